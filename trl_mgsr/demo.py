"""`trl-mgsr demo`: GKD against MGSR on the distillation lab's checkable tasks, offline, about 2 minutes of CPU.

1. Take the lab's teacher (shipped with the package, `trl_mgsr/assets/lab/`) and train (or reuse from
   `--output_dir/cache`) the lab's initial student on the lab tasks (`trl_mgsr.lab`: `sort`, `pick`, `walk`).
2. Distill two copies of that student, one with TRL's `GKDTrainer` (`Method("gkd")`) and one with `MGSRTrainer`
   with its defaults (`Method("mgsr")`), on one `Budget`: same rows, steps, batch, learning rate, `lmbda`, seed.
3. Evaluate the teacher, the initial student and both students on held-out prompts with the task checkers
   (`evaluate_student`): sampled and greedy validity, the teacher's NLL of the student's samples, distinct valid
   answers.
4. Print the table; write `results.json`, `results.md`, `demo.png`; save `teacher/`, `student-init/`,
   `student-gkd/` and `student-mgsr/` (with its model card).

One run, one seed, small held-out sets: differences of a few points are within noise. `--dolly` runs the older
demo on Dolly text (ROUGE-L, `trl_mgsr.demo_dolly`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from dataclasses import asdict, replace

from .lab import TASKS, Budget, Method, ModelSettings, distill, eval_rows, evaluate_student, prepare_models
from .reporting import save_results

#: The lab's models: its teacher ships with the package (`trl_mgsr/assets/lab/`), its initial student is trained
#: here.
MODELS = ModelSettings()
BUDGET = Budget()  # the lab's budget: the demo is one seed of the lab's GKD and MGSR runs
EVAL_PROMPTS = 32  # the first 32 of the lab's held-out prompts per task
QUICK_MODELS = ModelSettings(teacher_hidden=32, teacher_layers=1, teacher_steps=20, student_hidden=16,
                             student_layers=1, init_steps=4, eval_prompts=4)
QUICK_BUDGET = Budget(steps=3, batch_size=6, max_new_tokens=26)
METHODS = {"student-gkd": ("student + GKD", Method("gkd")), "student-mgsr": ("student + MGSR", Method("mgsr"))}
SAMPLES = 4  # sampled responses per held-out prompt
CURVE_POINTS = 5  # held-out validity measured this many times during each distillation (and before it)
DATASET = "trl_mgsr.lab tasks " + ", ".join(TASKS) + " (procedurally generated)"


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Tiny models run fastest on one thread (and far faster than on 2 threads of a busy machine)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _validity_curve(teacher, tokenizer, rows, budget: Budget):
    """A callback recording the student's mean sampled validity on `rows` (2 samples per prompt) during training;
    the RNG is forked so that measuring does not change the training run."""
    import torch
    from transformers import TrainerCallback

    every = max(budget.steps // CURVE_POINTS, 1)

    class ValidityCurve(TrainerCallback):
        def __init__(self):
            self.curve: list[tuple[int, float]] = []

        def _record(self, step, model):
            with torch.random.fork_rng(devices=[]):
                scores = evaluate_student(model, teacher, tokenizer, rows, samples=2, seed=budget.seed,
                                          max_new_tokens=budget.max_new_tokens)
            model.train()
            self.curve.append((step, statistics.fmean(s["sampled"] for s in scores.values())))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._record(state.global_step, model)

    return ValidityCurve()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def results_table(rows: list[dict], tasks: list[str]) -> str:
    """One line per model: sampled validity per task and on average, greedy validity, teacher NLL, diversity."""
    head = ["model", "parameters", *(f"{t} sampled" for t in tasks), "mean sampled", "mean greedy",
            "teacher NLL / token", "distinct valid (pick)"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        m = r["metrics"]
        cells = [r["model"], f"{r['parameters'] / 1e6:.2f}M", *(f"{m[t]['sampled']:.2f}" for t in tasks),
                 f"{r['mean']['sampled']:.2f}", f"{r['mean']['greedy']:.2f}", f"{r['mean']['teacher_nll']:.2f}",
                 f"{m['pick']['distinct_valid']:.2f}" if "pick" in m else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(path: str, rows: list[dict], tasks: list[str], curves: dict) -> str | None:
    """Write the PNG (sampled validity per task and model; students' held-out validity during distillation);
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = ["dimgray", "lightgray", "tab:orange", "tab:blue"]
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    groups = [*tasks, "mean"]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r["metrics"][t]["sampled"] if t != "mean" else r["mean"]["sampled"] for t in groups]
        ax.bar([g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))], values, width, label=r["model"],
               color=colors[i % len(colors)])
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylim=(0, 1), ylabel="share of valid sampled responses",
           title="Held-out sampled validity per task: teacher, student before, GKD, MGSR")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(rows))  # below: bars reach 1
    if curves:
        ax = axes[0][1]
        for (name, curve), color in zip(curves.items(), ("tab:orange", "tab:blue")):
            ax.plot(*zip(*curve), marker="o", label=name, color=color)
        ax.set(ylim=(0, 1), xlabel="distillation step", ylabel="mean sampled validity (2 samples per prompt)",
               title="Each student's held-out sampled validity during distillation")
        ax.legend(fontsize=8)
    for a in axes[0]:
        a.title.set_fontsize(10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _stage(models: dict, output_dir: str) -> tuple[str, str]:
    """Copy the cached teacher and initial student to `teacher/` and `student-init/` (what the README's examples
    use); return their paths."""
    paths = []
    for role, name in (("teacher", "teacher"), ("student_init", "student-init")):
        path = os.path.join(output_dir, name)
        shutil.copytree(models[role], path, dirs_exist_ok=True)
        paths.append(path)
    return paths[0], paths[1]


def run_demo(output_dir: str = "mgsr-demo", quick: bool = False, settings: ModelSettings | None = None,
             budget: Budget | None = None, log=print) -> dict:
    """Run the lab demo; return its results (also written to `output_dir/results.json`). Threads and log levels
    are the caller's (`main`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = settings or (QUICK_MODELS if quick else MODELS)
    budget = budget or (QUICK_BUDGET if quick else BUDGET)
    start = time.perf_counter()

    def clock(message: str) -> None:
        log(f"[{time.perf_counter() - start:6.1f}s] {message}")

    os.makedirs(output_dir, exist_ok=True)
    models = prepare_models(settings, os.path.join(output_dir, "cache"), log=clock)
    teacher_dir, init_dir = _stage(models, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()  # the model card names it by this path
    n_eval = min(EVAL_PROMPTS, settings.eval_prompts)
    rows_eval = {task: rows[:n_eval] for task, rows in eval_rows(settings).items()}
    tasks = list(settings.tasks)

    trainers, curves, seconds = {}, {}, {}
    for name, (label, method) in METHODS.items():
        student = AutoModelForCausalLM.from_pretrained(init_dir)
        callback = _validity_curve(teacher, tokenizer, rows_eval, budget)
        trainer, seconds[name] = distill(method, budget, settings, teacher, student, tokenizer,
                                         os.path.join(output_dir, name), callbacks=[callback])
        trainers[name], curves[label] = trainer, callback.curve
        trainer.save_model()
        clock(f"{label}: {budget.steps} steps in {seconds[name]:.0f} s "
              f"(with {len(callback.curve)} held-out checks), saved to {trainer.args.output_dir}")
    mgsr = trainers["student-mgsr"]
    mgsr.create_model_card(model_name="student-mgsr", dataset_name=DATASET)
    terms = sorted({k for e in mgsr.state.log_history for k in e if k.startswith("mgsr/")})

    rows = []
    for label, model in (("teacher", teacher), ("student before distillation", AutoModelForCausalLM.from_pretrained(
            init_dir)), *((METHODS[n][0], t.model) for n, t in trainers.items())):
        metrics = evaluate_student(model, teacher, tokenizer, rows_eval, samples=SAMPLES, seed=budget.seed,
                                   max_new_tokens=budget.max_new_tokens)
        mean = {k: statistics.fmean(metrics[t][k] for t in tasks) for k in ("sampled", "greedy", "teacher_nll")}
        rows.append({"model": label, "parameters": _count(model), "metrics": metrics, "mean": mean})
    clock(f"evaluation: {len(rows)} models x {len(tasks)} tasks x {n_eval} held-out prompts "
          f"x {SAMPLES} samples (+ greedy)")

    table = results_table(rows, tasks)
    log("")
    log(table)
    log(f"Same budget for both students: {budget.steps} steps x batch {budget.batch_size}, lr {budget.learning_rate:g}, "
        f"lmbda {budget.lmbda:g}, seed {budget.seed}, same initial student and rows. MGSR terms logged: "
        f"{', '.join(terms)}. One seed and {n_eval} prompts per task: a few points are noise.")
    png = plot_results(os.path.join(output_dir, "demo.png"), rows, tasks, curves)
    log(f"Plot: {png}" if png else "Plot skipped: matplotlib is not installed (pip install 'trl-mgsr[plot]').")
    results = {
        "settings": asdict(settings), "budget": asdict(budget), "samples": SAMPLES,
        "tasks": {t: TASKS[t].shape for t in tasks}, "rows": rows, "mgsr_terms": terms,
        "train_seconds": seconds, "validity_curves": curves, "models": models, "plot": png,
        "student": mgsr.args.output_dir, "wall_seconds": time.perf_counter() - start,
    }
    save_results(output_dir, results, table, mgsr.args.output_dir, log)
    clock("done")
    return results


def main(argv: list[str] | None = None) -> int:
    from .cli_errors import OneLineErrorParser
    from .lab.runner import quiet

    parser = OneLineErrorParser(prog="trl-mgsr demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="mgsr-demo", help="Where models, results and the plot go.")
    parser.add_argument("--quick", action="store_true", help="Tiny models, a few steps (smoke test, seconds).")
    parser.add_argument("--dolly", action="store_true", help="The older demo on Dolly text, scored by ROUGE-L.")
    parser.add_argument("--seed", type=int, default=0, help="Distillation seed.")
    parser.add_argument("--distill_steps", type=int, default=None, help="Override the distillation steps.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for tiny models)."
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.distill_steps is not None and args.distill_steps < 1:
        raise ValueError(f"--distill_steps must be >= 1, got {args.distill_steps}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with torch_threads(args.threads), quiet():
        if args.dolly:
            from . import demo_dolly

            settings = demo_dolly.QUICK if args.quick else demo_dolly.DemoSettings()
            if args.distill_steps is not None:
                settings = replace(settings, distill_steps=args.distill_steps)
            demo_dolly.run_demo(args.output_dir, settings, seed=args.seed)
        else:
            budget = replace(QUICK_BUDGET if args.quick else BUDGET, seed=args.seed,
                             **({"steps": args.distill_steps} if args.distill_steps else {}))
            run_demo(args.output_dir, quick=args.quick, budget=budget)
    return 0
