"""Span correlation consistency loss (MGSR span level, DESIGN.md §4).

Convention (see `terms.py`): inputs are already shifted, so position k of `student_logits` `[B, T, V]` predicts
`labels[:, k]`, and `span_ids[:, k]` is the span of that token (`span_ids_from_tokens` output shifted like the
labels). The items are the adjacent pairs (k, k+1) inside one span (`span_pair_mask`). For each pair the
*correlation* of a model is the vocab-sized Hadamard product `C_k = p_k ⊙ p_{k+1}` of its probabilities at the two
positions. We compare the teacher's (detached) and the student's correlations after normalising each to sum 1:

    Ĉ = C / sum(C), computed in log space: log Ĉ = log p_k + log p_{k+1} - logsumexp(log p_k + log p_{k+1})

- `distance="kl"` (default): KL(Ĉ^teacher || Ĉ^student).
- `distance="l2"`: *squared* Euclidean distance `sum_v (Ĉ^t_v - Ĉ^s_v)^2`. Squared, because the plain norm's
  gradient is undefined where the student equals the teacher (the point training converges to).
- `distance="l1"`: `sum_v |Ĉ^t_v - Ĉ^s_v|` (twice the total-variation distance, in [0, 2]).

All three compare the *normalised* products. The raw products are tiny for almost every pair (two adjacent tokens
rarely share their likely tokens, so sum(C) is near 0) and l1/l2 on them would give almost no signal; the paper is
silent on this point, so this is our choice. `temperature` divides both models' logits; no T^2 factor is applied
(as in TRL's `generalized_jsd_loss`). Computation is in float32 whatever the logits' dtype.

`span_loss` is the reference (all pairs at once). `chunked_span_loss` processes `chunk_size` pairs at a time, in
forward and in backward (where each chunk is recomputed), so that the float32 working memory is a few
`[chunk, V]` tensors per model instead of `[pairs, V]`; it matches the reference in value and gradient.
"""

from __future__ import annotations

import torch

from ..spans import span_pair_mask
from .terms import LossTerm

SPAN_DISTANCES = ("kl", "l2", "l1")


def _check(student_logits, teacher_logits, labels, span_ids, distance, temperature) -> None:
    if distance not in SPAN_DISTANCES:
        raise ValueError(f"span distance must be one of {SPAN_DISTANCES}, got {distance!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    if student_logits.shape[:2] != labels.shape or labels.shape != span_ids.shape:
        raise ValueError(
            f"logits {tuple(student_logits.shape)}, labels {tuple(labels.shape)} and span_ids "
            f"{tuple(span_ids.shape)} are not aligned"
        )


def _zero(student_logits: torch.Tensor) -> torch.Tensor:
    """A float32 zero attached to the graph of `student_logits` (valid backward, zero gradient, never NaN)."""
    return student_logits.reshape(-1)[:0].float().sum()


def _log_corr(lp_a: torch.Tensor, lp_b: torch.Tensor) -> torch.Tensor:
    """log Ĉ = normalised log(p_a ⊙ p_b), from float32 log-probabilities `[P, V]`."""
    logc = lp_a + lp_b
    return logc - torch.logsumexp(logc, dim=-1, keepdim=True)


def _distance(log_ct: torch.Tensor, log_cs: torch.Tensor, distance: str) -> torch.Tensor:
    """Per-pair distance `[P]` between normalised teacher and student correlations given in log space."""
    ct = log_ct.exp()
    if distance == "kl":
        # ct * (log ct - log cs); where ct == 0 (log ct = -inf possible) the term is 0.
        return torch.where(ct > 0, ct * (log_ct - log_cs), 0.0).sum(-1)
    diff = ct - log_cs.exp()
    if distance == "l2":
        return diff.square().sum(-1)
    return diff.abs().sum(-1)


def span_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    span_ids: torch.Tensor,
    *,
    distance: str = "kl",
    temperature: float = 1.0,
) -> LossTerm:
    """Reference span correlation loss: `total` = sum over pairs of d(Ĉ^teacher_k, Ĉ^student_k), `num_items` = #pairs.

    `student_logits`, `teacher_logits`: `[B, T, V]` (teacher detached here); `labels`: `[B, T]` (-100 = not a
    completion token); `span_ids`: `[B, T]` (-1 = no span), aligned with `labels`. Holds several `[pairs, V]` float32
    tensors: use `chunked_span_loss` in training.
    """
    _check(student_logits, teacher_logits, labels, span_ids, distance, temperature)
    pairs = span_pair_mask(span_ids, labels)
    b, k = pairs.nonzero(as_tuple=True)
    num_items = pairs.sum()
    if b.numel() == 0:
        return LossTerm(total=_zero(student_logits), num_items=num_items, stats={})
    s = student_logits.float() / temperature if temperature != 1.0 else student_logits.float()
    t = teacher_logits.detach().float() / temperature if temperature != 1.0 else teacher_logits.detach().float()
    log_cs = _log_corr(s[b, k].log_softmax(-1), s[b, k + 1].log_softmax(-1))
    log_ct = _log_corr(t[b, k].log_softmax(-1), t[b, k + 1].log_softmax(-1))
    total = _distance(log_ct, log_cs, distance).sum()
    return LossTerm(total=total, num_items=num_items, stats={})


