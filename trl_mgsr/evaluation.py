"""ROUGE-L evaluation with the MiniLLM / DistiLLM protocol (`trl-mgsr eval`).

Protocol: for each evaluation set and each seed, sample one response per prompt with pure ancestral sampling
(`do_sample=True, top_k=0, top_p=1.0, temperature=1.0`), score it against the set's references with
`rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)` (F-measure, x100), taking the **max over
references** when a row has several (S-NI), and average over rows. Report the mean and the sample standard
deviation over seeds, per set and for the average over sets.

Rows (jsonl, or a Hugging Face dataset / local dataset directory) need:
- `prompt` (used as is), or `instruction` (+ optional `input`) rendered with the Alpaca template MiniLLM uses
  (`ALPACA_PROMPT` / `ALPACA_PROMPT_NO_INPUT`);
- `output` (or `completion`): a reference string or a list of reference strings.

The scoring is a pure function, `score_generations(predictions, references)`, so that it can be checked against
`rouge-score` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_COLUMNS = ("prompt", "instruction")
REFERENCE_COLUMNS = ("output", "completion")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
#: what `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write
SAVED_DATASET_FILES = ("dataset_dict.json", "dataset_info.json", "state.json")
#: The sampling settings of the protocol (MiniLLM / DistiLLM evaluation).
SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}


class EvalError(ValueError):
    """A user error (bad file, column, model path); the CLI prints its message as one line."""


# ---------------------------------------------------------------------------------------------- scoring


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - rouge-score is a core dependency
        raise EvalError("ROUGE-L needs the `rouge-score` package: pip install rouge-score") from err
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str], scorer=None) -> float:
    """ROUGE-L F-measure x100 of one prediction, the max over its references."""
    scorer = scorer or _scorer()
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise EvalError("a row has an empty list of references")
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references) * 100


def score_rows(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[float]:
    """Per-row ROUGE-L (x100, max over references)."""
    if len(predictions) != len(references):
        raise EvalError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _scorer()
    return [rouge_l(p, r, scorer) for p, r in zip(predictions, references)]


def score_generations(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over rows of ROUGE-L F-measure x100 (max over each row's references); 0.0 for no rows."""
    scores = score_rows(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class EvalSet:
    name: str
    prompts: list[str]
    references: list[list[str]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)


def render_prompt(row: dict[str, Any], index: int = 0) -> str:
    """`prompt` if the row has one, else the Alpaca template on `instruction` (+ `input`)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    instruction = row.get("instruction")
    if not isinstance(instruction, str):
        raise EvalError(f"row {index}: no string `prompt` or `instruction` (columns: {sorted(row)})")
    extra = row.get("input") or ""
    template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=extra)


def row_references(row: dict[str, Any], index: int = 0) -> list[str]:
    """The row's references as a list (a string becomes a one-element list)."""
    for column in REFERENCE_COLUMNS:
        if column in row:
            value = row[column]
            refs = [value] if isinstance(value, str) else value
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise EvalError(f"row {index}: `{column}` must be a string or a non-empty list of strings")
            return refs
    raise EvalError(f"row {index}: no `output` column (columns: {sorted(row)})")


def check_columns(columns: Sequence[str], source: str) -> None:
    """Raise an `EvalError` naming the columns when rows cannot give a prompt and references."""
    if not any(c in columns for c in PROMPT_COLUMNS) or not any(c in columns for c in REFERENCE_COLUMNS):
        raise EvalError(
            f"{source}: has columns {sorted(columns)}; evaluation needs `prompt` or `instruction` (+ `input`) and "
            "`output` (a string or a list of strings)"
        )


def set_name(source: str) -> str:
    """A short name for a set: `.../dolly/valid.jsonl` -> `dolly`, `.../my_set.jsonl` -> `my_set`."""
    path = source.rstrip("/")
    stem = os.path.splitext(os.path.basename(path))[0]
    parent = os.path.basename(os.path.dirname(path))
    if stem in {"valid", "validation", "test", "dev", "train", "eval"} and parent:
        return parent
    return stem or path


@contextlib.contextmanager
def quiet_datasets():
    """No `datasets` progress bars while a small local file loads (keeps CLI errors to one line)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvalError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def load_rows(source: str, split: str = "test") -> list[dict[str, Any]]:
    """Rows of a local json/jsonl/parquet file, a saved dataset directory, or a Hugging Face dataset name."""
    if os.path.isfile(source):
        if source.endswith(".jsonl"):
            return read_jsonl(source)
        if source.endswith((".json", ".parquet")):
            from datasets import load_dataset

            kind = "parquet" if source.endswith(".parquet") else "json"
            with quiet_datasets():
                return list(load_dataset(kind, data_files=source, split="train"))
        raise EvalError(f"{source}: unsupported file type; use .jsonl, .json or .parquet")
    if source.endswith(DATA_FILE_SUFFIXES) or os.sep in source and not os.path.isdir(source):
        if not os.path.exists(source):
            raise EvalError(f"{source}: no such file")
    from datasets import DatasetDict, load_dataset, load_from_disk

    try:
        if os.path.isdir(source) and any(
            os.path.exists(os.path.join(source, f)) for f in SAVED_DATASET_FILES
        ):
            data = load_from_disk(source)
            if isinstance(data, DatasetDict):
                if split not in data:
                    raise EvalError(f"{source}: no split {split!r} (splits: {sorted(data)}); pick one with --split")
                data = data[split]
        else:
            data = load_dataset(source, split=split)
    except EvalError:
        raise
    except Exception as err:  # datasets raises many types (offline, missing split, bad builder)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"{source}: could not load the dataset ({first})") from None
    return list(data)


def load_eval_set(source: str, split: str = "test", max_samples: int | None = None, name: str | None = None) -> EvalSet:
    """One evaluation set from a file, a dataset directory or a dataset name; `max_samples` keeps the first rows."""
    rows = load_rows(source, split)
    if not rows:
        raise EvalError(f"{source}: no rows")
    check_columns(list(rows[0]), source)
    if max_samples is not None:
        rows = rows[:max_samples]
    try:
        prompts = [render_prompt(r, i) for i, r in enumerate(rows)]
        references = [row_references(r, i) for i, r in enumerate(rows)]
    except EvalError as err:
        raise EvalError(f"{source}: {err}") from None
    return EvalSet(name or set_name(source), prompts, references, source)


# ---------------------------------------------------------------------------------------------- model


def check_device(device: str | None) -> None:
    """Raise an `EvalError` unless `device` (None = automatic) names a torch device this machine has."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvalError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    module = getattr(torch, kind, None)
    if kind != "cpu" and not (module is not None and hasattr(module, "is_available") and module.is_available()):
        raise EvalError(f"--device {device!r}: no {kind} device is available on this machine (use cpu)")


def load_model(path: str, device: str | None = None, dtype: str = "auto"):
    """`(model, tokenizer)` from a saved model directory, a saved LoRA adapter directory, or a Hub id.

    An adapter directory (it has `adapter_config.json`) loads its base from `base_model_name_or_path` and the
    tokenizer from the adapter directory when it has one, else from the base.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .guards import check_model_path

    try:
        check_model_path(path, "--model")
    except FileNotFoundError as err:
        raise EvalError(str(err)) from None
    if os.path.isfile(path):
        raise EvalError(f"{path}: is a file; give the directory of a saved model or adapter")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    adapter_file = os.path.join(path, "adapter_config.json")
    try:
        if os.path.isfile(adapter_file):
            with open(adapter_file, encoding="utf-8") as f:
                base_path = json.load(f).get("base_model_name_or_path")
            if not base_path:
                raise EvalError(f"{adapter_file}: no `base_model_name_or_path`; cannot find the base model")
            try:
                check_model_path(base_path, f"{adapter_file}: base_model_name_or_path")
            except FileNotFoundError as err:
                raise EvalError(str(err)) from None
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
            model = PeftModel.from_pretrained(base, path)
            has_tokenizer = any(
                os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
            )
            tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else base_path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except EvalError:
        raise
    except ImportError as err:
        raise EvalError(f"{path}: is a LoRA adapter; loading it needs peft ({err})") from None
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"{path}: could not load the model ({first})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    seed: int,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_prompt_length: int | None = 256,
    progress: bool = True,
    desc: str | None = None,
    warn_truncation: bool = True,
) -> list[str]:
    """Sample one response per prompt with the protocol's settings; batched, left-padded, order preserved.

    Prompts get the tokenizer's BOS (once) and, when longer than `max_prompt_length` tokens, keep their first
    `max_prompt_length` tokens, as MiniLLM's prompt dataset does. Sampling ignores settings saved in the model's
    `generation_config.json` (`pure_sampling`). Prompts are batched by length (longest first) so that padding stays
    small; the seed is set once per call.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, set_seed

    from .data import encode_prompt
    from .generation import pure_sampling

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if max_prompt_length:
        cut = sum(len(ids) > max_prompt_length for ids in encoded)
        if cut and warn_truncation:
            warnings.warn(f"{cut} of {len(encoded)} prompts are longer than max_prompt_length={max_prompt_length} "
                          f"tokens and keep their first {max_prompt_length} (cut on the right, as in MiniLLM)",
                          stacklevel=2)
        encoded = [ids[:max_prompt_length] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    eos = getattr(model.generation_config, "eos_token_id", None)
    config = GenerationConfig(
        **SAMPLING,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
    )
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    set_seed(seed)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc or f"seed {seed}", disable=not progress, leave=False):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - len(encoded[i]) :] = 1
        with torch.no_grad(), pure_sampling(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, texts):
            outputs[i] = text.strip()
    return outputs


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """Scores per set and seed, their mean/std, and every generation (for inspection and tests)."""

    seeds: list[int]
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def average(self) -> dict[str, Any]:
        per_seed = {
            str(seed): statistics.fmean(s["scores"][str(seed)] for s in self.sets.values()) for seed in self.seeds
        }
        mean, std = mean_std(per_seed.values())
        return {"scores": per_seed, "mean": mean, "std": std}

    def to_dict(self, **extra) -> dict[str, Any]:
        return {**extra, "protocol": {**SAMPLING, "metric": "rougeL_fmeasure_x100_max_over_references"},
                "seeds": self.seeds, "sets": self.sets, "average": self.average}


