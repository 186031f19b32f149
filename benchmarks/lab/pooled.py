"""Pool lab runs over several initial students: issue 14's done-when, judged on every (initial student, seed) pair.

    python benchmarks/lab/pooled.py benchmarks/lab/results/dac_hi_075/pooled/manifest.json

The lab's three training seeds share one initial student, so their std misses what changing the initial student
(`run.py --init_seed`) moves; effects of 0.01 move that much. A manifest names, per setting and per initial student,
the `results.json` files to read and which of their methods to take under which name (runs made under earlier
names pool with today's: only the methods a run lists are read, so a name it used for another configuration is
left out). Paths are relative to the manifest. For each setting, every paired difference is taken per initial student
and training seed (each seed's models share the evaluation's dice), then pooled: mean ± std over those pairs.

The rule (written before the third initial student's results were read): `base` beats `reference` when its mean
paired difference exceeds their std on every task, beats each of `baselines` when the mean is above 0 on every
task, and a removal makes the student better beyond noise when its mean paired difference on the mean sampled
validity exceeds their std. A removal is paired with `base`, or with the method it names (`[removal, against]`:
a component removed from a variant of `base`).

    {"base": "MGSR", "reference": "GKD", "baselines": ["SFT", ...],
     "removals": ["MGSR w/o SCRG", ["MGSR + x, fixed band", "MGSR + x"], ...],
     "settings": {"defaults": [{"init_seed": 0, "runs": [{"path": "../x/results.json",
                                                           "names": {"name in that run": "name here"}}]}, ...]}}
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TASKS = ("sort", "pick", "walk")


def load_setting(students: list[dict], root: Path) -> list[dict[str, dict[str, list[float]]]]:
    """Per initial student: `{method: {task or "mean": per-seed sampled validity}}` from the runs it names."""
    pooled = []
    for student in students:
        methods: dict[str, dict[str, list[float]]] = {}
        for run in student["runs"]:
            results = json.loads((root / run["path"]).read_text())["results"]
            for old, new in run["names"].items():
                if new in methods:
                    raise ValueError(f"init_seed {student['init_seed']}: '{new}' comes from two runs")
                tasks = results[old]["tasks"]
                methods[new] = {t: tasks[t]["sampled"]["values"] for t in (*TASKS, "mean")}
        pooled.append(methods)
    return pooled


def paired(students, a: str, b: str, task: str) -> list[float]:
    """`a − b` per (initial student, seed), over the students that have both."""
    return [x - y for m in students if a in m and b in m for x, y in zip(m[a][task], m[b][task])]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}"


def table_head(first: str, last: str) -> list[str]:
    """A markdown table's header: `first`, the tasks, the mean (bold) and `last`."""
    return ["| " + " | ".join([first, *TASKS, "**mean**", last]) + " |",
            "| --- | " + " | ".join("---:" for _ in TASKS) + " | ---: | --- |"]


def report(manifest: dict, root: Path) -> str:
    base, reference = manifest["base"], manifest["reference"]
    lines = []
    for setting, students in manifest["settings"].items():
        data = load_setting(students, root)
        n = sum(len(m[base]["mean"]) for m in data if base in m)
        lines += [f"### {setting}: {len(data)} initial students, {n} (student, seed) pairs", "",
                  *table_head("method", "mean per initial student (`init_seed`: mean)")]
        removals = [(r, base) if isinstance(r, str) else tuple(r) for r in manifest["removals"]]
        for name in dict.fromkeys([base, reference, *manifest["baselines"], *(r for r, _ in removals)]):
            have = [(student["init_seed"], m[name]) for student, m in zip(students, data) if name in m]
            if not have:
                continue
            cells = [f"{statistics.mean(v for _, m in have for v in m[t]):.3f}" for t in (*TASKS, "mean")]
            per = ", ".join(f"{seed}: {statistics.mean(m['mean']):.3f}" for seed, m in have)
            lines.append(f"| {name} | " + " | ".join(cells[:-1]) + f" | **{cells[-1]}** | {per} |")
        lines += ["", *table_head(f"{base} −", "verdict")]
        for name in dict.fromkeys([reference, *manifest["baselines"]]):
            diffs = {t: paired(data, base, name, t) for t in (*TASKS, "mean")}
            if name == reference:
                ok = all(statistics.mean(diffs[t]) > statistics.stdev(diffs[t]) for t in TASKS)
                verdict = "ahead by more than the std on every task" if ok else "**not ahead by the std on every task**"
            else:
                ok = all(statistics.mean(diffs[t]) > 0 for t in TASKS)
                verdict = "ahead on every task" if ok else "**not ahead on every task**"
            lines.append(f"| {name} | " + " | ".join(spread(diffs[t]) for t in TASKS)
                         + f" | **{spread(diffs['mean'])}** | {verdict} |")
        lines += ["", *table_head("change − what it changes", "verdict")]
        for name, against in removals:
            diffs = {t: paired(data, name, against, t) for t in (*TASKS, "mean")}
            if len(diffs["mean"]) < 2:
                continue
            better = statistics.mean(diffs["mean"]) > statistics.stdev(diffs["mean"])
            verdict = "**better beyond noise**" if better else "not better"
            lines.append(f"| {name} − {against} | " + " | ".join(spread(diffs[t]) for t in TASKS)
                         + f" | **{spread(diffs['mean'])}** | {verdict} ({len(diffs['mean'])} pairs) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="Write the tables here (markdown) as well.")
    args = parser.parse_args(argv)
    text = report(json.loads(args.manifest.read_text()), args.manifest.resolve().parent)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
