"""`trl-mgsr demo --dolly`: MGSR against plain GKD on Dolly text shipped in the package (the demo before the lab).

1. Load `trl_mgsr/assets/dolly_mini.jsonl` (480 short rows of databricks-dolly-15k, CC BY-SA 3.0; see
   `trl_mgsr/assets/README.md`); the last rows are held out.
2. Train a byte-level BPE tokenizer on the training rows; build a small Llama teacher and a smaller student.
3. Fit the teacher on the training rows (plain cross-entropy), so that it has something to teach.
4. Distill two copies of the same initial student, one with `MGSRTrainer` and one with TRL's `GKDTrainer`: same
   steps, batch, learning rate, schedule, `lmbda`, `max_new_tokens` and seed. `MGSRTrainer` is called through its
   public constructor with default MGSR settings, so every loss term the package implements takes part.
5. Evaluate the teacher and the three students: teacher-forced loss per completion token on the held-out rows and
   ROUGE-L with the MiniLLM protocol (`trl_mgsr.evaluation`, several seeds).
6. Print a comparison table, write `results.json`, `results.md` and a PNG plot (training curves and scores), and
   save the MGSR student with its model card (plus the teacher, the initial student and the GKD student, so that
   `trl-mgsr eval` and the examples can be run on them).

The models are tiny and the budget is a few minutes of CPU: the numbers show the pipeline working end to end,
they are not a benchmark of MGSR. It also prints the `trl-mgsr eval` command that reproduces its ROUGE-L numbers.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources

DATA_FILE = "dolly_mini.jsonl"
DATA_DESCRIPTION = "trl_mgsr/assets/dolly_mini.jsonl (a 480-row subset of databricks-dolly-15k, CC BY-SA 3.0)"


@dataclass(frozen=True)
class DemoSettings:
    held_out: int = 48
    vocab_size: int = 1024
    teacher_hidden: int = 128
    teacher_layers: int = 4
    student_hidden: int = 48
    student_layers: int = 2
    teacher_steps: int = 400
    teacher_lr: float = 3e-3
    teacher_batch_size: int = 16
    distill_steps: int = 120
    batch_size: int = 8
    learning_rate: float = 3e-3
    lmbda: float = 0.5
    max_new_tokens: int = 32
    max_length: int = 128
    seeds: tuple[int, ...] = (10, 20, 30)
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 24
    curve_every: int = 10


QUICK = DemoSettings(
    held_out=6, vocab_size=512, teacher_hidden=32, teacher_layers=2, student_hidden=16, student_layers=1,
    teacher_steps=12, teacher_batch_size=4, distill_steps=3, batch_size=4, max_new_tokens=8, max_length=128,
    seeds=(10, 20), eval_max_new_tokens=12, eval_batch_size=8, curve_every=1,
)


def load_rows() -> list[dict]:
    """The instruction rows shipped with the package: `instruction`, `input`, `output`."""
    text = resources.files("trl_mgsr").joinpath("assets", DATA_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_messages(row: dict) -> dict:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


class _Stopwatch:
    def __init__(self, log):
        self.log, self.start = log, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.start:6.1f}s] {message}")


def _fit_teacher(teacher, tokenizer, rows, s: DemoSettings, curve: list) -> None:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from .data import MGSRDataCollator, position_ids_from_mask

    collator = MGSRDataCollator(tokenizer, max_length=s.max_length)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=s.teacher_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, s.teacher_steps // 20), s.teacher_steps)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rows), generator=generator).tolist()
    teacher.train()
    for step in range(s.teacher_steps):
        size = s.teacher_batch_size
        picked = [order[(step * size + i) % len(order)] for i in range(size)]
        batch = collator([rows[i] for i in picked])
        mask = batch["attention_mask"]
        loss = teacher(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
            labels=batch["labels"],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        curve.append((step + 1, loss.item()))
    teacher.eval()


def _held_out_curve_callback(tokenizer, rows, every: int, max_length: int):
    from transformers import TrainerCallback

    from .evaluation import completion_loss

    class HeldOutLoss(TrainerCallback):
        """Teacher-forced held-out loss of the student every `every` steps (comparable across trainers)."""

        def __init__(self):
            self.curve: list[tuple[int, float]] = []

        def _record(self, state, model):
            self.curve.append((state.global_step, completion_loss(model, tokenizer, rows, max_length=max_length)))

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._record(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                self._record(state, model)

    return HeldOutLoss()


def _distill(trainer_cls, config_cls, name, student, teacher, tokenizer, train, held_rows, s, output_dir, seed):
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    args = config_cls(
        output_dir=os.path.join(output_dir, name),
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        max_steps=s.distill_steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, s.distill_steps // 20),
        lmbda=s.lmbda,
        max_new_tokens=s.max_new_tokens,
        max_length=s.max_length,
        logging_steps=max(1, s.curve_every // 2),
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
    )
    callback = _held_out_curve_callback(tokenizer, held_rows, s.curve_every, s.max_length)
    trainer = trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(train),
        processing_class=tokenizer, callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)  # the demo prints its own summary
    trainer.train()
    return trainer, callback.curve


def _length(tokenizer, row: dict) -> int:
    text = tokenizer.apply_chat_template(to_messages(row)["messages"], tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def results_table(rows: list[dict], seeds) -> str:
    lines = [
        f"| model | parameters | held-out loss | ROUGE-L (mean ± std, {len(seeds)} seeds) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['held_out_loss']:.3f} | "
            f"{r['rougeL_mean']:.2f} ± {r['rougeL_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(path: str, teacher_curve, curves: dict, train_logs: dict, rows: list[dict]) -> str | None:
    """Write the PNG (teacher loss, students' held-out loss, training objectives, ROUGE-L); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"student-gkd": "tab:orange", "student-mgsr": "tab:blue"}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.plot(*zip(*teacher_curve), color="gray")
    ax.set(title="Teacher fit (training cross-entropy)", xlabel="step", ylabel="loss")
    ax = axes[0][1]
    for name, curve in curves.items():
        ax.plot(*zip(*curve), marker=".", label=name, color=colors.get(name))
    ax.set(title="Students: held-out loss per completion token", xlabel="step", ylabel="nats")
    ax.legend()
    ax = axes[1][0]
    for name, log in train_logs.items():
        if log:
            ax.plot(*zip(*log), marker=".", label=name, color=colors.get(name))
    ax.set(title="Training objective (each trainer's own loss)", xlabel="step", ylabel="loss")
    ax.legend()
    ax = axes[1][1]
    names = [r["model"] for r in rows]
    ax.bar(range(len(rows)), [r["rougeL_mean"] for r in rows], yerr=[r["rougeL_std"] for r in rows], capsize=4,
           color=["gray", "lightgray", "tab:orange", "tab:blue"][: len(rows)])
    ax.set_xticks(range(len(rows)), names, rotation=15, ha="right", fontsize=8)
    ax.set(title="ROUGE-L on held-out rows (mean ± std over seeds)", ylabel="ROUGE-L")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_command(model_dir: str, output_dir: str, s: DemoSettings) -> str:
    """The `trl-mgsr eval` command that reproduces the demo's ROUGE-L of `model_dir` on `heldout.jsonl`."""
    import shlex

    return (f"trl-mgsr eval --model {shlex.quote(model_dir)} "
            f"--data {shlex.quote(os.path.join(output_dir, 'heldout.jsonl'))} "
            f"--seeds {' '.join(map(str, s.seeds))} --batch_size {s.eval_batch_size} "
            f"--max_new_tokens {s.eval_max_new_tokens} --no_progress "
            f"--output_dir {shlex.quote(os.path.join(output_dir, 'eval-student-mgsr'))}")


def run_demo(output_dir: str = "mgsr-demo", settings: DemoSettings | None = None, seed: int = 0, log=print) -> dict:
    """Run the Dolly demo (threads and log levels are set by `trl_mgsr.demo.main`); return its results."""
    return _run(output_dir, settings or DemoSettings(), seed, log)


def _run(output_dir: str, s: DemoSettings, seed: int, log) -> dict:
    from transformers import set_seed
    from ._trl import GKDConfig, GKDTrainer
    from .config import MGSRConfig
    from .evaluation import EvalSet, completion_loss, evaluate
    from .reporting import save_results
    from .testing import build_llama, build_tokenizer
    from .trainer import MGSRTrainer

    clock = _Stopwatch(log)
    os.makedirs(output_dir, exist_ok=True)
    set_seed(seed)
    raw = load_rows()
    tokenizer = build_tokenizer([f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in raw[: -s.held_out]],
                                s.vocab_size)
    # GKD's collator rejects rows whose completion fills the whole window: keep rows that fit (same rows for both).
    fitting = [r for r in raw if _length(tokenizer, r) <= s.max_length]
    train_raw, held_raw = fitting[: -s.held_out], fitting[-s.held_out :]
    train, held = [to_messages(r) for r in train_raw], [to_messages(r) for r in held_raw]
    teacher = build_llama(tokenizer, s.teacher_hidden, s.teacher_layers, seed=seed + 1)
    student = build_llama(tokenizer, s.student_hidden, s.student_layers, seed=seed)
    clock(f"data: {len(train)} training rows, {len(held)} held out; tokenizer: {len(tokenizer)} tokens; "
          f"teacher {_count(teacher) / 1e6:.2f}M parameters, student {_count(student) / 1e6:.2f}M")

    teacher_curve: list = []
    _fit_teacher(teacher, tokenizer, train, s, teacher_curve)
    teacher_dir, init_dir = os.path.join(output_dir, "teacher"), os.path.join(output_dir, "student-init")
    for model, path in ((teacher, teacher_dir), (student, init_dir)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    teacher.config._name_or_path = teacher_dir  # so that the model card names the teacher by its saved path
    clock(f"teacher: {s.teacher_steps} steps, final training loss {teacher_curve[-1][1]:.3f}; saved to {teacher_dir}")

    runs, curves, train_logs = {}, {}, {}
    for name, trainer_cls, config_cls in (("student-gkd", GKDTrainer, GKDConfig),
                                          ("student-mgsr", MGSRTrainer, MGSRConfig)):
        trainer, curve = _distill(trainer_cls, config_cls, name, copy.deepcopy(student), teacher, tokenizer, train,
                                  held, s, output_dir, seed)
        runs[name], curves[name] = trainer, curve
        train_logs[name] = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        clock(f"{name}: {s.distill_steps} steps with {trainer_cls.__name__}, held-out loss {curve[-1][1]:.3f}")

    mgsr = runs["student-mgsr"]
    mgsr.save_model()
    mgsr.create_model_card(model_name="student-mgsr", dataset_name=DATA_DESCRIPTION)
    runs["student-gkd"].save_model()
    terms = sorted({k for e in mgsr.state.log_history for k in e if k.startswith("mgsr/")})

    prompts = [tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
               for r in held]
    held_set = EvalSet("held-out", prompts, [[r["output"]] for r in held_raw], f"trl_mgsr/assets/{DATA_FILE}")
    with open(os.path.join(output_dir, "heldout.jsonl"), "w", encoding="utf-8") as f:
        for prompt, row in zip(prompts, held_raw):
            f.write(json.dumps({"prompt": prompt, "output": row["output"]}, ensure_ascii=False) + "\n")
    models = [("teacher", teacher), ("student before distillation", student),
              ("student + GKD", runs["student-gkd"].model), ("student + MGSR", mgsr.model)]
    rows = []
    for label, model in models:
        model = model.eval()
        scores = evaluate(model, tokenizer, [held_set], s.seeds, s.eval_batch_size, s.eval_max_new_tokens,
                          max_prompt_length=None, progress=False)
        rows.append({"model": label, "parameters": _count(model),
                     "held_out_loss": completion_loss(model, tokenizer, held, max_length=s.max_length),
                     "rougeL_mean": scores.sets["held-out"]["mean"], "rougeL_std": scores.sets["held-out"]["std"],
                     "rougeL_per_seed": scores.sets["held-out"]["scores"]})
    clock(f"evaluation: {len(models)} models x {len(s.seeds)} seeds x {len(held)} held-out rows")

    table = results_table(rows, s.seeds)
    log("")
    log(table)
    log(f"Same budget for both students: {s.distill_steps} steps x batch {s.batch_size}, lr {s.learning_rate:g}, "
        f"lmbda {s.lmbda:g}, same initial weights and seed. MGSR terms logged: {', '.join(terms)}.")
    png = plot_results(os.path.join(output_dir, "demo.png"), teacher_curve, curves, train_logs, rows)
    log(f"Plot: {png}" if png else "Plot skipped: matplotlib is not installed (pip install 'trl-mgsr[plot]').")
    results = {"settings": asdict(s), "seed": seed, "rows": rows, "mgsr_terms": terms,
               "curves": {k: v for k, v in curves.items()}, "teacher_curve": teacher_curve,
               "training_loss": train_logs, "plot": png, "student": mgsr.args.output_dir}
    save_results(output_dir, results, table, mgsr.args.output_dir, log)
    log("Reproduce a ROUGE-L row with `trl-mgsr eval` (same prompts, seeds, batch size and length), e.g.:")
    log(eval_command(os.path.join(output_dir, "student-mgsr"), output_dir, s))
    clock("done")
    return results
