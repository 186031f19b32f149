"""Resuming from a checkpoint reproduces the uninterrupted run, on-policy sampling included."""

import pytest
import torch
from datasets import Dataset

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.testing import build_pair, toy_rows


def run(tokenizer, output_dir, resume=None, **overrides):
    student, teacher = build_pair(tokenizer)
    args = tiny_args(MGSRConfig, output_dir, max_steps=4, save_strategy="steps", save_steps=2, lmbda=0.5,
                     gradient_checkpointing=False, **overrides)
    trainer = MGSRTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(toy_rows(8)), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer


@pytest.mark.parametrize("continuation", ["stop", "regenerate"])  # re-generation draws from the RNG too
def test_resume_mid_epoch_matches_uninterrupted_run(tokenizer, tmp_path, continuation):
    # A random teacher is nearly uniform: only a reject ratio near 1 makes SCRG correct (and re-generate).
    scrg = dict(scrg_continuation=continuation, scrg_reject_ratio=0.999)
    straight, trainer = run(tokenizer, tmp_path / "straight", **scrg)
    sources = [e["mgsr/on_policy"] for e in trainer.state.log_history if "mgsr/on_policy" in e]
    assert 0 < sum(sources) < len(sources)  # both kinds of step happen, so generation is part of the test
    corrected = [e["mgsr/scrg_corrected_frac"] for e in trainer.state.log_history if "mgsr/scrg_corrected_frac" in e]
    assert max(corrected) > 0  # and so is SCRG's revision
    resumed, _ = run(tokenizer, tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2"), **scrg)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)


def test_checkpoint_holds_the_schedule_rng_and_resume_restores_it(tokenizer, tmp_path):
    import random

    run(tokenizer, tmp_path / "a")
    state = torch.load(tmp_path / "a" / "checkpoint-2" / "mgsr_state.pt", weights_only=False)
    expected = random.Random(0)  # seed 0, one draw per micro-batch, 2 micro-batches before the checkpoint
    expected.random(), expected.random()
    assert state["schedule"]["rng"] == expected.getstate()

    student, teacher = build_pair(tokenizer)
    other = MGSRTrainer(model=student, teacher_model=teacher, args=tiny_args(MGSRConfig, tmp_path / "b", lmbda=0.5),
                        train_dataset=Dataset.from_list(toy_rows(8)), processing_class=tokenizer)
    other.load_mgsr_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    assert other.schedule.rng.getstate() == expected.getstate()
