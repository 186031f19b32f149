"""Training-step time of MGSRTrainer against TRL's GKDTrainer and DistillationTrainer, with a per-phase profile.

    python benchmarks/bench_step.py [--steps 20] [--turn_steps 5] [--repeats 3] [--quick] [--device cuda --bf16]

Models: the lab's teacher (shipped with the package) and its initial student (trained in ~20 s when not cached in
`benchmarks/lab/cache/`), on the lab's training prompts. A trained teacher matters here: SCRG only corrects where
the teacher rejects a student token, and a random teacher rejects nothing. Every run is fully on-policy
(`lmbda=1`) and starts from the same student weights. The runs train at the same time, taking turns: each is a
greenlet of one process and thread (so one OpenMP pool: processes or threads that take turns slowed every step by
30-50 % here), and trains `--turn_steps` steps before passing the turn on; the first step of each turn (caches full
of the other runs' data) is a warm-up, not measured, and every run measures `--steps` steps. This machine is
shared, and its slow spells last seconds: taking turns, every run lives through them alike, where runs one after
the other gave ratios 0.8-1.4 for the same code.

| run | trainer | gradient checkpointing | KV cache in generation |
| --- | --- | --- | --- |
| `gkd` | GKDTrainer as shipped | on (TRL's default) | off (GKD turns it off under checkpointing) |
| `gkd_cache` | GKDTrainer | on | forced on |
| `gkd_nogc` | GKDTrainer | off | on |
| `distillation` | TRL's stable DistillationTrainer (HF generation) | on (its default) | on |
| `mgsr` | MGSRTrainer defaults (re-generation, SCRG while sampling) | on | on (`generation_use_cache`) |
| `mgsr_nogc` | MGSRTrainer defaults | off | on |
| `mgsr_twopass` | MGSRTrainer, `scrg_block_size=0` (sample, revise, re-generate: the earlier path) | on | on |
| `mgsr_stop` | MGSRTrainer, `scrg_continuation="stop"` (no re-generation) | on | on |
| `mgsr_stop_nogc` | MGSRTrainer, `scrg_continuation="stop"` | off | on |

A step runs from the start of `get_batch_samples` (MGSR generates there) to `on_step_end`. The profile times each
phase of the step (they nest; `exclusive` columns are not sums): `sampling` (the on-policy `generate`), `scrg`
(the whole revision; with SCRG while sampling, the sampling too), `scrg_teacher` (its teacher forwards),
`scrg_student` (the student's decoding steps of SCRG while sampling), `scrg_regenerate` (the re-generation's
`generate`), `student_forward`,
`sft_forward` (MGSR's second student forward, on the dataset completion), `teacher_forward` (the loss's), each loss
term (`loss_sft`, `loss_dac_kl`, `loss_span`, `loss_gkd` for GKD's JSD), `band_net` (the band sub-network's
forward, its own loss and its step), `spans` (span extraction), `backward`, `optimizer`, `metrics` (logging,
where the host syncs are) and `host_syncs` (calls of `Tensor.item`/`tolist` per step); phases are means over
the measured steps, `step_median` is the median step. `--repeats N` does it all N times and reports each phase's
mean over repeats. The ratios are of median steps, one per repeat, and their median over repeats is reported.
Writes `benchmarks/results/step.json` and prints the ratios and the profile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from greenlet import greenlet  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a clone without installing

import trl_mgsr.objective as objective_module  # noqa: E402
import trl_mgsr.trainer as trainer_module  # noqa: E402
from trl_mgsr import MGSRConfig, MGSRTrainer  # noqa: E402
from trl_mgsr._trl import GKDConfig, GKDTrainer  # noqa: E402
from trl_mgsr.lab.models import ModelSettings, train_rows  # noqa: E402
from trl_mgsr.lab.runner import prepare_models, quiet  # noqa: E402
from trl_mgsr.lab.tasks import to_messages  # noqa: E402

RESULTS = HERE / "results"
RUNS = ("gkd", "gkd_cache", "gkd_nogc", "distillation", "mgsr", "mgsr_nogc", "mgsr_twopass", "mgsr_stop",
        "mgsr_stop_nogc")
QUICK_MODELS = ModelSettings(teacher_hidden=32, teacher_layers=1, teacher_steps=30, student_hidden=16,
                             student_layers=1, init_steps=5, eval_prompts=8)
PHASE_FUNCTIONS = {  # (module, function): phase
    (objective_module, "chunked_sft_loss"): "loss_sft", (objective_module, "chunked_dac_kl_loss"): "loss_dac_kl",
    (objective_module, "span_loglik_loss"): "loss_span", (objective_module, "chunked_span_loss"): "loss_span",
    (objective_module, "band_features"): "band_net", (objective_module, "band_label_loss"): "band_net",
    (trainer_module, "span_ids_from_tokens"): "spans", (trainer_module, "scrg_revise"): "scrg",
    (trainer_module, "stream_scrg"): "scrg",
}


class Profiler:
    """Wall time per phase and host-sync count, over one training run.

    Phases may nest (`scrg` holds `scrg_teacher` and `scrg_regenerate`); `inside` says which phases are open, so a
    teacher forward is attributed to SCRG or to the loss, and a `generate` to sampling or to re-generation.
    On CUDA each phase boundary synchronises the device, so phases are timed, not queued.
    """

    def __init__(self, cuda: bool):
        self.total = defaultdict(float)
        self.inside: list[str] = []
        self.cuda = cuda
        self.active = True  # False while another run (sharing the patched functions) trains
        self._undo = []

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name):
        self._sync()
        self.inside.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.total[name] += time.perf_counter() - start
            self.inside.pop()

    def wrap(self, obj, attr, name):
        """Time every call of `obj.attr` as `name` (a callable `name(args, kwargs)` picks the phase per call)."""
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            if not self.active:
                return original(*args, **kwargs)
            with self.phase(name(args, kwargs) if callable(name) else name):
                return original(*args, **kwargs)

        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, original))

    def count_host_syncs(self):
        """Count `Tensor.item` and `Tensor.tolist` calls (each one waits for the device)."""
        for attr in ("item", "tolist"):
            original = getattr(torch.Tensor, attr)

            def counted(self_, *args, _original=original, **kwargs):
                self.total["host_syncs"] += self.active
                return _original(self_, *args, **kwargs)

            setattr(torch.Tensor, attr, counted)
            self._undo.append(lambda attr=attr, original=original: setattr(torch.Tensor, attr, original))

    def undo(self):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


class StepClock(TrainerCallback):
    """Per step: wall time from `get_batch_samples` to `on_step_end`, and each phase's share of it."""

    def __init__(self, profiler: Profiler):
        self.profiler, self.steps = profiler, []
        self._start, self._snapshot = None, {}

    def begin(self, cold: bool = False):
        """A step starts; `cold`: the first of its run's turn, a warm-up that is not measured."""
        if self._start is None:  # several calls within one step (evaluation) keep the first
            self.profiler._sync()
            self._start = time.perf_counter()
            self._snapshot = dict(self.profiler.total)
            self._cold = cold

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._opt_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.profiler._sync()
        self.profiler.total["optimizer"] += time.perf_counter() - self._opt_start

    def on_step_end(self, args, state, control, **kwargs):
        self.profiler._sync()
        phases = {k: v - self._snapshot.get(k, 0.0) for k, v in self.profiler.total.items()}
        self.steps.append({"step": time.perf_counter() - self._start, **phases, "cold": self._cold})
        self._start = None


