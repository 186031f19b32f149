"""Fail loud: non-finite teacher/student values stop training before any optimizer step or save; empty datasets and
mistyped local model paths fail at construction; long rows get our own truncation warning."""

import os
import re
import warnings

import pytest
import torch
from datasets import Dataset, IterableDataset

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.guards import NonFiniteError, looks_local
from trl_mgsr.testing import build_pair, toy_rows


def poison(model):
    """One NaN weight in the first decoder layer: every logit becomes NaN."""
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def make_trainer(tokenizer, tmp_path, student, teacher, **overrides):
    return MGSRTrainer(model=student, teacher_model=teacher, args=tiny_args(MGSRConfig, tmp_path, **overrides),
                       train_dataset=Dataset.from_list(toy_rows(8)), processing_class=tokenizer)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("lmbda, span_weight, where", [(0.0, 0.0, "term(s) dac_kl, band"),
                                                       (0.0, 0.1, "term(s) dac_kl, band, span"),
                                                       (1.0, 0.0, "in SCRG (before any correction)")])
def test_nan_teacher_stops_training_before_the_first_optimizer_step(lmbda, span_weight, where, tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, student, poison(teacher), lmbda=lmbda, span_weight=span_weight,
                           save_strategy="steps", save_steps=1)
    before = snapshot(student)
    with pytest.raises(FloatingPointError, match=rf"the teacher's logits are non-finite .* global step 0, {re.escape(where)}"):
        trainer.train()
    assert_unchanged(student, before)
    assert not any(name.startswith("checkpoint") for name in os.listdir(tmp_path))  # nothing saved


def test_scrg_never_corrects_with_nan_teacher_divergences(tokenizer, tmp_path, monkeypatch):
    import trl_mgsr.trainer as trainer_module

    calls = []
    real = trainer_module.stream_scrg  # SCRG while sampling (the default)
    monkeypatch.setattr(trainer_module, "stream_scrg", lambda *a, **k: calls.append(1) or real(*a, **k))
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, student, poison(teacher), lmbda=1.0)
    with pytest.raises(NonFiniteError, match="in SCRG"):
        trainer.train()
    assert calls == [1] and "mgsr/scrg_corrected_frac" not in trainer._metrics["train"]  # no SCRG result used


def test_nan_teacher_with_seq_kd_is_named_before_sampling_fails(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, student, poison(teacher), lmbda=0.0, seq_kd=True)
    with pytest.raises(NonFiniteError, match="the teacher's logits .* in seq_kd sampling"):
        trainer.train()


def test_diverging_student_stops_before_its_next_optimizer_step(tokenizer, tmp_path):
    """lr=1e30: step 0 is finite but writes weights ~1e30; step 1's student logits overflow."""
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, student, teacher, lmbda=0.0, learning_rate=1e30, max_steps=3)
    with pytest.raises(NonFiniteError, match=r"the student's logits are non-finite .* global step 1, term\(s\) dac_kl"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(p).all() for p in student.parameters())  # step 1 did not write its NaN update


def test_broken_student_is_named_before_on_policy_sampling_fails(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, poison(student), teacher, lmbda=1.0)
    with pytest.raises(NonFiniteError, match="the student's logits are non-finite .* global step 0, in on-policy"):
        trainer.train()


def test_non_finite_gradients_stop_before_the_optimizer_step(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, student, teacher, lmbda=0.0)
    student.lm_head.weight.register_hook(lambda grad: grad * float("inf"))
    before = snapshot(student)
    with pytest.raises(NonFiniteError, match="the student's gradients are non-finite .* global step 0"):
        trainer.train()
    assert_unchanged(student, before)


