"""The example scripts run as documented, on tiny saved models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from trl_mgsr.testing import build_pair

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ROWS = [{"instruction": f"Name color number {i}.", "input": "", "output": f"Color {i} is blue."} for i in range(8)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("example-models")
    student, teacher = build_pair(tokenizer)
    for model, name in ((student, "student"), (teacher, "teacher")):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def run(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_lora_example_reads_parquet_and_merges(models, tmp_path):
    Dataset.from_list(ROWS).to_parquet(tmp_path / "train.parquet")
    out = tmp_path / "lora"
    proc = run("mgsr_lora.py", "--student", models / "student", "--teacher", models / "teacher", "--train_file",
               tmp_path / "train.parquet", "--max_steps", "1", "--batch_size", "2", "--max_new_tokens", "4",
               "--max_length", "64", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter_config.json").is_file() and (tmp_path / "lora-merged" / "config.json").is_file()


def test_evaluate_student_runs_trl_mgsr_eval_on_the_sets_it_finds(models, tmp_path):
    (tmp_path / "data" / "dolly").mkdir(parents=True)
    (tmp_path / "data" / "dolly" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    proc = run("evaluate_student.py", "--model", models / "student", "--data_dir", tmp_path / "data",
               "--max_new_tokens", "4", "--no_progress", "--output_dir", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping vicuna/valid.jsonl" in proc.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["sets"]) == ["dolly"] and results["seeds"] == [10, 20, 30]  # trl-mgsr eval's defaults
    assert results["settings"]["batch_size"] == 8


def test_mgsr_example_trains_on_the_shipped_rows_by_default(models, tmp_path):
    out = tmp_path / "full"
    proc = run("mgsr.py", "--model_name_or_path", models / "student", "--teacher_model_name_or_path",
               models / "teacher", "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_new_tokens", "4",
               "--max_length", "64", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
               "--output_dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training on the shipped rows" in proc.stdout and "dolly_mini.jsonl" in proc.stdout
    assert (out / "model.safetensors").is_file()


def test_lora_example_rejects_a_mistyped_local_model_path(models, tmp_path):
    proc = run("mgsr_lora.py", "--student", f"{models}/studnet", "--teacher", models / "teacher")
    assert proc.returncode != 0
    assert f"--student {models}/studnet: no such model directory" in proc.stderr
    assert "huggingface.co" not in proc.stderr


def test_evaluate_student_falls_back_to_the_shipped_rows(models, tmp_path):
    proc = run("evaluate_student.py", "--model", models / "student", "--data_dir", tmp_path / "nothing-here",
               "--max_samples", "2", "--seeds", "1", "--max_new_tokens", "2", "--no_progress", "--output_dir",
               tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluating on the rows shipped in the package" in proc.stdout
    assert list(json.loads((tmp_path / "eval" / "results.json").read_text())["sets"]) == ["dolly_mini"]
