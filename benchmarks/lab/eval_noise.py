"""How much of the lab's seed spread is the evaluation's own dice: one fixed model, several sampling seeds.

    python benchmarks/lab/eval_noise.py                      # the initial student, 4 seeds, 4 and 16 samples
    python benchmarks/lab/eval_noise.py --samples 4 16 32 --seeds 0 1 2 3 4 5

The lab (`run.py`) evaluates each distilled student with sampling seeded by its training seed, so the std over
training seeds it reports holds the evaluation's sampling noise too. This script re-evaluates one model that no
training touched (the cached initial student, or `--model`) under each seed and prints, per task, the mean and std of
sampled validity for each number of samples per prompt: the part of the lab's std that no method can change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a clone without installing

from trl_mgsr.lab.models import ModelSettings, eval_rows  # noqa: E402
from trl_mgsr.lab.runner import prepare_models, quiet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="Where the lab's models are cached.")
    parser.add_argument("--model", type=Path, default=None, help="A model directory (default: the initial student).")
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 16], help="Samples per prompt to compare.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="Evaluation sampling seeds.")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_mgsr.lab.metrics import evaluate_student

    torch.set_num_threads(1)
    settings = ModelSettings()
    with quiet():
        models = prepare_models(settings, str(args.cache))
        tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
        teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
        model = AutoModelForCausalLM.from_pretrained(args.model or models["student_init"])
    rows = eval_rows(settings)
    print("| samples / prompt | " + " | ".join(f"{t} sampled (mean ± std over seeds)" for t in rows) + " |")
    print("| ---: |" + " ---: |" * len(rows))
    for samples in args.samples:
        scores = {t: [] for t in rows}
        for seed in args.seeds:
            for task, metrics in evaluate_student(model, teacher, tokenizer, rows, samples=samples, seed=seed).items():
                scores[task].append(metrics["sampled"])
        cells = [f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}" for v in scores.values()]
        print(f"| {samples} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