def instrument(trainer, kind: str, profiler: Profiler) -> None:
    """Hook the profiler's phases into one trainer (and, for MGSR, into the trainer module's functions)."""
    profiler.wrap(trainer.model, "generate",
                  lambda a, k: "scrg_regenerate" if "scrg" in profiler.inside else "sampling")
    teacher = trainer.teacher_model

    def teacher_phase():
        return "scrg_teacher" if "scrg" in profiler.inside else "teacher_forward"

    starts = []
    teacher.register_forward_pre_hook(lambda *a: starts.append((teacher_phase(), _now(profiler))))

    def forward_done(*a):
        name, start = starts.pop()
        if name is not None:
            profiler.total[name] += _now(profiler) - start

    teacher.register_forward_hook(forward_done)
    profiler.wrap(trainer.accelerator, "backward", "backward")
    if kind.startswith("gkd"):
        profiler.wrap(trainer, "generalized_jsd_loss", "loss_gkd")
    student_calls = []  # the student's forwards in the current `compute_loss`: the second is MGSR's SFT forward

    def student_phase():
        if any(p in profiler.inside for p in ("sampling", "scrg_regenerate")):
            return None  # a generation step, timed with its phase
        if "scrg" in profiler.inside:
            return "scrg_student"  # a decoding step of SCRG while sampling
        student_calls.append(None)
        return "sft_forward" if kind.startswith("mgsr") and len(student_calls) == 2 else "student_forward"

    trainer.model.register_forward_pre_hook(lambda *a: starts.append((student_phase(), _now(profiler))))
    trainer.model.register_forward_hook(forward_done)
    original_compute_loss = trainer.compute_loss

    def compute_loss(*a, **k):
        student_calls.clear()
        return original_compute_loss(*a, **k)

    trainer.compute_loss = compute_loss
    if kind.startswith("mgsr"):
        for (module, function), phase in PHASE_FUNCTIONS.items():
            profiler.wrap(module, function, phase)
        profiler.wrap(trainer, "_log_ratios", "metrics")
        if trainer.band is not None:
            profiler.wrap(trainer.band, "finish_step", "band_net")
            profiler.wrap(trainer.band, "average_gradients", "band_net")
            trainer.dac_band_net.register_forward_pre_hook(lambda *a: starts.append(("band_net", _now(profiler))))
            trainer.dac_band_net.register_forward_hook(forward_done)


