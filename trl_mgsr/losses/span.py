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

Note that log p_k + log p_{k+1} = z_k + z_{k+1} - const (z: logits), so Ĉ = softmax(z_k + z_{k+1}): the
normalised correlation is the distribution of the summed logits of the two positions.

`span_loss` is the reference (literal formula, all pairs at once, autograd). `chunked_span_loss` uses the identity
above and closed-form gradients, `chunk_size` pairs at a time, in forward and again in backward (recomputation),
so that the float32 working memory is one `[chunk, V]` tensor per model (plus transients) instead of several
`[pairs, V]`; it matches the reference in value and gradient (tests).
"""

from __future__ import annotations

import torch

from ..spans import span_groups, span_pair_mask
from .terms import LossTerm, chunked_token_logprobs, rowdot

SPAN_DISTANCES = ("kl", "l2", "l1")
SPAN_OBJECTIVES = ("loglik", "product")


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


def _pairs(student_logits, teacher_logits, labels, span_ids, distance, temperature):
    """The checked inputs' span pairs: batch and position indices `[P]` of each pair's first token, and `P`."""
    _check(student_logits, teacher_logits, labels, span_ids, distance, temperature)
    pairs = span_pair_mask(span_ids, labels)
    b, k = pairs.nonzero(as_tuple=True)
    return b, k, pairs.sum()


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
    b, k, num_items = _pairs(student_logits, teacher_logits, labels, span_ids, distance, temperature)
    if b.numel() == 0:
        return LossTerm(total=_zero(student_logits), num_items=num_items, stats={})
    s = student_logits.float() / temperature if temperature != 1.0 else student_logits.float()
    t = teacher_logits.detach().float() / temperature if temperature != 1.0 else teacher_logits.detach().float()
    log_cs = _log_corr(s[b, k].log_softmax(-1), s[b, k + 1].log_softmax(-1))
    log_ct = _log_corr(t[b, k].log_softmax(-1), t[b, k + 1].log_softmax(-1))
    total = _distance(log_ct, log_cs, distance).sum()
    return LossTerm(total=total, num_items=num_items, stats={})


def _log_corr_from_logits(logits: torch.Tensor, b: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """log Ĉ `[P, V]` float32 for the pairs (b, k), (b, k+1), straight from the logits.

    Since log p = z - logsumexp(z), log p_k + log p_{k+1} differs from z_k + z_{k+1} by a per-pair constant, which
    the normalisation removes: Ĉ = softmax((z_k + z_{k+1}) / temperature). One `[P, V]` float32 tensor.
    """
    z = logits[b, k].float()
    z += logits[b, k + 1]
    if temperature != 1.0:
        z /= temperature
    return z.log_softmax(-1)


def _chunk_value(student_logits, teacher_logits, b, k, distance, temperature) -> torch.Tensor:
    """Distance summed over one chunk of pairs. Two `[P, V]` float32 tensors (teacher, student)."""
    log_ct = _log_corr_from_logits(teacher_logits, b, k, temperature)
    log_cs = _log_corr_from_logits(student_logits, b, k, temperature)
    if distance == "kl":
        diff = log_cs.neg_().add_(log_ct)  # log ĉt - log ĉs
        diff.masked_fill_(torch.isneginf(log_ct), 0.0)  # ĉt == 0 exactly (-inf logits): the term is 0
        return rowdot(log_ct.exp_(), diff).sum()
    diff = log_ct.exp_().sub_(log_cs.exp_())
    return rowdot(diff, diff).sum() if distance == "l2" else diff.abs_().sum()


def _chunk_grad(student_logits, teacher_logits, b, k, distance, temperature) -> torch.Tensor:
    """Gradient `[P, V]` float32 of the chunk's summed distance with respect to (z_k + z_{k+1}) / temperature,
    the same for both positions of a pair. Two `[P, V]` float32 tensors (teacher, student)."""
    ct = _log_corr_from_logits(teacher_logits, b, k, temperature).exp_()
    cs = _log_corr_from_logits(student_logits, b, k, temperature).exp_()
    if distance == "kl":
        return cs.sub_(ct)  # d KL(ĉt || softmax(z)) / dz = ĉs - ĉt
    g = ct.neg_().add_(cs)  # ĉs - ĉt
    g = g.mul_(2.0) if distance == "l2" else g.sign_()  # d distance / d ĉs
    return g.sub_(rowdot(g, cs).unsqueeze(-1)).mul_(cs)  # softmax Jacobian: ĉs * (g - <g, ĉs>)


class _ChunkedSpanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, b, k, distance, temperature, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        with torch.no_grad():
            for start in range(0, b.numel(), chunk_size):
                sl = slice(start, start + chunk_size)
                total += _chunk_value(student_logits, teacher_logits, b[sl], k[sl], distance, temperature)
        ctx.save_for_backward(student_logits, teacher_logits, b, k)
        ctx.config = (distance, temperature, chunk_size)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        student_logits, teacher_logits, b, k = ctx.saved_tensors
        distance, temperature, chunk_size = ctx.config
        grad = torch.zeros_like(student_logits)
        scale = grad_output.float() / temperature
        with torch.no_grad():
            for start in range(0, b.numel(), chunk_size):
                bs, ks = b[start : start + chunk_size], k[start : start + chunk_size]
                g = _chunk_grad(student_logits, teacher_logits, bs, ks, distance, temperature)
                g = g.mul_(scale).to(grad.dtype)
                grad.index_put_((bs, ks), g, accumulate=True)
                grad.index_put_((bs, ks + 1), g, accumulate=True)
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

    Uses Ĉ = softmax((z_k + z_{k+1}) / temperature) (the normalisation cancels the two log-softmax constants) and
    the closed-form gradient with respect to z_k + z_{k+1}, which both positions of a pair receive. Forward keeps
    only the running sum; backward recomputes each chunk and adds its gradient into the `[B, T, V]` gradient of
    `student_logits`, so nothing of logits size is held between forward and backward. Working memory per chunk:
    one `[chunk_size, V]` float32 tensor per model (plus the `[chunk_size, V]` gathered logits in their own dtype
    and a transient of the same size inside log_softmax), never `[pairs, V]`. Works on non-contiguous logits
    (e.g. `logits[:, :-1]`) without copying them.
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    b, k, num_items = _pairs(student_logits, teacher_logits, labels, span_ids, distance, temperature)
    if b.numel() == 0:
        return LossTerm(total=_zero(student_logits), num_items=num_items, stats={})
    total = _ChunkedSpanLoss.apply(
        student_logits, teacher_logits.detach(), b, k, distance, float(temperature), chunk_size
    )
    return LossTerm(total=total, num_items=num_items, stats={})


def span_loglik_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    span_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> LossTerm:
    """Span log-likelihood consistency (the default span term): `total = sum over spans of (a_S - a_T)^2 / 2`,
    `num_items` = number of spans with at least one pair of adjacent labelled tokens.

    `a_S`, `a_T`: the student's and the teacher's mean log-probability per token of the span's tokens as they stand
    in the sequence (teacher-forced, temperature `temperature`). The tokens of a span share one error signal,
    `(a_S - a_T) / len`, so the term sees a phrase the student finds more (or less) likely than the teacher does as
    a whole, which the per-token term cannot; it is exactly 0, with zero gradient, when the student's token
    probabilities equal the teacher's. On the student's own samples `(log q - log p)^2 / 2` is the "k2" estimator
    of the span-level reverse KL, whose gradient is that KL's: a mode-seeking signal at the phrase level.
    Inputs as in `span_loss`; the student's log-probabilities are computed `chunk_size` positions at a time.
    """
    _check(student_logits, teacher_logits, labels, span_ids, "kl", temperature)
    rows, group, num_groups = span_groups(span_ids, labels)
    if rows.numel() == 0:
        return LossTerm(total=_zero(student_logits), num_items=num_groups, stats={})
    s = student_logits / temperature if temperature != 1.0 else student_logits
    t = teacher_logits.detach() / temperature if temperature != 1.0 else teacher_logits.detach()
    lp_s = chunked_token_logprobs(s, labels, rows, chunk_size)
    with torch.no_grad():
        lp_t = chunked_token_logprobs(t, labels, rows, chunk_size)
    size = torch.zeros(int(num_groups), device=rows.device).index_add_(0, group, torch.ones_like(lp_t))
    gap = torch.zeros_like(size).index_add(0, group, lp_s - lp_t) / size
    return LossTerm(total=0.5 * gap.square().sum(), num_items=num_groups,
                    stats={"gap": gap.detach().abs().sum()})
