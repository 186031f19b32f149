"""MGSR's state in `Trainer` checkpoints, and the RNG of a resumed run.

A checkpoint holds, besides the student and its optimizer, `mgsr_state.pt` (`mgsr_state_<rank>.pt` with several
processes): the schedule (its RNG, adaptive threshold and replay buffer) and the band sub-network (with its optimizer
when it has its own). A resumed run restores the RNG before its first on-policy samples are drawn.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

STATE_FILE = "mgsr_state.pt"


class MGSRCheckpointing:
    """Mixin of `MGSRTrainer` (before `GKDTrainer` in its bases); expects `schedule` and `band` attributes."""

    _rng_resume: str | None = None  # checkpoint whose RNG state must be restored before generating

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._rng_resume = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_rng_state(self, checkpoint):
        """Restore RNG state before a resumed run's first generation, not after it.

        On a mid-epoch resume `Trainer` restores the RNG state after `get_batch_samples`, but the on-policy samples
        are drawn inside it; so the first window restores it itself (before generating) and the Trainer's later
        call is skipped. When the Trainer restores before the loop (resume at an epoch boundary) nothing changes.
        """
        if self._rng_resume == "restored":
            self._rng_resume = None
            return
        self._rng_resume = None
        super()._load_rng_state(checkpoint)

    def mgsr_state_dict(self) -> dict[str, Any]:
        """Everything MGSR owns that a resumed run needs and that is not part of the saved student: the schedule
        (RNG, adaptive threshold, replay buffer) and the band sub-network. Its optimizer state lives in the main
        optimizer's checkpoint (or here under DeepSpeed/FSDP, where it has its own optimizer)."""
        return {"schedule": self.schedule.state_dict(), **(self.band.state_dict() if self.band is not None else {})}

    def load_mgsr_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        if self.band is not None:
            self.band.load_state_dict(state)

    def _state_file(self) -> str:
        """`mgsr_state.pt`, or `mgsr_state_<rank>.pt` with several processes (each rank has its own replay buffer)."""
        return STATE_FILE if self.args.world_size == 1 else f"mgsr_state_{self.args.process_index}.pt"

    def _save_optimizer_and_scheduler(self, output_dir):
        """With the optimizer (on every backend, before the checkpoint is pushed): each rank's MGSR state."""
        super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)  # a rank may get here before rank 0 has created it
        torch.save(self.mgsr_state_dict(), os.path.join(output_dir, self._state_file()))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Runs on every backend (DeepSpeed included) once the optimizers exist."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_mgsr_checkpoint(checkpoint)

    def load_mgsr_checkpoint(self, checkpoint: str) -> None:
        """Load this rank's MGSR state from a checkpoint directory; one written with another number of processes
        falls back to the first rank's state."""
        for name in (self._state_file(), STATE_FILE, "mgsr_state_0.pt"):
            path = os.path.join(checkpoint, name)
            if os.path.isfile(path):
                self.load_mgsr_state_dict(torch.load(path, map_location="cpu", weights_only=False))
                return

    def restore_rng_before_generating(self) -> None:
        """At the first window of a resumed run: restore the checkpoint's RNG state now (see `_load_rng_state`)."""
        if self._rng_resume is not None:
            checkpoint, self._rng_resume = self._rng_resume, "restored"
            super()._load_rng_state(checkpoint)
