"""`MGSRTrainer`: TRL's `GKDTrainer` with MGSR's generation hook (SCRG) and loss (SFT + DAC-KL + span).

How a training step flows (the parts GKD users know keep their names):

1. `get_batch_samples` fetches the micro-batches of one gradient-accumulation window and turns each into a
   *distillation batch* (`prepare_distillation_batch`): the schedule picks the sequence source (student sample
   revised by SCRG, teacher sample for `seq_kd`, or the dataset completion), the dataset tensors are kept aside
   as `sft_*` for the SFT term, and span ids are computed. Then the items of every loss term are counted over the
   whole window and summed over all ranks.
2. `training_step` runs as in `transformers.Trainer`; `compute_loss` runs the student (and the teacher, no grad)
   teacher-forced on the distillation sequence, computes each term as a sum and divides it by the window count.
   The loss is multiplied by the number of processes because data parallelism averages gradients, so that
   N ranks x GA k x batch b gives the gradient of one batch N*k*b (`loss_is_scaled_for_ga = True`).
"""

from __future__ import annotations

import copy
import functools
import os
import random
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import datasets
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import disable_dropout_in_model

from . import guards
from ._trl import GKDConfig, GKDTrainer
from .config import MGSRConfig
from .data import MGSRDataCollator, detect_format, position_ids_from_mask, split_prompt_completion
from .data import left_pad
from .generation import pure_sampling
from .losses import (IGNORE_INDEX, DACBandNet, LossTerm, band_features, band_label_loss, chunked_dac_kl_loss,
                     chunked_sft_loss, chunked_span_loss, span_loglik_loss)
from .losses.terms import labelled_rows
from .runtime import quiet_trl_deprecations
from .schedule import OFF_POLICY, REPLAY, STUDENT, AdaptiveSchedule, GKDSchedule
from .scrg import assemble_on_policy_batch, completion_from_generate, scrg_revise
from .spans import get_span_extractor, span_counts, span_groups, span_ids_from_tokens, span_pair_mask

TERMS = ("sft", "dac_kl", "span", "band")  # "band": the band sub-network's own objective (dac_band_objective="label")
REPLAY_KEYS = ("input_ids", "attention_mask", "labels", "span_ids")
WEIGHT_FIELDS = {"sft": "sft_weight", "dac_kl": "dac_weight", "span": "span_weight"}  # "band" trains only the band
STATE_FILE = "mgsr_state.pt"


