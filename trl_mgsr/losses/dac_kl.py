"""DAC-KL: distribution-adaptive clipping KL (DESIGN.md §3), with its band sub-network.

Per completion position the teacher distribution `p = softmax(teacher / T)` is sorted by probability; token `i`
then covers the interval `[c_prev_i, c_i]` of cumulative sorted mass. A band `(lo, hi)` on that axis (fixed, or
predicted per position by `DACBandNet`) keeps the tokens whose interval overlaps it, through the soft mask

    m_i = sigmoid(s * (c_i - lo)) * sigmoid(s * (hi - c_prev_i)),     s = sharpness,

where an edge at `lo <= 0` or `hi >= 1` given as a number is hard (its factor is exactly 1), so the fixed band
`[0, 1]` keeps exactly every token. The clipped teacher is `p~ = m * p / sum(m * p)`.

Student support:
  * `"full"` (default): a divergence between `p~` and `q = softmax(student / T)`: `KL(p~ || q)`
    (`divergence="forward"`), `KL(q || p~)` (`"reverse"`), GKD's generalised JSD (`"jsd"`, `beta`) or DistiLLM's
    skew KL / skew reverse KL (`"skew_forward"`, `"skew_reverse"`, `skew`) or AKL's per-position mix of forward and
    reverse KL (`"adaptive"`); see `_divergence`. The band selects
    the target, the divergence is a separate choice. Everything is computed in log space with the analytic log-mask
    (`log m = logsigmoid(.) + logsigmoid(.)`), which is finite for every token because the soft mask is never 0.
    So the reverse KL is finite: student mass outside the band pays about `s * distance-to-band` nats per unit of
    mass (bounded by `s`), i.e. reverse DAC-KL pushes the student's mass into the band rather than being infinite.
  * `"band"`: teacher and student are compared on the kept tokens, with all clipped mass lumped into one extra
    outcome: `P = (m * p, 1 - sum(m * p))`, `Q = (m * q, 1 - sum(m * q))`, loss `KL(P || Q)` (or `KL(Q || P)`).
    This equals `Z_p * KL(p~ || q~) + KL(Bernoulli(Z_p) || Bernoulli(Z_q))` with `q~ = renormalise(m * q)`.
    Our choice: the literal `KL(p~ || q~)` is exactly 0 for any student on a band holding a single token, so the
    sub-network could switch distillation off; the lumped outcome keeps the kept-mass mismatch in the loss.

Guarantees (tested): the kept teacher mass `sum(m * p)` is at least `∫_0^1 sigmoid(s(x - lo)) sigmoid(s(hi - x)) dx
>= (hi - lo) - 2 ln(2) / s` (each token's mask is at least the continuous mask at any point of its interval), so
with `DACBandNet` it is at least `min_width - 2 ln(2) / s`; the loss is 0 when the student equals the clipped
teacher (`"full"`) or the teacher (`"band"`).

Rescue (`rescue = r > 0`, "full" support; MGSRConfig's `dac_rescue_weight`, on the dataset's sequences): per position
`+ r * -log(K)`, `K = sum_i m_i q_i` the student's mass inside the band, with the mask held constant (the rescue
never moves the band). The reverse KL's gradient w.r.t. the student's logits, `-q (D + L)` with `D = log p~ - log q`,
vanishes as the student concentrates on any one token, a rejected one included (on a point mass at token j,
`D_j + L = 0` and `q_i ~ 0` elsewhere): a position the student has confidently wrong is a plateau however large its
loss. The rescue's gradient `r (q - m q / K)` does not vanish there: it moves the mass outside the band into it, in
the student's own proportions among the kept tokens (it does not impose the teacher's shape inside the band, which
stays the divergence's job), and its size, `2 r (1 - K)` in L1, is ~0 wherever the student keeps its mass in the band.
(A first form, `r (1 - K) KL(p~ || q)`, pulled toward the clipped teacher's whole shape; it cost `sort`/`pick` in the
lab: MGSRConfig's docstring.)

`top_k`: only the teacher's top-k tokens are sorted; the other tokens share the mask of the interval `[c_k, 1]`.

Every function follows the `LossTerm` contract: sums over valid positions (`labels != -100`) and their count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .terms import (LossTerm, chunk_rows, labelled_rows, log_softmax32, row_grad_buffer, rowdot, scale_saved_grad,
                    write_rows)

# Clamp of the inverse sigmoid that initialises DACBandNet at band edges like lo=0. Not smaller: an edge started at
# sigmoid(b) = 1e-4 gets a gradient 1e-4 times too small and never moves (measured); at 0.02 the start band differs
# from the asked one by at most 2 % of the free width, and the soft mask of an edge that close to 0 is ~1 anyway.
_INIT_EPS = 0.02


class DACBandNet(nn.Module):
    """Predicts a band `(lo, hi)` on the teacher's cumulative sorted mass from its top sorted probabilities.

    `forward(features [..., F]) -> (lo [...], hi [...])`, features = top-`num_features` teacher probabilities in
    descending order (shorter inputs are zero-padded). One hidden layer (GELU). Output parametrisation:
    `width = min_width + (1 - min_width) * sigmoid(a)`, `lo = (1 - width) * sigmoid(b)`,
    `hi = 1 - (1 - width) * sigmoid(-b)`, so always `0 <= lo < hi <= 1` and `hi - lo = width >= min_width`.
    The last layer starts at zero weights, so the initial band is `(init_lo, init_hi)` (up to 2 % of the free
    slack, the inverse-sigmoid clamp that keeps an edge at 0 or 1 movable) whatever the input. Computes in float32 whatever the input dtype.
    """

    def __init__(
        self,
        num_features: int = 32,
        hidden_size: int = 256,
        min_width: float = 0.5,
        init_lo: float = 0.0,
        init_hi: float = 0.95,
    ):
        super().__init__()
        if not 0 < min_width <= 1:
            raise ValueError(f"DACBandNet: min_width must be in (0, 1], got {min_width}")
        if not 0 <= init_lo < init_hi <= 1 or init_hi - init_lo < min_width - 1e-9:
            raise ValueError(
                f"DACBandNet: the initial band [{init_lo}, {init_hi}] must satisfy 0 <= lo < hi <= 1 and "
                f"hi - lo >= min_width={min_width}"
            )
        self.num_features = num_features
        self.min_width = float(min_width)
        self.hidden = nn.Linear(num_features, hidden_size)
        self.out = nn.Linear(hidden_size, 2)
        width = init_hi - init_lo
        free = (width - min_width) / (1 - min_width) if min_width < 1 else 0.5
        start = init_lo / (1 - width) if width < 1 else 0.5
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(torch.tensor([_logit(free), _logit(start)]))

    @classmethod
    def from_config(cls, config) -> DACBandNet:
        """The sub-network an `MGSRConfig` describes (`dac_features`, `dac_hidden_size`, `dac_min_width`,
        starting band `(dac_lo, dac_hi)`)."""
        return cls(config.dac_features, config.dac_hidden_size, config.dac_min_width, config.dac_lo, config.dac_hi)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = features.float()
        if x.shape[-1] != self.num_features:
            x = F.pad(x, (0, self.num_features - x.shape[-1])) if x.shape[-1] < self.num_features else (
                x[..., : self.num_features])
        h = F.gelu(F.linear(x, self.hidden.weight.float(), self.hidden.bias.float()))
        a, b = F.linear(h, self.out.weight.float(), self.out.bias.float()).unbind(-1)
        slack = (1 - self.min_width) * torch.sigmoid(-a)  # = 1 - width
        return slack * torch.sigmoid(b), 1 - slack * torch.sigmoid(-b)


def _logit(x: float) -> float:
    x = min(max(x, _INIT_EPS), 1 - _INIT_EPS)
    return math.log(x / (1 - x))


DIVERGENCES = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "adaptive")
STUDENT_SUPPORTS = ("full", "band")


@dataclass(frozen=True)
class DACKLSettings:
    """The options of `dac_kl_loss` and `chunked_dac_kl_loss` (MGSRConfig's `dac_*` fields), checked on creation.

    lo, hi: the fixed band (used when no band sub-network or explicit band is given; `min_width` only checks it).
    sharpness: slope `s` of the soft band edges. student_support: "full" or "band" (module docstring).
    divergence: one of `DIVERGENCES`; beta: JSD interpolation (in [0, 1]); skew: skew-KL mixing (in [0, 1)).
    temperature: divides both models' logits. rescue: weight `r` of the rescue (module docstring). num_features:
    teacher probabilities fed to the band sub-network (a given `band_net`'s own count wins). top_k: sort only the
    teacher's top-k tokens (None: the whole vocabulary).
    """

    lo: float = 0.0
    hi: float = 0.95
    min_width: float = 0.5
    sharpness: float = 50.0
    student_support: str = "full"
    divergence: str = "forward"
    temperature: float = 1.0
    num_features: int = 32
    top_k: int | None = None
    beta: float = 0.5
    skew: float = 0.1
    rescue: float = 0.0

    def __post_init__(self):
        if self.student_support not in STUDENT_SUPPORTS:
            raise ValueError(f"dac_kl_loss: student_support must be 'full' or 'band', got {self.student_support!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"dac_kl_loss: divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.student_support == "band" and self.divergence not in ("forward", "reverse"):
            raise ValueError(f"dac_kl_loss: student_support='band' takes divergence 'forward' or 'reverse', got "
                             f"{self.divergence!r}")
        if not (0 <= self.beta <= 1 and 0 <= self.skew < 1):
            raise ValueError(f"dac_kl_loss: beta must be in [0, 1] and skew in [0, 1), got {self.beta}, {self.skew}")
        if self.sharpness <= 0 or self.temperature <= 0:
            raise ValueError("dac_kl_loss: sharpness and temperature must be > 0")
        if self.rescue < 0 or (self.rescue > 0 and self.student_support != "full"):
            raise ValueError(f"dac_kl_loss: rescue must be >= 0, and 0 with student_support='band', got {self.rescue}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"dac_kl_loss: top_k must be None or >= 1, got {self.top_k}")


def _settings(student_logits, teacher_logits, labels, band_net, settings: dict) -> DACKLSettings:
    """The checked settings of one call: shapes, options, the fixed band when no `band_net` predicts it."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dac_kl_loss: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits differ in shape")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"dac_kl_loss: labels {tuple(labels.shape)} do not match logits "
                         f"{tuple(student_logits.shape)}")
    opts = DACKLSettings(**settings)
    if band_net is None and not (0 <= opts.lo < opts.hi <= 1 and opts.hi - opts.lo >= opts.min_width - 1e-9):
        raise ValueError(f"dac_kl_loss: fixed band [{opts.lo}, {opts.hi}] needs 0 <= lo < hi <= 1 and width >= "
                         f"{opts.min_width}")
    return opts if band_net is None else replace(opts, num_features=band_net.num_features)


