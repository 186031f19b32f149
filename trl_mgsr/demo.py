"""`trl-mgsr demo`: distill a tiny student from a tiny teacher, offline, on built-in text.

The teacher is first fitted on the built-in instruction rows so that it has something to teach; the student is
then distilled with MGSR and saved with its model card.
"""

from __future__ import annotations

import os

from datasets import Dataset

from .config import MGSRConfig
from .testing import build_pair, build_tokenizer, toy_rows
from .trainer import MGSRTrainer


def _fit_teacher(teacher, tokenizer, rows, steps: int) -> None:
    import torch

    from .data import MGSRDataCollator, position_ids_from_mask

    collator = MGSRDataCollator(tokenizer, max_length=128)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    teacher.train()
    for step in range(steps):
        batch = collator([rows[(step * 4 + i) % len(rows)] for i in range(4)])
        mask = batch["attention_mask"]
        loss = teacher(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
            labels=batch["labels"],
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()


def run_demo(output_dir: str = "mgsr-demo", quick: bool = False) -> MGSRTrainer:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = build_tokenizer()
    student, teacher = build_pair(tokenizer, "llama")
    rows = toy_rows(40)
    _fit_teacher(teacher, tokenizer, rows, steps=10 if quick else 150)
    args = MGSRConfig(
        output_dir,
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=4 if quick else 60,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lmbda=0.5,
        max_new_tokens=16,
        max_length=128,
        logging_steps=1 if quick else 10,
        save_strategy="no",
        gradient_checkpointing=False,
    )
    trainer = MGSRTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(output_dir)
    trainer.create_model_card(model_name=os.path.basename(os.path.abspath(output_dir)))
    print(f"Distilled student saved to {output_dir}")
    return trainer