def evaluate(
    model,
    tokenizer,
    sets: Sequence[EvalSet],
    seeds: Sequence[int] = (10, 20, 30),
    batch_size: int = 8,
    max_new_tokens: int = 256,
    max_prompt_length: int | None = 256,
    progress: bool = True,
) -> EvalResult:
    """Generate and score every set with every seed."""
    result = EvalResult(seeds=list(seeds))
    for eval_set in sets:
        scores = {}
        for seed in seeds:
            predictions = generate(
                model, tokenizer, eval_set.prompts, seed, batch_size, max_new_tokens, max_prompt_length,
                progress=progress, desc=f"{eval_set.name} seed {seed}", warn_truncation=seed == seeds[0],
            )
            row_scores = score_rows(predictions, eval_set.references)
            scores[str(seed)] = statistics.fmean(row_scores) if row_scores else 0.0
            for i, (pred, refs, score) in enumerate(zip(predictions, eval_set.references, row_scores)):
                result.generations.append(
                    {"set": eval_set.name, "seed": seed, "index": i, "prompt": eval_set.prompts[i],
                     "prediction": pred, "references": refs, "rougeL": score}
                )
        mean, std = mean_std(scores.values())
        result.sets[eval_set.name] = {"n": len(eval_set), "source": eval_set.source, "scores": scores,
                                      "mean": mean, "std": std}
    return result


