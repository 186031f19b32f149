"""Data schedules: GKD's coin and DistiLLM's adaptive schedule with its replay buffer."""

import random

import pytest
import torch
from datasets import Dataset

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.schedule import OFF_POLICY, REPLAY, STUDENT, AdaptiveSchedule, GKDSchedule, ReplayBuffer
from trl_mgsr.testing import build_pair, toy_rows


def test_threshold_follows_a_scripted_sequence_of_eval_losses():
    schedule = AdaptiveSchedule(random.Random(0), init_threshold=0.2, threshold_step=0.1, loss_eps=0.1)
    losses = [2.0, 2.05, 2.3, 2.1, 2.35, 2.2, 2.25]
    # rises:   -    +.05  +.25 -.2  +.25  -.15 +.05
    expected = [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.4]
    seen = []
    for loss in losses:
        schedule.on_eval_loss(loss)
        seen.append(round(schedule.threshold, 6))
    assert seen == expected


def test_threshold_is_capped_at_one():
    schedule = AdaptiveSchedule(random.Random(0), init_threshold=0.95, threshold_step=0.1, loss_eps=0.0)
    for loss in (1.0, 2.0, 3.0):
        schedule.on_eval_loss(loss)
    assert schedule.threshold == 1.0


def test_replay_ratio_decreases_linearly():
    schedule = AdaptiveSchedule(random.Random(0), ratio_start=0.8, ratio_end=0.2)
    assert [schedule.replay_ratio(p) for p in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([0.8, 0.5, 0.2, 0.2])


def fill(buffer, n, width=5):
    for start in range(0, n, 2):
        ids = torch.arange(start * 10, start * 10 + 2 * width).view(2, width)
        buffer.add_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
                         ("input_ids", "attention_mask", "labels"))


def test_replay_never_returns_a_sample_twice_in_one_batch():
    buffer = ReplayBuffer(capacity=16)
    fill(buffer, 16)
    rng = random.Random(1)
    for _ in range(200):
        batch = buffer.sample(8, rng)
        firsts = [int(row["input_ids"][0]) for row in batch]
        assert len(set(firsts)) == 8


def test_buffer_is_fifo_with_its_capacity_and_trims_padding():
    buffer = ReplayBuffer(capacity=4)
    fill(buffer, 6)
    assert len(buffer) == 4
    firsts = [int(s["input_ids"][0]) for s in buffer.samples]
    assert firsts == sorted(firsts) and min(firsts) > 0  # the oldest (from the first batch) were dropped
    padded = {"input_ids": torch.tensor([[0, 0, 7, 8]]), "attention_mask": torch.tensor([[0, 0, 1, 1]]),
              "labels": torch.tensor([[-100, -100, -100, 8]])}
    buffer.add_batch(padded, ("input_ids", "attention_mask", "labels"))
    assert buffer.samples[-1]["input_ids"].tolist() == [7, 8] and buffer.samples[-1]["labels"].tolist() == [-100, 8]


def test_decisions():
    off = AdaptiveSchedule(random.Random(0), init_threshold=0.0)
    assert {off.decide(0.0, 2) for _ in range(50)} == {OFF_POLICY}
    fresh = AdaptiveSchedule(random.Random(0), init_threshold=1.0, ratio_start=1.0, ratio_end=1.0)
    assert {fresh.decide(0.0, 2) for _ in range(50)} == {STUDENT}  # empty buffer: nothing to replay
    fill(fresh.buffer, 4)
    assert {fresh.decide(0.0, 2) for _ in range(50)} == {REPLAY}
    assert {fresh.decide(0.0, 8) for _ in range(50)} == {STUDENT}  # fewer buffered samples than a batch
    gkd = GKDSchedule(random.Random(0), lmbda=0.3)
    share = sum(gkd.decide() == STUDENT for _ in range(2000)) / 2000
    assert 0.25 < share < 0.35


def test_adaptive_draws_do_not_depend_on_local_buffer_state():
    # Two ranks whose buffers differ still draw the same random numbers.
    a, b = (AdaptiveSchedule(random.Random(5), init_threshold=0.5, ratio_start=0.5) for _ in range(2))
    fill(a.buffer, 4)
    for _ in range(30):
        a.decide(0.3, 2), b.decide(0.3, 2)
    assert a.rng.getstate() == b.rng.getstate()


def make_adaptive(tokenizer, output_dir, **overrides):
    student, teacher = build_pair(tokenizer)
    settings = dict(schedule="adaptive", init_threshold=1.0, replay_ratio_start=1.0, replay_ratio_end=1.0,
                    max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                    gradient_checkpointing=False)
    args = tiny_args(MGSRConfig, output_dir, **{**settings, **overrides})
    return MGSRTrainer(model=student, teacher_model=teacher, args=args,
                       train_dataset=Dataset.from_list(toy_rows(8)), eval_dataset=Dataset.from_list(toy_rows(4)),
                       processing_class=tokenizer)


def test_adaptive_training_generates_then_replays(tokenizer, tmp_path):
    trainer = make_adaptive(tokenizer, tmp_path)
    trainer.train()
    steps = [e for e in trainer.state.log_history if "mgsr/on_policy" in e]
    assert steps[0]["mgsr/on_policy"] == 1.0  # empty buffer: the first student batch is generated
    assert any(e["mgsr/replay"] == 1.0 for e in steps)  # then replayed
    assert len(trainer.schedule.buffer) >= 2
    assert any("mgsr/student_threshold" in e for e in trainer.state.log_history)


def test_adaptive_state_survives_save_and_resume(tokenizer, tmp_path):
    trainer = make_adaptive(tokenizer, tmp_path / "a", init_threshold=0.5, replay_ratio_start=0.5)
    trainer.train()
    state = torch.load(tmp_path / "a" / "checkpoint-2" / "mgsr_state.pt", weights_only=False)["schedule"]
    assert len(state["buffer"]) > 0 and state["last_eval_loss"] is not None
    other = make_adaptive(tokenizer, tmp_path / "b")
    other.load_mgsr_checkpoint(str(tmp_path / "a" / "checkpoint-2"))
    assert other.schedule.threshold == state["threshold"]
    assert other.schedule.last_eval_loss == state["last_eval_loss"]
    assert other.schedule.rng.getstate() == state["rng"]
    assert len(other.schedule.buffer) == len(state["buffer"])
    for ours, saved in zip(other.schedule.buffer.samples, state["buffer"]):
        assert all(torch.equal(ours[k], saved[k]) for k in saved)
