"""`MGSRTrainer`: TRL's `GKDTrainer` with MGSR's generation hook (SCRG) and loss (SFT + DAC-KL + span).

This module orchestrates; the work of each granularity lives elsewhere: `scrg.py` (revising student samples),
`objective.py` (the loss terms, their item counts, their weighted sum), `losses/` (each term), `spans.py`,
`band_training.py` (the band sub-network's optimisation), `checkpointing.py` (MGSR's checkpoint state) and
`construction.py` (what `__init__` checks and builds). How a training step flows (GKD's names are kept):

1. `get_batch_samples` fetches the micro-batches of one gradient-accumulation window and turns each into a
   *distillation batch* (`prepare_distillation_batch`): the schedule picks the sequence source (a student sample
   revised by SCRG, a teacher sample for `seq_kd`, or the dataset completion), the dataset tensors are kept aside
   as `sft_*` for the SFT term, and span ids are computed. Then the items of every loss term are counted over the
   whole window and summed over all ranks (`count_items`).
2. `training_step` runs as in `transformers.Trainer`; `compute_loss` runs the student teacher-forced on the
   distillation sequence, takes the teacher's logits (SCRG's where they still hold, `teacher_logits`), computes each
   term as a sum and divides it by the window count. The loss is multiplied by the number of processes because data
   parallelism averages gradients, so that N ranks x GA k x batch b gives the gradient of one batch N*k*b
   (`loss_is_scaled_for_ga = True`).
3. After the window's last backward the band sub-network's gradients are averaged over ranks; it is clipped with
   the student and stepped after the optimizer step.
"""

from __future__ import annotations

import copy
import os
import textwrap
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import disable_dropout_in_model

from . import construction, guards, objective
from ._trl import GKDConfig, GKDTrainer
from .band_training import BandTraining
from .checkpointing import MGSRCheckpointing
from .data import MGSRDataCollator, left_pad, position_ids_from_mask
from .generation import pure_sampling
from .losses import IGNORE_INDEX
from .objective import TERMS, shift_left
from .runtime import quiet_trl_deprecations
from .schedule import OFF_POLICY, REPLAY, STUDENT, AdaptiveSchedule, GKDSchedule, schedule_from_config
from .scrg import (SCRGResult, SCRGSettings, assemble_on_policy_batch, completion_from_generate, correction_labels,
                   kept_teacher_logits, scrg_revise)
from .scrg_stream import stream_scrg, streamable
from .spans import get_span_extractor, span_ids_from_tokens

REPLAY_KEYS = ("input_ids", "attention_mask", "labels", "span_ids")


