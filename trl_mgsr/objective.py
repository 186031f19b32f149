"""MGSR's loss on one micro-batch: a named term per granularity, each term's items, the weighted sum, the metrics.

Conventions (`losses/terms.py`): `student_logits`, `teacher_logits` `[B, T, V]` and `labels` `[B, T]` are shifted
(position k predicts `labels[:, k]`, -100 = no completion token there); every term is a `LossTerm` of sums, and the
loss divides each sum by its item count over the whole accumulation window and all ranks (`item_counts`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .losses import (IGNORE_INDEX, LossTerm, band_features, band_label_loss, chunked_dac_kl_loss, chunked_sft_loss,
                     chunked_span_loss, span_loglik_loss)
from .losses.terms import labelled_rows
from .spans import span_counts, span_groups, span_pair_mask

TERMS = ("sft", "dac_kl", "span", "band", "correction")  # "band": the band sub-network's own objective
WEIGHT_FIELDS = {"sft": "sft_weight", "dac_kl": "dac_weight", "span": "span_weight",
                 "correction": "scrg_correction_weight"}  # "band" trains only the band


def shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """`[B, T]` -> `[B, T]`: `x[:, k + 1]` at position k, `fill` at the last position."""
    return F.pad(x[:, 1:], (0, 1), value=fill)


def loss_terms(args, student_logits, teacher_logits, labels, *, sft=None, span_ids=None, band_net=None,
               train_band: bool = False, correction_labels=None, on_policy: bool) -> dict[str, LossTerm]:
    """The terms whose weight is > 0: `sft` (on `sft = (logits, labels)` when the SFT sequence is the dataset's and
    not the distillation sequence), `dac_kl` (and `band`, see `dac_kl_terms`; `on_policy`: the sequence is the
    student's sample, so DAC-KL leaves out its rescue), `span` (shifted `span_ids`) and
    `correction` (shifted `correction_labels`, on an on-policy batch: `scrg_correction_divergence`, forward KL by
    default, to the whole, unclipped teacher at each position SCRG corrected; measured against a cross-entropy on the
    teacher's token, which lowered `sort`)."""
    terms: dict[str, LossTerm] = {}
    if args.scrg_correction_weight > 0 and correction_labels is not None:
        term = chunked_dac_kl_loss(student_logits, teacher_logits, correction_labels, lo=0.0, hi=1.0,
                                   divergence=args.scrg_correction_divergence, beta=args.dac_beta,
                                   skew=args.dac_skew, temperature=args.dac_temperature,
                                   chunk_size=args.loss_chunk_size)
        terms["correction"] = LossTerm(term.total, term.num_items, {})  # the fixed band's stats say nothing
    if args.sft_weight > 0:
        sft_logits, sft_labels = sft if sft is not None else (student_logits, labels)
        terms["sft"] = chunked_sft_loss(sft_logits, sft_labels, chunk_size=args.loss_chunk_size)
    if args.dac_weight > 0:
        terms.update(dac_kl_terms(args, student_logits, teacher_logits, labels, band_net, train_band, on_policy))
    if args.span_weight > 0:
        if args.span_objective == "loglik":
            terms["span"] = span_loglik_loss(student_logits, teacher_logits, labels, span_ids,
                                             chunk_size=args.loss_chunk_size)
        else:
            terms["span"] = chunked_span_loss(student_logits, teacher_logits, labels, span_ids,
                                              distance=args.span_distance, chunk_size=args.loss_chunk_size)
    return terms


def dac_kl_terms(args, student_logits, teacher_logits, labels, band_net, train_band: bool,
                 on_policy: bool) -> dict[str, LossTerm]:
    """The token-level term: chunked DAC-KL with the learned band (or the fixed band `(dac_lo, dac_hi)` when
    `band_net` is None), and its rescue (`dac_rescue_weight`) unless the sequence is the student's (`on_policy`).

    With `dac_band_objective="label"` the divergence sees the band detached (it trains the student only) and, when
    `train_band` (the labels are the data's), a "band" term trains the sub-network on `band_label_loss`. With
    "joint" (the paper's) the sub-network is trained by the divergence itself.
    """
    a = args
    kwargs = dict(
        lo=a.dac_lo, hi=a.dac_hi, min_width=a.dac_min_width, sharpness=a.dac_sharpness,
        student_support=a.dac_student_support, divergence=a.dac_divergence, temperature=a.dac_temperature,
        rescue=0.0 if on_policy else a.dac_rescue_weight,
        num_features=a.dac_features, top_k=a.dac_top_k, beta=a.dac_beta, skew=a.dac_skew,
        chunk_size=a.loss_chunk_size,
    )
    if band_net is None or a.dac_band_objective == "joint":
        return {"dac_kl": chunked_dac_kl_loss(student_logits, teacher_logits, labels, band_net=band_net, **kwargs)}
    teacher_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    rows = labelled_rows(labels)
    lo, hi = band_net(band_features(teacher_flat, rows, a.dac_temperature, a.dac_features, a.loss_chunk_size))
    terms = {"dac_kl": chunked_dac_kl_loss(student_logits, teacher_logits, labels, band=(lo.detach(), hi.detach()),
                                           **kwargs)}
    if train_band:
        terms["band"] = band_label_loss(lo, hi, teacher_flat, rows, labels.reshape(-1), sharpness=a.dac_sharpness,
                                        width_cost=a.dac_band_width_cost, temperature=a.dac_temperature,
                                        chunk_size=a.loss_chunk_size)
    return terms


def weighted_loss(args, terms: dict[str, LossTerm], counts: dict[str, torch.Tensor] | None, like) -> torch.Tensor:
    """`sum_t weight_t * total_t / count_t`, with the window's `counts` (training) or each term's own items (None)."""
    loss = like.new_zeros(())
    for name, term in terms.items():
        count = counts[name] if counts is not None else term.num_items
        weight = getattr(args, WEIGHT_FIELDS[name]) if name in WEIGHT_FIELDS else 1.0
        loss = loss + weight * term.total / count.clamp(min=1)
    return loss


def item_counts(args, batch: dict[str, Any], train_band: bool) -> list[torch.Tensor]:
    """Each term's item count in one prepared micro-batch, in `TERMS` order: SFT and DAC-KL tokens, span items
    (spans with a pair for "loglik", the pairs for "product"), and band tokens when `train_band`."""
    labels = batch["labels"][:, 1:]
    sft_labels = batch.get("sft_labels", batch["labels"])[:, 1:]
    if "span_ids" not in batch:
        span = torch.zeros((), dtype=torch.long, device=labels.device)
    elif args.span_objective == "loglik":
        span = span_groups(batch["span_ids"][:, 1:], labels)[2]
    else:
        span = span_pair_mask(batch["span_ids"][:, 1:], labels).sum()
    tokens = (labels != IGNORE_INDEX).sum()
    corrections = (batch["mgsr_correction_labels"][:, 1:] != IGNORE_INDEX).sum() if (
        "mgsr_correction_labels" in batch) else torch.zeros((), dtype=torch.long, device=labels.device)
    return [(sft_labels != IGNORE_INDEX).sum(), tokens, span, tokens * train_band, corrections]


def term_ratios(terms: dict[str, LossTerm], inputs: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(metric, numerator, denominator)` to log: each term's mean over its items (`mgsr/<term>`) and its stats, the
    share of on-policy and replayed micro-batches, spans per sequence and span items per micro-batch."""
    one = torch.ones((), device=inputs["input_ids"].device)
    ratios = []
    for name, term in terms.items():
        ratios.append((f"mgsr/{name}", term.total.detach(), term.num_items))
        ratios += [(f"mgsr/{name}_{stat}", value, term.num_items) for stat, value in term.stats.items()]
    ratios += [(f"mgsr/{flag}", inputs[f"mgsr_{flag}"], one) for flag in ("on_policy", "replay")
               if f"mgsr_{flag}" in inputs]
    if "span" in terms:
        ratios.append(("mgsr/spans_per_seq", span_counts(inputs["span_ids"]).sum(), inputs["span_ids"].shape[0]))
        ratios.append(("mgsr/span_items", terms["span"].num_items, one))
    return ratios


def scrg_ratios(result) -> list[tuple[str, Any, Any]]:
    """`(metric, numerator, denominator)` of an `SCRGResult` under the trainer's names (`mgsr/scrg_<name>`)."""
    return [(f"mgsr/scrg_{name}", n, d) for name, n, d in result.metric_ratios()]
