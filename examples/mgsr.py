# Copyright the trl_mgsr developers. Licensed under the Apache License, Version 2.0.
"""MGSR distillation with TRL-style flags: TRL's GKD example script with `MGSRConfig`/`MGSRTrainer`.

The same entry point as `trl-mgsr distill` (both call `trl_mgsr.distill.run`). Flags: every `MGSRConfig` /
`GKDConfig` / `TrainingArguments` flag, TRL's `ModelConfig` (`--use_peft`, `--lora_r`, ...), TRL's
`ScriptArguments` (`--dataset_name`, `--dataset_train_split`, ...) plus `--train_file`, `--eval_file` and
`--merge_adapter`; `--config recipe.yaml` works as in TRL.

# Full training (GPU, Hub models; Dolly in the MiniLLM format from a local file):
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

# Offline on CPU, with the tiny models `trl-mgsr demo` saves (run the demo first):
python examples/mgsr.py \
    --model_name_or_path mgsr-demo/student-init --teacher_model_name_or_path mgsr-demo/teacher \
    --dataset_name ../shared/data/dolly/train.jsonl \
    --max_steps 20 --per_device_train_batch_size 4 --max_new_tokens 32 --max_length 256 \
    --learning_rate 1e-3 --bf16 false --gradient_checkpointing false --report_to none \
    --output_dir mgsr-example
"""

from trl import ModelConfig, TrlParser

from trl_mgsr import MGSRConfig
from trl_mgsr.distill import MGSRScriptArguments, run

if __name__ == "__main__":
    parser = TrlParser((MGSRScriptArguments, MGSRConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    run(script_args, training_args, model_args)
