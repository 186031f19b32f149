"""Plumbing of MGSRTrainer: schedule coin, batch preparation, forwards, loss composition, construction errors."""

import random

import pytest
import torch
from datasets import Dataset
from trl.experimental.gkd import GKDConfig, GKDTrainer

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.data import position_ids_from_mask
from trl_mgsr.testing import build_llama, build_pair, toy_rows


def make_trainer(tokenizer, tmp_path, student=None, teacher=None, **overrides):
    if student is None:
        student, teacher = build_pair(tokenizer)
    return MGSRTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(MGSRConfig, tmp_path, **overrides),
        train_dataset=Dataset.from_list(toy_rows(8)),
        processing_class=tokenizer,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_on_policy_coin_is_identical_across_ranks_with_different_local_rng(tokenizer, tmp_path):
    # Two "ranks": same config, different global RNG state (as after rank-dependent data shuffling/dropout).
    decisions = []
    for rank in range(2):
        trainer = make_trainer(tokenizer, tmp_path / str(rank), lmbda=0.5)
        random.seed(1000 + rank)
        torch.manual_seed(1000 + rank)
        draws = []
        for _ in range(64):
            random.random()  # local draws in between must not shift the shared stream
            draws.append(trainer.next_sequence_source())
        decisions.append(draws)
    assert decisions[0] == decisions[1]
    assert 10 < decisions[0].count("student") < 54  # a real coin, not a constant


def test_coin_follows_lmbda_and_seq_kd(tokenizer, tmp_path):
    always = make_trainer(tokenizer, tmp_path, lmbda=1.0)
    assert {always.next_sequence_source() for _ in range(20)} == {"student"}
    never = make_trainer(tokenizer, tmp_path, lmbda=0.0)
    assert {never.next_sequence_source() for _ in range(20)} == {"dataset"}
    teacher = make_trainer(tokenizer, tmp_path, lmbda=0.0, seq_kd=True)
    assert {teacher.next_sequence_source() for _ in range(20)} == {"teacher"}


def test_on_policy_step_keeps_ground_truth_for_sft(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=1.0, sft_weight=1.0)
    trainer.model_wrapped = trainer.model
    batch = first_batch(trainer)
    original = {k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")}
    prepared = trainer.prepare_distillation_batch(batch)
    for key, value in original.items():
        assert torch.equal(prepared[f"sft_{key}"], value)
    # The distillation sequence is the student's sample: prompt kept, new completion after it.
    prompt_width = batch["prompts"].shape[1]
    assert torch.equal(prepared["input_ids"][:, :prompt_width], batch["prompts"])
    assert (prepared["labels"][:, :prompt_width] == -100).all()
    assert (prepared["labels"][:, prompt_width:] != -100).any()
    assert prepared["mgsr_on_policy"].item() == 1.0


def test_off_policy_step_adds_no_sft_copy(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0)
    prepared = trainer.prepare_distillation_batch(first_batch(trainer))
    assert "sft_input_ids" not in prepared and prepared["mgsr_on_policy"].item() == 0.0


def test_rescue_applies_to_the_datasets_sequences_only(tokenizer, tmp_path):
    """dac_rescue_weight changes the loss of a dataset batch and not of the same batch marked as the student's."""
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0, span_weight=0.0, dac_rescue_weight=10.0)
    batch = trainer.prepare_distillation_batch(first_batch(trainer))

    def loss(rescue, on_policy):
        trainer.args.dac_rescue_weight = rescue
        return trainer.compute_loss(trainer.model, {**batch, "mgsr_on_policy": torch.tensor(float(on_policy))})

    assert loss(10.0, False) > loss(0.0, False) + 1e-3
    torch.testing.assert_close(loss(10.0, True), loss(0.0, True))


