"""The distillation lab: task checkers, and `benchmarks/lab/run.py --quick` end to end (pipeline, not winners)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trl_mgsr.lab.models import ModelSettings, build_lab_tokenizer, eval_rows, held_out_prompts, train_rows
from trl_mgsr.lab.runner import SHIPPED, prepare_models
from trl_mgsr.lab.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(TASKS))
def test_generated_answers_pass_their_checker_and_corruptions_fail(name):
    task = TASKS[name]
    rng = random.Random(0)
    for row in task.rows(200, 0):
        assert task.check(row["prompt"], row["answer"]), row
        assert task.check(row["prompt"], f"  {row['answer']} \n")  # whitespace does not matter
        words = row["answer"].split()
        i = rng.randrange(len(words))
        wrong = words[:i] + [next(c for c in "abcdefghijklmnopqrstuvwxyz" if c != words[i] and c not in words)] \
            + words[i + 1:]
        if name != "pick":  # a pick answer may stay valid with another letter
            assert not task.check(row["prompt"], " ".join(wrong)), (row, wrong)
        assert not task.check(row["prompt"], " ".join(words[:-1]))  # one letter short
        assert not task.check(row["prompt"], "")


def test_pick_has_many_valid_answers_and_rejects_invalid_ones():
    pick = TASKS["pick"]
    assert pick.check("pick 2 between c and h", "d g") and pick.check("pick 2 between c and h", "e f")
    for bad in ("g d", "c g", "d h", "d d", "d e f"):
        assert not pick.check("pick 2 between c and h", bad), bad
    answers = {}
    for r in pick.rows(3000, 1, distinct=False):
        answers.setdefault(r["prompt"], set()).add(r["answer"])
    assert max(len(a) for a in answers.values()) >= 5  # training rows show the teacher several answers per prompt


def test_walk_is_long_and_one_early_mistake_spoils_it():
    walk = TASKS["walk"]
    assert walk.check("walk from x by 3", "a d g j m p s v y b e h k n q t w z c f i l o r")
    row = walk.rows(1, 0)[0]
    assert len(row["answer"].split()) >= 24


def test_held_out_prompts_never_reach_training():
    settings = ModelSettings(eval_prompts=32)
    held = held_out_prompts(settings)
    assert held == {r["prompt"] for r in eval_rows(settings)["sort"]}  # pick and walk are evaluated in distribution
    assert not held & {r["prompt"] for r in train_rows(settings, 500, "distill")}


def test_cache_keys_follow_the_settings():
    base = ModelSettings()
    assert ModelSettings().key() == base.key()
    other_student = ModelSettings(student_hidden=64)
    assert other_student.teacher_key() == base.teacher_key() and other_student.key() != base.key()
    assert ModelSettings(teacher_steps=10).teacher_key() != base.teacher_key()
    other_init = ModelSettings(init_seed=1)  # another initial student, the same teacher
    assert other_init.teacher_key() == base.teacher_key() and other_init.key() != base.key()
    assert ModelSettings(init_seed=0).key() == base.key()


def test_the_shipped_teacher_is_the_default_settings_teacher_and_is_good():
    """The package ships the teacher of `ModelSettings()` (the lab's and the demo's); a change to the tasks or the
    settings changes its key, and this test says the shipped copy must be retrained (see trl_mgsr/assets/README.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_mgsr.lab.metrics import evaluate_student

    settings = ModelSettings()
    path = Path(SHIPPED) / f"teacher-{settings.teacher_key()}"
    assert (path / "lab.json").is_file(), f"no shipped teacher for the default settings at {path}: retrain it"
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.get_vocab() == build_lab_tokenizer(settings).get_vocab()  # a student built here fits it
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = {task: r[:12] for task, r in eval_rows(settings).items()}
    scores = evaluate_student(teacher, teacher, tokenizer, rows, samples=1, seed=0, max_new_tokens=32)
    assert all(s["greedy"] >= 0.9 for s in scores.values()), scores


def test_prepare_models_reuses_a_shipped_model_and_its_tokenizer(tmp_path):
    settings = ModelSettings(teacher_hidden=16, teacher_layers=1, teacher_steps=2, student_hidden=8,
                             student_layers=1, init_steps=1, eval_prompts=4)
    quiet_log = []
    first = prepare_models(settings, str(tmp_path / "shipped"), log=quiet_log.append, shipped_root=None)
    assert not first["teacher_meta"]["reused"]
    again = prepare_models(settings, str(tmp_path / "cache"), log=quiet_log.append, shipped_root=tmp_path / "shipped")
    assert again["teacher"] == first["teacher"] and again["teacher_meta"]["shipped"]
    assert again["student_init"] == first["student_init"] and again["student_init_meta"]["shipped"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing was trained
    other_student = prepare_models(ModelSettings(**{**settings.__dict__, "student_hidden": 12}), str(tmp_path / "cache"),
                                   log=quiet_log.append, shipped_root=tmp_path / "shipped")
    assert other_student["teacher_meta"]["shipped"] and not other_student["student_init_meta"]["reused"]
    assert "reusing the shipped teacher" in "\n".join(quiet_log)


def test_grid_flags_change_the_settings_and_the_budget():
    import argparse

    from trl_mgsr.lab.runner import Budget

    sys.path.insert(0, str(REPO / "benchmarks" / "lab"))
    from run import grid_settings

    flags = dict(quick=False, student_hidden=None, student_layers=None, init_seed=None, tasks=None, steps=None,
                 learning_rate=None, lmbda=None)
    assert grid_settings(argparse.Namespace(**flags)) == (ModelSettings(), Budget())
    settings, budget = grid_settings(argparse.Namespace(**{**flags, "tasks": ["walk"], "learning_rate": 5e-4}))
    assert settings.tasks == ("walk",) and settings.teacher_key() != ModelSettings().teacher_key()
    assert budget == Budget(learning_rate=5e-4)
    settings, _ = grid_settings(argparse.Namespace(**{**flags, "init_seed": 1}))
    assert settings == ModelSettings(init_seed=1) and settings.teacher_key() == ModelSettings().teacher_key()


@pytest.mark.slow
def test_quick_lab_run(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lab" / "run.py"), "--quick", "--out", str(out),
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    sys.path.insert(0, str(REPO / "benchmarks" / "lab"))
    from run import METHODS

    assert set(payload["results"]) == {"teacher", "student init", *METHODS}
    for name, result in payload["results"].items():
        for task in [*TASKS, "mean"]:
            cell = result["tasks"][task]
            assert 0.0 <= cell["sampled"]["mean"] <= 1.0 and 0.0 <= cell["greedy"]["mean"] <= 1.0, name
            assert cell["teacher_nll"]["mean"] > 0 and cell["distinct_valid"]["mean"] >= 0
        if name not in ("teacher", "student init"):
            assert len(result["seeds"]) == 2 and result["train_seconds"] > 0 and result["time_vs_gkd"] > 0
    assert payload["results"]["GKD"]["time_vs_gkd"] == 1.0
    assert "mgsr/scrg_corrected_frac" not in payload["results"]["MGSR w/o SCRG"]["logged_mean"]
    assert "mgsr/span" in payload["results"]["MGSR + span"]["logged_mean"]
    assert "mgsr/span" not in payload["results"]["MGSR"]["logged_mean"]  # off by default
    table = (out / "results.md").read_text()
    assert "| MGSR + SFT term |" in table and "time / GKD" in table
    assert "mgsr/sft" in payload["results"]["MGSR + SFT term"]["logged_mean"]
    assert "mgsr/sft" not in payload["results"]["MGSR"]["logged_mean"]  # off by default
    pytest.importorskip("matplotlib")
    assert (out / "lab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pooled_report_pairs_per_initial_student_and_seed_and_applies_the_rule(tmp_path):
    """`benchmarks/lab/pooled.py`: renamed methods from several runs, differences paired within (student, seed)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "lab"))
    from pooled import load_setting, paired, report

    def results(methods):  # {name: per-seed mean sampled validity}, the same value on every task
        return {"results": {name: {"tasks": {t: {"sampled": {"values": v}} for t in (*TASKS, "mean")}}
                            for name, v in methods.items()}}

    # Student 0 scores low, student 1 high: a paired difference must not see that spread.
    (tmp_path / "a.json").write_text(json.dumps(results({"old MGSR": [0.30, 0.32], "GKD": [0.20, 0.22]})))
    (tmp_path / "b.json").write_text(json.dumps(results({"w/o x": [0.31, 0.33], "other": [0.0, 0.0]})))
    (tmp_path / "c.json").write_text(json.dumps(results({"MGSR": [0.60, 0.62], "GKD": [0.50, 0.52],
                                                         "MGSR w/o x": [0.62, 0.63]})))
    manifest = {"base": "MGSR", "reference": "GKD", "baselines": [], "removals": ["MGSR w/o x"],
                "settings": {"defaults": [
                    {"init_seed": 0, "runs": [{"path": "a.json", "names": {"old MGSR": "MGSR", "GKD": "GKD"}},
                                              {"path": "b.json", "names": {"w/o x": "MGSR w/o x"}}]},
                    {"init_seed": 1, "runs": [{"path": "c.json", "names": {"MGSR": "MGSR", "GKD": "GKD",
                                                                           "MGSR w/o x": "MGSR w/o x"}}]}]}}
    data = load_setting(manifest["settings"]["defaults"], tmp_path)
    assert "other" not in data[0]  # only the methods a run names are read
    assert paired(data, "MGSR", "GKD", "mean") == pytest.approx([0.10, 0.10, 0.10, 0.10])
    assert paired(data, "MGSR w/o x", "MGSR", "walk") == pytest.approx([0.01, 0.01, 0.02, 0.01])
    text = report(manifest, tmp_path)
    assert "2 initial students, 4 (student, seed) pairs" in text
    assert "| GKD | +0.100 ± 0.000" in text and "ahead by more than the std on every task" in text
    assert "| MGSR w/o x − MGSR |" in text and "**better beyond noise** (4 pairs)" in text
    manifest["removals"] = [["GKD", "MGSR w/o x"]]  # paired with another method than the base
    assert "| GKD − MGSR w/o x | -0.112 ± 0.005 |" in report(manifest, tmp_path)
    manifest["settings"]["defaults"][1]["runs"].append({"path": "a.json", "names": {"GKD": "GKD"}})
    with pytest.raises(ValueError, match="'GKD' comes from two runs"):
        report(manifest, tmp_path)