def _features(teacher_logits: torch.Tensor, temperature: float, num_features: int) -> torch.Tensor:
    """Top-`num_features` teacher probabilities `[N, F]` (float32, descending, zero-padded) of logits `[N, V]`."""
    lp = log_softmax32(teacher_logits, temperature)
    top = lp.topk(min(num_features, lp.shape[-1]), dim=-1).values.exp()
    return F.pad(top, (0, num_features - top.shape[-1]))


def band_features(teacher_flat: torch.Tensor, rows: torch.Tensor, temperature: float, num_features: int,
                  chunk_size: int = 1024) -> torch.Tensor:
    """`_features` `[n, F]` of the teacher rows `teacher_flat[rows]`, `chunk_size` rows at a time (no grad)."""
    with torch.no_grad():
        if rows.numel() == 0:
            return teacher_flat.new_zeros(0, num_features, dtype=torch.float32)
        return torch.cat([_features(teacher_flat[r], temperature, num_features) for _, r in chunk_rows(rows, chunk_size)])


def band_label_loss(lo: torch.Tensor, hi: torch.Tensor, teacher_flat: torch.Tensor, rows: torch.Tensor,
                    targets_flat: torch.Tensor, *, sharpness: float = 50.0, width_cost: float = 0.1,
                    temperature: float = 1.0, chunk_size: int = 1024) -> LossTerm:
    """The band sub-network's own objective (`dac_band_objective="label"`): keep the ground-truth token, narrowly.

    For each position (rows of `teacher_flat` `[N, V]`, ground-truth token `targets_flat[rows]`, band `lo`, `hi`
    `[n]`), the token's interval `[c_prev, c]` of the teacher's sorted cumulative mass gives its soft keep mask
    `m = sigmoid(s (c - lo)) sigmoid(s (hi - c_prev))`; the loss is `-log m + width_cost (hi - lo)`, summed.
    It involves the teacher and the data only, never the student, so the band cannot move the target toward the
    student; `lo` rises where the truth tends to lie below the teacher's head, `hi` falls where it never lies in the
    tail. `stats["coverage"]` sums `m`.
    """
    c_prev = torch.empty(rows.numel(), device=teacher_flat.device)
    c = torch.empty_like(c_prev)
    with torch.no_grad():
        for sl, r in chunk_rows(rows, chunk_size):
            p = log_softmax32(teacher_flat[r], temperature).exp_()
            p_y = p.gather(1, targets_flat[r].unsqueeze(-1))
            c_prev[sl] = (p * (p > p_y)).sum(-1)
            c[sl] = c_prev[sl] + p_y.squeeze(-1)
    log_m = F.logsigmoid(sharpness * (c - lo)) + F.logsigmoid(sharpness * (hi - c_prev))
    total = (width_cost * (hi - lo) - log_m).sum()
    return LossTerm(total, rows.new_tensor(rows.numel()), {"coverage": log_m.detach().exp().sum()})


