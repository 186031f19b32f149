"""Build (or load) the lab's cached models and distill a student with one method on a fixed budget.

Shared by `benchmarks/lab/run.py` (the full grid) and `trl-mgsr demo` (GKD against MGSR on one budget).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

from .models import ModelSettings, build_lab_tokenizer, eval_rows, fit, fresh_rows, train_rows
from .tasks import to_messages

#: Trained models shipped with the package (`<role>-<key>/`, see `trl_mgsr/assets/README.md`).
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "lab")


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same steps, batch, learning rate, `lmbda`, generation length and seed."""

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 2e-3
    lmbda: float = 0.5
    max_new_tokens: int = 32
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """A distillation method: `trainer` is "mgsr" (`MGSRTrainer`) or "gkd" (TRL's `GKDTrainer`), `config` the
    fields that differ from the library's defaults (besides the shared budget)."""

    trainer: str
    config: dict = field(default_factory=dict)


@contextlib.contextmanager
def quiet():
    """No deprecation warnings, info logs or progress bars from the libraries while the lab runs."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def prepare_models(settings: ModelSettings, cache_root: str, log=print,
                   shipped_root: str | os.PathLike | None = SHIPPED) -> dict:
    """Train the teacher and the initial student, or reuse them from `cache_root` (the teacher is keyed by its own
    settings, the initial student by the whole `settings`, so another student size reuses the teacher).

    A model not in `cache_root` is looked up in `shipped_root` (the package ships the teacher of the default
    `ModelSettings()`, `trl_mgsr/assets/lab/`, so that neither the lab nor the demo has to train it) before it is
    trained. A reused teacher brings its own tokenizer, which the initial student is then built with.

    Returns `{"teacher", "student_init"}` (model directories, tokenizer included) and, per model, its training
    seconds the first time, its parameter count, whether it was reused and whether it was the shipped copy.
    """
    import torch
    from transformers import AutoTokenizer

    from ..testing import build_llama

    names = {"teacher": f"teacher-{settings.teacher_key()}", "student_init": f"student_init-{settings.key()}"}
    found_dirs = {role: _find(name, cache_root, shipped_root) for role, name in names.items()}
    teacher_dir = found_dirs["teacher"]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir) if teacher_dir else build_lab_tokenizer(settings)
    info = {}
    init_rows = f"student_init-{settings.init_seed}" if settings.init_seed else "student_init"
    for role, hidden, layers, steps, lr, seed, rows_seed in (
        ("teacher", settings.teacher_hidden, settings.teacher_layers, settings.teacher_steps, settings.teacher_lr,
         settings.seed + 1, "teacher"),
        ("student_init", settings.student_hidden, settings.student_layers, settings.init_steps, settings.init_lr,
         settings.seed + settings.init_seed, init_rows),
    ):
        path, found = os.path.join(cache_root, names[role]), found_dirs[role]
        if found:
            with open(os.path.join(found, "lab.json"), encoding="utf-8") as f:
                meta = json.load(f)
            shipped = found != path
            log(f"models: reusing the {'shipped ' if shipped else ''}{role.replace('_', ' ')} in {found} "
                f"(trained in {meta['seconds']:.0f} s)")
            info[role] = found
            info[f"{role}_meta"] = {**meta, "reused": True, "shipped": shipped}
            continue
        model = build_llama(tokenizer, hidden, layers, seed=seed)
        log(f"models: training the {role.replace('_', ' ')} ({_count(model) / 1e6:.2f}M parameters, {steps} steps)")
        torch.manual_seed(seed)
        start = time.perf_counter()
        fit(model, tokenizer, fresh_rows(settings, rows_seed), steps, lr,
            log_every=max(steps // 5, 1) if steps > 500 else 0, log=log)
        meta = {"seconds": time.perf_counter() - start, "parameters": _count(model), "steps": steps}
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        with open(os.path.join(path, "lab.json"), "w", encoding="utf-8") as f:
            json.dump({**meta, "settings": asdict(settings)}, f, indent=2)
        log(f"models: {role.replace('_', ' ')} trained in {meta['seconds']:.0f} s, cached in {path}")
        info[role] = path
        info[f"{role}_meta"] = {**meta, "reused": False, "shipped": False}
    return info


def _find(name: str, *roots: str | os.PathLike | None) -> str | None:
    """The first `root/name` that holds a finished model (its `lab.json` is written last), or None."""
    for root in roots:
        if root is not None and os.path.isfile(os.path.join(root, name, "lab.json")):
            return os.path.join(root, name)
    return None


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def distill(method: Method, budget: Budget, settings: ModelSettings, teacher, student, tokenizer, output_dir: str,
            callbacks=()):
    """Distill `student` (modified in place) from `teacher` with `method` on `budget`; returns
    `(trainer, train_seconds)`. The rows are the same for every method: one epoch of `steps x batch_size`."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    from .._trl import GKDConfig, GKDTrainer
    from ..config import MGSRConfig
    from ..trainer import MGSRTrainer

    config_cls, trainer_cls = (MGSRConfig, MGSRTrainer) if method.trainer == "mgsr" else (GKDConfig, GKDTrainer)
    per_task = math.ceil(budget.steps * budget.batch_size / len(settings.tasks))
    rows = [to_messages(r) for r in train_rows(settings, per_task, "distill")]
    extra = {}
    if method.config.get("schedule") == "adaptive":  # moves on evaluation losses: a validation split, 10 evals
        extra = {"eval_strategy": "steps", "eval_steps": max(budget.steps // 10, 1),
                 "per_device_eval_batch_size": budget.batch_size}
    fields = dict(
        output_dir=output_dir, report_to="none", use_cpu=not torch.cuda.is_available(), bf16=False,
        max_steps=budget.steps, per_device_train_batch_size=budget.batch_size, learning_rate=budget.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, budget.steps // 20), lmbda=budget.lmbda,
        max_new_tokens=budget.max_new_tokens, max_length=128, logging_steps=max(1, budget.steps // 20),
        save_strategy="no", gradient_checkpointing=False, disable_tqdm=True, seed=budget.seed,
    )
    args = config_cls(**{**fields, **extra, **method.config})
    eval_dataset = None
    if extra:
        eval_dataset = Dataset.from_list([to_messages(r) for r in train_rows(settings, 32, "validation")])
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                          eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


__all__ = ["Budget", "Method", "distill", "eval_rows", "prepare_models", "quiet"]
