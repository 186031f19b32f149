"""`trl-mgsr distill`: the TRL-style training entry point (shared with `examples/mgsr.py`).

Flags are those of TRL's GKD example script, parsed with `trl.TrlParser` from `(ScriptArguments, MGSRConfig,
ModelConfig)`: `--model_name_or_path`, `--teacher_model_name_or_path`, `--dataset_name`, every
`MGSRConfig`/`GKDConfig`/`TrainingArguments` flag (`--lmbda`, `--dac_weight`, `--output_dir`, `--push_to_hub`, ...),
the PEFT flags of `ModelConfig` (`--use_peft --lora_r 16 --lora_alpha 32 ...`) and `--config recipe.yaml`.
`MGSRScriptArguments` adds:

- `--train_file` / `--eval_file`: local `.json`/`.jsonl`/`.parquet` files (instead of `--dataset_name`);
  `--dataset_name path/to/train.jsonl` is the same as `--train_file path/to/train.jsonl`;
- `--merge_adapter`: with `--use_peft`, also save the adapter merged into its base as a full model in
  `<output_dir>-merged` (weights, tokenizer, model card);
- `--threads N`: torch CPU threads (default: 1 on a CPU when the models are tiny, see `trl_mgsr.runtime`).

`--help` lists MGSR's own flags first; `--help-mgsr` lists only those.

Rows may be in any format `MGSRTrainer` accepts (`messages`, or `prompt` + `completion`) or in the MiniLLM /
Alpaca instruction format (`instruction` [+ `input`] or `prompt`, and `output`; a list `output` uses its first
reference), which is turned into `prompt`/`completion` with the Alpaca template (`trl_mgsr.evaluation`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, fields

import torch
from trl import ModelConfig, ScriptArguments, TrlParser

from . import guards, runtime
from ._trl import GKDConfig
from .cli_errors import OneLineErrors
from .config import MGSRConfig
from .evaluation import DATA_FILE_SUFFIXES, SAVED_DATASET_FILES, quiet_datasets, render_prompt


@dataclass
class MGSRScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus local data files and adapter merging."""

    train_file: str | None = field(
        default=None,
        metadata={"help": "Local .json/.jsonl/.parquet training file (instead of --dataset_name)."},
    )
    eval_file: str | None = field(
        default=None,
        metadata={"help": "Local .json/.jsonl/.parquet evaluation file (used when --eval_strategy is set)."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With --use_peft: also save the adapter merged into its base model in <output_dir>-merged."},
    )
    threads: int | None = field(
        default=None,
        metadata={"help": "torch CPU threads. Default (None): 1 when training on a CPU with models under "
                  f"{runtime.SMALL_MODEL_PARAMETERS // 1_000_000}M parameters in all, else torch's default."},
    )


class DistillParser(OneLineErrors, TrlParser):
    """`TrlParser` whose usage errors are one line."""


USAGE = """%(prog)s --model_name_or_path STUDENT --teacher_model_name_or_path TEACHER
           --dataset_name DATA [MGSR options] [TRL / Transformers options]
       %(prog)s --help-mgsr   (MGSR's own options only)"""
#: Flags listed first in `--help` besides the fields MGSRConfig adds to GKDConfig.
FIRST_FLAGS = ("model_name_or_path", "teacher_model_name_or_path", "dataset_name", "dataset_train_split",
               "dataset_test_split", "train_file", "eval_file", "merge_adapter", "threads", "output_dir", "lmbda",
               "max_new_tokens", "max_length", "use_peft", "config")
TEACHER_HELP = "The teacher: a local model directory or a Hub id (required)."


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """TRL's help format; a required flag does not claim a default."""

    def _get_help_string(self, action):
        return action.help if action.dest in REQUIRED else super()._get_help_string(action)


REQUIRED = ("model_name_or_path", "teacher_model_name_or_path")


class _HelpMGSR(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        groups = parser._action_groups
        parser._action_groups = [g for g in groups if g.title == parser.mgsr_group.title]
        try:
            parser.print_help()
        finally:
            parser._action_groups = groups
        parser.exit()


def make_parser(prog: str = "trl-mgsr distill") -> TrlParser:
    """The parser, with MGSR's own flags (and the few every run sets) listed first in `--help`."""
    parser = DistillParser((MGSRScriptArguments, MGSRConfig, ModelConfig), prog=prog, usage=USAGE)
    gkd = {f.name for f in fields(GKDConfig)}
    first = {f.name for f in fields(MGSRConfig) if f.name not in gkd} | set(FIRST_FLAGS)
    group = parser.add_argument_group("MGSR options (TRL's GKDConfig/SFTConfig, TrainingArguments and ModelConfig "
                                      "options follow)")
    parser.add_argument("--help-mgsr", action=_HelpMGSR, help="Show only the MGSR options and exit.")
    for action in list(parser._optionals._group_actions):
        if action.dest in first or action.dest == argparse.SUPPRESS and "--help-mgsr" in action.option_strings:
            parser._optionals._group_actions.remove(action)
            group._group_actions.append(action)
        if action.dest == "teacher_model_name_or_path":
            action.help = TEACHER_HELP
        if action.dest == "dataset_name":
            action.help = "Training data: a Hub dataset, a saved dataset directory or a local .jsonl/.json/.parquet file."
        if action.dest == "model_name_or_path":
            action.help = "The student: a local model directory or a Hub id (required)."
    order = {name: i for i, name in enumerate(("help_mgsr", *FIRST_FLAGS))}
    group._group_actions.sort(key=lambda a: order.get(a.dest if a.dest != argparse.SUPPRESS else "help_mgsr",
                                                      len(order)))
    parser.formatter_class = _Formatter
    parser._optionals.title = "TRL and Transformers options"
    parser._action_groups.remove(group)
    parser._action_groups.insert(0, group)
    parser.mgsr_group = group
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "trl-mgsr distill"):
    """`(script_args, training_args, model_args)`; unknown flags raise a one-line `ValueError`.

    Unknown command-line flags are reported before the configs are built, so that a typo is not hidden behind an
    error of `TrainingArguments`' own checks (e.g. TRL's default `bf16=True` on a machine without bf16).
    """
    parser = make_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:  # the YAML's keys are checked by TrlParser itself
        at = argv.index("--config")
        flags = argv[:at] + argv[at + 2:]
    else:
        flags = argv
    _, unknown = parser.parse_known_args(flags)
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
    *parsed, remaining = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unrecognized arguments: {' '.join(remaining)}")
    if "--dataloader_pin_memory" not in flags and not torch.accelerator.is_available():
        parsed[1].dataloader_pin_memory = False  # without an accelerator torch warns at every pinned dataloader
    return tuple(parsed)


# ---------------------------------------------------------------------------------------------- data


def load_data_file(path: str, what: str):
    """A local .jsonl/.json/.parquet file as a `Dataset`; errors name the flag `what` that gave the path."""
    from datasets import load_dataset

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    if not path.endswith(DATA_FILE_SUFFIXES):
        raise ValueError(f"{what} {path}: unsupported file type; use .jsonl, .json or .parquet")
    kind = "parquet" if path.endswith(".parquet") else "json"
    if kind == "json":
        with open(path, "rb") as f:
            if not f.read(4096).strip() and not f.read(1):  # `datasets` fails on an empty JSON file with StopIteration
                raise ValueError(f"{what} {path}: the file has no rows")
    with quiet_datasets():
        data = load_dataset(kind, data_files=path, split="train")
    if len(data) == 0:
        raise ValueError(f"{what} {path}: the file has no rows")
    return data


def to_training_format(dataset, source: str):
    """Keep `messages` / `prompt`+`completion` datasets; turn MiniLLM/Alpaca rows into `prompt`/`completion`."""
    columns = dataset.column_names
    if "messages" in columns or {"prompt", "completion"} <= set(columns):
        return dataset
    if "output" in columns and ("prompt" in columns or "instruction" in columns):

        def convert(row, index):
            output = row["output"]
            completion = output[0] if isinstance(output, list) and output else output
            if not isinstance(completion, str):
                raise ValueError(f"{source}: row {index}: `output` must be a string or a list of strings")
            return {"prompt": render_prompt(row, index), "completion": completion}

        with quiet_datasets():
            return dataset.map(convert, with_indices=True, remove_columns=columns)
    raise ValueError(
        f"{source}: has columns {sorted(columns)}; give `messages`, `prompt` + `completion`, or `instruction` "
        "(+ `input`) / `prompt` + `output`"
    )


def load_datasets(script_args: MGSRScriptArguments, training_args: MGSRConfig):
    """`(train_dataset, eval_dataset, source)` from `--train_file/--eval_file`, a local file or `--dataset_name`."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    name, train_file, train_flag = script_args.dataset_name, script_args.train_file, "--train_file"
    if train_file is None and name and (os.path.isfile(name) or name.endswith(DATA_FILE_SUFFIXES)):
        train_file, train_flag = name, "--dataset_name"
    want_eval = training_args.eval_strategy != "no"
    if train_file is not None:
        train = to_training_format(load_data_file(train_file, train_flag), train_file)
        evaluation = None
        source = train_file
    elif name:
        try:
            if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in SAVED_DATASET_FILES):
                data = load_from_disk(name)  # `save_to_disk` of a DatasetDict, or of one Dataset (the train split)
                if isinstance(data, Dataset):
                    data = DatasetDict({script_args.dataset_train_split: data})
            else:
                data = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
        except Exception as err:  # offline, unknown name, bad builder: one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"--dataset_name {name}: could not load the dataset ({first})") from None
        if not isinstance(data, (DatasetDict, dict)) and not hasattr(data, "keys"):
            raise ValueError(f"--dataset_name {name}: expected a dataset with splits")
        if script_args.dataset_train_split not in data:
            raise ValueError(
                f"--dataset_name {name}: no split {script_args.dataset_train_split!r} (splits: {sorted(data)}); "
                "set --dataset_train_split"
            )
        _check_split_has_rows(data, script_args.dataset_train_split, name, "--dataset_train_split")
        train = to_training_format(data[script_args.dataset_train_split], name)
        test = script_args.dataset_test_split
        if test in data and want_eval:
            _check_split_has_rows(data, test, name, "--dataset_test_split")
        evaluation = to_training_format(data[test], name) if test in data else None
        source = name
    else:
        raise ValueError("no training data: give --dataset_name (a Hub dataset, a directory or a file) or --train_file")
    if script_args.eval_file is not None:  # overrides a dataset's test split
        evaluation = to_training_format(load_data_file(script_args.eval_file, "--eval_file"), script_args.eval_file)
    if want_eval and evaluation is None:
        strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
        raise ValueError(
            f"--eval_strategy {strategy} needs evaluation data: give --eval_file or a dataset with a "
            f"{script_args.dataset_test_split!r} split"
        )
    return train, (evaluation if want_eval else None), source


def _check_split_has_rows(data, split: str, name: str, flag: str) -> None:
    rows = getattr(data[split], "num_rows", None)
    if rows == 0:
        raise ValueError(f"--dataset_name {name}: split {split!r} has no rows; pick another with {flag}")


# ---------------------------------------------------------------------------------------------- training


def load_tokenizer(model_args: ModelConfig, training_args: MGSRConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run(script_args: MGSRScriptArguments, training_args: MGSRConfig, model_args: ModelConfig):
    """Train, save (model, tokenizer, card), push when `--push_to_hub`, merge when `--merge_adapter`.

    Mirrors TRL's GKD example: the student and teacher are loaded by the trainer from their paths with
    `model_init_kwargs` / `teacher_model_init_kwargs` built from `ModelConfig`. Returns the trainer.
    """
    from trl import get_peft_config, get_quantization_config

    from .trainer import MGSRTrainer

    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (the student)")
    if not training_args.teacher_model_name_or_path:
        raise ValueError("--teacher_model_name_or_path is required (the teacher)")
    if script_args.merge_adapter and not model_args.use_peft:
        raise ValueError("--merge_adapter needs --use_peft (there is no adapter to merge)")
    guards.check_model_path(model_args.model_name_or_path, "--model_name_or_path")
    guards.check_model_path(training_args.teacher_model_name_or_path, "--teacher_model_name_or_path")
    runtime.check_threads(script_args.threads)

    train_dataset, eval_dataset, source = load_datasets(script_args, training_args)

    quantization_config = get_quantization_config(model_args)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        use_cache=not training_args.gradient_checkpointing,
    )
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    teacher_init_kwargs = dict(
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    teacher_init_kwargs.update(training_args.teacher_model_init_kwargs or {})
    training_args.teacher_model_init_kwargs = teacher_init_kwargs

    trainer = MGSRTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(model_args, training_args),
        peft_config=get_peft_config(model_args),
    )
    device = "cpu" if training_args.use_cpu else training_args.device
    runtime.configure_threads(script_args.threads, trainer.model, trainer.teacher_model, device=device)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    if training_args.push_to_hub:
        # The standard path: saves model + tokenizer, writes the card (with the dataset), uploads `output_dir` once.
        # (`save_model` would also push, without the dataset in the card, so it is not called separately.)
        trainer.push_to_hub(dataset_name=source)
        trainer.accelerator.print(
            f"Model, tokenizer and model card saved to {training_args.output_dir} and pushed to "
            f"https://huggingface.co/{trainer.hub_model_id}"
        )
    else:
        trainer.save_model(training_args.output_dir)
        trainer.create_model_card(dataset_name=source)
        trainer.accelerator.print(f"Model, tokenizer and model card saved to {training_args.output_dir}")
    if script_args.merge_adapter and trainer.accelerator.is_main_process:
        merged_dir = merge_adapter(trainer, merged_output_dir(training_args.output_dir), dataset_name=source)
        trainer.accelerator.print(f"Merged model saved to {merged_dir}")
    trainer.accelerator.wait_for_everyone()
    return trainer


def merged_output_dir(output_dir: str) -> str:
    return os.path.normpath(output_dir) + "-merged"


def merge_adapter(trainer, merged_dir: str, dataset_name: str | None = None) -> str:
    """Merge the trainer's LoRA adapter into its base; save the full model, tokenizer and its own card (named after
    and loading `merged_dir`) in `merged_dir`.

    Runs after saving (and pushing) the adapter: merging changes the trainer's model in place.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_and_unload"):
        raise ValueError("--merge_adapter: the trained model has no adapter to merge (is --use_peft set?)")
    merged = model.merge_and_unload()
    merged.save_pretrained(merged_dir)
    trainer.processing_class.save_pretrained(merged_dir)
    output_dir, hub_model_id = trainer.args.output_dir, trainer.hub_model_id
    trainer.args.output_dir, trainer.hub_model_id = merged_dir, None  # the card describes the merged model
    try:
        trainer.create_model_card(dataset_name=dataset_name)
    finally:
        trainer.args.output_dir, trainer.hub_model_id = output_dir, hub_model_id
    return merged_dir


def main(argv: list[str] | None = None) -> int:
    script_args, training_args, model_args = parse_args(argv)
    if training_args.disable_tqdm:  # also the model loading / saving bars
        runtime.disable_progress_bars()
    run(script_args, training_args, model_args)
    return 0