def _edges(lp: torch.Tensor, lo, hi, opts: DACKLSettings):
    """Sorted cumulative mass and the sigmoid arguments of the two band edges.

    Returns `(idx [N, k], xa [N, k], xb [N, k], tail)`: `xa = s (c - lo)`, `xb = s (hi - c_prev)` per sorted token
    (None for a hard edge), `tail = (xa_tail [N, 1], xb_tail [N, 1])` for the tokens outside the top-k (else None).
    """
    V = lp.shape[-1]
    k = V if opts.top_k is None else min(opts.top_k, V)
    vals, idx = lp.sort(dim=-1, descending=True, stable=True) if opts.top_k is None else lp.topk(k, dim=-1)
    ps = vals.exp()
    c = ps.cumsum(-1)
    s, lo_, hi_ = opts.sharpness, _col(lo), _col(hi)
    hard_lo, hard_hi = _is_hard(lo, 0.0), _is_hard(hi, 1.0)
    xa = None if hard_lo else s * (c - lo_)
    xb = None if hard_hi else s * (hi_ - (c - ps))
    tail = None
    if opts.top_k is not None:
        ck = c[:, -1:]
        tail = (None if hard_lo else s * (1 - lo_) + torch.zeros_like(ck), None if hard_hi else s * (hi_ - ck))
    return idx, xa, xb, tail


