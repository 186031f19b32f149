# Copyright the trl_mgsr developers. Licensed under the Apache License, Version 2.0.
"""MGSR distillation with TRL-style flags: TRL's GKD example script with `MGSRConfig`/`MGSRTrainer`.

The same entry point as `trl-mgsr distill` (both call `trl_mgsr.distill.run`). Flags: every `MGSRConfig` /
`GKDConfig` / `TrainingArguments` flag, TRL's `ModelConfig` (`--use_peft`, `--lora_r`, ...), TRL's
`ScriptArguments` (`--dataset_name`, `--dataset_train_split`, ...) plus `--train_file`, `--eval_file` and
`--merge_adapter`; `--config recipe.yaml` works as in TRL.

# Full training (GPU, Hub models; Dolly in the MiniLLM format from a local file; ../shared/data is the MiniLLM
# data of this project's workspace, not part of the repository: any file in that format works):
python examples/mgsr.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --dataset_name ../shared/data/dolly/train.jsonl \
    --eval_file ../shared/data/dolly/valid.jsonl --eval_strategy steps --eval_steps 200 \
    --learning_rate 2e-5 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
    --lmbda 0.5 --max_new_tokens 128 --num_train_epochs 1 --logging_steps 10 \
    --output_dir Qwen2.5-0.5B-MGSR

# LoRA (adds an adapter; --merge_adapter also saves the merged model in <output_dir>-merged):
python examples/mgsr.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \
    --dataset_name ../shared/data/dolly/train.jsonl \
    --learning_rate 2e-4 --per_device_train_batch_size 8 --num_train_epochs 1 \
    --use_peft --lora_r 32 --lora_alpha 16 --merge_adapter \
    --output_dir Qwen2.5-0.5B-MGSR-LoRA

# Offline on CPU, with the tiny English models `trl-mgsr demo --dolly --output_dir mgsr-dolly` saves (run it
# first); without --dataset_name the script trains on the rows shipped in the package
# (trl_mgsr/assets/dolly_mini.jsonl); one torch thread by default for such tiny models (--threads N to change it):
python examples/mgsr.py \
    --model_name_or_path mgsr-dolly/student-init --teacher_model_name_or_path mgsr-dolly/teacher \
    --max_steps 20 --per_device_train_batch_size 4 --max_new_tokens 32 --max_length 256 \
    --learning_rate 1e-3 --bf16 false --gradient_checkpointing false --report_to none \
    --output_dir mgsr-example
"""

from importlib import resources

from trl_mgsr.distill import parse_args, run
from trl_mgsr.runtime import disable_progress_bars

#: The rows shipped with the package (480 short Dolly rows in the MiniLLM format): the data when none is given.
DEFAULT_DATA = str(resources.files("trl_mgsr").joinpath("assets", "dolly_mini.jsonl"))

if __name__ == "__main__":
    script_args, training_args, model_args = parse_args(prog="examples/mgsr.py")
    if not (script_args.dataset_name or script_args.train_file):
        print(f"No --dataset_name given: training on the shipped rows {DEFAULT_DATA}")
        script_args.train_file = DEFAULT_DATA
    if training_args.disable_tqdm:
        disable_progress_bars()
    run(script_args, training_args, model_args)