def _chunk_distance(s_u, t_u, ia, ib, distance, temperature) -> torch.Tensor:
    """Summed distance of one chunk from the gathered logits of its unique positions `[U, V]` (any dtype)."""
    s = s_u.float()
    t = t_u.float()
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    lp_s = s.log_softmax(-1)
    del s
    log_cs = _log_corr(lp_s[ia], lp_s[ib])
    del lp_s
    lp_t = t.log_softmax(-1)
    del t
    log_ct = _log_corr(lp_t[ia], lp_t[ib])
    del lp_t
    return _distance(log_ct, log_cs, distance).sum()


def _chunks(b: torch.Tensor, k: torch.Tensor, T: int, chunk_size: int):
    """Per chunk of pairs: (batch index, position) of its unique positions and, per pair, the index of its first and
    second position among them."""
    for start in range(0, b.numel(), chunk_size):
        fa = b[start : start + chunk_size] * T + k[start : start + chunk_size]
        uniq, inverse = torch.unique(torch.cat([fa, fa + 1]), return_inverse=True)
        n = fa.numel()
        yield uniq // T, uniq % T, inverse[:n], inverse[n:]


class _ChunkedSpanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, b, k, distance, temperature, chunk_size):
        T = student_logits.shape[1]
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        with torch.no_grad():
            for bu, ku, ia, ib in _chunks(b, k, T, chunk_size):
                total += _chunk_distance(student_logits[bu, ku], teacher_logits[bu, ku], ia, ib, distance, temperature)
        ctx.save_for_backward(student_logits, teacher_logits, b, k)
        ctx.config = (distance, temperature, chunk_size)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        student_logits, teacher_logits, b, k = ctx.saved_tensors
        distance, temperature, chunk_size = ctx.config
        grad = torch.zeros_like(student_logits)
        T = student_logits.shape[1]
        for bu, ku, ia, ib in _chunks(b, k, T, chunk_size):
            s_u = student_logits[bu, ku].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = _chunk_distance(s_u, teacher_logits[bu, ku], ia, ib, distance, temperature)
            (g,) = torch.autograd.grad(loss, s_u, grad_output)
            grad.index_put_((bu, ku), g, accumulate=True)
        return grad, None, None, None, None, None, None


def chunked_span_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    span_ids: torch.Tensor,
    *,
    distance: str = "kl",
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> LossTerm:
    """`span_loss` computed `chunk_size` pairs at a time (MGSRConfig.loss_chunk_size), with exact gradients.

    Forward keeps only the running sum; backward recomputes each chunk and writes its gradient into the
    `[B, T, V]` gradient of `student_logits`. Working memory: a few `[chunk_size, V]` float32 tensors per model
    (the log-probabilities of the chunk's unique positions, then its normalised log-correlations), never
    `[pairs, V]`. Works on non-contiguous logits (e.g. `logits[:, :-1]`) without copying them.
    """
    _check(student_logits, teacher_logits, labels, span_ids, distance, temperature)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    pairs = span_pair_mask(span_ids, labels)
    b, k = pairs.nonzero(as_tuple=True)
    num_items = pairs.sum()
    if b.numel() == 0:
        return LossTerm(total=_zero(student_logits), num_items=num_items, stats={})
    total = _ChunkedSpanLoss.apply(
        student_logits, teacher_logits.detach(), b, k, distance, float(temperature), chunk_size
    )
    return LossTerm(total=total, num_items=num_items, stats={})