def _col(x):
    return x[:, None] if isinstance(x, torch.Tensor) else x


def _is_hard(x, edge: float) -> bool:
    return not isinstance(x, torch.Tensor) and (x <= edge if edge == 0.0 else x >= edge)


def _to_vocab(sorted_vals: torch.Tensor, tail_val, idx: torch.Tensor, V: int) -> torch.Tensor:
    """Scatter per-sorted-token values `[N, k]` back to vocabulary order `[N, V]`; non-top-k tokens get `tail_val`."""
    if tail_val is None:
        return torch.empty(sorted_vals.shape[0], V, device=idx.device).scatter(1, idx, sorted_vals)
    return tail_val.expand(-1, V).scatter(1, idx, sorted_vals)


def _log_mask(xa, xb):
    """`log m` from the edge arguments (None = hard edge, factor 1); None when both edges are hard."""
    parts = [F.logsigmoid(x) for x in (xa, xb) if x is not None]
    return None if not parts else (parts[0] if len(parts) == 1 else parts[0] + parts[1])


def _log_one_minus_mask(xa, xb):
    """`log(1 - m)` in closed form: `1 - sig(a) sig(b) = sig(-a) + sig(a) sig(-b)`."""
    if xa is None:
        return F.logsigmoid(-xb)
    if xb is None:
        return F.logsigmoid(-xa)
    return torch.logaddexp(F.logsigmoid(-xa), F.logsigmoid(xa) + F.logsigmoid(-xb))


def _rows_autograd(z: torch.Tensor, t: torch.Tensor, lo, hi, opts: DACKLSettings):
    """Per-row loss, kept token count and kept mass `[N]` of rows `z`, `t` `[N, V]`; plain autograd ops."""
    V = t.shape[-1]
    lp = log_softmax32(t.detach(), opts.temperature)
    lq = log_softmax32(z, opts.temperature)
    lm = l1m = None
    if not (_is_hard(lo, 0.0) and _is_hard(hi, 1.0)):
        idx, xa, xb, tail = _edges(lp, lo, hi, opts)
        lm = _to_vocab(_log_mask(xa, xb), tail and _log_mask(*tail), idx, V)
        if opts.student_support == "band":
            l1m = _to_vocab(_log_one_minus_mask(xa, xb), tail and _log_one_minus_mask(*tail), idx, V)
    if lm is None:  # band [0, 1]: every token kept exactly, p~ = p
        kept_tokens = torch.full_like(lp[:, 0], V)
        kept_mass = torch.ones_like(kept_tokens)
    else:
        kept_tokens = lm.exp().sum(-1)
        kept_mass = (lm + lp).logsumexp(-1).exp()
    if opts.student_support == "full":
        lpt = lp if lm is None else (lm + lp).log_softmax(-1)
        loss = _divergence(lpt, lq, opts)
        if opts.rescue > 0 and lm is not None:
            loss = loss - opts.rescue * (lm.detach() + lq).logsumexp(-1)
    else:
        a, b = (lp, lq) if opts.divergence == "forward" else (lq, lp)
        kept = a if lm is None else lm + a
        loss = (kept.exp() * (a - b).masked_fill(torch.isneginf(a), 0.0)).sum(-1)
        if l1m is not None:  # the lumped outcome holding the clipped mass
            ra, rb = (l1m + a).logsumexp(-1), (l1m + b).logsumexp(-1)
            loss = loss + ra.exp() * (ra - rb)
    return loss, kept_tokens, kept_mass


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`KL(a || b)` per row from log-probabilities, with 0 log 0 = 0."""
    return (a.exp() * (a - b).masked_fill(torch.isneginf(a), 0.0)).sum(-1)


AKL_HEAD = 0.5  # AKL's head: the teacher's top tokens that hold this much of its mass (the paper's value)


def _head_share(lpt: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """`[n]`, detached: the share of `sum_i |p~_i - q_i|` on the tokens of the teacher's head (a token is in it when
    the teacher tokens ranked above it hold less than `AKL_HEAD` of the mass, so the top token always is)."""
    with torch.no_grad():
        p = lpt.exp()
        ranked, order = p.sort(dim=-1, descending=True)
        head = (ranked.cumsum(-1) - ranked) < AKL_HEAD
        gap = (p - lq.exp()).abs().gather(-1, order)
        return (gap * head).sum(-1) / gap.sum(-1).clamp_min(1e-12)


def _mix(la: torch.Tensor, lb: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities."""
    return torch.logaddexp(la + math.log(weight_a), lb + math.log1p(-weight_a))


