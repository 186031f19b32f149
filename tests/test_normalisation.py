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


@pytest.mark.slow
@pytest.mark.parametrize("term", ["sft", "sum"])
def test_two_process_ddp_equals_one_process(term, tmp_path):
    sft, dac, span = TERMS[term]
    single, _ = grad_step(tmp_path / "single", per_device=4, ga=1, sft=sft, dac=dac, span=span)
    out = tmp_path / "ddp" / "delta.pt"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           str(Path(__file__).parent / "grad_step.py"), str(out), "2", "1", str(sft), str(dac), str(span), "0"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(out)
    assert_same_update(single, ddp)
    assert_same_update(ddp, torch.load(str(out) + ".rank1"))