def test_first_batch_checks_logits_in_full(tokenizer, tmp_path, monkeypatch):
    """A NaN the loss does not see (here: the teacher's logit of an id outside the labels) is still reported."""
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path, student, teacher, lmbda=0.0, sft_weight=1.0, dac_weight=0.0,
                           span_weight=0.0)
    real_forward = trainer._forward

    def forward(model, input_ids, attention_mask):
        out = real_forward(model, input_ids, attention_mask)
        if model is trainer.teacher_model:
            out.logits[0, -1, 0] = float("nan")  # the SFT-only loss never reads the teacher
        return out

    monkeypatch.setattr(trainer, "_forward", forward)
    with pytest.raises(NonFiniteError, match="teacher's logits .* checking the first batch"):
        trainer.train()


def test_save_refuses_non_finite_weights(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    trainer = make_trainer(tokenizer, tmp_path / "run", student, teacher)
    poison(student)
    with pytest.raises(NonFiniteError, match="weight model.layers.0.mlp.down_proj.weight is non-finite"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("case", ["empty", "filtered", "eval split", "streaming"])
def test_dataset_without_rows_is_one_clear_error(case, tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    rows = Dataset.from_list(toy_rows(4))
    train, evaluation, name = rows, None, "train_dataset"
    if case == "empty":
        train = Dataset.from_list([])
    elif case == "filtered":
        train = rows.filter(lambda row: False)
    elif case == "eval split":
        evaluation, name = rows.select([]), "eval_dataset"
    else:
        train = IterableDataset.from_generator(lambda: iter([]))
    with pytest.raises(ValueError, match=rf"^{name} has no rows"):
        MGSRTrainer(model=student, teacher_model=teacher, processing_class=tokenizer, train_dataset=train,
                    eval_dataset=evaluation, args=tiny_args(MGSRConfig, tmp_path, eval_strategy="no"))


@pytest.mark.parametrize("which", ["model", "teacher_model"])
def test_mistyped_local_model_path_is_no_such_model_directory(which, tokenizer, tmp_path, monkeypatch):
    (tmp_path / "mgsr-demo").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the error must come before any Hub lookup
    student, teacher = build_pair(tokenizer)
    models = {"model": student, "teacher_model": teacher, which: "mgsr-demo/teachr"}
    with pytest.raises(FileNotFoundError, match=rf"^{which} mgsr-demo/teachr: no such model directory"):
        MGSRTrainer(**models, processing_class=tokenizer, train_dataset=Dataset.from_list(toy_rows(2)),
                    args=tiny_args(MGSRConfig, tmp_path / "out"))


@pytest.mark.parametrize("path, local", [("./x", True), ("../models/x", True), ("/abs/x", True), ("~/x", True),
                                         ("a/b/c", True), ("Qwen/Qwen2.5-0.5B", False), ("gpt2", False)])
def test_looks_local(path, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_local(path) is local


def test_hub_id_whose_org_is_a_local_directory_counts_as_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("mgsr-demo/teachr")
    (tmp_path / "mgsr-demo").mkdir()
    assert looks_local("mgsr-demo/teachr")


def test_long_rows_get_one_warning_saying_how_many_and_which_way(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    rows = [{"prompt": long_text, "completion": " ok"}] * 2 + [{"prompt": "Hi", "completion": long_text}] * 3
    rows += [{"prompt": "Hi", "completion": " ok"}] * 5
    tokenizer.model_max_length, before = 16, tokenizer.model_max_length  # transformers' "indexing errors" threshold
    tokenizer.deprecation_warnings.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = MGSRTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list(rows),
                                  args=tiny_args(MGSRConfig, tmp_path, max_length=32))
            trainer.data_collator(rows)
    finally:
        tokenizer.model_max_length = before
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tokenizer.deprecation_warnings
    messages = [str(w.message) for w in caught if "max_length" in str(w.message) or "indexing" in str(w.message)]
    assert messages == [
        "train_dataset: 5 of 10 rows are longer than max_length=32 tokens: 2 prompt(s) are longer than max_length "
        "- 1 and keep only their last 31 tokens (cut on the left) with a 1-token completion; 3 completion(s) lose "
        "their end (cut on the right). Raise max_length or shorten those rows."
    ]