def _divergence(lpt: torch.Tensor, lq: torch.Tensor, opts: DACKLSettings) -> torch.Tensor:
    """Per-row divergence between the clipped teacher `p~` and the student `q` (log-probabilities `[n, V]`).

    forward `KL(p~||q)`; reverse `KL(q||p~)`; jsd: GKD's generalised JSD, `beta KL(p~||m) + (1-beta) KL(q||m)`
    with `m = beta p~ + (1-beta) q` (forward KL at beta 0, reverse at 1); skew_forward (DistiLLM's SKL):
    `KL(p~ || skew p~ + (1-skew) q)`; skew_reverse (SRKL): `KL(q || skew q + (1-skew) p~)`; adaptive (AKL, Wu et
    al. 2024): `w KL(p~||q) + (1-w) KL(q||p~)` per row, `w` (no gradient) the share of `sum |p~ - q|` that falls on
    the teacher's head (its top tokens holding `AKL_HEAD` of its mass): forward KL while the student misses the
    teacher's mode, reverse KL once it has it.
    """
    kind = opts.divergence
    if kind == "adaptive":
        w = _head_share(lpt, lq)
        return w * _kl(lpt, lq) + (1 - w) * _kl(lq, lpt)
    if kind == "jsd" and opts.beta in (0.0, 1.0):
        kind = "forward" if opts.beta == 0.0 else "reverse"
    if kind == "forward":
        return _kl(lpt, lq)
    if kind == "reverse":
        return _kl(lq, lpt)
    if kind == "jsd":
        m = _mix(lpt, lq, opts.beta)
        return opts.beta * _kl(lpt, m) + (1 - opts.beta) * _kl(lq, m)
    if kind == "skew_forward":
        return _kl(lpt, lq if opts.skew == 0 else _mix(lpt, lq, opts.skew))
    return _kl(lq, lpt if opts.skew == 0 else _mix(lq, lpt, opts.skew))


def _chunk_with_grads(z, t, lo, hi, opts: DACKLSettings, need_z: bool, need_band: bool):
    """Loss sum, stats and gradients (w.r.t. `z` rows in float32, and per-row `lo`, `hi`) of one chunk.

    `"full"` support with the forward or reverse KL has closed-form gradients (no autograd graph kept); the other
    divergences and `"band"` support use a local autograd pass.
    """
    if opts.student_support == "full" and opts.divergence in ("forward", "reverse"):
        return _chunk_full_closed_form(z, t, lo, hi, opts, need_z, need_band)
    with torch.enable_grad():
        zz = z.detach().float().requires_grad_(need_z)
        band = [x.detach().requires_grad_() for x in (lo, hi)] if need_band else []
        lo_, hi_ = band if need_band else (lo, hi)
        loss, kept_tokens, kept_mass = _rows_autograd(zz, t, lo_, hi_, opts)
        total = loss.sum()
        wrt = ([zz] if need_z else []) + band
        grads = list(torch.autograd.grad(total, wrt)) if wrt else []
    gz = grads.pop(0) if need_z else None
    glo, ghi = grads if need_band else (None, None)
    return total.detach(), kept_tokens.sum(), kept_mass.sum(), gz, glo, ghi