def _now(profiler: Profiler) -> float:
    profiler._sync()
    return time.perf_counter()


def build_trainer(kind: str, models: dict, tokenizer, rows: list[dict], opts, callbacks):
    """One of `RUNS`, on fresh copies of the teacher and the initial student."""
    from trl import DistillationConfig, DistillationTrainer

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    student = AutoModelForCausalLM.from_pretrained(models["student_init"], dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=dtype)
    warmups = math.ceil(opts.steps / (opts.turn_steps - 1))  # each turn's first step
    common = dict(output_dir=f"/tmp/bench_step_{kind}", max_steps=opts.steps + warmups, report_to="none",
                  use_cpu=opts.device == "cpu", bf16=opts.bf16, per_device_train_batch_size=opts.batch_size,
                  learning_rate=2e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                  gradient_checkpointing=not kind.endswith("_nogc"))
    if kind == "distillation":
        config = DistillationConfig(**common, max_completion_length=opts.max_new_tokens, beta=0.5)
        dataset = Dataset.from_list([{"prompt": r["messages"][:1]} for r in rows])
        return DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=callbacks)
    config_cls, trainer_cls = (MGSRConfig, MGSRTrainer) if kind.startswith("mgsr") else (GKDConfig, GKDTrainer)
    extra = {"scrg_continuation": "stop"} if kind.startswith("mgsr_stop") else {}
    if kind.startswith("mgsr"):
        extra["scrg_block_size"] = 0 if kind == "mgsr_twopass" else opts.scrg_block_size
    config = config_cls(**common, **extra, lmbda=1.0, max_new_tokens=opts.max_new_tokens, max_length=128)
    trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=callbacks)
    if kind == "gkd_cache":
        trainer.generation_config.use_cache = True
        trainer.generation_kwargs["use_cache"] = True
    return trainer


