"""The `LossTerm` contract shared by every MGSR loss, and the SFT term.

Convention for every term function: inputs are already shifted so that position `k` of `student_logits`
`[B, T, V]` predicts `labels[:, k]` (`[B, T]`, -100 = not a completion token). The function returns *sums* over its
items (tokens, or span pairs) and the item count; the trainer divides by the count taken over the whole
gradient-accumulation window and all ranks, which keeps accumulation and data parallelism exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions that are not completion tokens


class LossTerm(NamedTuple):
    """One loss term of a micro-batch.

    total: scalar, the loss summed over the term's items (differentiable).
    num_items: scalar long tensor, the number of items summed (tokens or span pairs).
    stats: detached scalars summed over the same items, for metrics (the trainer logs `stat / num_items`).
    """

    total: torch.Tensor
    num_items: torch.Tensor
    stats: dict[str, torch.Tensor]


def sft_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> LossTerm:
    """Cross-entropy of `student_logits` `[B, T, V]` on `labels` `[B, T]` (-100 ignored), summed over tokens."""
    mask = labels != IGNORE_INDEX
    total = F.cross_entropy(student_logits[mask].float(), labels[mask], reduction="sum")  # 0 with no tokens
    return LossTerm(total=total, num_items=mask.sum(), stats={})
