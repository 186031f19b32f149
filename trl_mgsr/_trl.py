"""The one place that imports TRL's GKD classes, with a clear error when the installed TRL lacks them."""

import warnings

SUPPORTED_TRL = ">=1.16,<2"

try:
    with warnings.catch_warnings():  # we depend on trl.experimental on purpose; its warning is noise for our users
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as err:  # pragma: no cover - exercised by test_import_guard with a fake module
    try:
        from importlib.metadata import version

        found = version("trl")
    except Exception:
        found = "not installed"
    raise ImportError(
        f"trl_mgsr needs TRL {SUPPORTED_TRL} (its `trl.experimental.gkd.GKDTrainer`), but found trl {found}. "
        f"Install a supported version: pip install 'trl{SUPPORTED_TRL}'."
    ) from err

__all__ = ["GKDConfig", "GKDTrainer", "SUPPORTED_TRL"]
