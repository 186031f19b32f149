"""Process settings of the `trl-mgsr` commands and the examples: torch CPU threads, progress bars, known warnings."""

from __future__ import annotations

import warnings

#: Below this many parameters (all models of the run together) a CPU run uses one torch thread by default: tiny
#: models spend their time in per-op overhead that more threads only add to, and on a machine shared with other jobs
#: extra threads wait on each other (measured: README, "CPU threads").
SMALL_MODEL_PARAMETERS = 20_000_000

#: Deprecated transformers aliases that TRL's generation helper (`unwrap_model_for_generation`) calls on every
#: generation; the user cannot act on them.
_TRL_DEPRECATIONS = r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated"


def quiet_trl_deprecations() -> None:
    """Hide the FutureWarnings transformers raises when TRL's generation helper uses its deprecated aliases."""
    warnings.filterwarnings("ignore", message=_TRL_DEPRECATIONS, category=FutureWarning)


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{flag} must be an integer >= 1, got {threads!r}")


def configure_threads(threads: int | None, *models, device=None) -> int:
    """Set torch's CPU thread count and return it.

    `threads` set: use it. Otherwise, when the run is on the CPU and `models` have fewer than
    `SMALL_MODEL_PARAMETERS` parameters together, use 1; else leave torch's default.
    """
    import torch

    check_threads(threads)
    if threads is None:
        on_cpu = (torch.device(device).type == "cpu") if device is not None else not torch.cuda.is_available()
        size = sum(sum(p.numel() for p in m.parameters()) for m in models if m is not None)
        if on_cpu and size < SMALL_MODEL_PARAMETERS:
            threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def disable_progress_bars() -> None:
    """No transformers or datasets progress bars (model loading and saving included)."""
    from datasets.utils.logging import disable_progress_bar as disable_datasets_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_datasets_bars()
