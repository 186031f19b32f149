"""Data schedules: where each micro-batch's distillation sequence comes from (DESIGN.md §5).

Both schedules draw from one `random.Random` that is seeded identically on every rank and drawn the same number of
times there, so every rank takes the same decision without communicating.

Each `decide` returns `STUDENT` (sample afresh), `REPLAY` (reuse buffered samples) or `OFF_POLICY` (the trainer
then uses the teacher's sample with `seq_kd`, the dataset completion otherwise).

- `GKDSchedule`: GKD's coin, a student sample with probability `lmbda`.
- `AdaptiveSchedule`: DistiLLM's adaptive off-policy schedule. A student-sample (SGO) micro-batch happens with
  probability `threshold`, which starts at `init_threshold` and grows by `threshold_step` whenever the evaluation
  loss rises by more than `loss_eps` over the previous evaluation. An SGO micro-batch is replayed from a buffer of
  earlier (SCRG-revised) samples with probability `replay_ratio(progress)`, decreasing linearly from
  `ratio_start` to `ratio_end` over training, and generated afresh otherwise; fresh samples enter the buffer.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import torch

STUDENT, REPLAY, OFF_POLICY = "student", "replay", "off_policy"


class GKDSchedule:
    def __init__(self, rng: random.Random, lmbda: float):
        self.rng, self.lmbda = rng, lmbda

    def decide(self, progress: float = 0.0, batch_size: int = 1) -> str:
        return STUDENT if self.rng.random() < self.lmbda else OFF_POLICY

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])


class ReplayBuffer:
    """FIFO buffer of distillation samples; each sample is a dict of 1-D CPU tensors without padding."""

    def __init__(self, capacity: int):
        self.samples: deque[dict[str, torch.Tensor]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.samples)

    def add_batch(self, batch: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
        """Store each row of `batch` (left-padded `[B, T]` tensors) trimmed to its attention mask."""
        mask = batch["attention_mask"].bool().cpu()
        for row in range(mask.shape[0]):
            self.samples.append({k: batch[k][row].detach().cpu()[mask[row]] for k in keys if k in batch})

    def sample(self, k: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
        """`k` distinct samples (never the same sample twice in one batch)."""
        return [self.samples[i] for i in rng.sample(range(len(self.samples)), k)]


class AdaptiveSchedule:
    def __init__(
        self,
        rng: random.Random,
        init_threshold: float = 0.0,
        threshold_step: float = 0.1,
        loss_eps: float = 0.1,
        capacity: int = 1000,
        ratio_start: float = 0.5,
        ratio_end: float = 0.0,
    ):
        self.rng = rng
        self.threshold = init_threshold
        self.threshold_step, self.loss_eps = threshold_step, loss_eps
        self.ratio_start, self.ratio_end = ratio_start, ratio_end
        self.buffer = ReplayBuffer(capacity)
        self.last_eval_loss: float | None = None

    def replay_ratio(self, progress: float) -> float:
        """Share of SGO micro-batches replayed at `progress` in [0, 1] of training."""
        progress = min(max(progress, 0.0), 1.0)
        return self.ratio_start + (self.ratio_end - self.ratio_start) * progress

    def decide(self, progress: float, batch_size: int) -> str:
        """Two draws per micro-batch, always (so the draw count never depends on local state)."""
        use_student, use_replay = self.rng.random(), self.rng.random()
        if use_student >= self.threshold:
            return OFF_POLICY
        if use_replay < self.replay_ratio(progress) and len(self.buffer) >= batch_size:
            return REPLAY
        return STUDENT

    def on_eval_loss(self, loss: float) -> None:
        """Raise the SGO probability when the evaluation loss rose by more than `loss_eps`."""
        if self.last_eval_loss is not None and loss - self.last_eval_loss > self.loss_eps:
            self.threshold = min(1.0, self.threshold + self.threshold_step)
        self.last_eval_loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "threshold": self.threshold,
            "last_eval_loss": self.last_eval_loss,
            "buffer": list(self.buffer.samples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.threshold, self.last_eval_loss = state["threshold"], state["last_eval_loss"]
        self.buffer.samples.clear()
        self.buffer.samples.extend(state["buffer"])


def schedule_from_config(args) -> GKDSchedule | AdaptiveSchedule:
    """The schedule an `MGSRConfig` names, on one RNG seeded with `args.seed` (the same decisions on every rank)."""
    rng = random.Random(args.seed)
    if args.schedule == "adaptive":
        return AdaptiveSchedule(rng, args.init_threshold, args.threshold_step, args.loss_eps, args.replay_capacity,
                                args.replay_ratio_start, args.replay_ratio_end)
    return GKDSchedule(rng, args.lmbda)
