"""What `MGSRTrainer.__init__` checks and builds before training: the config, the teacher, the tokenizer, the shared
vocabulary, the datasets' format and the generation settings. Every check raises early, naming the argument and
what to do."""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import fields

import datasets
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ._trl import GKDConfig
from .config import MGSRConfig
from . import guards
from .data import MGSRDataCollator, detect_format, split_prompt_completion
from .spans import span_ids_from_tokens


def as_mgsr_config(args, model) -> MGSRConfig:
    if args is None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        return MGSRConfig(f"{str(name).split('/')[-1] or 'model'}-MGSR")
    if isinstance(args, MGSRConfig):
        return args
    if isinstance(args, GKDConfig):
        values = {f.name: getattr(args, f.name) for f in fields(GKDConfig) if f.init and hasattr(args, f.name)}
        return MGSRConfig(**values)
    raise TypeError(f"`args` must be an MGSRConfig (or a GKDConfig), got {type(args).__name__}.")


def check_adaptive_schedule(args: MGSRConfig, eval_dataset) -> None:
    """`schedule="adaptive"` moves its student-sample probability only on evaluation losses."""
    if args.schedule != "adaptive" or (eval_dataset is not None and args.eval_strategy != "no"):
        return
    message = (
        "schedule='adaptive' raises its student-sample probability only when the evaluation loss rises, but this "
        "run has no evaluation (pass `eval_dataset` and set `eval_strategy` to 'steps' or 'epoch'), so it would stay "
        f"at init_threshold={args.init_threshold}"
    )
    if args.init_threshold == 0:
        raise ValueError(f"{message}: no student samples at all. Add evaluation, or use schedule='gkd' with `lmbda`.")
    warnings.warn(f"{message} for the whole run.", stacklevel=4)


def load_teacher(teacher_model, args: MGSRConfig):
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError(
            "MGSRTrainer needs a teacher: pass `teacher_model=` (a model or a path/Hub id) or set "
            "`teacher_model_name_or_path` in the config."
        )
    if not isinstance(teacher_model, str):
        if args.teacher_model_init_kwargs:
            raise ValueError(
                "`teacher_model_init_kwargs` is set but `teacher_model` is already a model; drop the kwargs or pass "
                "the teacher as a path/id."
            )
        return teacher_model
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"teacher_model_init_kwargs['dtype']={dtype!r} is not a torch dtype name.")
        kwargs["dtype"] = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(teacher_model, **kwargs)


def shared_vocab_size(student, teacher, tokenizer, args: MGSRConfig) -> int:
    """The vocab size both models' logits are compared on; raise when the vocabularies are not compatible."""
    student_vocab = student.config.get_text_config().vocab_size
    teacher_vocab = teacher.config.get_text_config().vocab_size
    if student_vocab == teacher_vocab:
        return student_vocab
    shared = min(student_vocab, teacher_vocab)
    if len(tokenizer) > shared:
        raise ValueError(
            f"The student has vocab_size {student_vocab} and the teacher {teacher_vocab}, and the tokenizer has "
            f"{len(tokenizer)} tokens, more than the smaller of the two: the models do not share a vocabulary. "
            "MGSR compares full next-token distributions, so use a teacher from the same tokenizer family."
        )
    if not args.truncate_teacher_vocab:
        raise ValueError(
            f"The student has vocab_size {student_vocab} and the teacher {teacher_vocab}; every tokenizer id is "
            f"below {shared}, so the extra rows look like same-family padding. Set `truncate_teacher_vocab=True` "
            f"to compare logits on the first {shared} entries."
        )
    return shared


def named_datasets(train_dataset, eval_dataset):
    if train_dataset is not None:
        yield "train_dataset", train_dataset
    if isinstance(eval_dataset, dict):
        for key, dataset in eval_dataset.items():
            yield f"eval_dataset[{key!r}]", dataset
    elif eval_dataset is not None:
        yield "eval_dataset", eval_dataset


def shares_weights(model: nn.Module, teacher: nn.Module) -> bool:
    student_params = {id(p) for p in model.parameters()}
    return teacher is model or any(id(p) in student_params for p in teacher.parameters())


