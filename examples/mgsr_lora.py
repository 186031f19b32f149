# Copyright the trl_mgsr developers. Licensed under the Apache License, Version 2.0.
"""LoRA distillation with the Python API: a LoRA student, MGSR, then the adapter merged into a full model.

The TRL-flag route is `examples/mgsr.py --use_peft --lora_r 32 --lora_alpha 16 --merge_adapter` (or
`trl-mgsr distill` with the same flags); this script shows the same thing written out in Python.

# Offline on CPU, with the tiny English models `trl-mgsr demo --dolly --output_dir mgsr-dolly` saves (run it
# first), on the rows shipped in the package (the default --train_file, trl_mgsr/assets/dolly_mini.jsonl); one torch
# thread by default for such tiny models (--threads N to change it):
python examples/mgsr_lora.py \
    --student mgsr-dolly/student-init --teacher mgsr-dolly/teacher \
    --max_steps 20 --learning_rate 5e-3 --output_dir mgsr-lora

# GPU, Hub models (../shared/data is the MiniLLM data of this project's workspace, not part of the repository; any
# file of rows in that format works):
python examples/mgsr_lora.py \
    --student Qwen/Qwen2.5-0.5B-Instruct --teacher Qwen/Qwen2.5-1.5B-Instruct \
    --train_file ../shared/data/dolly/train.jsonl --max_steps 1000 --batch_size 8 \
    --learning_rate 2e-4 --max_new_tokens 128 --max_length 512 --output_dir Qwen2.5-0.5B-MGSR-LoRA

Writes the adapter (with tokenizer and model card) to --output_dir and the merged model to <output_dir>-merged.
"""

import argparse
from importlib import resources

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.distill import load_data_file, merge_adapter, merged_output_dir, to_training_format
from trl_mgsr.guards import check_model_path
from trl_mgsr.runtime import check_threads, configure_threads

DEFAULT_DATA = str(resources.files("trl_mgsr").joinpath("assets", "dolly_mini.jsonl"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", required=True, help="Student model directory or Hub id.")
    parser.add_argument("--teacher", required=True, help="Teacher model directory or Hub id.")
    parser.add_argument("--train_file", default=DEFAULT_DATA,
                        help=".jsonl/.json/.parquet training rows (default: the rows shipped in the package).")
    parser.add_argument("--max_rows", type=int, default=None, help="Use the first N rows only.")
    parser.add_argument("--output_dir", default="mgsr-lora")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on a CPU for models under 20M parameters).")
    args = parser.parse_args()
    check_model_path(args.student, "--student")  # a mistyped local path is an error, not a Hub lookup
    check_model_path(args.teacher, "--teacher")
    check_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(args.student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    configure_threads(args.threads, student, teacher, device="cuda" if torch.cuda.is_available() else "cpu")

    train = load_data_file(args.train_file, "--train_file")
    if args.max_rows:
        train = train.select(range(min(args.max_rows, len(train))))
    train = to_training_format(train, args.train_file)  # MiniLLM/Alpaca rows -> prompt/completion

    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    training_args = MGSRConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lmbda=0.5,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
    )
    trainer = MGSRTrainer(
        model=student, teacher_model=teacher, args=training_args, train_dataset=train,
        processing_class=tokenizer, peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model()  # the adapter + tokenizer
    trainer.create_model_card(dataset_name=args.train_file)
    merged = merge_adapter(trainer, merged_output_dir(args.output_dir), dataset_name=args.train_file)
    print(f"Adapter saved to {args.output_dir}, merged model to {merged}")


if __name__ == "__main__":
    main()