class MGSRTrainer(MGSRCheckpointing, GKDTrainer):
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
        args = construction.as_mgsr_config(args, model)
        construction.check_arguments(model, teacher_model, args, train_dataset, eval_dataset, formatting_func)
        quiet_trl_deprecations()
        teacher_model = construction.load_teacher(teacher_model, args)
        construction.check_separate_teacher(model, teacher_model)
        if processing_class is None:
            processing_class = construction.default_tokenizer(model, args)

        # Built once here, so a missing NLTK/spaCy fails at construction rather than mid-training.
        self.span_extractor = (
            get_span_extractor(span_extractor or args.span_extractor, **(args.span_extractor_kwargs or {}))
            if args.span_weight > 0
            else None
        )
        args.remove_unused_columns = False  # the collator needs the raw columns
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if data_collator is None:
            data_collator = construction.default_collator(args, processing_class, self.span_extractor)

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
        if isinstance(self.data_collator, MGSRDataCollator):  # `chat_template_path` may have given it a template
            self.data_collator.tokenizer = self.processing_class
        construction.validate_datasets(train_dataset, eval_dataset, self.processing_class, self.data_collator)
        self.shared_vocab_size = construction.shared_vocab_size(self.model, teacher_model, processing_class, args)
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
            disable_dropout_in_model(teacher_model)
        if self.is_deepspeed_enabled:
            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)

        self.beta, self.temperature, self.seq_kd = args.beta, args.temperature, args.seq_kd
        self.band = None  # the band sub-network's training (dac_mode="learned")
        if args.dac_weight > 0 and args.dac_mode == "learned":
            self.band = BandTraining(args, self.args.device)
            self.add_callback(self.band.callback())
        self.generation_kwargs, self.generation_config, self.teacher_generation_config = (
            construction.generation_settings(args, self.model, teacher_model, processing_class, self.shared_vocab_size))
        self.schedule = schedule_from_config(args)
        self.lmbda = args.lmbda

    @property
    def dac_band_net(self):
        """The band sub-network (`DACBandNet`), or None with a fixed band."""
        return self.band.net if self.band is not None else None

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
        """Sample completions from the student and revise them with SCRG (`_scrg`).

        Returns `input_ids`, `attention_mask` (left-padded prompt, completion up to and including its first end
        token) and `labels` (-100 on prompt and padding) and, when SCRG ran and `scrg_reuse_teacher_logits` is on,
        `mgsr_teacher_logits` `[B, L, V]` (SCRG's teacher logits predicting each completion token) with
        `mgsr_teacher_valid` `[B]` (how many leading completion positions they still predict right: every position
        when SCRG ran while sampling), which `teacher_logits` reuses instead of running the teacher again. With
        `scrg_rounds=0` this is GKD's hook.
        """
        prompts, prompt_mask = inputs["prompts"], inputs["prompt_attention_mask"]
        pad, eos = self.processing_class.pad_token_id, generation_config.eos_token_id
        cache = {}
        if self.args.scrg_rounds == 0:  # GKD's sampling
            out = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=generation_config)
            completion_ids, completion_mask = completion_from_generate(out, prompts.shape[1], eos)
        else:
            result = self._scrg(model, prompts, prompt_mask, generation_config)
            completion_ids, completion_mask = result.completion_ids, result.completion_mask
            if result.teacher_logits is not None:
                cache = {"mgsr_teacher_logits": result.teacher_logits, "mgsr_teacher_valid": result.teacher_valid}
            self._log_ratios(objective.scrg_ratios(result), "train")
        ids, mask, labels = assemble_on_policy_batch(prompts, prompt_mask, completion_ids, completion_mask, pad)
        if self.args.scrg_rounds > 0 and self.args.scrg_correction_weight > 0:
            cache["mgsr_correction_labels"] = correction_labels(labels, prompts.shape[1], result)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, **cache}

    def _scrg(self, model, prompts, prompt_mask, generation_config) -> SCRGResult:
        """Student samples of `prompts` revised by SCRG: while sampling (`stream_scrg`) when `scrg_block_size > 0`
        and the settings allow it, else sampled by `generate` and revised after (`scrg_revise`, whose first round
        takes the student's logits from the sampling pass)."""
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled  # every rank must run the same collectives
        settings = dict(generation_config=generation_config, eos_token_ids=generation_config.eos_token_id,
                        pad_token_id=self.processing_class.pad_token_id, vocab_size=self.shared_vocab_size,
                        always_generate=sharded, generate_kwargs={"synced_gpus": True} if sharded else None,
                        **construction.scrg_options(self.args))
        rounds = self.args.scrg_rounds
        if self.args.scrg_block_size > 0 and streamable(SCRGSettings(**settings)):
            return stream_scrg(model, self.teacher_model, prompts, prompt_mask, rounds=rounds,
                               block_size=self.args.scrg_block_size, **settings)
        sampling_config = copy.deepcopy(generation_config)
        sampling_config.update(return_dict_in_generate=True, output_logits=self.args.scrg_error == "max_divergence")
        out = model.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=sampling_config)
        completion_ids, completion_mask = completion_from_generate(out.sequences, prompts.shape[1],
                                                                   generation_config.eos_token_id)
        return scrg_revise(model, self.teacher_model, prompts, prompt_mask, completion_ids, completion_mask,
                           rounds=rounds, student_logits=torch.stack(out.logits, dim=1) if out.logits else None,
                           **settings)

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
        self.restore_rng_before_generating()
        batches = [self.prepare_distillation_batch(self._prepare_inputs(batch)) for batch in batches]
        return batches, self.count_items(batches, device)

    def count_items(self, batches: list[dict[str, Any]], device=None) -> dict[str, torch.Tensor]:
        """Item count of each loss term summed over `batches` and over all processes."""
        local = torch.zeros(len(TERMS), dtype=torch.long, device=device or self.args.device)
        for batch in batches:
            local += torch.stack(objective.item_counts(self.args, batch, self._trains_band(batch))).to(local.device)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return dict(zip(TERMS, total))

    def _trains_band(self, batch) -> bool:
        """Whether this batch trains the band sub-network with its own objective: a training batch whose labels are
        the data's (never in evaluation, whose loss stays the student's)."""
        return (self.band is not None and self.args.dac_band_objective == "label" and self.model.training
                and batch.get("mgsr_labels_are_data", True))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not inputs.get("mgsr_prepared"):  # called outside the training loop: this batch is the whole window
            inputs = self.prepare_distillation_batch(self._prepare_inputs(inputs))
            num_items_in_batch = self.count_items([inputs])
        # SFTTrainer's step (activation offloading), not GKD's: the batch is already the distillation batch.
        loss = SFTTrainer.training_step(self, model, inputs, num_items_in_batch)
        if self.band is not None and self.accelerator.sync_gradients:  # the window's last backward
            self.band.average_gradients(self.accelerator.num_processes)
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
        # Position k predicts token k+1: labels shift left instead of the logits losing their last position, so the
        # logits stay contiguous and the losses flatten them without a copy.
        student_logits = student_outputs.logits[..., :vocab]
        teacher_logits = self.teacher_logits(inputs)[..., :vocab]
        labels = shift_left(inputs["labels"], IGNORE_INDEX)
        sft = None
        if self.args.sft_weight > 0 and "sft_input_ids" in inputs:  # the dataset's completion, not the sequence's
            sft_logits = self._forward(model, inputs["sft_input_ids"], inputs["sft_attention_mask"]).logits
            sft = sft_logits[..., :vocab], shift_left(inputs["sft_labels"], IGNORE_INDEX)
        if self.args.span_weight > 0 and "span_ids" not in inputs:  # evaluation, or a collator without them
            inputs["span_ids"] = self.span_ids(self.processing_class, inputs["input_ids"], inputs["labels"] != -100)
        terms = objective.loss_terms(
            self.args, student_logits, teacher_logits, labels, sft=sft,
            span_ids=shift_left(inputs["span_ids"], -1) if self.args.span_weight > 0 else None,
            band_net=self.dac_band_net, train_band=self._trains_band(inputs),
            correction_labels=shift_left(inputs["mgsr_correction_labels"], IGNORE_INDEX)
            if "mgsr_correction_labels" in inputs else None,
            on_policy=bool(inputs.get("mgsr_on_policy", 0) or inputs.get("mgsr_replay", 0)),  # the student's sample
        )
        global_counts = isinstance(num_items_in_batch, dict)
        loss = objective.weighted_loss(self.args, terms, num_items_in_batch if global_counts else None,
                                       like=student_logits)
        if global_counts:
            loss = loss * self.accelerator.num_processes
        guards.check_loss(self, loss, terms, student_logits, teacher_logits, inputs["attention_mask"])
        self._log_ratios(objective.term_ratios(terms, inputs), "train" if self.model.training else "eval")
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
            logits, need = kept_teacher_logits(cached, inputs["mgsr_teacher_valid"], inputs["prompts"].shape[1],
                                               inputs["labels"])
            if need.numel() == 0 and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                need = torch.zeros(1, dtype=torch.long, device=ids.device)  # a forward whose result is the cache's
            if need.numel() > 0:
                fresh = self._forward(self.teacher_model, ids[need], mask[need]).logits
                logits[need] = fresh[..., : logits.shape[-1]].to(logits.dtype)
            return logits

    def _log_ratios(self, ratios: list[tuple[str, Any, Any]], mode: str) -> None:
        """Log `numerator / denominator` per metric, both summed over all ranks in one reduction."""
        device = self.args.device
        values = torch.stack([torch.stack([torch.as_tensor(n, device=device).float(),
                                           torch.as_tensor(d, device=device).float()]) for _, n, d in ratios])
        if self.accelerator.num_processes > 1:  # not gather_for_metrics: it drops ranks at the end of an epoch
            values = self.accelerator.reduce(values, reduction="sum")
        for (key, _, _), (numerator, denominator) in zip(ratios, values.tolist()):
            self._metrics[mode][key].append(numerator / denominator if denominator > 0 else 0.0)

    # ------------------------------------------------------------------ the band sub-network (band_training.py)

    def create_optimizer(self, model=None):
        """The user's optimizer; the band sub-network joins it as a parameter group (`dac_learning_rate`, no weight
        decay), or gets its own AdamW under DeepSpeed/FSDP and with a user-given scheduler."""
        optimizer = super().create_optimizer(model)
        if self.band is not None:
            own = self.is_deepspeed_enabled or self.is_fsdp_enabled or self.lr_scheduler is not None
            self.band.attach(optimizer, own_optimizer=own)
        return optimizer

    def _clip_grad_norm(self, model):
        """Clip the band sub-network's gradients with the student's, then check the norm is finite."""
        if self.band is None:
            norm = super()._clip_grad_norm(model)
        else:
            norm = self.band.clip_grad_norm(model, self.args.max_grad_norm, self.accelerator, super()._clip_grad_norm,
                                            mixed_mesh=self._has_mixed_mesh_grads(model))
        guards.check_grad_norm(self, norm)  # before the optimizer step writes the weights
        return norm

    # ------------------------------------------------------------------ evaluation and saving

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
