"""Training the DAC-KL band sub-network beside the student (`dac_mode="learned"`).

`DACBandNet` is not part of the model the `Trainer` wraps, so what the `Trainer` does for the student is done here
for it: a parameter group in the main optimizer (so it follows the learning-rate schedule), or an AdamW of its own
at a constant `dac_learning_rate` under DeepSpeed/FSDP (whose engines take only model parameters) and when the
user passed a scheduler (built over the optimizer's existing groups); gradient clipping with the student;
averaging its gradients over ranks; skipping the step whose fp16 gradients overflowed; zeroing its gradients after
each step; and its state in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from .losses import DACBandNet


class BandTraining:
    """The band sub-network `net` and its optimisation; `MGSRTrainer` calls it at fixed points of a step."""

    def __init__(self, args, device):
        with torch.random.fork_rng(devices=[]):  # same initial weights on every rank, global RNG untouched
            torch.manual_seed(args.seed)
            self.net = DACBandNet.from_config(args).to(device)
        self.learning_rate = args.dac_learning_rate
        self.optimizer: torch.optim.Optimizer | None = None  # only when it cannot join the main optimizer

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.net.parameters())

    def attach(self, optimizer: torch.optim.Optimizer, own_optimizer: bool) -> None:
        """Give the band a parameter group in `optimizer` (its learning rate, no weight decay), or, with
        `own_optimizer`, an AdamW of its own. Idempotent: `create_optimizer` may run more than once."""
        params = self.parameters()
        if own_optimizer:
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)
        elif not any(p is params[0] for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": params, "lr": self.learning_rate, "weight_decay": 0.0})

    def clip_grad_norm(self, model, max_norm: float, accelerator, clip_student: Callable, mixed_mesh: bool):
        """Clip with the student: one global norm over both when the band is in the main optimizer (and the student's
        gradients are not sharded over mixed meshes); otherwise the band alone and `clip_student(model)` for the
        student. Returns the norm the `Trainer` logs."""
        if self.optimizer is None and not mixed_mesh:
            return accelerator.clip_grad_norm_([*model.parameters(), *self.parameters()], max_norm)
        torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        return clip_student(model)

    def average_gradients(self, num_processes: int) -> None:
        """Average the band's gradients over ranks, as DDP does for the student (the band is not wrapped)."""
        if num_processes == 1:
            return
        params = self.parameters()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= num_processes
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def finish_step(self) -> None:
        """After the main optimizer's step: step the band's own optimizer, except on a step whose gradients overflowed
        (fp16 loss scaling: the engine skips that step too); then zero the band's gradients (the `Trainer` only
        zeroes the model's)."""
        if self.optimizer is not None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            if grads and all(torch.isfinite(g).all() for g in grads):
                self.optimizer.step()
        self.net.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """`band_net` and, when it has its own, `band_optimizer` (otherwise its state is in the main optimizer's)."""
        state = {"band_net": self.net.state_dict()}
        if self.optimizer is not None:
            state["band_optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["band_net"])
        if self.optimizer is not None and "band_optimizer" in state:
            self.optimizer.load_state_dict(state["band_optimizer"])

    def callback(self) -> TrainerCallback:
        """The callback that calls `finish_step` after each optimizer step."""
        return _FinishBandStep(self)


class _FinishBandStep(TrainerCallback):
    def __init__(self, band: BandTraining):
        self.band = band

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.band.finish_step()
