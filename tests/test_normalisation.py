"""Gradient accumulation and data parallelism give the gradient of one big batch, for each term and their sum."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grad_step import grad_step

TERMS = {"sft": (1.0, 0.0, 0.0), "dac_kl": (0.0, 1.0, 0.0), "span": (0.0, 0.0, 1.0), "sum": (1.0, 1.0, 1.0)}


def assert_same_update(a, b):
    assert a.keys() == b.keys()
    assert any(v.abs().max() > 1e-6 for k, v in a.items() if not k.startswith("band."))  # the student moved
    if any(k.startswith("band.") for k in a):  # so did the band sub-network (learned DAC-KL band)
        assert any(v.abs().max() > 1e-6 for k, v in a.items() if k.startswith("band."))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("term", list(TERMS))
def test_grad_accumulation_equals_one_big_batch(term, tmp_path):
    sft, dac, span = TERMS[term]
    big, _ = grad_step(tmp_path / "big", per_device=4, ga=1, sft=sft, dac=dac, span=span)
    accumulated, _ = grad_step(tmp_path / "ga", per_device=2, ga=2, sft=sft, dac=dac, span=span)
    assert_same_update(big, accumulated)


def test_on_policy_terms_are_token_weighted_means_over_the_window(tokenizer, tmp_path):
    from datasets import Dataset

    from conftest import tiny_args
    from trl_mgsr import MGSRConfig, MGSRTrainer
    from trl_mgsr.testing import build_pair, toy_rows

    student, teacher = build_pair(tokenizer)
    trainer = MGSRTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                          args=tiny_args(MGSRConfig, tmp_path, lmbda=1.0, max_new_tokens=12,
                                         gradient_checkpointing=False, span_weight=1.0),  # span ids on
                          train_dataset=Dataset.from_list(toy_rows(8)))
    trainer.model_wrapped = trainer.model
    # A random model rarely samples the end token; let a slice of the vocabulary end a sample so lengths vary.
    trainer.generation_config.eos_token_id = list(range(100, 200))
    for seed in range(10):  # a draw where the micro-batches' generated lengths differ
        torch.manual_seed(seed)
        batches, counts = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, trainer.args.device)
        generated = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
        if generated[0] != generated[1]:
            break
    assert generated[0] != generated[1]
    assert int(counts["dac_kl"]) == sum(generated)  # counted after generation
    distinguished = []
    for name in ("sft", "dac_kl", "span"):
        weights = {"sft_weight": 0.0, "dac_weight": 0.0, "span_weight": 0.0, TERM_WEIGHT[name]: 1.0}
        for key, value in weights.items():
            setattr(trainer.args, key, value)
        with torch.no_grad():
            window = sum(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=counts) for b in batches)
            means = [trainer.compute_loss(trainer.model, dict(b)) for b in batches]  # each batch's own mean
        items = [int(c) for c in (trainer.count_items([b])[name] for b in batches)]
        assert sum(items) == int(counts[name]) > 0
        token_weighted = sum(m * n for m, n in zip(means, items)) / sum(items)
        torch.testing.assert_close(window, token_weighted, rtol=1e-5, atol=1e-6)
        # A mean of micro-batch means differs by (m0 - m1)(n0 - n1) / (2 (n0 + n1)); where that gap is measurable,
        # check that the window value is not it.
        gap = abs((means[0] - means[1]) * (items[0] - items[1])) / (2 * sum(items))
        if gap > 1e-4 * abs(window):
            distinguished.append(name)
            assert not torch.isclose(window, sum(means) / 2, rtol=1e-5, atol=0)
    assert distinguished  # at least one term tells the two normalisations apart


TERM_WEIGHT = {"sft": "sft_weight", "dac_kl": "dac_weight", "span": "span_weight"}


def test_micro_batch_mean_would_differ(tmp_path):
    # Guards the test above: with these rows, per-micro-batch means give a different update than token means.
    big, trainer = grad_step(tmp_path / "big", per_device=4, ga=1, sft=1.0, dac=0.0)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 1
    halves = [(b["labels"][:, 1:] != -100).sum().item() for b in (
        trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)]),
        trainer.data_collator([trainer.train_dataset[i] for i in (2, 3)]),
    )]
    assert halves[0] != halves[1]


def torchrun_grad_step(tmp_path, *args, port):
    """Run `grad_step.py` on 2 CPU processes (gloo); returns the update of rank 0 and of rank 1."""
    out = tmp_path / "ddp" / "delta.pt"
    out.parent.mkdir()
    # tests/ for grad_step.py, then this checkout's trl_mgsr (not whichever one is installed)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).parent / "grad_step.py"), str(out), *map(str, args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out), torch.load(str(out) + ".rank1")


@pytest.mark.slow
@pytest.mark.parametrize("term", ["sft", "sum"])
def test_two_process_ddp_equals_one_process(term, tmp_path):
    sft, dac, span = TERMS[term]
    single, _ = grad_step(tmp_path / "single", per_device=4, ga=1, sft=sft, dac=dac, span=span)
    rank0, rank1 = torchrun_grad_step(tmp_path, 2, 1, sft, dac, span, 0, port=29561)
    assert_same_update(single, rank0)
    assert_same_update(rank0, rank1)


@pytest.mark.slow
def test_two_process_on_policy_run_with_scrg_all_losses_and_lora(tmp_path):
    # lmbda=1: every step samples, revises with SCRG (different samples on each rank) and trains all three terms.
    rank0, rank1 = torchrun_grad_step(tmp_path, 2, 1, 1.0, 1.0, 1.0, 1.0, 2, "lora", port=29562)
    assert any("lora" in k for k in rank0)
    assert_same_update(rank0, rank1)  # both ranks hold identical student (and band net) weights
    # each rank checkpoints its own MGSR state (schedule, band net)
    states = [torch.load(tmp_path / "ddp" / "checkpoint-2" / f"mgsr_state_{rank}.pt", weights_only=False)
              for rank in (0, 1)]
    assert states[0]["schedule"] == states[1]["schedule"]
    for key, value in states[0]["band_net"].items():
        assert torch.equal(value, states[1]["band_net"][key])