def test_sft_term_uses_ground_truth_on_policy(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=1.0, sft_weight=1.0, dac_weight=0.0, span_weight=0.0,
                           scrg_correction_weight=0.0)
    trainer.model_wrapped = trainer.model
    batch = trainer.prepare_distillation_batch(first_batch(trainer))
    loss = trainer.compute_loss(trainer.model, batch)
    logits = trainer.model(
        input_ids=batch["sft_input_ids"],
        attention_mask=batch["sft_attention_mask"],
        position_ids=position_ids_from_mask(batch["sft_attention_mask"]),
    ).logits[:, :-1]
    labels = batch["sft_labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(loss, expected)


def test_every_forward_gets_position_ids_from_the_attention_mask(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0)
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
        for m in (trainer.model, trainer.teacher_model)
    ]
    batch = first_batch(trainer)
    assert (batch["attention_mask"] == 0).any()  # the batch really is left-padded
    trainer.compute_loss(trainer.model, batch)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    for kwargs in seen:
        torch.testing.assert_close(kwargs["position_ids"], position_ids_from_mask(batch["attention_mask"]))


def test_left_padding_does_not_change_a_rows_loss(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0)
    rows = [toy_rows(2)[0], toy_rows(2)[1]]  # answers of different lengths
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    assert (batch["attention_mask"] == 0).any()  # one row really is left-padded
    singles = [trainer._prepare_inputs(trainer.data_collator([row])) for row in rows]
    with torch.no_grad():
        together = trainer.compute_loss(trainer.model, batch)
        alone = [trainer.compute_loss(trainer.model, single) for single in singles]
    counts = [int((single["labels"][:, 1:] != -100).sum()) for single in singles]
    # Every term is a token mean, so the batch loss is the token-weighted mean of the rows' losses,
    # which holds only if padding changes nothing for the padded row.
    expected = sum(l * n for l, n in zip(alone, counts)) / sum(counts)
    torch.testing.assert_close(together, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [0, 16])  # sampled by `generate`, or by SCRG's own decoding loop
def test_generation_uses_kv_cache_with_gradient_checkpointing(tokenizer, tmp_path, block_size):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=1.0, gradient_checkpointing=True, scrg_block_size=block_size)
    gkd_args = tiny_args(GKDConfig, tmp_path / "gkd", gradient_checkpointing=True)
    student, teacher = build_pair(tokenizer)
    gkd = GKDTrainer(model=student, teacher_model=teacher, args=gkd_args,
                     train_dataset=Dataset.from_list(toy_rows(4)), processing_class=tokenizer)
    assert gkd.generation_config.use_cache is False  # what GKD does ...
    assert trainer.generation_config.use_cache is True  # ... and what we do instead

    seen = {}
    original = trainer.model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["cache"] = kwargs["generation_config"].use_cache
        seen["checkpointing_during_generate"] = trainer.model.is_gradient_checkpointing
        return out

    def decoding_step(module, args, kwargs):
        seen["cache"] = any(kwargs.get(name) is not None for name in ("cache", "past_key_values"))
        seen["checkpointing_during_generate"] = trainer.model.is_gradient_checkpointing

    hook = trainer.model.register_forward_pre_hook(decoding_step, with_kwargs=True) if block_size else None
    trainer.model.generate = spy
    trainer.model_wrapped = trainer.model
    trainer.model.gradient_checkpointing_enable()  # as Trainer.train() does
    assert trainer.model.is_gradient_checkpointing
    trainer.prepare_distillation_batch(first_batch(trainer))
    if hook is not None:
        hook.remove()
    assert seen == {"cache": True, "checkpointing_during_generate": False}
    assert trainer.model.is_gradient_checkpointing  # restored after generation


def test_loss_is_the_weighted_sum_of_the_logged_terms(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0, sft_weight=0.3, dac_weight=2.0, span_weight=0.7)
    batch = first_batch(trainer)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    assert metrics["mgsr/span_items"][-1] > 0  # the span term really contributes
    expected = 0.3 * metrics["mgsr/sft"][-1] + 2.0 * metrics["mgsr/dac_kl"][-1] + 0.7 * metrics["mgsr/span"][-1]
    expected += metrics["mgsr/band"][-1]  # the band sub-network's own objective (it trains the band only)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_zero_weight_terms_are_not_computed(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0, sft_weight=0.0, span_weight=0.0)
    trainer._metrics["train"].clear()
    batch = first_batch(trainer)
    assert "span_ids" not in batch  # no span extraction when the span term is off
    trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    assert "mgsr/sft" not in logged and "mgsr/span" not in logged and "mgsr/dac_kl" in logged