def run_all(kinds: list[str], models: dict, tokenizer, rows: list[dict], opts) -> dict[str, dict]:
    """Train every run of `kinds` at once, interleaved: each run's `train()` is a greenlet (one OS thread, so one
    OpenMP pool and no hand-over cost) that trains `opts.turn_steps` steps and passes the turn to the next run.
    The first step of each turn (caches full of another run's data) is a warm-up and is not measured. A slow spell
    of the shared machine then lands on every run alike. Returns, per run, the mean of each phase over the measured
    steps, the median step and the SCRG correction rate (MGSR)."""
    scheduler = greenlet.getcurrent()
    profilers, clocks, trainers, runs = {}, {}, {}, {}
    try:
        for kind in kinds:
            profilers[kind] = profiler = Profiler(cuda=opts.device == "cuda")
            clocks[kind] = clock = StepClock(profiler)
            torch.manual_seed(0)
            trainers[kind] = trainer = build_trainer(kind, models, tokenizer, rows, opts, [clock])
            trainer.remove_callback(PrinterCallback)
            instrument(trainer, kind, profiler)
            profiler.count_host_syncs()
            trainer.get_batch_samples = _in_turns(trainer.get_batch_samples, clock, scheduler, opts.turn_steps)
            runs[kind] = greenlet(trainer.train)
        live = list(kinds)
        while live:  # round robin, one turn each; an error in a run is raised here
            for kind in list(live):
                for other in kinds:  # the runs share the patched module functions: only the running one times
                    profilers[other].active = other == kind
                runs[kind].switch()
                if runs[kind].dead:
                    live.remove(kind)
    finally:
        for kind in reversed(list(profilers)):  # patches stack in creation order: undo in reverse
            profilers[kind].undo()
    return {kind: _summary(clocks[kind], trainers[kind]) for kind in kinds}


def _in_turns(get_batch_samples, clock: StepClock, scheduler, turn_steps: int):
    """`get_batch_samples` that starts the step's clock, and hands the turn back to `scheduler` before the first
    step (setup done) and after every `turn_steps` steps."""
    done = [None]  # steps of the current turn; None before the first

    def clocked(*args, **kwargs):
        if done[0] is None or done[0] == turn_steps:
            scheduler.switch()
            done[0] = 0
        clock.begin(cold=done[0] == 0)
        done[0] += 1
        return get_batch_samples(*args, **kwargs)

    return clocked


def _summary(clock: StepClock, trainer) -> dict:
    measured = [s for s in clock.steps if not s["cold"]]  # each turn's first step warms up (the very first too)
    keys = sorted({k for s in measured for k in s} - {"cold"})
    mean = {k: sum(s.get(k, 0.0) for s in measured) / len(measured) for k in keys}
    mean["step_median"] = statistics.median(s["step"] for s in measured)
    logs = [e for e in trainer.state.log_history if "mgsr/scrg_corrected_frac" in e]
    extra = {}
    if logs:
        extra["scrg_corrected_frac"] = sum(e["mgsr/scrg_corrected_frac"] for e in logs) / len(logs)
    return {"seconds_per_step": mean, **extra}


RATIOS = (("mgsr", "gkd"), ("mgsr", "gkd_cache"), ("mgsr_nogc", "gkd_nogc"), ("mgsr", "distillation"),
          ("mgsr_nogc", "distillation"), ("mgsr_twopass", "gkd"), ("mgsr", "mgsr_twopass"), ("mgsr_stop", "gkd"),
          ("mgsr_stop_nogc", "gkd_nogc"))


def _ratios(step: dict[str, float]) -> dict[str, float]:
    """Step-time ratios of the runs that were made (`RATIOS`)."""
    return {f"{a}_over_{b}": step[a] / step[b] for a, b in RATIOS if a in step and b in step}


