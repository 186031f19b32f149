"""`trl-mgsr demo --quick` end to end: the comparison table, the PNG, and a reloadable distilled student."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_mgsr.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | parameters | held-out loss | ROUGE-L (mean ± std, 2 seeds) |" in printed
    for row in ("| teacher |", "| student before distillation |", "| student + GKD |", "| student + MGSR |"):
        assert row in printed
    assert "mgsr/sft" in printed  # the MGSR loss terms took part

    png = out / "demo.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    student = out / "student-mgsr"
    card = (student / "README.md").read_text()
    assert "## MGSR distillation" in card and str(out / "teacher") in card and "dolly" in card
    model = AutoModelForCausalLM.from_pretrained(student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]


def test_plot_is_skipped_clearly_without_matplotlib(monkeypatch, tmp_path):
    from trl_mgsr.demo import plot_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a `pip install -e .` without the [plot] extra
    rows = [{"model": "m", "rougeL_mean": 1.0, "rougeL_std": 0.1}]
    assert plot_results(str(tmp_path / "x.png"), [(1, 2.0)], {"s": [(0, 1.0)]}, {"s": [(1, 1.0)]}, rows) is None
    assert not (tmp_path / "x.png").exists()
