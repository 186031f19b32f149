"""Training-step time of MGSRTrainer against TRL's GKDTrainer on the same models, data and settings.

    python benchmarks/bench_step.py [--steps 6] [--quick]

All runs are fully on-policy (`lmbda=1`) with gradient checkpointing at TRL's default (on), in one process, one
after the other, from the same initial weights:
- `gkd`: GKDTrainer as shipped (it turns the KV cache off for generation when gradient checkpointing is on);
- `gkd_cache`: GKDTrainer with the KV cache forced on;
- `mgsr`: MGSRTrainer with its defaults (SCRG, DAC-KL, span, SFT).

Per step, besides its total time, the phases (they nest, so they do not add up): `generation` (the on-policy hook:
sampling, plus SCRG for MGSR), `loss` (`compute_loss`: student and teacher forwards and the loss terms),
`train_step` (`training_step`: loss plus backward), `teacher` (every teacher forward, SCRG's included) and `spans`
(span extraction, MGSR only); the optimizer step is the remainder. The first step of each run is a warm-up and is not counted. Writes
`benchmarks/results/step.json` and prints the ratios MGSR / GKD.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

import trl_mgsr.trainer as mgsr_trainer_module
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.testing import build_llama, build_tokenizer

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly" / "train.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"


def load_rows(n: int) -> list[dict]:
    """Dolly rows (`messages` format, which GKDTrainer's collator needs) from ../shared when present; otherwise the
    package's built-in toy rows (said in the output)."""
    if DOLLY.is_file():
        with DOLLY.open() as f:
            rows = [r for r in map(json.loads, f) if len(r["prompt"]) + len(r["output"]) < 700][:n]  # fit max_length
        return [{"messages": [{"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                              {"role": "assistant", "content": r["output"]}]} for r in rows]
    from trl_mgsr.testing import toy_rows

    print(f"{DOLLY} not found: using built-in toy rows")
    return toy_rows(n, "messages")


class Timer:
    """Accumulates wall time per phase (phases may nest: see the module docstring)."""

    def __init__(self):
        self.total = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] += time.perf_counter() - start

    def wrap(self, obj, attr, name):
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(obj, attr, timed)


class StepClock(TrainerCallback):
    """A step runs from the start of `get_batch_samples` (MGSR generates there, GKD in `training_step`) to
    `on_step_end`, so both trainers' steps include their generation."""

    def __init__(self, timer):
        self.timer, self.steps = timer, []

    def begin(self):
        self._start = time.perf_counter()
        self.snapshot = dict(self.timer.total)

    def on_step_end(self, args, state, control, **kwargs):
        phases = {k: v - self.snapshot.get(k, 0.0) for k, v in self.timer.total.items()}
        self.steps.append({"step": time.perf_counter() - self._start, **phases})


def run(kind: str, tokenizer, rows, student_state, teacher, args_kwargs, steps: int) -> dict:
    student = build_llama(tokenizer, **args_kwargs.pop("student_shape"))
    student.load_state_dict(student_state)
    config_cls, trainer_cls = (MGSRConfig, MGSRTrainer) if kind == "mgsr" else (GKDConfig, GKDTrainer)
    config = config_cls(f"/tmp/bench_step_{kind}", max_steps=steps + 1, **args_kwargs)
    timer = Timer()
    clock = StepClock(timer)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[clock])
    if kind == "gkd_cache":
        trainer.generation_config.use_cache = True
        trainer.generation_kwargs["use_cache"] = True
    # Generation: GKD samples inside training_step, MGSR inside get_batch_samples; both call this hook.
    timer.wrap(trainer, "generate_on_policy_outputs", "generation")
    timer.wrap(trainer, "compute_loss", "loss")
    timer.wrap(trainer, "training_step", "train_step")
    handle_pre = trainer.teacher_model.register_forward_pre_hook(lambda *a: timer.total.__setitem__(
        "_teacher_start", time.perf_counter()))
    handle_post = trainer.teacher_model.register_forward_hook(lambda *a: timer.total.__setitem__(
        "teacher", timer.total["teacher"] + time.perf_counter() - timer.total["_teacher_start"]))
    if kind == "mgsr" and hasattr(mgsr_trainer_module, "span_ids_from_tokens"):
        timer.wrap(mgsr_trainer_module, "span_ids_from_tokens", "spans")
    original = trainer.get_batch_samples

    def clocked_batches(*a, **k):
        clock.begin()
        return original(*a, **k)

    trainer.get_batch_samples = clocked_batches
    trainer.train()
    handle_pre.remove(), handle_post.remove()
    measured = clock.steps[1:]  # drop the warm-up step
    keys = sorted({k for s in measured for k in s if not k.startswith("_")})
    mean = {k: sum(s.get(k, 0.0) for s in measured) / len(measured) for k in keys}
    return mean


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="Measured steps per run (after one warm-up step).")
    parser.add_argument("--quick", action="store_true", help="Tiny models and 2 steps (smoke check).")
    opts = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = load_rows(256)
    tokenizer = build_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=2048)
    student_shape = dict(hidden_size=32, num_layers=2) if opts.quick else dict(hidden_size=128, num_layers=4)
    teacher = build_llama(tokenizer, **(dict(hidden_size=64, num_layers=2) if opts.quick else
                                         dict(hidden_size=256, num_layers=6)), seed=1)
    student_state = build_llama(tokenizer, **student_shape).state_dict()
    steps = 2 if opts.quick else opts.steps
    common = dict(bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=4, lmbda=1.0,
                  max_new_tokens=16 if opts.quick else 64, max_length=256, logging_steps=1, save_strategy="no",
                  learning_rate=1e-4, disable_tqdm=True)
    results = {}
    for kind in ("gkd", "gkd_cache", "mgsr"):
        results[kind] = run(kind, tokenizer, rows, student_state, teacher,
                            {**common, "student_shape": student_shape}, steps)
        print(kind, {k: round(v, 3) for k, v in results[kind].items()})
    ratios = {
        "mgsr_over_gkd": results["mgsr"]["step"] / results["gkd"]["step"],
        "mgsr_over_gkd_cache": results["mgsr"]["step"] / results["gkd_cache"]["step"],
    }
    if "spans" in results["mgsr"]:
        ratios["span_share_of_mgsr_step"] = results["mgsr"]["spans"] / results["mgsr"]["step"]
    report = {"settings": {**common, "student": student_shape, "steps": steps, "threads": torch.get_num_threads(),
                           "data": str(DOLLY) if DOLLY.is_file() else "toy"},
              "seconds_per_step": results, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
