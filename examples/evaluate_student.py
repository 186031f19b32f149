# Copyright the trl_mgsr developers. Licensed under the Apache License, Version 2.0.
"""Evaluate a saved student on the MiniLLM/DistiLLM instruction-following sets (ROUGE-L, several seeds).

Looks for the sets under --data_dir (`dolly/valid.jsonl`, `self-inst/valid.jsonl`, `vicuna/valid.jsonl`,
`sinst/valid.jsonl` with list references, `uinst/valid.jsonl`), skips missing ones with a note, and writes
`results.json`, `results.md` and `generations.jsonl` to --output_dir. The model may be a full model directory or a
LoRA adapter directory (its base is read from `adapter_config.json`). Same as
`trl-mgsr eval --model M --data <the five files>`.

# A quick look (50 rows per set, 3 seeds) at the student saved by examples/mgsr.py:
python examples/evaluate_student.py --model mgsr-example --data_dir ../shared/data \
    --max_samples 50 --max_new_tokens 64 --output_dir mgsr-example-eval

# The full protocol (every row, 5 seeds, 256 new tokens; use a GPU):
python examples/evaluate_student.py --model Qwen2.5-0.5B-MGSR --data_dir ../shared/data \
    --seeds 10 20 30 40 50 --batch_size 32 --output_dir Qwen2.5-0.5B-MGSR-eval
"""

import argparse
import os
from pathlib import Path

from trl_mgsr.evaluation import evaluate, load_eval_set, load_model, markdown_table, write_results

#: `../shared/data` next to this repository (the project's data folder), the default --data_dir.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("dolly/valid.jsonl", "self-inst/valid.jsonl", "vicuna/valid.jsonl", "sinst/valid.jsonl", "uinst/valid.jsonl")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Saved model or LoRA adapter directory.")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="Directory holding the MiniLLM sets.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[10, 20, 30])
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output_dir", default="mgsr-eval")
    args = parser.parse_args()

    sets = []
    for relative in SETS:
        path = os.path.join(args.data_dir, relative)
        if os.path.isfile(path):
            sets.append(load_eval_set(path, max_samples=args.max_samples))
        else:
            print(f"skipping {relative}: not found under {args.data_dir}")
    if not sets:
        raise SystemExit(f"no evaluation set found under {args.data_dir}")
    model, tokenizer = load_model(args.model)
    result = evaluate(model, tokenizer, sets, args.seeds, args.batch_size, args.max_new_tokens)
    write_results(result, args.output_dir, model=args.model)
    print(markdown_table(result), end="")


if __name__ == "__main__":
    main()
