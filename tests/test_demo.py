"""`trl-mgsr demo --quick` end to end (lab tasks): the table, the files, the PNG, a reloadable student with its card;
`--dolly --quick` and the `trl-mgsr eval` command it prints."""

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_mgsr.cli import main

ROWS = ("| teacher |", "| student before distillation |", "| student + GKD |", "| student + MGSR |")


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | parameters | sort sampled | pick sampled | walk sampled | mean sampled | mean greedy |" in printed
    for row in ROWS:
        assert row in printed
    assert "mgsr/dac_kl" in printed and "mgsr/correction" in printed  # the MGSR loss terms took part
    assert "mgsr/sft" not in printed  # the SFT term is off by default

    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == [r.strip("| ") for r in ROWS]
    for r in results["rows"]:
        for task in ("sort", "pick", "walk"):
            m = r["metrics"][task]
            assert 0 <= m["sampled"] <= 1 and 0 <= m["greedy"] <= 1 and m["teacher_nll"] > 0
    assert set(results["validity_curves"]) == {"student + GKD", "student + MGSR"}
    assert all(curve[0][0] == 0 and curve[-1][0] == results["budget"]["steps"]
               for curve in results["validity_curves"].values())
    assert (out / "results.md").read_text().count("\n") == 6
    for name in ("teacher", "student-init", "student-gkd", "student-mgsr"):
        assert (out / name / "config.json").is_file(), name

    card = (out / "student-mgsr" / "README.md").read_text()
    assert "## MGSR distillation" in card and str(out / "teacher") in card and "trl_mgsr.lab tasks" in card
    model = AutoModelForCausalLM.from_pretrained(out / "student-mgsr")
    tokenizer = AutoTokenizer.from_pretrained(out / "student-mgsr")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "sort: d b a"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]

    assert main(["demo", "--quick", "--output_dir", str(out)]) == 0  # a rerun reuses the cached teacher
    assert "reusing the teacher" in capsys.readouterr().out

    pytest.importorskip("matplotlib")
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_dolly_quick_and_its_eval_command_reproduces_rouge(tmp_path, capsys):
    out = tmp_path / "dolly"
    assert main(["demo", "--dolly", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | parameters | held-out loss | ROUGE-L (mean ± std, 2 seeds) |" in printed
    for row in ROWS:
        assert row in printed
    command = next(line for line in printed.splitlines() if line.startswith("trl-mgsr eval "))
    assert "--batch_size 8" in command and "--max_new_tokens 12" in command and "heldout.jsonl" in command
    results = json.loads((out / "results.json").read_text())
    expected = next(r for r in results["rows"] if r["model"] == "student + MGSR")

    words = shlex.split(command)
    assert main(words[1:]) == 0
    scores = json.loads((Path(words[words.index("--output_dir") + 1]) / "results.json").read_text())["sets"]["heldout"]
    assert scores["scores"] == pytest.approx(expected["rougeL_per_seed"])
    assert (out / "student-mgsr" / "README.md").read_text().count("dolly") >= 1


def test_plot_is_skipped_clearly_without_matplotlib(monkeypatch, tmp_path):
    from trl_mgsr.demo import plot_results

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a `pip install -e .` without the [plot] extra
    metrics = {"sort": {"sampled": 0.5}}
    rows = [{"model": "m", "metrics": metrics, "mean": {"sampled": 0.5}}]
    assert plot_results(str(tmp_path / "x.png"), rows, ["sort"], {"s": [(0, 0.1), (1, 0.2)]}) is None
    assert not (tmp_path / "x.png").exists()