def markdown_table(result: EvalResult) -> str:
    """Per-set and average ROUGE-L as a markdown table (mean ± std over seeds, then each seed)."""
    seeds = [str(s) for s in result.seeds]
    lines = [
        "| set | n | ROUGE-L (mean ± std) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in seeds) + " |",
    ]
    rows = [(name, str(s["n"]), s) for name, s in result.sets.items()]
    if len(result.sets) > 1:
        rows.append(("**average**", "", result.average))
    for name, n, s in rows:
        cells = " | ".join(f"{s['scores'][seed]:.2f}" for seed in seeds)
        lines.append(f"| {name} | {n} | {s['mean']:.2f} ± {s['std']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def write_results(result: EvalResult, output_dir: str, **extra) -> dict[str, str]:
    """Write `results.json`, `results.md` and `generations.jsonl` to `output_dir`; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in ("results.json", "results.md", "generations.jsonl")}
    with open(paths["results.json"], "w", encoding="utf-8") as f:
        json.dump(result.to_dict(**extra), f, indent=2, ensure_ascii=False)
    with open(paths["results.md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(result))
    with open(paths["generations.jsonl"], "w", encoding="utf-8") as f:
        for row in result.generations:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------- CLI


def build_parser(prog: str = "trl-mgsr eval"):
    from .cli_errors import OneLineErrorParser

    parser = OneLineErrorParser(
        prog=prog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ROUGE-L evaluation (MiniLLM/DistiLLM protocol: sampling with top_k=0, top_p=1, temperature=1, "
        "several seeds, max over references).",
    )
    parser.add_argument("--model", required=True, help="Saved model directory, saved LoRA adapter directory or Hub id.")
    parser.add_argument(
        "--data", nargs="+", required=True,
        help="Evaluation sets: .jsonl/.json/.parquet files, saved dataset directories or Hugging Face dataset names.",
    )
    parser.add_argument("--split", default="test", help="Split of dataset names/directories.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[10, 20, 30], help="Sampling seeds.")
    parser.add_argument(
        "--batch_size", type=int, default=8,
        help="Prompts per generate call; samples depend on it, so compare models with the same value.",
    )
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Longest sampled response.")
    parser.add_argument(
        "--max_prompt_length", type=int, default=256, help="Prompts keep their first N tokens (MiniLLM)."
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Evaluate the first N rows of each set.")
    parser.add_argument("--output_dir", default="mgsr-eval", help="Where results.json/.md and generations go.")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (None: cuda when available).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="Weights dtype ('auto': as saved).")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (None: 1 on a CPU for models under 20M parameters, else torch's default).",
    )
    parser.add_argument("--no_progress", action="store_true", help="Hide every progress bar (loading included).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_prompt_length", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name} must be >= 1, got {value}")
    if len(set(args.seeds)) < len(args.seeds):
        raise EvalError(f"--seeds must be distinct, got {args.seeds}")
    check_device(args.device)
    from .runtime import check_threads, configure_threads, disable_progress_bars

    check_threads(args.threads)
    if args.no_progress:
        disable_progress_bars()
    sets = [load_eval_set(source, args.split, args.max_samples) for source in args.data]
    names = [s.name for s in sets]
    for i, s in enumerate(sets):  # two sets with the same derived name: keep both
        if names.count(s.name) > 1:
            s.name = f"{s.name}-{i}"
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    configure_threads(args.threads, model, device=next(model.parameters()).device)
    result = evaluate(
        model, tokenizer, sets, args.seeds, args.batch_size, args.max_new_tokens, args.max_prompt_length,
        progress=not args.no_progress,
    )
    paths = write_results(
        result, args.output_dir, model=args.model,
        settings={k: getattr(args, k) for k in ("max_new_tokens", "max_prompt_length", "max_samples", "batch_size")},
    )
    print(markdown_table(result), end="")
    print(f"Results written to {paths['results.json']}, {paths['results.md']} and {paths['generations.jsonl']}")
    return 0


def completion_loss(
    model, tokenizer, rows: Sequence[dict[str, Any]], batch_size: int = 16, max_length: int = 512
) -> float:
    """Teacher-forced cross-entropy per completion token (nats) on rows in a trainer format (`messages` or
    `prompt`/`completion`)."""
    import torch

    from .data import MGSRDataCollator, position_ids_from_mask

    collator = MGSRDataCollator(tokenizer, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collator(list(rows[start : start + batch_size]))
            mask = batch["attention_mask"].to(device)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=mask, position_ids=position_ids_from_mask(mask)
            ).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
