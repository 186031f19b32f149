"""SCRG: sequence correction and re-generation (DESIGN.md §2), as pure functions over models and tensors.

For a batch of prompts and the completions the student sampled for them, one round of SCRG:

1. runs the teacher (and, for `error_rule="max_divergence"`, the student) teacher-forced on `prompt + completion`
   (one batched forward each, no grad, eval mode, position ids derived from the attention mask);
2. computes per completion position `i` the "semantic cognitive difference" `D_i` (`KL(p_teacher || q_student)` by
   default, `KL(q_student || p_teacher)` with `kl_direction="reverse"`) and the teacher's token `t_i` (its argmax,
   or a sample from it with `teacher_token="sample"`);
3. picks the error position `j` among the real completion tokens where `y_i != t_i`: the first one the teacher
   rejects (`error_rule="first_rejected"`, the default; see `SCRGSettings`) or `argmax D_i` (`"max_divergence"`,
   the paper); rows without such a position are left unchanged;
4. replaces the row by `y_<j + [t_j]`; with `continuation="regenerate"` (the paper, and the default here and in
   `MGSRConfig`) the **student** then re-generates the rest from `prompt + y_<j + [t_j]` (unless `t_j` is an end
   token) with its own generation settings, within the same total budget of `generation_config.max_new_tokens`
   completion tokens, all re-generated rows in ONE batched `generate` call (prefixes of different lengths re-padded
   on the left); with `continuation="stop"` (cheaper: no second `generate`) the row ends there.

`rounds` repeats the round on the revised completions. This is SCRG revising finished samples; `scrg_stream.py`
computes the same first-rejected revision while the student samples (the trainer's default path), and these
functions are its reference. `assemble_on_policy_batch` turns the result into GKD's
`(input_ids, attention_mask, labels)` layout, `completion_from_generate` cuts a `generate` output after the first
end token.

Choices that are ours (the paper is silent): `D_i` is computed on the raw logits (temperature 1, the generation
temperature only affects the student's re-generation); the teacher token is sampled at temperature 1; ties in `D`
go to the earliest position; a correction whose budget is used up (`j + 1 == max_new_tokens`) is not
re-generated; across rounds the per-row records keep the row's last correction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .data import position_ids_from_mask
import torch.nn.functional as F

CONTINUATIONS = ("regenerate", "stop")
ERROR_RULES = ("max_divergence", "first_rejected")
KL_DIRECTIONS = ("forward", "reverse")
TEACHER_TOKENS = ("greedy", "sample")

__all__ = [
    "CONTINUATIONS",
    "ERROR_RULES",
    "KL_DIRECTIONS",
    "TEACHER_TOKENS",
    "SCRGResult",
    "SCRGSettings",
    "assemble_on_policy_batch",
    "completion_from_generate",
    "completion_mask_from_ids",
    "kept_teacher_logits",
    "scrg_revise",
]


@dataclass
class SCRGResult:
    """Revised completions of a batch and what SCRG did to each row.

    completion_ids: `[B, L']` revised completions, right-padded with the pad id (`L' >= L`, the input width).
    completion_mask: `[B, L']` 1 on real completion tokens, up to and including the first end token.
    corrected: `[B]` bool, whether the row was corrected (in any round).
    error_pos: `[B]` long, the error position `j` within the completion, -1 for rows left unchanged.
    divergence: `[B]` float, `D_j`, 0 for rows left unchanged.
    teacher_token: `[B]` long, the correction token `t_j`, -1 for rows left unchanged.
    regen_len: `[B]` long, number of tokens the student re-generated after `j` (0 when unchanged, when `t_j` is an
        end token, or when the budget was used up).
    num_corrections: `[B]` long, in how many rounds the row was corrected.

    teacher_logits: with `keep_teacher_logits`, `[B, L, V]` the teacher's logits predicting each completion token of
        the last round's input (cut to `vocab_size`), else None.
    teacher_valid: with `keep_teacher_logits`, `[B]` long: how many leading completion positions of the revised row
        `teacher_logits` still predicts right (the whole row when unchanged, `j + 1` when corrected at `j`: the
        teacher is causal and the prefix before `j` is kept), else None.

    With `rounds > 1` the per-row records describe the row's last correction.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    corrected: torch.Tensor
    error_pos: torch.Tensor
    divergence: torch.Tensor
    teacher_token: torch.Tensor
    regen_len: torch.Tensor
    num_corrections: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_valid: torch.Tensor | None = None

    def metric_sums(self) -> dict[str, torch.Tensor]:
        """Sums and counts (float tensors on the result's device) for the per-step metrics.

        Reduce them across processes (sum) before dividing: `corrected / rows` is the share of rows corrected,
        `error_pos / corrected`, `divergence / corrected` and `regen_len / corrected` the means over corrected rows.
        """
        c = self.corrected
        return {
            "rows": torch.tensor(float(c.numel()), device=c.device),
            "corrected": c.float().sum(),
            "error_pos": self.error_pos[c].float().sum(),
            "divergence": self.divergence[c].float().sum(),
            "regen_len": self.regen_len[c].float().sum(),
        }

    def metric_ratios(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """`(name, numerator, denominator)` of each metric, from `metric_sums` (sum both over processes before
        dividing): `corrected_frac`, and the means over corrected rows `error_pos`, `divergence`, `regen_len`."""
        s = self.metric_sums()
        return [("corrected_frac", s["corrected"], s["rows"])] + [
            (key, s[key], s["corrected"]) for key in ("error_pos", "divergence", "regen_len")]

    def metrics(self) -> dict[str, float]:
        """Local (this process's) metrics: share of rows corrected, mean error position, mean `D_j` and mean
        re-generated length (the means over corrected rows; 0 when no row was corrected)."""
        return {f"scrg/{name}": n.item() / d.item() if d.item() > 0 else 0.0 for name, n, d in self.metric_ratios()}


# --------------------------------------------------------------------------------------------------------------
# Masks and layout
# --------------------------------------------------------------------------------------------------------------


def _eos_tensor(eos_token_ids, device) -> torch.Tensor | None:
    if eos_token_ids is None:
        return None
    if isinstance(eos_token_ids, torch.Tensor):
        ids = eos_token_ids.flatten().tolist()
    elif isinstance(eos_token_ids, int):
        ids = [eos_token_ids]
    else:
        ids = list(eos_token_ids)
    if not ids:
        return None
    return torch.tensor(ids, dtype=torch.long, device=device)


def _first_end_lengths(ids: torch.Tensor, eos_token_ids) -> torch.Tensor:
    """`[B]` length of each row up to and including its first end token (the full width when there is none)."""
    B, L = ids.shape
    full = torch.full((B,), L, dtype=torch.long, device=ids.device)
    eos = _eos_tensor(eos_token_ids, ids.device)
    if eos is None or L == 0:
        return full
    is_eos = torch.isin(ids, eos)
    first = is_eos.int().argmax(dim=1) + 1
    return torch.where(is_eos.any(dim=1), first, full)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids) -> torch.Tensor:
    """`[B, L]` long mask: 1 up to and including the first end token of each row (all 1 without an end token)."""
    lengths = _first_end_lengths(completion_ids, eos_token_ids)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()