def _mean_of(repeats: list[dict]) -> dict:
    """One run's results averaged over the repeats: each phase's seconds per step, the SCRG correction rate."""
    phases = {p for r in repeats for p in r["seconds_per_step"]}
    mean = {"seconds_per_step": {p: statistics.mean(r["seconds_per_step"].get(p, 0.0) for r in repeats)
                                 for p in phases},
            "step_per_repeat": [r["seconds_per_step"]["step"] for r in repeats]}
    if "scrg_corrected_frac" in repeats[0]:
        mean["scrg_corrected_frac"] = statistics.mean(r["scrg_corrected_frac"] for r in repeats)
    return mean


def table(results: dict) -> str:
    """Markdown: one column per run, one row per phase (seconds per step)."""
    kinds = list(results)
    phases = ["step", "step_median"] + sorted({p for r in results.values() for p in r["seconds_per_step"]}
                                              - {"step", "step_median", "host_syncs"})
    lines = ["| phase | " + " | ".join(kinds) + " |", "| --- |" + " ---: |" * len(kinds)]
    for phase in phases + ["host_syncs"]:
        cells = []
        for kind in kinds:
            value = results[kind]["seconds_per_step"].get(phase)
            cells.append("-" if value is None else (f"{value:.0f}" if phase == "host_syncs" else f"{value:.3f}"))
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="Measured steps per run (warm-ups not counted).")
    parser.add_argument("--turn_steps", type=int, default=5,
                        help="Steps a run trains before the next run's turn (>= 2; the first is a warm-up).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run every run this many times, interleaved; phases and ratios are means over repeats.")
    parser.add_argument("--scrg_block_size", type=int, default=MGSRConfig.scrg_block_size,
                        help="scrg_block_size of the MGSR runs (mgsr_twopass: 0).")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="Models and training in bfloat16 (GPU check).")
    parser.add_argument("--cache", default=str(HERE / "lab" / "cache"), help="Lab model cache.")
    parser.add_argument("--out", default=str(RESULTS / "step.json"))
    parser.add_argument("--quick", action="store_true", help="Tiny models, 2 steps (smoke check).")
    opts = parser.parse_args(argv)
    if opts.turn_steps < 2:
        parser.error("--turn_steps must be >= 2: the first step of each turn is a warm-up and is not measured")
    if opts.quick:
        opts.steps, opts.batch_size, opts.max_new_tokens = 2, 4, 8
    if opts.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    settings = QUICK_MODELS if opts.quick else ModelSettings()
    models = prepare_models(settings, opts.cache)
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    rows = [to_messages(r) for r in train_rows(settings, (opts.steps + 1) * opts.batch_size, "bench")]
    rounds = []  # one dict of runs per repeat; the runs interleave, so a slow spell of the machine hits them all
    with quiet():
        for repeat in range(opts.repeats):
            rounds.append(run_all(opts.runs, models, tokenizer, rows, opts))
            for kind, result in rounds[-1].items():
                step = result["seconds_per_step"]
                print(f"[{repeat + 1}/{opts.repeats}] {kind} {step['step']:.3f} s/step "
                      f"(median {step['step_median']:.3f})", flush=True)
    results = {kind: _mean_of(kind_rounds) for kind, kind_rounds in
               ((kind, [r[kind] for r in rounds]) for kind in opts.runs)}
    per_repeat = [_ratios({k: r["seconds_per_step"]["step_median"] for k, r in one.items()}) for one in rounds]
    ratios = {name: statistics.median(r[name] for r in per_repeat) for name in per_repeat[0]}
    report = {"settings": {**{k: v for k, v in vars(opts).items() if k != "out"}, "threads": torch.get_num_threads(),
                           "torch": torch.__version__},
              "results": results, "ratios": ratios, "ratios_per_repeat": per_repeat}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    print(table(results))
    if opts.repeats > 1:
        print("ratios per repeat:", json.dumps({k: [round(r[k], 3) for r in per_repeat] for k in ratios}))
    print(json.dumps({**ratios, **{f"{k}_scrg_corrected_frac": r["scrg_corrected_frac"] for k, r in results.items()
                                  if "scrg_corrected_frac" in r}}, indent=2))
    return report


if __name__ == "__main__":
    main()
