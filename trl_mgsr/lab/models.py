"""The lab's tokenizer, teacher and initial student: built here, trained on the tasks, cached on disk.

Everything is deterministic in the settings, so a cache directory is keyed by a hash of them
(`asset_dir(root, settings)`): a rerun with the same settings reuses the trained models.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from .tasks import TASKS, to_messages

EVAL_SEED = "eval"


@dataclass(frozen=True)
class ModelSettings:
    """What the cached teacher and initial student depend on."""

    tasks: tuple[str, ...] = tuple(TASKS)
    vocab_size: int = 320
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 3000
    teacher_lr: float = 3e-3
    student_hidden: int = 48
    student_layers: int = 2
    init_steps: int = 700
    init_lr: float = 3e-3
    batch_size: int = 32
    eval_prompts: int = 128
    seed: int = 0
    init_seed: int = 0  # another initial student by the same recipe (its weights and rows); the teacher is the same

    def key(self) -> str:
        """Hash of every setting and of the tasks' rows (the initial student's cache key; `init_seed` 0 leaves it as
        it was before the field existed, so cached students stay valid)."""
        values = {k: v for k, v in asdict(self).items() if k != "init_seed" or v}
        return _hash({**values, "rows": _fingerprint(self)})

    def teacher_key(self) -> str:
        """Hash of what the teacher depends on: the settings except the student's, and the tasks' rows (so that a
        change to a task's definition retrains it)."""
        values = {k: v for k, v in asdict(self).items() if not k.startswith(("student_", "init_"))}
        return _hash({**values, "rows": _fingerprint(self)})


def _hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def _fingerprint(settings: ModelSettings) -> list:
    """A few training rows and the evaluation prompts of every task: they change when a task's definition does."""
    rows = {name: TASKS[name].rows(8, "fingerprint", distinct=False) for name in settings.tasks}
    return [rows, {name: [r["prompt"] for r in group] for name, group in eval_rows(settings).items()}]


def eval_rows(settings: ModelSettings) -> dict[str, list[dict]]:
    """The evaluation prompts of each task: never seen in any training, except for a task with
    `held_out = False`."""
    return {name: TASKS[name].rows(settings.eval_prompts, EVAL_SEED) for name in settings.tasks}


def held_out_prompts(settings: ModelSettings) -> frozenset[str]:
    """The evaluation prompts that training must not see."""
    return frozenset(r["prompt"] for name, rows in eval_rows(settings).items() if TASKS[name].held_out
                     for r in rows)


def train_rows(settings: ModelSettings, n_per_task: int, seed) -> list[dict]:
    """`n_per_task` rows of every task, outside the held-out prompts, interleaved task by task."""
    exclude = held_out_prompts(settings)
    per_task = [TASKS[name].rows(n_per_task, seed, exclude, distinct=False) for name in settings.tasks]
    return [row for group in zip(*per_task) for row in group]


def build_lab_tokenizer(settings: ModelSettings):
    from ..testing import build_tokenizer

    corpus = train_rows(settings, 400, "tokenizer")
    return build_tokenizer([f"{r['prompt']}\n{r['answer']}" for r in corpus], settings.vocab_size)


def fit(model, tokenizer, rows_for_step, steps: int, lr: float, log_every: int = 0, log=print) -> list[float]:
    """Plain cross-entropy on completions: `rows_for_step(step) -> rows`, AdamW with warm-up and cosine decay."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from ..data import MGSRDataCollator, position_ids_from_mask

    collator = MGSRDataCollator(tokenizer, max_length=128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    model.train()
    losses = []
    for step in range(steps):
        batch = collator([to_messages(r) for r in rows_for_step(step)])
        mask = batch["attention_mask"]
        loss = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            log(f"  step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.4f}")
    model.eval()
    return losses


def fresh_rows(settings: ModelSettings, seed: str):
    """`step -> rows`: a fresh batch of every task's training distribution per step (held-out prompts excluded)."""
    exclude = held_out_prompts(settings)
    rng = random.Random(seed)
    names = list(settings.tasks)

    def rows_for_step(step: int) -> list[dict]:
        rows = []
        while len(rows) < settings.batch_size:
            task = TASKS[names[len(rows) % len(names)]]
            prompt, answer = task.sample(rng)
            if prompt not in exclude:
                rows.append({"task": task.name, "prompt": prompt, "answer": answer})
        return rows

    return rows_for_step
