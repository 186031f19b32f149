"""`benchmarks/quality/run.py`: the quick smoke run end to end, and a clear message when the data is missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "quality" / "run.py"
SHARED_DATA = REPO.parent / "shared" / "data"


def _run(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _assert_missing_data_message(proc):
    assert proc.returncode != 0
    assert "the data is missing" in proc.stderr and "../shared/data" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_gives_a_clear_message(tmp_path):
    proc = _run("--quick", "--data_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), timeout=120)
    _assert_missing_data_message(proc)
    assert str(tmp_path / "nowhere") in proc.stderr


@pytest.mark.slow
def test_quick_benchmark(tmp_path):
    out = tmp_path / "quality"
    proc = _run("--quick", "--out", str(out))
    if not SHARED_DATA.is_dir():  # no ../shared/data: a clear message, not a traceback
        _assert_missing_data_message(proc)
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    expected = {"teacher", "student init", "SFT", "GKD", "MGSR", "MGSR w/o SCRG", "MGSR w/o DAC-KL (forward KL)",
                "MGSR + span", "MGSR adaptive schedule", "GKD [seed 43]"}
    assert expected <= set(results["results"])
    for name, r in results["results"].items():
        assert set(r["sets"]) == {"dolly", "self-inst", "vicuna", "sinst"}, name
        assert len(r["average"]["scores"]) >= 3 and r["eval_seconds"] > 0
        if name not in ("teacher", "student init"):
            assert r["train_seconds"] > 0 and r["loss_curve"]
    mgsr = results["results"]["MGSR"]["mgsr_metrics_mean"]
    assert "mgsr/dac_kl" in mgsr and not {"mgsr/sft", "mgsr/span"} & set(mgsr)  # SFT and span terms off by default
    assert "mgsr/span" in results["results"]["MGSR + span"]["mgsr_metrics_mean"]
    forward_kl = results["results"]["MGSR w/o DAC-KL (forward KL)"]["mgsr_metrics_mean"]
    assert forward_kl["mgsr/dac_kl_lo"] == 0.0 and forward_kl["mgsr/dac_kl_hi"] == 1.0  # the band [0, 1]
    assert mgsr["mgsr/dac_kl_hi"] < 1.0  # the learned band (starts at dac_hi = 0.75)
    assert "mgsr/scrg_corrected_frac" not in results["results"]["MGSR w/o SCRG"]["mgsr_metrics_mean"]
    assert results["git"]["commit"] and results["learning_rate"] in results["settings"]["lr_grid"]
    table = (out / "results.md").read_text()
    assert "| MGSR + span |" in table and "**average**" in table
    png = out / "quality.png"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun reuses the cached assets and method results.
    again = _run("--quick", "--out", str(out))
    assert again.returncode == 0 and "assets: reusing" in again.stdout and "GKD: reusing" in again.stdout
