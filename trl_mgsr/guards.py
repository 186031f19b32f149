"""Fail loud instead of training on, or saving, garbage: non-finite values, empty datasets, mistyped model paths.

`MGSRTrainer` calls these from short hooks:
- `check_loss` (every `compute_loss`): the reduced loss must be finite; on the first batch the teacher's and the
  student's logits are also checked in full. A failure names the model whose logits are non-finite (or the term
  when both are finite), the global step and the terms, before the backward pass or any optimizer step.
- `finite_logits` (around on-policy sampling, SCRG and `seq_kd` sampling): a forward hook on each model's output
  layer, so that neither sampling nor SCRG ever acts on non-finite logits (SCRG's divergences come from them).
- `check_grad_norm` (before each optimizer step) and `check_weights` (before each save).
- `check_datasets` and `check_model_path` (at construction).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

#: Hub ids have at most one "/"; anything else with these marks is a local path.
_LOCAL_PREFIXES = (".", "/", "~")


class NonFiniteError(FloatingPointError):
    """Training hit NaN or inf; the message names the model, the global step and the term."""


def _step(trainer, training: bool | None = None) -> str:
    """Where training is, for a message; `training` overrides the student's mode (which sampling may change)."""
    training = trainer.model.training if training is None else training
    return f"global step {trainer.state.global_step}" + ("" if training else " (evaluation)")


def _has_non_finite(logits: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bool:
    """Whether `logits` `[B, T, V]` has a NaN/inf at an attended position; one row at a time (no `[B, T, V]` copy)."""
    for b in range(logits.shape[0]):
        bad = ~torch.isfinite(logits[b]).all(-1)
        if attention_mask is not None:
            bad &= attention_mask[b].bool()
        if bad.any():
            return True
    return False


def _fail(trainer, model: str, where: str, training: bool | None = None) -> None:
    hint = {
        "teacher": "the teacher model is broken (NaN/inf weights, or a dtype that overflows, e.g. float16); check "
        "it with a plain forward pass",
        "student": "the student diverged or was loaded broken; lower learning_rate, keep max_grad_norm > 0, or use "
        "bf16/float32 instead of float16",
    }[model]
    raise NonFiniteError(
        f"MGSRTrainer: the {model}'s logits are non-finite (NaN/inf) at {_step(trainer, training)}, {where}: {hint}. "
        "Training stopped before any optimizer step or save used them."
    )


def check_loss(trainer, loss, terms: dict[str, Any], student_logits, teacher_logits, attention_mask) -> None:
    """Raise when the reduced loss is non-finite; on the first batch, also when either model's logits are."""
    first = not getattr(trainer, "_mgsr_logits_checked", False)
    if torch.isfinite(loss).all() and not first:
        return
    trainer._mgsr_logits_checked = True
    bad_terms = [name for name, term in terms.items() if not torch.isfinite(term.total).all()]
    where = f"term(s) {', '.join(bad_terms)}" if bad_terms else "checking the first batch"
    for model, logits in (("teacher", teacher_logits), ("student", student_logits)):
        if _has_non_finite(logits.detach(), attention_mask):
            _fail(trainer, model, where)
    if not torch.isfinite(loss).all():
        raise NonFiniteError(
            f"MGSRTrainer: the loss is non-finite at {_step(trainer)} (term(s) {', '.join(bad_terms) or 'sum'}) "
            "although both models' logits are finite; report this with the config (e.g. dac_temperature, weights)."
        )


@contextlib.contextmanager
def finite_logits(trainer, model, name: str, where: str) -> Iterator[None]:
    """Within the block, every forward of `model` checks its output layer's logits and raises naming `name`."""
    training = trainer.model.training  # as the block starts: sampling runs the student in eval mode
    unwrapped = trainer.accelerator.unwrap_model(model)
    head = unwrapped.get_output_embeddings() if hasattr(unwrapped, "get_output_embeddings") else None
    if head is None:  # not a transformers LM: nothing to hook
        yield
        return

    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        if isinstance(logits, torch.Tensor) and not torch.isfinite(logits).all():
            _fail(trainer, name, where, training)

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_grad_norm(trainer, grad_norm) -> None:
    """Non-finite gradients before the optimizer step (fp16 overflow steps are skipped by the scaler: not checked)."""
    if trainer.args.fp16 or grad_norm is None:
        return
    if not torch.isfinite(torch.as_tensor(grad_norm)).all():
        raise NonFiniteError(
            f"MGSRTrainer: the student's gradients are non-finite (grad norm {float(grad_norm)}) at {_step(trainer)}, "
            "before the optimizer step: lower learning_rate, check the loss weights, or use bf16/float32 instead of "
            "float16. The weights were not updated."
        )


def check_weights(trainer) -> None:
    """Never save a student with NaN/inf weights (this rank's parameters; sharded ones are checked per shard)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, param in model.named_parameters():
        if param.numel() and not torch.isfinite(param.detach()).all():
            raise NonFiniteError(
                f"MGSRTrainer: the student's weight {name} is non-finite (NaN/inf) at {_step(trainer)}; refusing "
                "to save it. Lower learning_rate or use bf16/float32 instead of float16."
            )


# ---------------------------------------------------------------------------------------------- construction


def check_datasets(named_datasets) -> None:
    """One clear error for a dataset without rows (an empty file, a zero-row split, every row filtered out)."""
    import datasets

    for name, dataset in named_datasets:
        if isinstance(dataset, datasets.IterableDataset):
            empty = next(iter(dataset), None) is None
        else:
            try:
                empty = len(dataset) == 0
            except TypeError:  # a torch IterableDataset without a length
                continue
        if empty:
            raise ValueError(
                f"{name} has no rows (an empty file or split, or every row filtered out); give it at least one row"
                + (" or pass eval_dataset=None" if name.startswith("eval") else "")
            )


def looks_local(path: str) -> bool:
    """Whether a model name is meant as a local directory rather than a Hub id `name` or `org/name`.

    Local: it starts with `.`, `/` or `~`, contains a backslash or more than one `/`, or its first component is an
    existing local directory (e.g. `mgsr-demo/teachr` next to `mgsr-demo/`).
    """
    if path.startswith(_LOCAL_PREFIXES) or "\\" in path or path.count("/") > 1:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def check_model_path(path, what: str) -> None:
    """A local-looking path that does not exist is an error ("no such model directory"), never a Hub lookup."""
    if isinstance(path, str) and looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"{what} {path}: no such model directory"
            + ("" if os.path.exists(os.path.expanduser(path)) else " (check the path; Hub ids look like org/name)")
        )
