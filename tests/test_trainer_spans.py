"""Span ids inside MGSRTrainer: collated, recomputed after generation, replayed, and used by the span term."""

import pytest
import torch
from datasets import Dataset

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.spans import span_ids_from_tokens
from trl_mgsr.testing import build_pair, toy_rows


def make(tokenizer, tmp_path, extractor=None, **overrides):
    """A trainer with the span term on (`span_weight` 0.1, off by default), unless `overrides` say otherwise."""
    student, teacher = build_pair(tokenizer)
    args = tiny_args(MGSRConfig, tmp_path, **{"span_weight": 0.1, **overrides})
    trainer = MGSRTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(toy_rows(8)), processing_class=tokenizer,
                          span_extractor=extractor)
    trainer.model_wrapped = trainer.model
    return trainer


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def dataset_step(trainer):
    """The first batch prepared as a step that trains on the dataset's sequence."""
    trainer.args.lmbda = 0.0
    return trainer.prepare_distillation_batch(first_batch(trainer))


def test_dataset_steps_get_span_ids_of_the_completion_only(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path)
    assert "span_ids" not in first_batch(trainer)  # no DataLoader workers: left to the step that needs them
    batch = dataset_step(trainer)
    completion = batch["labels"] != -100
    assert (batch["span_ids"][~completion] == -1).all()
    assert (batch["span_ids"][completion] >= 0).any()
    # with workers the collator computes them, off the main process, and the step keeps them
    workers = make(tokenizer, tmp_path / "workers", dataloader_num_workers=1)
    collated = workers.data_collator(toy_rows(2))
    expected = span_ids_from_tokens(tokenizer, collated["input_ids"], collated["labels"] != -100,
                                    workers.span_extractor)
    assert torch.equal(collated["span_ids"], expected)


def test_span_ids_are_recomputed_for_the_generated_sequence(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=12)
    batch = trainer.prepare_distillation_batch(first_batch(trainer))
    expected = span_ids_from_tokens(tokenizer, batch["input_ids"], batch["labels"] != -100, trainer.span_extractor)
    assert torch.equal(batch["span_ids"], expected)
    assert batch["span_ids"].shape == batch["input_ids"].shape
    assert (batch["span_ids"][batch["labels"] == -100] == -1).all()  # never in the prompt or padding


def test_custom_callable_extractor_is_used(tokenizer, tmp_path):
    calls = []

    def whole_text(text):
        calls.append(text)
        return [(0, len(text))]

    trainer = make(tokenizer, tmp_path, extractor=whole_text)
    batch = dataset_step(trainer)
    assert calls
    for row in range(batch["span_ids"].shape[0]):  # one span per completion (the eos token is never in a span)
        ids = batch["span_ids"][row][batch["span_ids"][row] >= 0]
        assert set(ids.tolist()) == {0}


def test_missing_optional_backend_fails_at_construction(tokenizer, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_spacy(name, *args, **kwargs):
        if name == "spacy" or name.startswith("spacy."):
            raise ImportError("No module named 'spacy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spacy)
    with pytest.raises(ImportError, match="spacy"):
        make(tokenizer, tmp_path, span_extractor="spacy")


def test_span_term_is_logged_and_off_by_default(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, max_steps=2)
    trainer.train()
    logged = {k for e in trainer.state.log_history for k in e}
    assert {"mgsr/span", "mgsr/spans_per_seq", "mgsr/span_items"} <= logged
    assert tiny_args(MGSRConfig, tmp_path / "default").span_weight == 0.0
    off = make(tokenizer, tmp_path / "off", span_weight=0.0)
    assert off.span_extractor is None and "span_ids" not in dataset_step(off)


def test_replayed_batches_bring_their_own_span_ids(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, schedule="adaptive", init_threshold=1.0, replay_ratio_start=1.0,
                   replay_ratio_end=1.0, max_new_tokens=10)
    generated = trainer.prepare_distillation_batch(first_batch(trainer))
    assert generated["mgsr_on_policy"].item() == 1.0
    replayed = trainer.prepare_distillation_batch(first_batch(trainer))
    assert replayed["mgsr_replay"].item() == 1.0
    expected = span_ids_from_tokens(tokenizer, replayed["input_ids"], replayed["labels"] != -100,
                                    trainer.span_extractor)
    assert torch.equal(replayed["span_ids"], expected)
