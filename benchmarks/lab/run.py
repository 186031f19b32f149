"""The distillation lab: every method from the same student on checkable tasks, several seeds, one run.

    python benchmarks/lab/run.py            # the full grid (11 methods x 3 seeds: about 35 min on 2 CPU cores)
    python benchmarks/lab/run.py --quick    # a smoke run of the whole pipeline (< 2 min)

Tasks (`trl_mgsr/lab/tasks.py`): `sort` (one correct answer), `pick` (many valid answers), `walk` (24 letters where
one early mistake spoils the rest). A multi-task teacher (shipped with the package for the default settings,
`trl_mgsr/assets/lab/`) and an initial student (short SFT) are trained here when not found, and cached on disk
(`--cache`); every method then distills a copy of that student with the same budget (steps, batch,
learning rate, `lmbda`, seed) and is evaluated on held-out prompts of each task. Writes `results.json`,
`results.md` and `lab.png` to `--out`.

Add a method: one line in `METHODS` (trainer "mgsr" or "gkd", and the config fields that differ from the
library's defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a clone without installing

from trl_mgsr.lab.models import ModelSettings, eval_rows  # noqa: E402
from trl_mgsr.lab.runner import Budget, Method, distill, prepare_models, quiet  # noqa: E402
from trl_mgsr.lab.tasks import TASKS  # noqa: E402

METHODS: dict[str, Method] = {
    "SFT": Method("mgsr", {"sft_weight": 1.0, "dac_weight": 0.0, "span_weight": 0.0, "lmbda": 0.0}),
    "GKD": Method("gkd"),
    "GKD β=0 (forward KL)": Method("gkd", {"beta": 0.0}),
    "GKD β=1 (reverse KL)": Method("gkd", {"beta": 1.0}),
    "MGSR": Method("mgsr"),
    "MGSR w/o SCRG": Method("mgsr", {"scrg_rounds": 0}),
    "MGSR fixed band": Method("mgsr", {"dac_mode": "fixed"}),
    "MGSR + span": Method("mgsr", {"span_weight": 0.1}),  # the span term on, as it was by default ("w/o span" then)
    "MGSR + SFT term": Method("mgsr", {"sft_weight": 1.0}),  # the default before the SFT term went off
    "MGSR w/o correction": Method("mgsr", {"scrg_correction_weight": 0.0}),
    "MGSR + rescue": Method("mgsr", {"dac_rescue_weight": 10.0}),
    "MGSR adaptive schedule": Method("mgsr", {"schedule": "adaptive"}),
}
REFERENCE = "GKD"  # time ratios are to this method, measured in the same run
METRICS = ("sampled", "greedy", "teacher_nll", "distinct_valid")

QUICK_MODELS = ModelSettings(teacher_hidden=32, teacher_layers=1, teacher_steps=30, student_hidden=16,
                             student_layers=1, init_steps=5, eval_prompts=8)
QUICK_BUDGET = Budget(steps=3, batch_size=6, max_new_tokens=26)


def log(message: str) -> None:
    print(message, flush=True)


def run_job(method_name: str, method: Method, budget: Budget, settings: ModelSettings, models: dict,
            samples: int, threads: int) -> dict:
    """One (method, seed) in a worker process: distill the cached initial student, evaluate it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_mgsr.lab.metrics import evaluate_student

    torch.set_num_threads(threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    with quiet(), tempfile.TemporaryDirectory() as work:
        tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
        teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
        student = AutoModelForCausalLM.from_pretrained(models["student_init"])
        train_seconds, history = 0.0, []
        if method is not None:
            trainer, train_seconds = distill(method, budget, settings, teacher, student, tokenizer, work)
            student, history = trainer.model, trainer.state.log_history
        metrics = evaluate_student(student, teacher, tokenizer, eval_rows(settings), samples=samples,
                                   seed=budget.seed, max_new_tokens=budget.max_new_tokens)
    logged = {}
    for entry in history:
        for key, value in entry.items():
            if key.startswith("mgsr/") or key == "loss":
                logged.setdefault(key, []).append(value)
    return {"method": method_name, "seed": budget.seed, "train_seconds": train_seconds, "metrics": metrics,
            "logged_mean": {k: statistics.fmean(v) for k, v in logged.items()}}


def aggregate(jobs: list[dict], tasks: list[str]) -> dict:
    """Per method: each task's metrics and their mean over tasks, as mean ± std over seeds (and the standard error
    of the mean), the mean training time and the mean of the logged MGSR metrics."""
    by_method: dict[str, list[dict]] = {}
    for job in jobs:
        by_method.setdefault(job["method"], []).append(job)
    out = {}
    for name, runs in by_method.items():
        entry = {"seeds": [r["seed"] for r in runs], "tasks": {}, "train_seconds": statistics.fmean(
            r["train_seconds"] for r in runs)}
        for task in [*tasks, "mean"]:
            entry["tasks"][task] = {}
            for metric in METRICS:
                if task == "mean":
                    values = [statistics.fmean(r["metrics"][t][metric] for t in tasks) for r in runs]
                else:
                    values = [r["metrics"][task][metric] for r in runs]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                entry["tasks"][task][metric] = {"mean": statistics.fmean(values), "std": std,
                                                "sem": std / math.sqrt(len(values)), "values": values}
        keys = sorted({k for r in runs for k in r["logged_mean"]})
        entry["logged_mean"] = {k: statistics.fmean(r["logged_mean"][k] for r in runs if k in r["logged_mean"])
                                for k in keys}
        out[name] = entry
    reference = out.get(REFERENCE, {}).get("train_seconds")
    for entry in out.values():
        entry["time_vs_gkd"] = entry["train_seconds"] / reference if reference and entry["train_seconds"] else None
    return out


def _pm(cell: dict, digits: int = 2) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown(results: dict, tasks: list[str], names: list[str]) -> str:
    head = ["method", *(f"{t} sampled" for t in tasks), "**mean sampled**", "mean greedy", "teacher NLL / token",
            "distinct valid (pick)", "time / GKD"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name in names:
        r = results[name]["tasks"]
        ratio = results[name]["time_vs_gkd"]
        cells = [name, *(_pm(r[t]["sampled"]) for t in tasks), f"**{_pm(r['mean']['sampled'])}**",
                 _pm(r["mean"]["greedy"]), _pm(r["mean"]["teacher_nll"], 3),
                 _pm(r["pick"]["distinct_valid"]) if "pick" in r else "–",
                 f"{ratio:.2f}" if ratio else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spread(results: dict, tasks: list[str], names: list[str]) -> dict:
    """The largest standard error (std over seeds / sqrt(seeds)) of a method's mean sampled validity, per task."""
    return {t: max(results[n]["tasks"][t]["sampled"]["sem"] for n in names if n in results) for t in [*tasks, "mean"]}


def plot(path: Path, results: dict, tasks: list[str], names: list[str]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = [n for n in names if n not in ("teacher", "student init")]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 5.5), sharey=True)
    for ax, task in zip(axes, [*tasks, "mean"]):
        means = [results[n]["tasks"][task]["sampled"]["mean"] for n in methods]
        stds = [results[n]["tasks"][task]["sampled"]["std"] for n in methods]
        colors = ["tab:blue" if n.startswith("MGSR") else "tab:orange" if n.startswith("GKD") else "tab:gray"
                  for n in methods]
        ax.barh(range(len(methods)), means, xerr=stds, color=colors, capsize=3)
        for ref, style in (("teacher", "--"), ("student init", ":")):
            if ref in results:
                ax.axvline(results[ref]["tasks"][task]["sampled"]["mean"], color="k", ls=style, lw=1, label=ref)
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
        ax.invert_yaxis()
        ax.set(title=f"{task}: sampled validity", xlim=(0, 1))
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Sampled validity of the distilled student (mean ± std over seeds; same student init and budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def grid_settings(args) -> tuple[ModelSettings, Budget]:
    """The models' settings and the budget of a run: the defaults (or `--quick`'s) with the flags that change them."""
    settings, budget = (QUICK_MODELS, QUICK_BUDGET) if args.quick else (ModelSettings(), Budget())
    settings = replace(settings, **{k: v for k, v in (("student_hidden", args.student_hidden),
                                                       ("student_layers", args.student_layers),
                                                       ("init_seed", args.init_seed),
                                                       ("tasks", tuple(args.tasks or ()))) if v})
    budget = replace(budget, **{k: v for k, v in (("steps", args.steps), ("learning_rate", args.learning_rate),
                                                   ("lmbda", args.lmbda)) if v is not None})
    return settings, budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny models and budget: checks the pipeline only.")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="Where trained models are cached.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Training seeds (default 0 1 2).")
    parser.add_argument("--methods", nargs="+", default=None, help=f"Subset of: {', '.join(METHODS)}.")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=TRAINER:JSON",
                        help='An extra method for this run, e.g. \'MGSR rev=mgsr:{"dac_divergence": "reverse"}\'.')
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--lmbda", type=float, default=None)
    parser.add_argument("--student_hidden", type=int, default=None, help="Another student size (new initial student).")
    parser.add_argument("--init_seed", type=int, default=None,
                        help="Another initial student by the same recipe (its weights and rows); the same teacher.")
    parser.add_argument("--student_layers", type=int, default=None)
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS),
                        help="A subset of the tasks (a new teacher and initial student, trained and cached).")
    parser.add_argument("--samples", type=int, default=16,
                        help="Sampled responses per held-out prompt (16: with 4, re-evaluating one student under "
                             "other sampling seeds varied `pick` as much as the training seeds did).")
    parser.add_argument("--workers", type=int, default=2, help="Jobs run in parallel, one torch thread each.")
    args = parser.parse_args(argv)
    for variant in args.variant:
        name, _, spec = variant.partition("=")
        trainer, _, config = spec.partition(":")
        METHODS[name] = Method(trainer, json.loads(config or "{}"))
    names = list(dict.fromkeys((args.methods or list(METHODS)) + [v.partition("=")[0] for v in args.variant]))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    settings, budget = grid_settings(args)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    tasks = list(settings.tasks)
    start = time.perf_counter()
    with quiet():
        models = prepare_models(settings, str(args.cache), log=log)
    log(f"grid: {len(names)} methods x {len(seeds)} seeds, budget {asdict(budget)}, {args.workers} workers")
    jobs = [("teacher", None, replace(budget, seed=0)), ("student init", None, replace(budget, seed=0))]
    jobs += [(name, METHODS[name], replace(budget, seed=seed)) for name in names for seed in seeds]
    done = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = []
        for name, method, job_budget in jobs:
            job_models = models if name != "teacher" else {**models, "student_init": models["teacher"]}
            futures.append(pool.submit(run_job, name, method, job_budget, settings, job_models, args.samples, 1))
        for future in futures:
            result = future.result()
            done.append(result)
            sampled = {t: result["metrics"][t]["sampled"] for t in tasks}
            log(f"[{time.perf_counter() - start:6.0f}s] {result['method']} seed {result['seed']}: sampled "
                f"{statistics.fmean(sampled.values()):.3f} ({', '.join(f'{t} {v:.2f}' for t, v in sampled.items())}"
                f"), train {result['train_seconds']:.0f} s")
    results = aggregate(done, tasks)
    order = ["teacher", "student init", *names]
    table = markdown(results, tasks, order)
    spreads = spread(results, tasks, names)
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(args.out / "lab.png", results, tasks, order)
    payload = {
        "settings": asdict(settings), "budget": asdict(budget), "seeds": seeds, "samples": args.samples,
        "methods": {n: asdict(METHODS[n]) for n in names}, "tasks": {t: TASKS[t].shape for t in tasks},
        "models": models, "results": results, "spread_sem": spreads, "git": git_commit(),
        "wall_seconds": time.perf_counter() - start, "quick": args.quick,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2))
    (args.out / "results.md").write_text(table)
    log("")
    log(table)
    log("Largest standard error of a method's mean sampled validity: "
        + ", ".join(f"{t} {v:.3f}" for t, v in spreads.items()))
    log(f"Wrote {args.out / 'results.json'}, {args.out / 'results.md'}" + (f", {png}" if png else "")
        + f" in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
