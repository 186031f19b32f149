"""`benchmarks/bench_step.py --quick`: every peer runs and the MGSR profile has its phases (not who is faster)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_step_quick_profiles_every_run(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--quick", "--repeats", "2", "--cache",
                           str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"gkd", "gkd_cache", "gkd_nogc", "distillation", "mgsr", "mgsr_nogc",
                                      "mgsr_twopass", "mgsr_stop", "mgsr_stop_nogc"}
    mgsr = report["results"]["mgsr"]["seconds_per_step"]
    for phase in ("step", "step_median", "scrg", "scrg_student", "scrg_teacher", "student_forward", "loss_dac_kl",
                  "band_net", "backward", "optimizer", "metrics", "host_syncs"):
        assert phase in mgsr, phase
    assert "sft_forward" not in mgsr and "loss_sft" not in mgsr  # the SFT term is off by default: no second forward
    assert "loss_span" not in mgsr  # and so is the span term
    assert "sampling" not in mgsr and "teacher_forward" not in mgsr  # SCRG samples, and serves the loss's teacher
    assert {"sampling", "scrg_teacher"} <= set(report["results"]["mgsr_twopass"]["seconds_per_step"])
    assert "loss_gkd" in report["results"]["gkd"]["seconds_per_step"]
    assert 0 < report["ratios"]["mgsr_over_gkd"] < 100
    per_repeat = [r["mgsr_over_gkd"] for r in report["ratios_per_repeat"]]  # two interleaved repeats, their median
    assert len(per_repeat) == 2 and abs(report["ratios"]["mgsr_over_gkd"] - sum(per_repeat) / 2) < 1e-9