def _chunk_full_closed_form(z, t, lo, hi, opts: DACKLSettings, need_z: bool, need_band: bool):
    """`"full"` support in closed form, in place where possible (a few `[n, V]` float32 tensors at a time).

    With `A = log m + log p`, `P = softmax(A)` (= p~) and `D = log P - log q`:
    forward `L = sum P D`, dL/dA = P (D - L), dL/dz = (q - P) / T;
    reverse `L = -sum q D`, dL/dA = P - q, dL/dz = -q (D + L) / T;
    the rescue adds `-r log K`, `K = sum_i m_i q_i`, per row and `r (q - m q / K) / T` to dL/dz (the mask constant);
    dL/dlo = sum_i dL/dA_i * (-s sigmoid(-xa_i)), dL/dhi = sum_i dL/dA_i * s sigmoid(-xb_i) (sorted tokens + tail).
    The normaliser `Z = sum m p` and the kept token count come from the sorted `[n, k]` tensors, and `log m - log Z`
    is added to `log p` in place, so no `[n, V]` log-sum-exp is needed beyond the two log-softmaxes.
    """
    V, s = t.shape[-1], opts.sharpness
    log_pt = log_softmax32(t, opts.temperature)
    n = log_pt.shape[0]
    hard_lo, hard_hi = _is_hard(lo, 0.0), _is_hard(hi, 1.0)
    idx = coefs = rescue_idx = m_sorted = m_tail = None
    if hard_lo and hard_hi:
        kept_tokens, kept_mass = log_pt.new_full((n,), V), log_pt.new_ones(n)
    else:
        k = V if opts.top_k is None else min(opts.top_k, V)
        ps, idx = log_pt.sort(dim=-1, descending=True, stable=True) if opts.top_k is None else log_pt.topk(k, dim=-1)
        ps = ps.exp_()
        c = ps.cumsum(-1)
        ck = c[:, -1:].clone()  # mass of the sorted tokens; the tail holds 1 - ck
        xa = None if hard_lo else (c - _col(lo)).mul_(s)  # s (c - lo)
        xb = None if hard_hi else c.sub_(ps).neg_().add_(_col(hi)).mul_(s)  # s (hi - c_prev), in place
        del c
        lm = F.logsigmoid(xa) if xa is not None else F.logsigmoid(xb)
        if xa is not None and xb is not None:
            lm += F.logsigmoid(xb)
        m = lm.exp()
        mass, kept_tokens = rowdot(m, ps), m.sum(-1)
        if opts.rescue > 0:
            rescue_idx, m_sorted = idx, m
        del ps, m
        tail = None
        if k < V:
            tail = (None if hard_lo else (1 - _col(lo)) * s + torch.zeros_like(ck),
                    None if hard_hi else (_col(hi) - ck) * s)
            lm_tail = _log_mask(*tail)
            m_tail = lm_tail.exp().squeeze(-1)
            mass = mass + m_tail * (1 - ck.squeeze(-1)).clamp_min(0)
            kept_tokens = kept_tokens + (V - k) * m_tail
        kept_mass = mass
        log_z = mass.clamp_min(1e-30).log()[:, None]
        if tail is None:
            log_pt.scatter_add_(1, idx, lm.sub_(log_z))
        else:  # every token gets log m_tail - log Z, the top-k ones are then corrected to their own log m
            log_pt += lm_tail - log_z
            log_pt.scatter_add_(1, idx, lm.sub_(lm_tail))
        del lm
        if need_band:  # d log m / d lo = -s sigmoid(-xa), d log m / d hi = s sigmoid(-xb)
            coefs = [[None if x is None else x.neg_().sigmoid_().mul_(sign * s) for x in pair]
                     for pair, sign in (((xa, tail and tail[0]), -1.0), ((xb, tail and tail[1]), 1.0))]
        else:
            idx = None
        del xa, xb, tail
    lq = log_softmax32(z, opts.temperature)
    log_kept = q_coef = sorted_grad = None
    if rescue_idx is not None:
        log_kept, q_coef, sorted_grad = _rescue_parts(lq, rescue_idx, m_sorted, m_tail, opts.rescue)
    del m_sorted, m_tail
    d = log_pt - lq  # D = log p~ - log q
    d.masked_fill_(torch.isneginf(log_pt if opts.divergence == "forward" else lq), 0.0)  # 0 log 0 = 0
    q, pt = lq.exp_(), log_pt.exp_()
    del lq, log_pt
    inv_t = 1.0 / opts.temperature
    if opts.divergence == "forward":
        loss = rowdot(pt, d)
        g_a = d.sub_(loss[:, None]).mul_(pt) if idx is not None else None  # P (D - L)
        gz = (q if q_coef is None else q.mul_(1 + q_coef)).sub_(pt) if need_z else None  # q - P (+ rescue), in place
    else:
        loss = -rowdot(q, d)
        g_a = pt.sub_(q) if idx is not None else None  # P - q
        gz = d.add_(loss[:, None]).mul_(q).neg_() if need_z else None
        if gz is not None and q_coef is not None:
            gz.addcmul_(q, q_coef)
    if log_kept is not None:  # the rescue: -r log K, and the rest of its dL/dz on the sorted tokens
        loss = loss - opts.rescue * log_kept
        if gz is not None:
            gz.scatter_add_(1, rescue_idx, sorted_grad)
    del rescue_idx, q_coef, sorted_grad
    if gz is not None and inv_t != 1.0:
        gz.mul_(inv_t)
    del q, pt, d
    glo = ghi = None
    if idx is not None:
        g_sorted = g_a.gather(1, idx)
        g_tail = g_a.sum(-1) - g_sorted.sum(-1)
        del g_a, idx
        glo, ghi = (_band_grad(g_sorted, g_tail, pair, edge) for pair, edge in zip(coefs, (lo, hi)))
    return loss.sum(), kept_tokens.sum(), kept_mass.sum(), gz, glo, ghi