class MGSRTrainer(GKDTrainer):
    """Trainer for MGSR knowledge distillation; a drop-in replacement for `GKDTrainer`.

    Takes the same arguments as `GKDTrainer` (plus `span_extractor`, a callable `text -> [(start, end)]` that
    overrides `args.span_extractor`). `args` may be an `MGSRConfig` or a plain `GKDConfig` (converted, MGSR options
    at their defaults).

    Differences from `GKDTrainer`, all deliberate:
    - the loss is `sft_weight * L_SFT + dac_weight * L_DAC-KL + span_weight * L_span` (see `MGSRConfig`), each term
      normalised by its item count over the accumulation window and all ranks, counted after generation;
    - the on-policy coin comes from a dedicated RNG seeded with `args.seed`, so every rank draws the same decision;
    - generation uses the KV cache even with gradient checkpointing on (`generation_use_cache`);
    - every forward gets position ids derived from the attention mask;
    - a teacher whose vocab differs from the student's only by padding rows is accepted with
      `truncate_teacher_vocab=True`; `teacher_model_init_kwargs` may omit `dtype`;
    - `GKDTrainer.__init__` is not run (its vocab check and kwargs handling are replaced); its attributes
      (`teacher_model`, `lmbda`, `beta`, `temperature`, `seq_kd`, `generation_config`) exist with the same meaning.
    """

    _tag_names = ["trl", "gkd", "mgsr"]
    _name = "MGSR"
    _paper = {
        "title": "Multi-Granularity Semantic Revision for Large Language Model Distillation",
        "id": "2407.10068",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{liu2026mgsr,
                title        = {{Multi-Granularity Semantic Revision for Large Language Model Distillation}},
                author       = {Xiaoyu Liu and Yun Zhang and Wei Li and Simiao Li and Xudong Huang and Hanting Chen and Yehui Tang and Jie Hu and Zhiwei Xiong and Yunhe Wang},
                year         = 2026,
                booktitle    = {Proceedings of the Annual Meeting of the Association for Computational Linguistics (ACL)},
                eprint       = {arXiv:2407.10068},
            }"""),
    }
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher_model: nn.Module | str | None = None,
        args: GKDConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        formatting_func=None,
        span_extractor: Callable[[str], list[tuple[int, int]]] | None = None,
    ):
        args = _as_mgsr_config(args, model)
        if formatting_func is not None:
            raise ValueError(
                "MGSRTrainer does not take `formatting_func`: give rows with `messages` or `prompt`/`completion` "
                "columns (format them with `dataset.map` first)."
            )
        _check_adaptive_schedule(args, eval_dataset)
        guards.check_model_path(model, "model")
        guards.check_model_path(teacher_model if teacher_model is not None else args.teacher_model_name_or_path,
                                "teacher_model")
        guards.check_datasets(_named_datasets(train_dataset, eval_dataset))  # SFTTrainer fails on none with a bare error
        quiet_trl_deprecations()
        teacher_model = _load_teacher(teacher_model, args)
        if isinstance(model, nn.Module) and _shares_weights(model, teacher_model):
            raise ValueError(
                "`teacher_model` shares weights with the student `model` (the same model object, or the student's "
                "base model): the teacher would change with the student, and with `peft_config` it would run the "
                "student's adapters. Load the teacher separately (e.g. `teacher_model=<path or Hub id>`)."
            )
        if processing_class is None:
            source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            if not source:
                raise ValueError("MGSRTrainer needs `processing_class` (the tokenizer) when `model` is not a path/id.")
            processing_class = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)

        # Built once here, so a missing NLTK/spaCy fails at construction rather than mid-training.
        self.span_extractor = (
            get_span_extractor(span_extractor or args.span_extractor, **(args.span_extractor_kwargs or {}))
            if args.span_weight > 0
            else None
        )
        args.remove_unused_columns = False  # the collator needs the raw columns
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if data_collator is None:
            data_collator = MGSRDataCollator(
                processing_class,
                max_length=args.max_length,
                # not the bound `self.span_ids`: DataLoader workers would pickle the whole trainer with it
                span_fn=functools.partial(span_ids_from_tokens, extractor=self.span_extractor)
                if self.span_extractor else None,
            )

        SFTTrainer.__init__(
            self,
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
        )
        # After SFTTrainer.__init__: `chat_template_path` may have given the tokenizer its chat template.
        if isinstance(self.data_collator, MGSRDataCollator):
            self.data_collator.tokenizer = self.processing_class
        for name, dataset in _named_datasets(train_dataset, eval_dataset):
            _validate_dataset(dataset, self.processing_class, name)
            if isinstance(self.data_collator, MGSRDataCollator) and not isinstance(dataset, datasets.IterableDataset):
                report = self.data_collator.truncation_report(dataset, name)  # how many rows, cut which way
                if report:
                    warnings.warn(report, stacklevel=2)
        self.shared_vocab_size = _shared_vocab_size(self.model, teacher_model, processing_class, args)
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
            disable_dropout_in_model(teacher_model)
        if self.is_deepspeed_enabled:
            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

        self.beta, self.temperature, self.seq_kd = args.beta, args.temperature, args.seq_kd
        self.dac_band_net, self._band_optimizer = None, None
        if args.dac_weight > 0 and args.dac_mode == "learned":
            with torch.random.fork_rng(devices=[]):  # same initial weights on every rank, global RNG untouched
                torch.manual_seed(args.seed)
                self.dac_band_net = DACBandNet.from_config(args).to(self.args.device)
            self.add_callback(_BandNetStep(self))
        self.generation_kwargs = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "do_sample": True,
            "top_k": 0,
            "top_p": 1.0,
            "use_cache": args.generation_use_cache or not args.gradient_checkpointing,
            "pad_token_id": processing_class.pad_token_id,
        }
        student_vocab = self.model.config.get_text_config().vocab_size
        if self.shared_vocab_size < student_vocab:  # never sample ids the teacher does not have
            self.generation_kwargs["suppress_tokens"] = list(range(self.shared_vocab_size, student_vocab))
        self.generation_config = GenerationConfig(**self.generation_kwargs)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.generation_config.eos_token_id = eos if eos is not None else processing_class.eos_token_id
        self.teacher_generation_config = copy.deepcopy(self.generation_config)  # for `seq_kd`
        teacher_vocab = teacher_model.config.get_text_config().vocab_size
        self.teacher_generation_config.suppress_tokens = (
            list(range(self.shared_vocab_size, teacher_vocab)) if self.shared_vocab_size < teacher_vocab else None
        )
        # One RNG for every schedule decision; same seed on every rank, same number of draws => same decisions.
        rng = random.Random(args.seed)
        if args.schedule == "adaptive":
            self.schedule = AdaptiveSchedule(
                rng, args.init_threshold, args.threshold_step, args.loss_eps, args.replay_capacity,
                args.replay_ratio_start, args.replay_ratio_end,
            )
        else:
            self.schedule = GKDSchedule(rng, args.lmbda)
        self.lmbda = args.lmbda
        self._rng_resume: str | None = None  # checkpoint whose RNG state must be restored before generating

    # ------------------------------------------------------------------ schedule and batch preparation

    @property
    def lmbda(self) -> float:
        """GKD's student-sample probability. Setting it (e.g. from a callback, to anneal it) changes the coin of
        `schedule="gkd"` from the next micro-batch on, as in `GKDTrainer`."""
        return self._lmbda

    @lmbda.setter
    def lmbda(self, value: float) -> None:
        self._lmbda = value
        if isinstance(self.schedule, GKDSchedule):
            self.schedule.lmbda = value

    def next_sequence_source(self, batch_size: int = 1) -> str:
        """Draw the source of the next micro-batch's distillation sequence: "student", "replay" (adaptive
        schedule), "teacher" (`seq_kd`) or "dataset"."""
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0
        source = self.schedule.decide(progress, batch_size)
        if source == OFF_POLICY:
            return "teacher" if self.seq_kd else "dataset"
        return source

    def prepare_distillation_batch(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Replace the dataset sequence by the step's distillation sequence; keep the dataset tensors as `sft_*`."""
        source = self.next_sequence_source(inputs["input_ids"].shape[0])
        if source != "dataset":
            if self.args.sft_weight > 0:
                for key in ("input_ids", "attention_mask", "labels"):
                    inputs[f"sft_{key}"] = inputs[key]
            inputs.pop("span_ids", None)  # the dataset's spans
            if source == STUDENT:
                with unwrap_model_for_generation(
                    self.model_wrapped,
                    self.accelerator,
                    generation_kwargs=self.generation_kwargs,
                    gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                ) as unwrapped, pure_sampling(unwrapped), \
                        guards.finite_logits(self, unwrapped, "student", "in on-policy sampling"), \
                        guards.finite_logits(self, self.teacher_model, "teacher", "in SCRG (before any correction)"):
                    inputs.update(self.sample_and_revise(unwrapped, inputs, self.generation_config))
            elif source == REPLAY:  # buffered samples bring their own span ids
                inputs.update(self._replayed_batch(inputs["input_ids"].shape[0], inputs["input_ids"].device))
            else:
                with unwrap_model_for_generation(
                    self.teacher_model, self.accelerator, generation_kwargs=self.generation_kwargs
                ) as unwrapped, pure_sampling(unwrapped), \
                        guards.finite_logits(self, unwrapped, "teacher", "in seq_kd sampling"):
                    ids, mask, labels = GKDTrainer.generate_on_policy_outputs(
                        unwrapped, inputs, self.teacher_generation_config
                    )
                inputs.update(input_ids=ids, attention_mask=mask, labels=labels)
        if self.span_extractor is not None and "span_ids" not in inputs:
            inputs["span_ids"] = self.span_ids(self.processing_class, inputs["input_ids"], inputs["labels"] != -100)
        if source == STUDENT and isinstance(self.schedule, AdaptiveSchedule):
            self.schedule.buffer.add_batch(inputs, REPLAY_KEYS)
        device = inputs["input_ids"].device
        inputs["mgsr_on_policy"] = torch.tensor(float(source == STUDENT), device=device)
        inputs["mgsr_replay"] = torch.tensor(float(source == REPLAY), device=device)
        inputs["mgsr_labels_are_data"] = source == "dataset"  # the band's objective needs ground-truth labels
        inputs["mgsr_prepared"] = True
        return inputs

    def _replayed_batch(self, batch_size: int, device) -> dict[str, torch.Tensor]:
        """`batch_size` distinct buffered samples, left-padded: `input_ids`, `attention_mask`, `labels` and, when
        the span term is on, `span_ids`."""
        rows = self.schedule.buffer.sample(batch_size, self.schedule.rng)
        padding = {"input_ids": self.processing_class.pad_token_id, "attention_mask": 0, "labels": -100, "span_ids": -1}
        return {key: left_pad([row[key].tolist() for row in rows], value).to(device)
                for key, value in padding.items() if key in rows[0]}

    def span_ids(self, tokenizer, input_ids, completion_mask):
        """Span ids `[B, T]` of the completion tokens (-1 elsewhere), from `span_extractor`; off the graph."""
        return span_ids_from_tokens(tokenizer, input_ids, completion_mask, self.span_extractor)

    def generate_on_policy_outputs(self, model, inputs, generation_config):
        """GKD's hook: sample completions from the student and revise them with SCRG; returns GKD's layout
        `(input_ids, attention_mask, labels)` (see `sample_and_revise`)."""
        batch = self.sample_and_revise(model, inputs, generation_config)
        return batch["input_ids"], batch["attention_mask"], batch["labels"]

    def sample_and_revise(self, model, inputs, generation_config) -> dict[str, torch.Tensor]:
        """Sample completions from the student and revise them with SCRG.

        Returns `input_ids`, `attention_mask` (left-padded prompt, completion up to and including its first end
        token) and `labels` (-100 on prompt and padding) and, when SCRG ran and `scrg_reuse_teacher_logits` is on,
        `mgsr_teacher_logits` `[B, L, V]` (SCRG's teacher logits predicting each completion token) with
        `mgsr_teacher_valid` `[B]` (how many leading completion positions they still predict right), which
        `teacher_logits` reuses instead of running the teacher again. The sampling pass's own logits serve as the
        student's logits of SCRG's first round (no extra student forward). With `scrg_rounds=0` this is GKD's hook.
        """
        prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        pad, eos = self.processing_class.pad_token_id, generation_config.eos_token_id
        use_scrg = self.args.scrg_rounds > 0
        sampling_config = copy.deepcopy(generation_config)
        sampling_config.update(return_dict_in_generate=True,
                               output_logits=use_scrg and self.args.scrg_error == "max_divergence")
        out = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=sampling_config)
        completion_ids, completion_mask = completion_from_generate(out.sequences, prompts.shape[1], eos)
        cache = {}
        if use_scrg:
            sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled  # every rank must run the same collectives
            result = scrg_revise(
                model,
                self.teacher_model,
                prompts,
                prompt_mask,
                completion_ids,
                completion_mask,
                generation_config=generation_config,
                eos_token_ids=eos,
                pad_token_id=pad,
                rounds=self.args.scrg_rounds,
                error_rule=self.args.scrg_error,
                reject_ratio=self.args.scrg_reject_ratio,
                kl_direction=self.args.scrg_kl_direction,
                teacher_token=self.args.scrg_teacher_token,
                allow_eos=self.args.scrg_allow_eos_correction,
                continuation=self.args.scrg_continuation,
                vocab_size=self.shared_vocab_size,
                student_logits=torch.stack(out.logits, dim=1) if out.logits else None,
                always_generate=sharded,
                generate_kwargs={"synced_gpus": True} if sharded else None,
                chunk_size=self.args.loss_chunk_size,
                keep_teacher_logits=self.args.scrg_reuse_teacher_logits,
            )
            completion_ids, completion_mask = result.completion_ids, result.completion_mask
            if result.teacher_logits is not None:
                cache = {"mgsr_teacher_logits": result.teacher_logits, "mgsr_teacher_valid": result.teacher_valid,
                         "mgsr_prompt_width": prompts.shape[1]}
            self._log_scrg(result)
        ids, mask, labels = assemble_on_policy_batch(prompts, prompt_mask, completion_ids, completion_mask, pad)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **cache}

    def _log_scrg(self, result) -> None:
        """Per-step SCRG metrics over all ranks: share of rows corrected and means over corrected rows."""
        sums = result.metric_sums()
        values = torch.stack(list(sums.values()))
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        s = dict(zip(sums, values.tolist()))
        corrected = max(s["corrected"], 1.0)
        metrics = self._metrics["train"]
        metrics["mgsr/scrg_corrected_frac"].append(s["corrected"] / max(s["rows"], 1.0))
        for key in ("error_pos", "divergence", "regen_len"):
            metrics[f"mgsr/scrg_{key}"].append(s[key] / corrected)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch one accumulation window, prepare each micro-batch, and count every term's items over the window.

        Returns `(batches, counts)`; `counts` maps each term to its item count summed over the window and all
        ranks, and is what `compute_loss` receives as `num_items_in_batch`.
        """
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self._rng_resume is not None:  # see `_load_rng_state`
            checkpoint, self._rng_resume = self._rng_resume, "restored"
            super()._load_rng_state(checkpoint)
        batches = [self.prepare_distillation_batch(self._prepare_inputs(batch)) for batch in batches]
        return batches, self.count_items(batches, device)

    def count_items(self, batches: list[dict[str, Any]], device=None) -> dict[str, torch.Tensor]:
        """Item count of each loss term summed over `batches` and over all processes."""
        local = torch.zeros(len(TERMS), dtype=torch.long, device=device or self.args.device)
        for batch in batches:
            for i, (_, count) in enumerate(self._term_item_counts(batch)):
                local[i] += count
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return dict(zip(TERMS, total))

    def _term_item_counts(self, batch):
        labels = batch["labels"][:, 1:]
        sft_labels = batch.get("sft_labels", batch["labels"])[:, 1:]
        return [
            ("sft", (sft_labels != -100).sum()),
            ("dac_kl", (labels != -100).sum()),
            ("span", self._span_items(batch["span_ids"][:, 1:], labels) if "span_ids" in batch
             else torch.zeros((), dtype=torch.long, device=labels.device)),
            ("band", (labels != -100).sum() * self._trains_band(batch)),
        ]

    def _trains_band(self, batch) -> bool:
        """Whether this batch trains the band sub-network with its own objective: a training batch whose labels are
        the data's (never in evaluation, whose loss stays the student's)."""
        return (self.dac_band_net is not None and self.args.dac_band_objective == "label" and self.model.training
                and batch.get("mgsr_labels_are_data", True))

    def _span_items(self, span_ids, labels):
        """The span term's items: spans with a pair ("loglik") or the pairs themselves ("product")."""
        if self.args.span_objective == "loglik":
            return span_groups(span_ids, labels)[2]
        return span_pair_mask(span_ids, labels).sum()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs.get("mgsr_prepared"):  # called outside the training loop: this batch is the whole window
            inputs = self.prepare_distillation_batch(self._prepare_inputs(inputs))
            num_items_in_batch = self.count_items([inputs])
        # SFTTrainer's step (activation offloading), not GKD's: the batch is already the distillation batch.
        loss = SFTTrainer.training_step(self, model, inputs, num_items_in_batch)
        if self.dac_band_net is not None and self.accelerator.sync_gradients:  # the window's last backward
            self._sync_band_gradients()
        return loss

    # ------------------------------------------------------------------ loss

    def _forward(self, model, input_ids, attention_mask):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`sum_t weight_t * (term_t sum / term_t count)`; counts come from `count_items` during training.

        Outside the training loop (evaluation) each term is a mean over this batch's own items.
        """
        vocab = self.shared_vocab_size
        student_outputs = self._forward(model, inputs["input_ids"], inputs["attention_mask"])
        teacher_logits = self.teacher_logits(inputs)
        # Position k predicts token k+1: labels shift left instead of the logits losing their last position, so the
        # logits stay contiguous and the losses flatten them without a copy.
        student_logits = student_outputs.logits[..., :vocab]
        teacher_logits = teacher_logits[..., :vocab]
        labels = _shift_left(inputs["labels"], IGNORE_INDEX)

        terms: dict[str, LossTerm] = {}
        if self.args.sft_weight > 0:
            if "sft_input_ids" in inputs:
                sft_logits = self._forward(model, inputs["sft_input_ids"], inputs["sft_attention_mask"]).logits
                sft_logits, sft_labels = sft_logits[..., :vocab], _shift_left(inputs["sft_labels"], IGNORE_INDEX)
            else:
                sft_logits, sft_labels = student_logits, labels
            terms["sft"] = chunked_sft_loss(sft_logits, sft_labels, chunk_size=self.args.loss_chunk_size)
        if self.args.dac_weight > 0:
            terms.update(self.dac_kl_terms(student_logits, teacher_logits, labels, self._trains_band(inputs)))
        if self.args.span_weight > 0:
            if "span_ids" not in inputs:  # a user collator without spans
                inputs["span_ids"] = self.span_ids(self.processing_class, inputs["input_ids"], inputs["labels"] != -100)
            span_ids = _shift_left(inputs["span_ids"], -1)
            if self.args.span_objective == "loglik":
                terms["span"] = span_loglik_loss(student_logits, teacher_logits, labels, span_ids,
                                                 chunk_size=self.args.loss_chunk_size)
            else:
                terms["span"] = chunked_span_loss(
                    student_logits, teacher_logits, labels, span_ids, distance=self.args.span_distance,
                    chunk_size=self.args.loss_chunk_size,
                )

        global_counts = isinstance(num_items_in_batch, dict)
        loss = student_logits.new_zeros(())
        for name, term in terms.items():
            count = num_items_in_batch[name] if global_counts else term.num_items
            weight = getattr(self.args, WEIGHT_FIELDS[name]) if name in WEIGHT_FIELDS else 1.0
            loss = loss + weight * term.total / count.clamp(min=1)
        if global_counts:
            loss = loss * self.accelerator.num_processes
        guards.check_loss(self, loss, terms, student_logits, teacher_logits, inputs["attention_mask"])
        self._log_terms(terms, inputs)
        return (loss, student_outputs) if return_outputs else loss

    def teacher_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The teacher's logits `[B, T, V]` on the distillation sequence (no grad).

        After SCRG (`mgsr_teacher_logits` in `inputs`) they are SCRG's wherever those still hold, and the teacher
        runs only on the rows that have positions past that (a corrected row that was re-generated); positions that
        predict no completion token are 0. Otherwise one teacher forward on the whole batch. Under DeepSpeed/FSDP the
        teacher runs once per call on every rank (on at least one row), so the ranks' collectives stay in step.
        """
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        self.teacher_model.eval()
        with torch.no_grad():
            cached = inputs.get("mgsr_teacher_logits")
            if cached is None:
                return self._forward(self.teacher_model, ids, mask).logits
            B, T = ids.shape
            L, V = cached.shape[1], cached.shape[2]
            width = T - inputs["mgsr_prompt_width"]  # completion width; cached position i predicts token i
            logits = F.pad(cached[:, : min(L, width)], (0, 0, T - width - 1, max(width - L, 0) + 1))
            lengths = (inputs["labels"][:, T - width:] != -100).sum(dim=1)
            need = (inputs["mgsr_teacher_valid"] < lengths).nonzero(as_tuple=True)[0]
            if need.numel() == 0 and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                need = torch.zeros(1, dtype=torch.long, device=ids.device)  # a forward whose result is the cache's
            if need.numel() > 0:
                logits[need] = self._forward(self.teacher_model, ids[need], mask[need]).logits[..., :V].to(logits.dtype)
            return logits

    def dac_kl_terms(self, student_logits, teacher_logits, labels, train_band: bool) -> dict[str, LossTerm]:
        """The token-level term: chunked DAC-KL with the learned band (or the fixed band `(dac_lo, dac_hi)`).

        With `dac_band_objective="label"` the divergence sees the band detached (it trains the student only) and,
        when `train_band` (the labels are the data's), a "band" term trains the sub-network on `band_label_loss`.
        With "joint" (the paper's) the sub-network is trained by the divergence itself.
        """
        a = self.args
        kwargs = dict(
            lo=a.dac_lo, hi=a.dac_hi, min_width=a.dac_min_width, sharpness=a.dac_sharpness,
            student_support=a.dac_student_support, divergence=a.dac_divergence, temperature=a.dac_temperature,
            num_features=a.dac_features, top_k=a.dac_top_k, beta=a.dac_beta, skew=a.dac_skew,
            chunk_size=a.loss_chunk_size,
        )
        if self.dac_band_net is None or a.dac_band_objective == "joint":
            return {"dac_kl": chunked_dac_kl_loss(student_logits, teacher_logits, labels, band_net=self.dac_band_net,
                                                  **kwargs)}
        teacher_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
        rows = labelled_rows(labels)
        lo, hi = self.dac_band_net(band_features(teacher_flat, rows, a.dac_temperature, a.dac_features,
                                                 a.loss_chunk_size))
        terms = {"dac_kl": chunked_dac_kl_loss(student_logits, teacher_logits, labels, band=(lo.detach(), hi.detach()),
                                               **kwargs)}
        if train_band:
            terms["band"] = band_label_loss(lo, hi, teacher_flat, rows, labels.reshape(-1), sharpness=a.dac_sharpness,
                                            width_cost=a.dac_band_width_cost, temperature=a.dac_temperature,
                                            chunk_size=a.loss_chunk_size)
        return terms

    # ------------------------------------------------------------------ the band sub-network's optimisation

    def create_optimizer(self, model=None):
        """The user's optimizer, plus a parameter group for the band sub-network (`dac_learning_rate`, no weight
        decay), which then follows the learning-rate schedule like the student. The band sub-network gets its own
        AdamW at a constant `dac_learning_rate` instead (stepped right after the main optimizer) under DeepSpeed or
        FSDP, whose engines only take model parameters, and when the user passed their own scheduler, which was
        built over the optimizer's existing groups."""
        optimizer = super().create_optimizer(model)
        if self.dac_band_net is None:
            return optimizer
        params = list(self.dac_band_net.parameters())
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.lr_scheduler is not None:
            if self._band_optimizer is None:
                self._band_optimizer = torch.optim.AdamW(params, lr=self.args.dac_learning_rate, weight_decay=0.0)
        elif not any(p is params[0] for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": params, "lr": self.args.dac_learning_rate, "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model):
        """Clip the band sub-network's gradients with the student's: one global norm when it is in the main
        optimizer, its own norm otherwise (when it has its own optimizer the engine clips the student)."""
        band = [] if self.dac_band_net is None else list(self.dac_band_net.parameters())
        if band and self._band_optimizer is None and not self._has_mixed_mesh_grads(model):
            norm = self.accelerator.clip_grad_norm_([*model.parameters(), *band], self.args.max_grad_norm)
        else:
            if band:
                torch.nn.utils.clip_grad_norm_(band, self.args.max_grad_norm)
            norm = super()._clip_grad_norm(model)
        guards.check_grad_norm(self, norm)  # before the optimizer step writes the weights
        return norm

    def _sync_band_gradients(self) -> None:
        """Average the band sub-network's gradients over ranks, as DDP does for the student (it is not wrapped)."""
        if self.accelerator.num_processes == 1:
            return
        params = list(self.dac_band_net.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.accelerator.num_processes
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _finish_band_step(self) -> None:
        """Step the band's own optimizer, except on a step whose gradients overflowed (fp16 loss scaling: the
        engine skips that step too), then zero the band's gradients."""
        if self._band_optimizer is not None:
            grads = [p.grad for p in self.dac_band_net.parameters() if p.grad is not None]
            if grads and all(torch.isfinite(g).all() for g in grads):
                self._band_optimizer.step()
        self.dac_band_net.zero_grad(set_to_none=True)  # Trainer only zeroes the model's gradients

    def _log_terms(self, terms: dict[str, LossTerm], inputs) -> None:
        """Log ratios summed over all ranks in one gather: each term's mean over its items (`mgsr/<term>`) and its
        stats, the share of on-policy and replayed micro-batches, spans per sequence and span pairs per
        micro-batch."""
        mode = "train" if self.model.training else "eval"
        one = torch.ones((), device=inputs["input_ids"].device)
        ratios = []  # (key, numerator, denominator)
        for name, term in terms.items():
            ratios.append((f"mgsr/{name}", term.total.detach(), term.num_items))
            ratios += [(f"mgsr/{name}_{stat}", value, term.num_items) for stat, value in term.stats.items()]
        ratios += [(f"mgsr/{flag}", inputs[f"mgsr_{flag}"], one) for flag in ("on_policy", "replay")
                   if f"mgsr_{flag}" in inputs]
        if "span" in terms:
            ratios.append(("mgsr/spans_per_seq", span_counts(inputs["span_ids"]).sum(), inputs["span_ids"].shape[0]))
            ratios.append(("mgsr/span_items", terms["span"].num_items, one))
        values = torch.stack([torch.stack([torch.as_tensor(n, device=one.device).float(),
                                           torch.as_tensor(d, device=one.device).float()]) for _, n, d in ratios])
        if self.accelerator.num_processes > 1:  # not gather_for_metrics: it drops ranks at the end of an epoch
            values = self.accelerator.reduce(values, reduction="sum")
        summed = values.tolist()
        for (key, _, _), (numerator, denominator) in zip(ratios, summed):
            self._metrics[mode][key].append(numerator / denominator if denominator > 0 else 0.0)

    # ------------------------------------------------------------------ checkpoints

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

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """`Trainer.evaluate`; the adaptive schedule also sees the evaluation loss of the trainer's own (first)
        eval dataset, not of a dataset passed in ad hoc."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        own = eval_dataset is None or isinstance(eval_dataset, str)  # a str names one of `self.eval_dataset`
        first = own and (metric_key_prefix == "eval" or (
            isinstance(self.eval_dataset, dict) and metric_key_prefix == f"eval_{next(iter(self.eval_dataset))}"
        ))
        if isinstance(self.schedule, AdaptiveSchedule) and first and f"{metric_key_prefix}_loss" in metrics:
            self.schedule.on_eval_loss(metrics[f"{metric_key_prefix}_loss"])
            self._metrics["train"]["mgsr/student_threshold"].append(self.schedule.threshold)
        return metrics

    def mgsr_state_dict(self) -> dict[str, Any]:
        """Everything MGSR owns that a resumed run needs and that is not part of the saved student: the schedule
        (RNG, adaptive threshold, replay buffer) and the band sub-network. Its optimizer state lives in the main
        optimizer's checkpoint (or here under DeepSpeed/FSDP, where it has its own optimizer)."""
        state = {"schedule": self.schedule.state_dict()}
        if self.dac_band_net is not None:
            state["band_net"] = self.dac_band_net.state_dict()
        if self._band_optimizer is not None:
            state["band_optimizer"] = self._band_optimizer.state_dict()
        return state

    def load_mgsr_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        if self.dac_band_net is not None:
            self.dac_band_net.load_state_dict(state["band_net"])
        if self._band_optimizer is not None and "band_optimizer" in state:
            self._band_optimizer.load_state_dict(state["band_optimizer"])

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, refusing to write a student with non-finite weights."""
        guards.check_weights(self)
        super().save_model(output_dir, _internal_call)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card plus an "MGSR distillation" section: teacher, dataset, objective, MGSR settings, citation."""
        from .model_card import add_mgsr_section, hub_dataset_name

        if model_name is None:  # as transformers names it when it pushes
            model_name = (self.args.hub_model_id or os.path.normpath(self.args.output_dir)).split("/")[-1]
        super().create_model_card(model_name=model_name, dataset_name=hub_dataset_name(dataset_name), tags=tags)
        add_mgsr_section(self, dataset_name)


class _BandNetStep(TrainerCallback):
    """After each optimizer step: step the band's own optimizer (if any) and zero the band's gradients."""

    def __init__(self, trainer: MGSRTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._finish_band_step()


# ---------------------------------------------------------------------- construction helpers


def _as_mgsr_config(args, model) -> MGSRConfig:
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        return MGSRConfig(f"{str(name).split('/')[-1] or 'model'}-MGSR")
    if isinstance(args, MGSRConfig):
        return args
    if isinstance(args, GKDConfig):
        values = {f.name: getattr(args, f.name) for f in fields(GKDConfig) if f.init and hasattr(args, f.name)}
        return MGSRConfig(**values)
    raise TypeError(f"`args` must be an MGSRConfig (or a GKDConfig), got {type(args).__name__}.")


def _shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """`[B, T]` -> `[B, T]`: `x[:, k + 1]` at position k, `fill` at the last position."""
    return F.pad(x[:, 1:], (0, 1), value=fill)


def _check_adaptive_schedule(args: MGSRConfig, eval_dataset) -> None:
    """`schedule="adaptive"` moves its student-sample probability only on evaluation losses."""
    if args.schedule != "adaptive" or (eval_dataset is not None and args.eval_strategy != "no"):
        return
    message = (
        "schedule='adaptive' raises its student-sample probability only when the evaluation loss rises, but this "
        "run has no evaluation (pass `eval_dataset` and set `eval_strategy` to 'steps' or 'epoch'), so it would stay "
        f"at init_threshold={args.init_threshold}"
    )
    if args.init_threshold == 0:
        raise ValueError(f"{message}: no student samples at all. Add evaluation, or use schedule='gkd' with `lmbda`.")
    warnings.warn(f"{message} for the whole run.", stacklevel=3)


def _load_teacher(teacher_model, args: MGSRConfig):
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError(
            "MGSRTrainer needs a teacher: pass `teacher_model=` (a model or a path/Hub id) or set "
            "`teacher_model_name_or_path` in the config."
        )
    if not isinstance(teacher_model, str):
        if args.teacher_model_init_kwargs:
            raise ValueError(
                "`teacher_model_init_kwargs` is set but `teacher_model` is already a model; drop the kwargs or pass "
                "the teacher as a path/id."
            )
        return teacher_model
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"teacher_model_init_kwargs['dtype']={dtype!r} is not a torch dtype name.")
        kwargs["dtype"] = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(teacher_model, **kwargs)


def _shared_vocab_size(student, teacher, tokenizer, args: MGSRConfig) -> int:
    """The vocab size both models' logits are compared on; raise when the vocabularies are not compatible."""
    student_vocab = student.config.get_text_config().vocab_size
    teacher_vocab = teacher.config.get_text_config().vocab_size
    if student_vocab == teacher_vocab:
        return student_vocab
    shared = min(student_vocab, teacher_vocab)
    if len(tokenizer) > shared:
        raise ValueError(
            f"The student has vocab_size {student_vocab} and the teacher {teacher_vocab}, and the tokenizer has "
            f"{len(tokenizer)} tokens, more than the smaller of the two: the models do not share a vocabulary. "
            "MGSR compares full next-token distributions, so use a teacher from the same tokenizer family."
        )
    if not args.truncate_teacher_vocab:
        raise ValueError(
            f"The student has vocab_size {student_vocab} and the teacher {teacher_vocab}; every tokenizer id is "
            f"below {shared}, so the extra rows look like same-family padding. Set `truncate_teacher_vocab=True` "
            f"to compare logits on the first {shared} entries."
        )
    return shared


def _named_datasets(train_dataset, eval_dataset):
    if train_dataset is not None:
        yield "train_dataset", train_dataset
    if isinstance(eval_dataset, dict):
        for key, dataset in eval_dataset.items():
            yield f"eval_dataset[{key!r}]", dataset
    elif eval_dataset is not None:
        yield "eval_dataset", eval_dataset


def _shares_weights(model: nn.Module, teacher: nn.Module) -> bool:
    student_params = {id(p) for p in model.parameters()}
    return teacher is model or any(id(p) in student_params for p in teacher.parameters())


def _validate_dataset(dataset, tokenizer, name: str) -> None:
    """Check columns and the first row up front, so a bad dataset fails at construction, not mid-training.
    An iterable (streaming) dataset is checked on its first row; one without rows or columns is left alone."""
    if isinstance(dataset, datasets.IterableDataset):
        first = next(iter(dataset), None)
        if first is None:
            return
        columns = list(first)
    else:
        columns = getattr(dataset, "column_names", None)
        if columns is None or len(dataset) == 0:
            return
        first = dataset[0]
    try:
        detect_format(columns)
        split_prompt_completion(first, tokenizer, row=0)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
