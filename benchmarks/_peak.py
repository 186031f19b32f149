"""Shared harness of the loss benchmarks: one fresh process per measurement, peak memory from `ru_maxrss`.

torch's CPU allocator is plain malloc, which `tracemalloc` does not see, so a worker reads
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (the process's peak resident set) once its inputs are allocated and
touched, and again after the first forward+backward; the difference is the extra peak memory the loss needs on top
of its inputs. Tensors this large are mmap-backed and go back to the OS when freed, so the high-water mark is the
real peak of live tensors, and a fresh process keeps one method's peak from hiding another's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def time_and_peak(run, repeats: int, reset=lambda: None) -> dict:
    """Run `run()` `1 + repeats` times; peak MiB of the first run, best time of the others (or the first's)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(1 + repeats):
        reset()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - before) / 1024, "time_s": min(times[1:] or times), "inputs_mib": before / 1024}


def measure(script: str, spec: dict) -> dict:
    """Run `script --worker <spec as JSON>` in a fresh process; its last stdout line is the JSON result."""
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(path, meta: dict, rows: list[dict]) -> None:
    """Write `{"meta", "rows"}` as JSON to `path` (a `Path`), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def fmt(x: float | None, digits: int = 2) -> str:
    """A table cell: `x` with `digits` decimals, or "-" when it was not measured."""
    return "-" if x is None else f"{x:.{digits}f}"