def _rescue_parts(lq, idx, m_sorted, m_tail, r: float):
    """The rescue `-r log K`, `K = sum_i m_i q_i`, from the sorted mask `m_sorted` `[n, k]` (+ `m_tail` `[n]`, the
    mask of the unsorted tokens): `log K` `[n]`, and its dL/dz `r (q - m q / K)` split into a coefficient of q on
    every token, `r (1 - m_tail / K)` `[n, 1]`, and `-r (m_i - m_tail) q_i / K` `[n, k]` on the sorted ones
    (`m_tail` = 0 without a top-k tail)."""
    lq_sorted = lq.gather(1, idx)
    log_mq = m_sorted.log() + lq_sorted
    log_kept = log_mq.logsumexp(-1)
    if m_tail is None:
        return log_kept, lq.new_full((lq.shape[0], 1), r), log_mq.sub_(log_kept[:, None]).exp_().mul_(-r)
    q_rest = (1 - lq_sorted.exp().sum(-1)).clamp_min(0)  # the student's mass on the unsorted tokens
    log_kept = torch.logaddexp(log_kept, (m_tail * q_rest).log())
    q_coef = (m_tail.log() - log_kept).exp().neg_().add_(1).mul_(r)[:, None]
    sorted_grad = (m_sorted - m_tail[:, None]).mul_(lq_sorted.sub_(log_kept[:, None]).exp_()).mul_(-r)
    return log_kept, q_coef, sorted_grad


def _band_grad(g_sorted, g_tail, coefs, edge):
    coef, coef_tail = coefs
    if coef is None:
        return torch.zeros_like(edge)
    out = (g_sorted * coef).sum(-1)
    return out if coef_tail is None else out + g_tail * coef_tail.squeeze(-1)


def _valid_rows(student_logits, teacher_logits, labels):
    V = student_logits.shape[-1]
    return student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), labelled_rows(labels)


def _fixed_sums(lo, hi, n, like):
    return like.new_tensor(lo * n, dtype=torch.float32), like.new_tensor(hi * n, dtype=torch.float32)


def _stats(lo_sum, hi_sum, kept_tokens, kept_mass):
    return {"lo": lo_sum.detach(), "hi": hi_sum.detach(), "kept_tokens": kept_tokens.detach(),
            "kept_mass": kept_mass.detach()}


def dac_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    band_net: DACBandNet | None = None,
    **settings,
) -> LossTerm:
    """Reference DAC-KL (plain autograd, whole batch at once).

    student_logits, teacher_logits: `[B, T, V]` or `[N, V]`, aligned (position k predicts `labels[..., k]`);
    labels: `[B, T]` / `[N]`, -100 = ignored. The teacher is detached. `settings`: the fields of `DACKLSettings`
    (`lo`, `hi`, `divergence`, ...). `band_net=None` is the fixed band `(lo, hi)` (`dac_mode="fixed"`), else
    `band_net` predicts `(lo, hi)` per position from the detached top-`band_net.num_features` teacher
    probabilities and receives gradients through the soft mask. Returns `LossTerm(total, num_items=#valid
    positions, stats)` with `stats` sums of `lo`, `hi`, soft kept token count and kept teacher mass over the valid
    positions.
    """
    opts = _settings(student_logits, teacher_logits, labels, band_net, settings)
    s_flat, t_flat, rows = _valid_rows(student_logits, teacher_logits, labels)
    z, t = s_flat[rows], t_flat[rows].detach()
    n = rows.numel()
    if band_net is None:
        lo, hi = opts.lo, opts.hi
        lo_sum, hi_sum = _fixed_sums(lo, hi, n, z)
    else:
        lo, hi = band_net(_features(t, opts.temperature, opts.num_features))
        lo_sum, hi_sum = lo.sum(), hi.sum()
    loss, kept_tokens, kept_mass = _rows_autograd(z, t, lo, hi, opts)
    return LossTerm(loss.sum(), rows.new_tensor(n), _stats(lo_sum, hi_sum, kept_tokens.sum(), kept_mass.sum()))