def completion_from_generate(
    sequences: torch.Tensor, prompt_len: int, eos_token_ids
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a `generate` output `[B, prompt_len + N]` into `(completion_ids, completion_mask)`, both `[B, N]`.

    The mask is 1 up to and including the first end token (`eos_token_ids`: an int, a list of ints or None; with
    None nothing ends early). Ids after the end token are kept as `generate` wrote them; only the mask says where
    the completion stops, so this is right when `pad_token_id == eos_token_id`.
    """
    completion_ids = sequences[:, prompt_len:]
    return completion_ids, completion_mask_from_ids(completion_ids, eos_token_ids)


def assemble_on_policy_batch(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_token_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GKD's on-policy layout: `input_ids = [prompt (left-padded as given), completion]`, `attention_mask` 0 on
    padding, `labels` -100 on the prompt and on padding, the completion tokens elsewhere.

    Everything is decided by the masks, never by comparing ids with the pad id; completion positions with mask 0 are
    overwritten with `pad_token_id` (when not None) so that no stale token follows the end token.
    """
    completion_mask = completion_mask.to(prompt_mask.dtype)
    if pad_token_id is not None:
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = torch.cat(
        [torch.full_like(prompt_ids, -100), completion_ids.masked_fill(completion_mask == 0, -100)], dim=1
    )
    return input_ids, attention_mask, labels


def correction_labels(labels: torch.Tensor, prompt_width: int, result: SCRGResult) -> torch.Tensor:
    """`labels` `[B, T]` of an assembled on-policy batch (`assemble_on_policy_batch`) kept only at each corrected
    row's correction (its completion index `result.error_pos`, the teacher's token; with several rounds, the last
    one); -100 elsewhere."""
    column = (prompt_width + result.error_pos.clamp(min=0)).clamp(max=labels.shape[1] - 1).unsqueeze(1)
    keep = torch.zeros_like(labels, dtype=torch.bool).scatter_(1, column, result.corrected.unsqueeze(1))
    return labels.masked_fill(~keep, -100)


def kept_teacher_logits(kept: torch.Tensor, valid: torch.Tensor, prompt_width: int,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's logits `[B, T, V]` on the revised sequences `[prompt (prompt_width columns), completion]` whose
    labels are `labels` `[B, T]`, from `SCRGResult.teacher_logits` `kept` `[B, L, V]` (position `prompt_width - 1 + i`
    predicts completion token `i`; positions that predict no completion token are 0), and the rows `[n]` whose
    labelled completion is longer than `valid` (`SCRGResult.teacher_valid`): those need a teacher forward."""
    B, T = labels.shape
    width = T - prompt_width  # completion columns; the revised width is never below the kept one
    L = min(kept.shape[1], width)
    logits = F.pad(kept[:, :L], (0, 0, prompt_width - 1, width - L + 1))
    lengths = (labels[:, prompt_width:] != -100).sum(dim=1)
    return logits, (valid < lengths).nonzero(as_tuple=True)[0]


# --------------------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(*models) -> Iterator[None]:
    """Put `models` in eval mode and restore every submodule's own `training` flag afterwards (only the modules
    that were training are touched: a model already in eval mode, like the teacher, costs one pass over it)."""
    training = []
    for model in models:
        if model is None:
            continue
        modules = [m for m in model.modules() if m.training]
        if modules:
            model.eval()
            training.extend(modules)
    try:
        yield
    finally:
        for module in training:
            module.training = True


def lm_logits(model, logits_to_keep: int, **kwargs) -> torch.Tensor:
    """`model(**kwargs)`'s logits of the last `logits_to_keep` positions `[B, logits_to_keep, V]`; the LM head skips
    the other positions when the model takes `logits_to_keep`."""
    try:
        out = model(**kwargs, logits_to_keep=logits_to_keep)
    except TypeError as err:
        if "logits_to_keep" not in str(err):
            raise
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -logits_to_keep:]


def _completion_logits(model, input_ids, attention_mask, num_completion: int) -> torch.Tensor:
    """Teacher-forced logits `[B, num_completion, V]` predicting each completion token (the last
    `num_completion` tokens of `input_ids`)."""
    logits = lm_logits(model, num_completion + 1, input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return logits[:, :-1]


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """`KL(p || q)` over the last dim, with `0 * log 0 = 0` (so -inf logits, e.g. masked tokens, are safe)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def _differences(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor | None,
    completion_ids: torch.Tensor,
    *,
    kl_direction: str,
    teacher_token: str,
    generator: torch.Generator | None,
    chunk_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Per position: `D` `[B, L]` (float32; None without student logits), the teacher token `t` `[B, L]` and the
    teacher's log-probability of the completion token relative to its most likely token, `log p(y_i) - max_v log
    p(v)` `[B, L]` (float32, <= 0). Computed in chunks of positions so the float32 working tensors stay `[chunk, V]`."""
    B, L, V = teacher_logits.shape
    t_flat = teacher_logits.reshape(B * L, V)
    s_flat = student_logits.reshape(B * L, V) if student_logits is not None else None
    y_flat = completion_ids.reshape(B * L).clamp(0, V - 1)
    D = torch.empty(B * L, dtype=torch.float32, device=teacher_logits.device) if s_flat is not None else None
    tok = torch.empty(B * L, dtype=torch.long, device=teacher_logits.device)
    gap = torch.empty(B * L, dtype=torch.float32, device=teacher_logits.device)
    for start in range(0, B * L, chunk_size):
        sl = slice(start, start + chunk_size)
        log_p = F.log_softmax(t_flat[sl].float(), dim=-1)
        top = log_p.max(-1)
        gap[sl] = log_p.gather(-1, y_flat[sl].to(log_p.device).unsqueeze(-1)).squeeze(-1) - top.values
        if D is not None:
            log_q = F.log_softmax(s_flat[sl].float().to(log_p.device), dim=-1)
            D[sl] = _kl_rows(log_p, log_q) if kl_direction == "forward" else _kl_rows(log_q, log_p)
        if teacher_token == "greedy":
            tok[sl] = top.indices
        else:
            tok[sl] = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)
    return (D.view(B, L) if D is not None else None), tok.view(B, L), gap.view(B, L)


def _check_vocab(teacher_logits, student_logits, vocab_size):
    """Both logits cut to the shared vocabulary (`student_logits` may be None: only the teacher's is checked)."""
    if student_logits is None:
        if vocab_size is not None and teacher_logits.shape[-1] < vocab_size:
            raise ValueError(f"scrg: vocab_size={vocab_size} is larger than the teacher's logits "
                             f"({teacher_logits.shape[-1]}).")
        return (teacher_logits[..., :vocab_size] if vocab_size is not None else teacher_logits), None
    if vocab_size is not None:
        if teacher_logits.shape[-1] < vocab_size or student_logits.shape[-1] < vocab_size:
            raise ValueError(
                f"scrg: vocab_size={vocab_size} is larger than a model's logits (teacher "
                f"{teacher_logits.shape[-1]}, student {student_logits.shape[-1]})."
            )
        return teacher_logits[..., :vocab_size], student_logits[..., :vocab_size]
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"scrg: teacher and student logits have different vocabulary sizes ({teacher_logits.shape[-1]} vs "
            f"{student_logits.shape[-1]}); pass vocab_size (truncate_teacher_vocab) when they differ only by padding."
        )
    return teacher_logits, student_logits


# --------------------------------------------------------------------------------------------------------------
# SCRG
# --------------------------------------------------------------------------------------------------------------


def _left_aligned_prefixes(seq, seq_mask, lengths, pad_token_id):
    """Right-align the first `lengths[r]` columns of each row of `seq` `[R, T]`: returns `[R, max(lengths)]` ids
    (left-padded with `pad_token_id`) and their attention mask."""
    width = int(lengths.max().item())
    shift = width - lengths  # [R]
    idx = torch.arange(width, device=seq.device).unsqueeze(0) - shift.unsqueeze(1)
    valid = idx >= 0
    idx = idx.clamp(min=0)
    ids = torch.where(valid, seq.gather(1, idx), torch.full_like(idx, pad_token_id))
    mask = torch.where(valid, seq_mask.gather(1, idx), torch.zeros_like(idx)).to(seq_mask.dtype)
    return ids, mask


@dataclass(frozen=True, eq=False)
class SCRGSettings:
    """How `scrg_revise` revises: everything it takes besides the models, the batch, `rounds` and round 1's student
    logits. Checked on creation.

    generation_config: the student's sampling settings for the re-generation; its `max_new_tokens` is the total
        completion budget (a revised completion is never longer; None: the input width `L`).
    eos_token_ids: end token id(s) (int, list or None).
    pad_token_id: id written on padding (may equal an end token: masks decide, never ids).
    error_rule: which position is the error. `"max_divergence"` (the paper): `argmax_i D_i` over positions whose
        token differs from the teacher's; `"first_rejected"`: the first position whose token the teacher rejects,
        `p_teacher(y_i) < reject_ratio * max_v p_teacher(v)` (no student forward; rows the teacher accepts whole are
        left unchanged; the recorded divergence is `log(max p / p(y_j))`).
    reject_ratio: threshold of `"first_rejected"`, in (0, 1).
    kl_direction: `"forward"`: `D_i = KL(p_teacher || q_student)`; `"reverse"`: `KL(q_student || p_teacher)`.
    teacher_token: `"greedy"` (teacher argmax) or `"sample"` (a sample from the teacher, drawn with `generator`).
    allow_eos: whether an end token may be the correction; if False, positions whose teacher token is an end token
        are not candidates.
    continuation: what follows a correction: `"regenerate"` (the paper: the student re-generates the rest) or
        `"stop"` (the row ends at the correction `y_<j + [t_j]`, without an end token; no `generate` call, and a
        further round changes nothing, the kept prefix being accepted by the teacher).
    vocab_size: compare (and take the teacher token) over the first `vocab_size` logits of both models only
        (`truncate_teacher_vocab`); None requires equal vocab sizes.
    generator: RNG for `teacher_token="sample"` (on the logits' device). The student's re-generation samples with
        the global RNG like `generate` always does.
    always_generate: call `student.generate` in every round even when no row needs re-generation (a one-token dummy
        call). Set it when every process must run the same collectives (ZeRO-3/FSDP without gathered parameters;
        pass `generate_kwargs={"synced_gpus": True}` too). A round's forwards run on every process whatever it finds.
    generate_kwargs: extra keyword arguments of `student.generate`.
    chunk_size: positions per chunk when computing `D` (bounds the float32 `[chunk, V]` working tensors).
    keep_teacher_logits: return the last round's teacher logits and how far each revised row still matches them
        (`SCRGResult.teacher_logits`, `teacher_valid`), so that a loss needs no second teacher forward where they
        are right.
    """

    generation_config: Any
    eos_token_ids: int | Iterable[int] | None
    pad_token_id: int
    error_rule: str = "first_rejected"
    reject_ratio: float = 0.1
    kl_direction: str = "forward"
    teacher_token: str = "greedy"
    allow_eos: bool = True
    continuation: str = "regenerate"
    vocab_size: int | None = None
    generator: torch.Generator | None = None
    always_generate: bool = False
    generate_kwargs: dict | None = None
    chunk_size: int = 1024
    keep_teacher_logits: bool = False

    def __post_init__(self):
        if self.error_rule not in ERROR_RULES:
            raise ValueError(f"scrg: error_rule must be 'max_divergence' or 'first_rejected', got {self.error_rule!r}.")
        if self.continuation not in CONTINUATIONS:
            raise ValueError(f"scrg: continuation must be one of {CONTINUATIONS}, got {self.continuation!r}.")
        if not 0.0 < self.reject_ratio < 1.0:
            raise ValueError(f"scrg: reject_ratio must be in (0, 1), got {self.reject_ratio!r}.")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"scrg: kl_direction must be 'forward' or 'reverse', got {self.kl_direction!r}.")
        if self.teacher_token not in TEACHER_TOKENS:
            raise ValueError(f"scrg: teacher_token must be 'greedy' or 'sample', got {self.teacher_token!r}.")
        if self.pad_token_id is None:
            raise ValueError("scrg: pad_token_id is required (it fills the re-padded prefixes and the completions).")


def _revise_once(student, teacher, prompt_ids, prompt_mask, completion_ids, completion_mask, opts: SCRGSettings,
                 student_logits: torch.Tensor | None) -> SCRGResult:
    """One SCRG round (see `scrg_revise`); `num_corrections` is 0 or 1."""
    device = completion_ids.device
    B, L = completion_ids.shape
    completion_mask = completion_mask.to(prompt_mask.dtype)
    budget = opts.generation_config.max_new_tokens if opts.generation_config.max_new_tokens is not None else L
    eos = _eos_tensor(opts.eos_token_ids, device)
    unchanged_long = torch.full((B,), -1, dtype=torch.long, device=device)

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)

    # --- 1-2. teacher-forced logits, D_i, t_i and the teacher's verdict on y_i ------------------------------------
    needs_student = opts.error_rule == "max_divergence"
    if L > 0:
        with torch.no_grad(), _eval_mode(teacher, student if needs_student and student_logits is None else None):
            t_logits = _completion_logits(teacher, input_ids, attention_mask, L)
            s_logits = None
            if needs_student:
                s_logits = (_completion_logits(student, input_ids, attention_mask, L) if student_logits is None
                            else student_logits[:, :L])
            t_logits, s_logits = _check_vocab(t_logits, s_logits, opts.vocab_size)
            D, t, gap = _differences(
                t_logits, s_logits, completion_ids, kl_direction=opts.kl_direction, teacher_token=opts.teacher_token,
                generator=opts.generator, chunk_size=opts.chunk_size,
            )
            kept_logits = t_logits if opts.keep_teacher_logits else None
            del t_logits, s_logits
        t, gap = t.to(device), gap.to(device)
        D = D.to(device) if D is not None else -gap  # first_rejected: the recorded divergence is -log p ratio
    else:
        D = torch.zeros(B, 0, device=device)
        gap = torch.zeros(B, 0, device=device)
        t = torch.zeros(B, 0, dtype=torch.long, device=device)
        kept_logits = None

    # --- 3. error position -----------------------------------------------------------------------------------------
    candidates = (completion_ids != t) & completion_mask.bool()
    if opts.error_rule == "first_rejected":
        candidates &= gap < math.log(opts.reject_ratio)
    if not opts.allow_eos and eos is not None:
        candidates &= ~torch.isin(t, eos)
    corrected = candidates.any(dim=1)
    if opts.error_rule == "first_rejected":
        j = candidates.to(torch.int8).argmax(dim=1) if L > 0 else torch.zeros(B, dtype=torch.long, device=device)
    else:
        masked_D = D.masked_fill(~candidates, float("-inf"))
        j = masked_D.argmax(dim=1) if L > 0 else torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    t_j = t[rows, j] if L > 0 else unchanged_long.clone()
    D_j = D[rows, j] if L > 0 else torch.zeros(B, device=device)

    # --- 4. correction -------------------------------------------------------------------------------------------
    # Corrected completion prefix y_<j + [t_j]; the rest of a corrected row is dropped (re-generated below).
    fixed = completion_ids.clone()
    if corrected.any():
        fixed[rows[corrected], j[corrected]] = t_j[corrected]
    ends_at_j = torch.isin(t_j, eos) if eos is not None else torch.zeros_like(corrected)
    left = (budget - (j + 1)).clamp(min=0)  # budget left after position j
    regen_rows = corrected & ~ends_at_j & (left > 0) & (opts.continuation == "regenerate")

    lengths = torch.where(corrected, j + 1, completion_mask.sum(dim=1).long())
    regen_len = torch.zeros(B, dtype=torch.long, device=device)
    new_tokens = None
    if regen_rows.any() or (opts.always_generate and opts.continuation == "regenerate"):
        new_tokens, regen_len = _regenerate(
            student,
            input_ids=torch.cat([prompt_ids, fixed], dim=1),
            attention_mask=torch.cat([prompt_mask, torch.ones_like(completion_mask)], dim=1),
            prefix_lengths=prompt_ids.shape[1] + j + 1,
            regen_rows=regen_rows,
            left=left,
            generation_config=opts.generation_config,
            eos_token_ids=opts.eos_token_ids,
            pad_token_id=opts.pad_token_id,
            generate_kwargs=opts.generate_kwargs,
        )
    lengths = lengths + regen_len

    # --- assemble the revised completions ------------------------------------------------------------------------
    width = max(L, int(lengths.max().item()) if B > 0 else 0)
    out_ids = torch.full((B, width), opts.pad_token_id, dtype=completion_ids.dtype, device=device)
    out_ids[:, :L] = fixed
    positions = torch.arange(width, device=device).unsqueeze(0)
    # Corrected rows: keep y_<j + [t_j] and clear what followed.
    out_ids = torch.where(corrected.unsqueeze(1) & (positions > j.unsqueeze(1)), opts.pad_token_id, out_ids)
    if new_tokens is not None and regen_rows.any():
        G = new_tokens.shape[1]
        cols = (j + 1).unsqueeze(1) + torch.arange(G, device=device).unsqueeze(0)  # [B, G]
        keep = torch.arange(G, device=device).unsqueeze(0) < regen_len.unsqueeze(1)  # [B, G], False off regen rows
        row_idx = rows.unsqueeze(1).expand(B, G)
        out_ids[row_idx[keep], cols[keep]] = new_tokens[keep]
    out_mask = torch.zeros((B, width), dtype=completion_mask.dtype, device=device)
    out_mask[:, :L] = completion_mask
    out_mask = torch.where(corrected.unsqueeze(1), (positions < lengths.unsqueeze(1)).to(out_mask.dtype), out_mask)

    return SCRGResult(
        completion_ids=out_ids,
        completion_mask=out_mask,
        corrected=corrected,
        error_pos=torch.where(corrected, j, unchanged_long),
        divergence=torch.where(corrected, D_j, torch.zeros_like(D_j)),
        teacher_token=torch.where(corrected, t_j, unchanged_long),
        regen_len=torch.where(corrected, regen_len, torch.zeros_like(regen_len)),
        num_corrections=corrected.long(),
        teacher_logits=kept_logits,
        teacher_valid=torch.where(corrected, j + 1, torch.full_like(j, L)) if opts.keep_teacher_logits else None,
    )


def _regenerate(
    student,
    *,
    input_ids,
    attention_mask,
    prefix_lengths,
    regen_rows,
    left,
    generation_config,
    eos_token_ids,
    pad_token_id,
    generate_kwargs,
):
    """One batched `student.generate` over the rows in `regen_rows`, each continuing the first
    `prefix_lengths[r]` columns of `input_ids` for at most `left[r]` tokens.

    Returns `new_tokens` `[B, G]` (rows not re-generated are padding) and `regen_len` `[B]`, the number of new tokens
    kept per row (up to and including the first end token, at most `left[r]`; 0 off `regen_rows`).
    With no row to re-generate (`always_generate`), a one-token dummy call on row 0 keeps collectives in step.
    """
    B = input_ids.shape[0]
    device = input_ids.device
    idx = regen_rows.nonzero(as_tuple=True)[0]
    dummy = idx.numel() == 0
    if dummy:
        idx = torch.zeros(1, dtype=torch.long, device=device)
    prefix_ids, prefix_mask = _left_aligned_prefixes(
        input_ids[idx], attention_mask[idx], prefix_lengths[idx].clamp(max=input_ids.shape[1]), pad_token_id
    )
    max_new = 1 if dummy else int(left[idx].max().item())
    config = copy.deepcopy(generation_config)
    config.max_new_tokens = max_new
    if getattr(config, "min_new_tokens", None) is not None:
        config.min_new_tokens = min(config.min_new_tokens, max_new)
    config.max_length = None
    config.min_length = 0
    config.return_dict_in_generate = True
    config.output_scores = False
    config.output_logits = False
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    with torch.no_grad(), _eval_mode(student):
        out = student.generate(
            input_ids=prefix_ids, attention_mask=prefix_mask, generation_config=config, **(generate_kwargs or {})
        )
    sequences = out.sequences if hasattr(out, "sequences") else out
    generated = sequences[:, prefix_ids.shape[1] :].to(device)
    G = generated.shape[1]
    new_tokens = torch.full((B, G), pad_token_id, dtype=input_ids.dtype, device=device)
    regen_len = torch.zeros(B, dtype=torch.long, device=device)
    if dummy:
        return new_tokens, regen_len
    new_tokens[idx] = generated
    regen_len[idx] = torch.minimum(_first_end_lengths(generated, eos_token_ids), left[idx])
    return new_tokens, regen_len


def scrg_revise(
    student,
    teacher,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    rounds: int = 1,
    student_logits: torch.Tensor | None = None,
    **settings,
) -> SCRGResult:
    """Sequence correction and re-generation of a batch of student samples (DESIGN.md §2).

    Args:
        student, teacher: causal LMs (a `PeftModel` student is fine; unwrap DDP/DeepSpeed before calling). Both are
            run in eval mode under `no_grad`; their `training` flags are restored afterwards.
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts and their attention mask.
        completion_ids, completion_mask: `[B, L]` the student's sampled completions, mask 1 on real tokens up to and
            including the first end token (see `completion_from_generate`).
        rounds: correction rounds (0 returns the input unchanged); each round revises the previous round's output.
        student_logits: optional `[B, >=L, V]` student logits for round 1 (e.g. the generation pass's
            `output_logits`), which saves the student forward of round 1.
        settings: the fields of `SCRGSettings` (`generation_config`, `eos_token_ids` and `pad_token_id` required).

    Returns:
        `SCRGResult`; rows are revised independently, so the result of a batch equals revising each row alone (up
        to the numerics of padding and the RNG when sampling).
    """
    if rounds < 0:
        raise ValueError(f"scrg: rounds must be >= 0, got {rounds}.")
    opts = SCRGSettings(**settings)
    B = completion_ids.shape[0]
    device = completion_ids.device
    result = SCRGResult(
        completion_ids=completion_ids,
        completion_mask=completion_mask.to(prompt_mask.dtype),
        corrected=torch.zeros(B, dtype=torch.bool, device=device),
        error_pos=torch.full((B,), -1, dtype=torch.long, device=device),
        divergence=torch.zeros(B, dtype=torch.float32, device=device),
        teacher_token=torch.full((B,), -1, dtype=torch.long, device=device),
        regen_len=torch.zeros(B, dtype=torch.long, device=device),
        num_corrections=torch.zeros(B, dtype=torch.long, device=device),
    )
    if B == 0:
        return result
    for r in range(rounds):
        step = _revise_once(student, teacher, prompt_ids, prompt_mask, result.completion_ids, result.completion_mask,
                            opts, student_logits if r == 0 else None)
        c = step.corrected
        result = SCRGResult(
            completion_ids=step.completion_ids,
            completion_mask=step.completion_mask,
            corrected=result.corrected | c,
            error_pos=torch.where(c, step.error_pos, result.error_pos),
            divergence=torch.where(c, step.divergence, result.divergence),
            teacher_token=torch.where(c, step.teacher_token, result.teacher_token),
            regen_len=torch.where(c, step.regen_len, result.regen_len),
            num_corrections=result.num_corrections + step.num_corrections,
            teacher_logits=step.teacher_logits,
            teacher_valid=step.teacher_valid,
        )
    return result