def test_window_counts_sum_micro_batches(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, lmbda=0.0, sft_weight=1.0)
    batches = [first_batch(trainer), first_batch(trainer)]
    counts = trainer.count_items(batches)
    per_batch = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert int(counts["sft"]) == per_batch and int(counts["dac_kl"]) == per_batch


def test_teacher_as_path_with_and_without_dtype(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    teacher.save_pretrained(tmp_path / "teacher")
    for kwargs in (None, {"dtype": "float32"}, {"trust_remote_code": False}):
        student, _ = build_pair(tokenizer)
        trainer = MGSRTrainer(
            model=student,
            teacher_model=str(tmp_path / "teacher"),
            args=tiny_args(MGSRConfig, tmp_path, teacher_model_init_kwargs=kwargs),
            train_dataset=Dataset.from_list(toy_rows(4)),
            processing_class=tokenizer,
        )
        assert trainer.teacher_model.config.hidden_size == teacher.config.hidden_size
        assert trainer.teacher_model.dtype == torch.float32


def test_teacher_from_config_name(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = MGSRTrainer(
        model=student,
        args=tiny_args(MGSRConfig, tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher")),
        train_dataset=Dataset.from_list(toy_rows(4)),
        processing_class=tokenizer,
    )
    assert trainer.teacher_model.config.num_hidden_layers == teacher.config.num_hidden_layers


def test_missing_teacher_is_a_clear_error(tokenizer, tmp_path):
    student, _ = build_pair(tokenizer)
    with pytest.raises(ValueError, match="needs a teacher.*teacher_model=.*teacher_model_name_or_path"):
        MGSRTrainer(model=student, args=tiny_args(MGSRConfig, tmp_path), processing_class=tokenizer,
                    train_dataset=Dataset.from_list(toy_rows(4)))


def test_init_kwargs_with_instantiated_teacher_is_a_clear_error(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    with pytest.raises(ValueError, match="teacher_model_init_kwargs"):
        make_trainer(tokenizer, tmp_path, student, teacher, teacher_model_init_kwargs={"dtype": "float32"})


def test_same_family_vocab_padding_needs_the_explicit_option(tokenizer, tmp_path):
    student = build_llama(tokenizer)  # vocab = len(tokenizer) = 512
    teacher = build_llama(tokenizer, hidden_size=64, vocab_size=len(tokenizer) + 128)
    with pytest.raises(ValueError, match="truncate_teacher_vocab=True"):
        make_trainer(tokenizer, tmp_path, student, teacher)
    trainer = make_trainer(tokenizer, tmp_path, student, teacher, truncate_teacher_vocab=True, lmbda=1.0)
    assert trainer.shared_vocab_size == len(tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2


def test_larger_student_vocab_suppresses_ids_the_teacher_lacks(tokenizer, tmp_path):
    student = build_llama(tokenizer, vocab_size=len(tokenizer) + 64)
    teacher = build_llama(tokenizer, hidden_size=64)
    trainer = make_trainer(tokenizer, tmp_path, student, teacher, truncate_teacher_vocab=True, lmbda=1.0)
    assert trainer.generation_config.suppress_tokens == list(range(len(tokenizer), len(tokenizer) + 64))
    trainer.train()


def test_unrelated_vocab_is_a_clear_error(tokenizer, tmp_path):
    student = build_llama(tokenizer)
    teacher = build_llama(tokenizer, vocab_size=300)  # smaller than the tokenizer: not the same family
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        make_trainer(tokenizer, tmp_path, student, teacher, truncate_teacher_vocab=True)


def test_plain_gkd_config_is_accepted(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    trainer = MGSRTrainer(model=student, teacher_model=teacher, args=tiny_args(GKDConfig, tmp_path, lmbda=0.25),
                          train_dataset=Dataset.from_list(toy_rows(4)), processing_class=tokenizer)
    assert isinstance(trainer.args, MGSRConfig) and trainer.args.lmbda == 0.25 and trainer.args.max_new_tokens == 6


def test_formatting_func_is_rejected_clearly(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    with pytest.raises(ValueError, match="formatting_func"):
        MGSRTrainer(model=student, teacher_model=teacher, args=tiny_args(MGSRConfig, tmp_path),
                    train_dataset=Dataset.from_list(toy_rows(4)), processing_class=tokenizer,
                    formatting_func=lambda x: x)