class _ChunkedDACKL(torch.autograd.Function):
    """Loss over row chunks; gradients are computed chunk by chunk in forward and stored (Liger-style)."""

    @staticmethod
    def forward(ctx, student_flat, lo, hi, teacher_flat, rows, opts, chunk_size, fixed_band):
        need_z = ctx.needs_input_grad[0]
        need_band = fixed_band is None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        band_lo, band_hi = fixed_band if fixed_band is not None else (lo, hi)
        gz_all = row_grad_buffer(student_flat, rows) if need_z else None
        glo_all = torch.zeros_like(lo) if need_band else None
        ghi_all = torch.zeros_like(hi) if need_band else None
        total = torch.zeros((), device=student_flat.device)
        kept_tokens, kept_mass = total.clone(), total.clone()
        for sl, r in chunk_rows(rows, chunk_size):
            c_lo, c_hi = (band_lo, band_hi) if fixed_band is not None else (band_lo[sl], band_hi[sl])
            loss, kt, km, gz, glo, ghi = _chunk_with_grads(
                student_flat[r], teacher_flat[r], c_lo, c_hi, opts, need_z, need_band)
            total += loss
            kept_tokens += kt
            kept_mass += km
            if need_z:
                write_rows(gz_all, r, gz)
            if need_band:
                glo_all[sl], ghi_all[sl] = glo, ghi
            del gz, glo, ghi
        ctx.save_for_backward(*(g for g in (gz_all, glo_all, ghi_all) if g is not None))
        ctx.has = (need_z, need_band)
        ctx.mark_non_differentiable(kept_tokens, kept_mass)
        return total, kept_tokens, kept_mass

    @staticmethod
    def backward(ctx, grad_total, _gk, _gm):
        saved = list(ctx.saved_tensors)
        need_z, need_band = ctx.has
        gz = saved.pop(0) if need_z else None
        glo, ghi = saved if need_band else (None, None)
        if gz is not None:
            gz = scale_saved_grad(gz, grad_total)
        if glo is not None:
            glo, ghi = glo * grad_total, ghi * grad_total
        return gz, glo, ghi, None, None, None, None, None


def chunked_dac_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    band_net: DACBandNet | None = None,
    band: tuple[torch.Tensor, torch.Tensor] | None = None,
    **settings,
) -> LossTerm:
    """Memory-bounded DAC-KL: same arguments and result as `dac_kl_loss` (loss and gradients), plus `chunk_size`.

    Only valid positions are processed, `chunk_size` at a time, so float32 working tensors are `[chunk, V]`
    (a few of them) instead of `[B * T, V]`. The gradient w.r.t. the student logits is computed during the forward
    pass and kept in the logits' dtype (one tensor of their size, as any loss needs); the band sub-network gets
    its gradient through per-position gradients w.r.t. `(lo, hi)`. `band=(lo, hi)` (`[n]` each, one per valid
    position in order) gives the band directly instead of `band_net` (e.g. detached, so that this loss trains the
    student only; see `band_label_loss`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_dac_kl_loss: chunk_size must be >= 1, got {chunk_size}")
    opts = _settings(student_logits, teacher_logits, labels, band_net, settings)
    s_flat, t_flat, rows = _valid_rows(student_logits, teacher_logits, labels)
    t_flat = t_flat.detach()
    n = rows.numel()
    if band is not None or band_net is not None:
        band_lo, band_hi = band if band is not None else band_net(band_features(t_flat, rows, opts.temperature,
                                                                                 opts.num_features, chunk_size))
        fixed = None
        lo_sum, hi_sum = band_lo.sum(), band_hi.sum()
    else:
        band_lo = band_hi = s_flat.new_zeros(0, dtype=torch.float32)
        fixed = (float(opts.lo), float(opts.hi))
        lo_sum, hi_sum = _fixed_sums(opts.lo, opts.hi, n, s_flat)
    total, kept_tokens, kept_mass = _ChunkedDACKL.apply(
        s_flat, band_lo, band_hi, t_flat, rows, opts, chunk_size, fixed)
    return LossTerm(total, rows.new_tensor(n), _stats(lo_sum, hi_sum, kept_tokens, kept_mass))
