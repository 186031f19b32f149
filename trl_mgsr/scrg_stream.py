"""SCRG in one decoding pass: the student samples, the teacher verifies each block of new tokens as it comes.

`scrg.scrg_revise` revises finished samples: the student samples whole completions, one teacher forward finds each
row's first rejected token, the token is corrected and the student re-generates the rest in a second `generate`
call; everything the student sampled after the error is thrown away, and the re-generated tokens need a second
teacher forward for the loss. `stream_scrg` computes the same revision (`error_rule="first_rejected"`) as the
sample is being drawn, the way speculative decoding verifies a draft:

1. the student samples a block of tokens, one per step with its KV cache (2 tokens, then blocks that double up to
   `block_size`);
2. the teacher reads the block (the prompt too, the first time) in ONE forward with its own KV cache and judges
   every new token of every row: rejected when `p_teacher(y) < reject_ratio * max p_teacher` (and `y` is not the
   teacher's token);
3. a row's first rejected token (while it has corrections left, `rounds`) becomes the teacher's token and the row
   resumes sampling right after it: the tokens it had drawn past the error become holes in both KV caches
   (attention mask 0; the row's next token takes the position after the correction), so nothing is recomputed;
   with `continuation="stop"` the row ends at the correction;
4. repeat until every row has ended (an end token or `max_new_tokens` tokens, each judged). Once no row that still
   samples has a correction left, the student samples to the end and the teacher reads the rest in one forward.
   After each teacher forward the rows that have ended leave both batches and KV caches (unless a cache layer keeps
   state that row selection would miss), so later forwards run on the rows still going.

With sliding-window attention the holes count towards the window (it is measured in cache slots), so a row
with corrections sees slightly fewer tokens than a fresh forward would once it is longer than the window.

What comes out is distributed as `scrg_revise`'s result for the same settings (the student's tokens up to the first
rejection, the teacher's token, the student's continuation from there) and equals it token for token when the
student's sampling is deterministic (tested with top-k 1). The teacher's logits of every position of the final
rows come with it (`keep_teacher_logits`), so the loss runs no teacher forward at all. Differences: a correction
token is never judged again (with `teacher_token="sample"` and `rounds > 1`, `scrg_revise` may correct a sampled
teacher token it rejects itself), and the student's samples come from the global RNG in another order.

Cost: the longest row's decoding steps plus, per correction, the steps its block had left (fewer than
`block_size`), and one teacher forward per block; against a whole `generate`, a teacher forward, a second
`generate` and a teacher forward for the loss on the re-generated rows. Blocks after the short rows have ended run
on the long rows only (`generate` steps every row to the end).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.generation import (
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .data import position_ids_from_mask
from .scrg import SCRGResult, SCRGSettings, _differences, _eos_tensor, _eval_mode, lm_logits

__all__ = ["sample_tokens", "stream_scrg", "streamable"]

# Student tokens of the first block; blocks then double up to `block_size`. SCRG's errors come early in a sample (the
# lab: mean position 0.4-0.7), where a short block wastes few steps; later blocks save teacher forwards.
FIRST_BLOCK = 2

# Sampling settings this decoding loop applies itself; any other field away from its neutral value means the
# caller must use `generate` (and `scrg_revise`).
_NEUTRAL = {
    "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_new_tokens": 0, "min_length": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "begin_suppress_tokens": None, "guidance_scale": None,
    "renormalize_logits": False, "watermarking_config": None,
}


def streamable(settings: SCRGSettings) -> bool:
    """Whether `stream_scrg` computes what `scrg_revise` (after `generate`) would with these settings: the
    first-rejected rule, and a sampling configuration that uses only temperature, top-k, top-p and suppressed
    tokens."""
    config = settings.generation_config
    if settings.error_rule != "first_rejected" or not config.do_sample or config.max_new_tokens is None:
        return False
    return all(getattr(config, name, None) in (None, neutral) for name, neutral in _NEUTRAL.items())


def _processors(config, device) -> list:
    """The logits warpers `generate` would apply for `config`, in its order; called one by one (a
    `LogitsProcessorList` inspects every processor's signature on every call)."""
    processors = []
    if config.suppress_tokens:
        processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.temperature is not None and config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    return processors


def sample_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` `[B, V]` (rows summing to 1, up to rounding), drawn by inverting each row's CDF
    with one uniform number from the global RNG: the distribution of `torch.multinomial(probs, 1)`, which on CPU
    draws a random number per vocabulary entry (0.45 ms a step at V=320, 42 ms at V=32k, against 0.08 and 1.7 ms
    here). A token of probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < total, so the first index whose CDF exceeds u exists and its CDF step (its probability) is positive
    u = (torch.rand_like(total) * total).minimum(total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _cache_argument(model) -> str:
    """The name a model's forward takes its KV cache by: `cache` (newer transformers) or `past_key_values`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", model)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _everywhere(flags: list[torch.Tensor], synced: bool) -> list[bool]:
    """Each 0-dim bool tensor of `flags`, ANDed over every process when `synced` (one host sync)."""
    both = torch.stack(flags).to(torch.int32)
    if synced and dist.is_available() and dist.is_initialized():
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
    return [bool(flag) for flag in both.tolist()]


class _Stream:
    """The decoding state of one batch. Slots are the columns of both KV caches: every student step appends one
    slot to every row (a row that is waiting feeds padding, masked); a slot keeps the token fed there, its position,
    its attention-mask bit and which completion index its logits predict (-1: none).

    Rows are the batch rows still decoding (`origin`: their index in the batch). `drop_finished` takes the rows that
    have ended out of every per-row tensor and both KV caches (their outcome goes to `final`), so the later forwards
    run on the rows that still decode; `finish` does it for every row."""

    ROW_FIELDS = ("ids", "mask", "pos", "predicts", "prompt_len", "out", "length", "stopped", "corrections",
                  "error_pos", "divergence", "teacher_token", "origin")
    OUTCOMES = ("out", "length", "corrections", "error_pos", "divergence", "teacher_token")

    def __init__(self, prompt_ids, prompt_mask, max_new_tokens, pad):
        B, P = prompt_ids.shape
        device = prompt_ids.device
        self.ids, self.mask = prompt_ids, prompt_mask.long()
        self.pos = position_ids_from_mask(prompt_mask)
        self.predicts = torch.full((B, P), -1, dtype=torch.long, device=device)
        self.predicts[:, -1] = 0  # left padding: the last prompt slot predicts completion token 0
        self.prompt_len = self.mask.sum(dim=1)
        self.prompt_width = P
        self.out = torch.full((B, max_new_tokens), pad, dtype=prompt_ids.dtype, device=device)
        self.length = torch.zeros(B, dtype=torch.long, device=device)  # completion tokens drawn (and kept)
        self.stopped = torch.zeros(B, dtype=torch.bool, device=device)  # ended, pending the teacher's verdict
        self.corrections = torch.zeros(B, dtype=torch.long, device=device)
        self.error_pos = torch.full((B,), -1, dtype=torch.long, device=device)  # completion index of the correction
        self.divergence = torch.zeros(B, dtype=torch.float32, device=device)  # -log ratio of the corrected token
        self.teacher_token = torch.full((B,), -1, dtype=torch.long, device=device)
        self.origin = torch.arange(B, device=device)
        self.rows = torch.arange(B, device=device)
        self.final = {name: getattr(self, name).clone() for name in self.OUTCOMES}

    def put(self, at: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """Write `tokens[r]` at completion index `at[r]` of each row where `rows[r]` (other rows' `at` may be out of
        range: they are left alone). No boolean indexing, so no host sync."""
        at = at.clamp(0, self.out.shape[1] - 1).unsqueeze(1)
        self.out.scatter_(1, at, torch.where(rows, tokens, self.out.gather(1, at).squeeze(1)).unsqueeze(1))

    def append(self, drawn: torch.Tensor, live: torch.Tensor, eos) -> None:
        """Write `drawn` `[rows]` as the next completion token of the `live` rows."""
        self.put(self.length, drawn, live)
        self.length = self.length + live.long()
        ended = self.length >= self.out.shape[1]
        if eos is not None:
            ended |= torch.isin(drawn, eos) & live
        self.stopped |= ended

    def add_slot(self, token, live, predicts) -> None:
        self.ids = torch.cat([self.ids, token.unsqueeze(1)], dim=1)
        self.mask = torch.cat([self.mask, live.long().unsqueeze(1)], dim=1)
        self.pos = torch.cat([self.pos, (self.prompt_len + self.length - 1).unsqueeze(1)], dim=1)
        self.predicts = torch.cat([self.predicts, predicts.unsqueeze(1)], dim=1)

    def drop_finished(self, caches) -> None:
        """Keep only the rows that have not ended, here and in `caches`; call it when the teacher has judged every
        token drawn. Keeps every row when none or all have ended (a process whose rows have all ended still runs
        the forwards of a synced loop), or when a cache holds a layer that cannot select rows."""
        keep = (~self.stopped).nonzero().squeeze(1)  # one host sync
        if keep.numel() in (0, self.stopped.numel()) or not all(_selectable(cache) for cache in caches):
            return
        self._record(self.stopped)
        for name in self.ROW_FIELDS:
            setattr(self, name, getattr(self, name)[keep])
        for cache in caches:
            cache.batch_select_indices(keep)
        self.rows = torch.arange(keep.numel(), device=keep.device)

    def finish(self) -> dict[str, torch.Tensor]:
        """The outcome of every batch row: `out` `[B, N]`, `length`, `corrections`, `error_pos`, `divergence`,
        `teacher_token` `[B]`."""
        self._record(torch.ones_like(self.stopped))
        return self.final

    def _record(self, rows: torch.Tensor) -> None:
        for name in self.OUTCOMES:
            self.final[name][self.origin[rows]] = getattr(self, name)[rows]


def _selectable(cache) -> bool:
    """Whether every layer of `cache` keeps its whole state in keys and values (rows can be selected)."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in getattr(cache, "layers", [None]))


def stream_scrg(student, teacher, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, rounds: int = 1,
                block_size: int = 16, **settings) -> SCRGResult:
    """Sample completions of `prompt_ids` from the student and revise them with SCRG as they are drawn.

    Args:
        student, teacher: causal LMs taking `attention_mask`, `position_ids` and a KV cache (`cache` or
            `past_key_values`); unwrapped; run in eval mode under `no_grad`, their `training` flags restored.
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts.
        rounds: corrections per row at most (0: plain sampling, the teacher still scores every token).
        block_size: the most student tokens drawn between two teacher forwards (>= 1; blocks start at 2 tokens and
            double). Larger blocks mean fewer teacher forwards and more student steps thrown away after a
            correction (fewer than the block's size per correction).
        settings: the fields of `SCRGSettings`; `streamable(SCRGSettings(**settings))` must hold. The completion
            budget is `generation_config.max_new_tokens`; `always_generate` makes every process run the same number
            of forwards (ZeRO-3/FSDP: the loop ends when every process is done); `generate_kwargs` and
            `kl_direction` do not apply (no `generate`, no student divergence).

    Returns:
        `SCRGResult`: completions `[B, L]` (`L` the longest row), their mask (up to and including the first end
        token), the correction records and, with `keep_teacher_logits`, the teacher's logits `[B, L, V]` predicting
        every completion token, all valid (`teacher_valid` = the row lengths).
    """
    opts = SCRGSettings(**settings)
    if not streamable(opts):
        raise ValueError("stream_scrg: needs error_rule='first_rejected' and a sampling generation_config that "
                         "uses only temperature, top_k, top_p and suppress_tokens; use scrg_revise otherwise.")
    if block_size < 1:
        raise ValueError(f"stream_scrg: block_size must be >= 1, got {block_size}.")
    if rounds < 0:
        raise ValueError(f"stream_scrg: rounds must be >= 0, got {rounds}.")
    N = opts.generation_config.max_new_tokens
    device = prompt_ids.device
    B = prompt_ids.shape[0]
    eos = _eos_tensor(opts.eos_token_ids, device)
    sample_from = _processors(opts.generation_config, device)
    log_ratio = math.log(opts.reject_ratio)
    vocab = opts.vocab_size
    s = _Stream(prompt_ids, prompt_mask, N, opts.pad_token_id)
    kept = None  # [B, N, V] teacher logits per completion index
    caches = DynamicCache(), DynamicCache()
    student_cache = {_cache_argument(student): caches[0], "use_cache": True}
    teacher_cache = {_cache_argument(teacher): caches[1], "use_cache": True}
    teacher_read = 0  # slots the teacher has read

    def draw(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warp in sample_from:
            scores = warp(s.ids, scores)
        return sample_tokens(F.softmax(scores, dim=-1))

    def student_step(first: bool) -> None:
        live = ~s.stopped
        if first:
            ids, mask, pos = s.ids, s.mask, s.pos
        else:
            token = torch.where(live, s.out[s.rows, (s.length - 1).clamp(min=0)], opts.pad_token_id)
            s.add_slot(token, live, torch.where(live, s.length, -1))
            ids, mask, pos = s.ids[:, -1:], s.mask, s.pos[:, -1:]
        logits = lm_logits(student, 1, input_ids=ids, attention_mask=mask, position_ids=pos, **student_cache)
        s.append(draw(logits[:, -1]), live, eos)

    def verify() -> None:
        """The teacher reads the slots it has not read and judges the tokens they predict."""
        nonlocal teacher_read, kept
        new = slice(teacher_read, s.ids.shape[1])
        # of the prompt's slots only the last predicts a completion token: the others' logits are not computed
        scored = slice(max(teacher_read, s.prompt_width - 1), s.ids.shape[1])
        logits = lm_logits(teacher, scored.stop - scored.start, input_ids=s.ids[:, new], attention_mask=s.mask,
                           position_ids=s.pos[:, new], **teacher_cache)
        teacher_read = s.ids.shape[1]
        logits = logits[..., :vocab] if vocab is not None else logits
        index = s.predicts[:, scored]  # [B, n] completion index each scored slot predicts
        judged = index >= 0
        drawn = s.out.gather(1, index.clamp(min=0))
        _, token, gap = _differences(logits, None, drawn, kl_direction=opts.kl_direction,
                                     teacher_token=opts.teacher_token, generator=opts.generator,
                                     chunk_size=opts.chunk_size)  # float32 working tensors [chunk, V] only
        rejected = judged & (drawn != token) & (gap < log_ratio) & (s.corrections < rounds).unsqueeze(1)
        if not opts.allow_eos and eos is not None:
            rejected &= ~torch.isin(token, eos)
        hit = rejected.any(dim=1)
        first = rejected.to(torch.int8).argmax(dim=1)  # [B] slot (within `scored`) of the first rejection
        later = torch.arange(index.shape[1], device=device).unsqueeze(0) > first.unsqueeze(1)
        discard = hit.unsqueeze(1) & later  # slots fed after the rejected token was drawn
        if opts.keep_teacher_logits:
            if kept is None:
                kept = logits.new_zeros(B, N, logits.shape[-1])
            keep = judged & ~discard
            kept[s.origin.unsqueeze(1).expand_as(index)[keep], index[keep]] = logits[keep]
        # holes in both caches: the slots of this block past the rejection
        s.mask[:, scored] = s.mask[:, scored].masked_fill(discard, 0)
        s.predicts[:, scored] = s.predicts[:, scored].masked_fill(discard, -1)
        j = index[s.rows, first]
        t_j = token[s.rows, first]
        s.put(j, t_j, hit)
        s.length = torch.where(hit, j + 1, s.length)
        ends = (j + 1 >= N) | (opts.continuation == "stop")
        if eos is not None:
            ends |= torch.isin(t_j, eos)
        s.stopped = torch.where(hit, ends, s.stopped)
        s.corrections = s.corrections + hit.long()
        s.error_pos = torch.where(hit, j, s.error_pos)
        s.divergence = torch.where(hit, -gap[s.rows, first], s.divergence)
        s.teacher_token = torch.where(hit, t_j, s.teacher_token)

    synced = opts.always_generate
    with torch.no_grad(), _eval_mode(student, teacher):
        if B > 0 and N > 0:
            student_step(first=True)
            size = min(FIRST_BLOCK, block_size)
            while True:
                steps = 0
                while True:
                    # settled: no row that still samples can be corrected, so the teacher's verdict waits for the end
                    settled = (s.stopped | (s.corrections >= rounds)).all()
                    done, settled = _everywhere([s.stopped.all(), settled], synced)
                    if done or (steps >= size and not settled):
                        break
                    student_step(first=False)
                    steps += 1
                verify()
                if _everywhere([s.stopped.all()], synced)[0]:
                    break
                s.drop_finished(caches)
                size = min(2 * size, block_size)

    row = s.finish()
    length, corrections, error_pos = row["length"], row["corrections"], row["error_pos"]
    width = int(length.max().item()) if B > 0 else 0
    positions = torch.arange(width, device=device).unsqueeze(0)
    completion_mask = (positions < length.unsqueeze(1)).to(prompt_mask.dtype)
    completion_ids = row["out"][:, :width].masked_fill(completion_mask == 0, opts.pad_token_id)
    corrected = corrections > 0
    regen = torch.where(corrected, length - error_pos - 1, torch.zeros_like(length))
    return SCRGResult(
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        corrected=corrected,
        error_pos=error_pos,
        divergence=row["divergence"],
        teacher_token=row["teacher_token"],
        regen_len=regen,
        num_corrections=corrections,
        teacher_logits=kept[:, :width] if kept is not None else None,
        teacher_valid=length.clone() if opts.keep_teacher_logits else None,
    )
