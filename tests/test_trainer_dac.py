"""The DAC-KL band sub-network inside MGSRTrainer: optimisation, checkpoints, and what is saved."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.testing import build_pair, toy_rows


def make(tokenizer, tmp_path, peft=False, **overrides):
    student, teacher = build_pair(tokenizer)
    settings = dict(gradient_checkpointing=False, dac_learning_rate=1e-2)
    return MGSRTrainer(
        model=student, teacher_model=teacher, args=tiny_args(MGSRConfig, tmp_path, **{**settings, **overrides}),
        train_dataset=Dataset.from_list(toy_rows(8)), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if peft else None,
    )


def band_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.dac_band_net.state_dict().items()}


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd", "adafactor"])
def test_band_net_trains_in_its_own_group_with_any_optimizer(optim, tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, optim=optim, max_steps=2)
    before = band_state(trainer)
    trainer.train()
    groups = [g for g in trainer.optimizer.param_groups
              if any(p is next(trainer.dac_band_net.parameters()) for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) == len(list(trainer.dac_band_net.parameters()))
    after = band_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.dac_band_net.parameters())  # cleared after each step


def test_band_group_follows_the_schedule_from_dac_learning_rate(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, dac_learning_rate=0.02, learning_rate=1e-3, lr_scheduler_type="constant",
                   max_steps=1)
    trainer.train()
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [1e-3, 0.02]


def test_fixed_mode_has_no_band_net(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, dac_mode="fixed", dac_lo=0.1, dac_hi=0.9)
    assert trainer.dac_band_net is None
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "mgsr/dac_kl_lo" in e)
    assert entry["mgsr/dac_kl_lo"] == pytest.approx(0.1) and entry["mgsr/dac_kl_hi"] == pytest.approx(0.9)


def test_band_metrics_are_logged(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, max_steps=1)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "mgsr/dac_kl" in e)
    for stat in ("lo", "hi", "kept_tokens", "kept_mass"):
        assert f"mgsr/dac_kl_{stat}" in entry
    assert 0.0 <= entry["mgsr/dac_kl_lo"] < entry["mgsr/dac_kl_hi"] <= 1.0
    assert entry["mgsr/dac_kl_kept_mass"] >= trainer.args.dac_min_width - 0.03


@pytest.mark.parametrize("peft", [False, True])
def test_band_net_is_never_saved_with_the_student(peft, tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, peft=peft, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    weights = load_file(str(tmp_path / "final" / ("adapter_model.safetensors" if peft else "model.safetensors")))
    expected = {k for k, v in trainer.model.state_dict().items()}
    band_shapes = {tuple(p.shape) for p in trainer.dac_band_net.parameters()}
    if not peft:
        assert set(weights) <= expected
    assert not any(tuple(v.shape) in band_shapes and v.shape[-1] == trainer.args.dac_features
                   for v in weights.values())
    assert not any("band" in k or "dac" in k for k in weights)


def test_checkpoint_holds_band_net_and_resume_matches_straight_run(tokenizer, tmp_path):
    straight = make(tokenizer, tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2, lmbda=0.5)
    straight.train()
    state = torch.load(tmp_path / "a" / "checkpoint-2" / "mgsr_state.pt", weights_only=False)
    assert set(state["band_net"]) == set(straight.dac_band_net.state_dict())

    resumed = make(tokenizer, tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2, lmbda=0.5)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for key, value in band_state(straight).items():
        torch.testing.assert_close(band_state(resumed)[key], value, msg=key)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)
    # The band group's optimizer state (Adam moments) is restored too.
    def band_moments(trainer):
        return [trainer.optimizer.state[p]["exp_avg"] for p in trainer.dac_band_net.parameters()]
    for ours, theirs in zip(band_moments(resumed), band_moments(straight)):
        torch.testing.assert_close(ours, theirs)