def validate_dataset(dataset, tokenizer, name: str) -> None:
    """Check columns and the first row up front, so a bad dataset fails at construction, not mid-training.
    An iterable (streaming) dataset is checked on its first row; one without rows or columns is left alone."""
    if isinstance(dataset, datasets.IterableDataset):
        first = next(iter(dataset), None)
        if first is None:
            return
        columns = list(first)
    else:
        columns = getattr(dataset, "column_names", None)
        if columns is None or len(dataset) == 0:
            return
        first = dataset[0]
    try:
        detect_format(columns)
        split_prompt_completion(first, tokenizer, row=0)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def check_separate_teacher(model, teacher: nn.Module) -> None:
    if isinstance(model, nn.Module) and shares_weights(model, teacher):
        raise ValueError(
            "`teacher_model` shares weights with the student `model` (the same model object, or the student's "
            "base model): the teacher would change with the student, and with `peft_config` it would run the "
            "student's adapters. Load the teacher separately (e.g. `teacher_model=<path or Hub id>`)."
        )


def default_tokenizer(model, args: MGSRConfig):
    """The student's tokenizer, when `processing_class` is not given."""
    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        raise ValueError("MGSRTrainer needs `processing_class` (the tokenizer) when `model` is not a path/id.")
    return AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)


def generation_settings(args: MGSRConfig, student, teacher, tokenizer, shared_vocab: int):
    """`(generation_kwargs, generation_config, teacher_generation_config)`: GKD's sampling settings (temperature,
    no top-k/top-p), the KV cache unless turned off, ids the other model lacks suppressed, the student's end token;
    the teacher's copy is for `seq_kd`."""
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "use_cache": args.generation_use_cache or not args.gradient_checkpointing,
        "pad_token_id": tokenizer.pad_token_id,
    }
    student_vocab = student.config.get_text_config().vocab_size
    if shared_vocab < student_vocab:  # never sample ids the teacher does not have
        kwargs["suppress_tokens"] = list(range(shared_vocab, student_vocab))
    config = GenerationConfig(**kwargs)
    eos = getattr(student.generation_config, "eos_token_id", None)
    config.eos_token_id = eos if eos is not None else tokenizer.eos_token_id
    teacher_config = copy.deepcopy(config)
    teacher_vocab = teacher.config.get_text_config().vocab_size
    teacher_config.suppress_tokens = (
        list(range(shared_vocab, teacher_vocab)) if shared_vocab < teacher_vocab else None
    )
    return kwargs, config, teacher_config


def check_arguments(model, teacher_model, args: MGSRConfig, train_dataset, eval_dataset, formatting_func) -> None:
    """What can be checked before any model is loaded: arguments MGSR does not take, the schedule's needs, the model
    paths and that there is data."""
    if formatting_func is not None:
        raise ValueError(
            "MGSRTrainer does not take `formatting_func`: give rows with `messages` or `prompt`/`completion` "
            "columns (format them with `dataset.map` first)."
        )
    check_adaptive_schedule(args, eval_dataset)
    guards.check_model_path(model, "model")
    guards.check_model_path(teacher_model if teacher_model is not None else args.teacher_model_name_or_path,
                            "teacher_model")
    guards.check_datasets(named_datasets(train_dataset, eval_dataset))  # SFTTrainer fails on none with a bare error


def default_collator(args: MGSRConfig, tokenizer, span_extractor) -> MGSRDataCollator:
    """The dataset sequence's span ids are used only by the steps that train on it (an on-policy step replaces the
    sequence): DataLoader workers compute them off the main process (free); without workers the collator leaves
    them to `prepare_distillation_batch`, which computes them for the step's own sequence."""
    in_workers = span_extractor is not None and args.dataloader_num_workers > 0
    return MGSRDataCollator(
        tokenizer,
        max_length=args.max_length,
        # a partial, not a bound trainer method: DataLoader workers would pickle the whole trainer with it
        span_fn=functools.partial(span_ids_from_tokens, extractor=span_extractor) if in_workers else None,
    )


def validate_datasets(train_dataset, eval_dataset, tokenizer, collator) -> None:
    """Each dataset's columns and first row; with our collator, a warning saying how many rows get cut, which way."""
    for name, dataset in named_datasets(train_dataset, eval_dataset):
        validate_dataset(dataset, tokenizer, name)
        if isinstance(collator, MGSRDataCollator) and not isinstance(dataset, datasets.IterableDataset):
            report = collator.truncation_report(dataset, name)
            if report:
                warnings.warn(report, stacklevel=3)  # the caller of MGSRTrainer()


def scrg_options(args: MGSRConfig) -> dict:
    """The `SCRGSettings` fields that the config's `scrg_*` fields (and `loss_chunk_size`) set."""
    return dict(error_rule=args.scrg_error, reject_ratio=args.scrg_reject_ratio,
                kl_direction=args.scrg_kl_direction, teacher_token=args.scrg_teacher_token,
                allow_eos=args.scrg_allow_eos_correction, continuation=args.scrg_continuation,
                keep_teacher_logits=args.scrg_reuse_teacher_logits, chunk_size=args.loss_chunk_size)
