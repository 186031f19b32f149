"""The `LossTerm` contract shared by every MGSR loss, the SFT term (reference and chunked) and chunking helpers.

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


def log_softmax32(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 `log_softmax(x / temperature)` over the last dim (`x` is never modified; differentiable)."""
    if temperature != 1.0:
        x = x.float() / temperature
    return torch.log_softmax(x, dim=-1, dtype=torch.float32)


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product `[n]` of `[n, V]` tensors without an `[n, V]` temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def chunk_rows(rows: torch.Tensor, chunk_size: int):
    """Yield `(positions slice, rows)` per chunk; `rows` is a slice (a view, no copy) when the rows are consecutive."""
    bounds = rows.tolist()
    for start in range(0, len(bounds), chunk_size):
        end = min(start + chunk_size, len(bounds))
        first, last = bounds[start], bounds[end - 1]
        r = slice(first, last + 1) if last - first == end - start - 1 else rows[start:end]
        yield slice(start, end), r


def labelled_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices `[n]` (ascending) of the positions of `labels` that are not `IGNORE_INDEX`."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)


def row_grad_buffer(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A gradient buffer like `flat` `[N, V]` whose rows outside `rows` are zero (they carry no label)."""
    return (torch.empty_like if rows.numel() == flat.shape[0] else torch.zeros_like)(flat)


def write_rows(buffer: torch.Tensor, r, values: torch.Tensor) -> None:
    """`buffer[r] = values` for a `chunk_rows` chunk `r` (a slice, or an index tensor of rows)."""
    if isinstance(r, slice):
        buffer[r] = values
    else:
        buffer.index_copy_(0, r, values.to(buffer.dtype))


def scale_saved_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """`grad * grad_output` for a gradient precomputed in forward, in place (no second logits-sized buffer).

    In place means autograd's version check refuses a second backward through the same graph, as it should.
    """
    if torch.equal(grad_output, torch.ones_like(grad_output)):
        return grad
    return grad.mul_(grad_output.item())


def chunked_sft_loss(student_logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> LossTerm:
    """`sft_loss` (same sum, count and gradient) computed `chunk_size` completion positions at a time.

    The working set is one float32 `[chunk, V]` tensor (two when a chunk's rows are not consecutive, since they are
    gathered first) instead of `[tokens, V]` ones; the gradient w.r.t. the logits is computed during forward and
    kept in the logits' dtype (one tensor of their size, as any loss needs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_sft_loss: chunk_size must be >= 1, got {chunk_size}")
    rows = labelled_rows(labels)
    total = -chunked_token_logprobs(student_logits, labels, rows, chunk_size).sum()
    return LossTerm(total=total, num_items=rows.new_tensor(rows.numel()), stats={})


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """`log softmax(logits)[target]` of rows `[n]`; the gradient (one-hot - softmax) is computed in forward."""

    @staticmethod
    def forward(ctx, logits_flat, targets, rows, chunk_size):
        need_grad = ctx.needs_input_grad[0]
        grad = row_grad_buffer(logits_flat, rows) if need_grad else None
        out = torch.empty(rows.numel(), device=logits_flat.device)
        for sl, r in chunk_rows(rows, chunk_size):
            work = torch.log_softmax(logits_flat[r], dim=-1, dtype=torch.float32)
            target = targets[r].unsqueeze(-1)
            out[sl] = work.gather(-1, target).squeeze(-1)
            if need_grad:  # one-hot - softmax, in place
                work.exp_().neg_().scatter_add_(-1, target, torch.ones_like(target, dtype=torch.float32))
                write_rows(grad, r, work)
            del work
        if need_grad:
            ctx.save_for_backward(grad, rows)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad, rows = ctx.saved_tensors
        scale = torch.zeros(grad.shape[0], dtype=grad.dtype, device=grad.device)
        scale[rows] = grad_out.to(grad.dtype)
        return grad.mul_(scale[:, None]), None, None, None


def chunked_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                           chunk_size: int = 1024) -> torch.Tensor:
    """Log-probability `[n]` (float32, differentiable) of `targets` under `logits` at the flat positions `rows`.

    `logits`: `[B, T, V]`, `targets`: `[B, T]` (read at `rows` only). Works `chunk_size` rows at a time: the working
    set is one float32 `[chunk, V]` tensor, and the gradient w.r.t. the logits (computed in forward, in their dtype)
    is the one tensor of their size.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    return _ChunkedTokenLogProbs.apply(flat, targets.reshape(-1), rows, chunk_size)
