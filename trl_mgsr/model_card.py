"""The MGSR part of a distilled model's card.

`MGSRTrainer.create_model_card` first lets TRL write its card (`README.md` in `args.output_dir`: front matter with
the `trl`/`gkd`/`mgsr` tags, quick start, framework versions, and the MGSR citation from `MGSRTrainer._paper`),
then calls `add_mgsr_section`, which inserts an "MGSR distillation" section naming the teacher, the dataset, the
objective and every MGSR setting, before the citations.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Any

from ._trl import GKDConfig

#: GKD options that keep their meaning in MGSR and shape what is distilled.
GKD_FIELDS = ("lmbda", "seq_kd", "temperature", "max_new_tokens", "max_length")
SECTION_TITLE = "## MGSR distillation"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")


def hub_dataset_name(dataset_name: str | None) -> str | None:
    """`dataset_name` when it looks like a Hub dataset id, else None (TRL's card links it on the Hub)."""
    if not dataset_name or os.path.exists(dataset_name) or dataset_name.endswith(_DATA_SUFFIXES):
        return None
    return dataset_name if _HUB_ID.match(dataset_name) else None


def mgsr_settings(args) -> dict[str, Any]:
    """The MGSR-specific config fields (those `MGSRConfig` adds to `GKDConfig`) and their values."""
    gkd = {f.name for f in fields(GKDConfig)}
    return {f.name: getattr(args, f.name) for f in fields(type(args)) if f.init and f.name not in gkd}


def gkd_settings(args) -> dict[str, Any]:
    return {name: getattr(args, name) for name in GKD_FIELDS if hasattr(args, name)}


def describe_model(model) -> str:
    """A model's path/Hub id, or its class and size when it was built in memory."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    if name:
        return f"`{name}`"
    size = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else 0
    return f"{type(model).__name__} ({size / 1e6:.2f}M parameters, built in memory)"


def objective(args) -> str:
    """The loss, term by term with the formulation each uses (terms of weight 0 left out)."""
    band = "a learned band" if args.dac_mode == "learned" else f"the fixed band [{args.dac_lo:g}, {args.dac_hi:g}]"
    rescue = (f", with a {args.dac_rescue_weight:g} · −log(student mass in the band) rescue on sequences it did not "
              "sample" if args.dac_rescue_weight else "")
    parts = [(args.sft_weight, "SFT"),
             (args.dac_weight, f"DAC-KL ({args.dac_divergence} divergence to the teacher clipped to {band}{rescue})"),
             (args.span_weight, f"span ({args.span_objective})"),
             (args.scrg_correction_weight,
              f"{args.scrg_correction_divergence} divergence to the whole teacher at the SCRG-corrected tokens")]
    return " + ".join(f"{w:g} · {name}" for w, name in parts if w) or "no loss term (every weight is 0)"


def sequences(args) -> str:
    """Where the distillation sequences come from and what SCRG does to the student's."""
    if args.schedule == "adaptive":
        source = "DistiLLM's adaptive schedule (student samples as the evaluation loss calls for, with replay)"
    else:
        other = "the teacher's samples (`seq_kd`)" if args.seq_kd else "the dataset's completions"
        source = f"student samples with probability `lmbda={args.lmbda:g}`, otherwise {other}"
    after = {"regenerate": "the student re-generates the rest", "stop": "the sample ends at the correction"}
    scrg = (f"SCRG revises each student sample ({args.scrg_rounds} round(s), error rule `{args.scrg_error}`; "
            f"{after[args.scrg_continuation]})" if args.scrg_rounds else "SCRG off")
    return f"{source}; {scrg}"


def _value(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text.replace("|", "\\|")


def mgsr_section(trainer, dataset_name: str | None = None) -> str:
    """Markdown: the MGSR distillation section of the card."""
    from ._version import __version__

    args = trainer.args
    teacher = args.teacher_model_name_or_path
    teacher = f"`{teacher}`" if isinstance(teacher, str) and teacher else describe_model(trainer.teacher_model)
    lines = [
        SECTION_TITLE,
        "",
        "This model is a student distilled with **MGSR** (Multi-Granularity Semantic Revision, "
        "[arXiv 2407.10068](https://arxiv.org/abs/2407.10068)) using `trl_mgsr` "
        f"{__version__} (`MGSRTrainer`, a TRL `GKDTrainer`).",
        "",
        f"- **Teacher:** {teacher}",
        f"- **Dataset:** {f'`{dataset_name}`' if dataset_name else 'not recorded'}",
        f"- **Objective:** {objective(args)}",
        f"- **Sequences:** {sequences(args)}",
        f"- **Training:** {trainer.state.global_step} steps, learning rate {args.learning_rate:g}, "
        f"{args.per_device_train_batch_size} sequences per device x {args.gradient_accumulation_steps} "
        "accumulation steps",
        "",
        "### MGSR settings",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| `{k}` | `{_value(v)}` |" for k, v in mgsr_settings(args).items()]
    lines += ["", "GKD settings in effect: " + ", ".join(f"`{k}={_value(v)}`" for k, v in gkd_settings(args).items())]
    return "\n".join(lines) + "\n"


def _fix_unknown_base(card: str, trainer) -> str:
    """TRL writes `[None](https://huggingface.co/None)` and `model="None"` for local or in-memory students."""
    student = describe_model(trainer.accelerator.unwrap_model(trainer.model))
    card = card.replace("[None](https://huggingface.co/None)", student)
    return card.replace('model="None"', f'model="{trainer.args.output_dir}"')


def _fix_trl_placeholders(card: str, trainer) -> str:
    """TRL's template writes `licence: license` (a placeholder, not a licence) and a "Training procedure" heading
    whose badges are empty for runs without W&B/Comet: drop the placeholder, say what the procedure was."""
    card = re.sub(r"^licence: license\n", "", card, flags=re.M)
    teacher = trainer.args.teacher_model_name_or_path
    teacher = f"`{teacher}`" if isinstance(teacher, str) and teacher else describe_model(trainer.teacher_model)
    procedure = (f"Distilled from the teacher {teacher} with `MGSRTrainer` (`trl_mgsr`); the objective and every "
                 "setting are listed under [MGSR distillation](#mgsr-distillation).")
    return re.sub(r"(## Training procedure\n)\s*\n(?=\S)", rf"\1\n{procedure}\n\n", card, count=1)


def add_mgsr_section(trainer, dataset_name: str | None = None) -> str | None:
    """Insert the MGSR section into the card TRL wrote in `args.output_dir`; return the card's path.

    The section goes before "## Citations" (or at the end); the MGSR citation is appended when the card lacks it.
    Returns None on processes that do not write the card.
    """
    path = os.path.join(trainer.args.output_dir, "README.md")
    if not trainer.is_world_process_zero() or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        card = f.read()
    if SECTION_TITLE in card:  # written twice (e.g. push_to_hub after save): replace, do not duplicate
        card = re.sub(rf"{re.escape(SECTION_TITLE)}\n.*?(?=\n## |\Z)", "", card, flags=re.S)
    section = mgsr_section(trainer, dataset_name)
    marker = "\n## Citations"
    card = card.replace(marker, "\n" + section + marker, 1) if marker in card else card.rstrip() + "\n\n" + section
    card = _fix_unknown_base(card, trainer)
    card = _fix_trl_placeholders(card, trainer)
    citation = trainer._paper.get("citation", "")
    if citation and citation not in card:
        card = card.rstrip() + "\n\n## Citation\n\n```bibtex\n" + citation + "\n```\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return path
