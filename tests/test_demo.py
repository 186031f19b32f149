"""`trl-mgsr demo --quick` end to end: the comparison table, the PNG, and a reloadable distilled student."""

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
