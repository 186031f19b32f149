# Copyright the trl_mgsr developers. Licensed under the Apache License, Version 2.0.
"""Evaluate a saved student on the MiniLLM/DistiLLM instruction-following sets (ROUGE-L, several seeds).

Runs `trl-mgsr eval` on the sets found under --data_dir (`dolly/valid.jsonl`, `self-inst/valid.jsonl`,
`vicuna/valid.jsonl`, `sinst/valid.jsonl` with list references, `uinst/valid.jsonl`), skipping missing ones with a
note; with none of them (e.g. in a clone without `../shared`, this project's workspace data), on the rows shipped in
the package. Every other flag is `trl-mgsr eval`'s, with its defaults (`--seeds`, `--batch_size`,
`--max_new_tokens`, `--max_samples`, `--threads`, `--output_dir`, ...). The model may be a full model directory or a
LoRA adapter directory.

# A quick look (50 rows per set, 3 seeds) at the student saved by examples/mgsr.py:
python examples/evaluate_student.py --model mgsr-example --data_dir ../shared/data \
    --max_samples 50 --max_new_tokens 64 --output_dir mgsr-example-eval

# The full protocol (every row, 5 seeds, 256 new tokens; use a GPU):
python examples/evaluate_student.py --model Qwen2.5-0.5B-MGSR --data_dir ../shared/data \
    --seeds 10 20 30 40 50 --batch_size 32 --output_dir Qwen2.5-0.5B-MGSR-eval
"""

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

from trl_mgsr.cli import main as trl_mgsr

#: `../shared/data` next to this repository: the MiniLLM evaluation data of this project's workspace (not part of the
#: repository), the default --data_dir. Without it the script evaluates on the rows shipped in the package.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHIPPED = str(resources.files("trl_mgsr").joinpath("assets", "dolly_mini.jsonl"))
SETS = ("dolly/valid.jsonl", "self-inst/valid.jsonl", "vicuna/valid.jsonl", "sinst/valid.jsonl", "uinst/valid.jsonl")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="Directory holding the MiniLLM sets.")
    args, eval_args = parser.parse_known_args(argv)
    found = []
    for relative in SETS:
        path = os.path.join(args.data_dir, relative)
        if os.path.isfile(path):
            found.append(path)
        else:
            print(f"skipping {relative}: not found under {args.data_dir}")
    if not found and "-h" not in eval_args and "--help" not in eval_args:
        print(f"no evaluation set found under {args.data_dir}: evaluating on the rows shipped in the package, "
              f"{SHIPPED} (Dolly rows the demo trains on: a smoke test, not a held-out score)")
        found = [SHIPPED]
    return trl_mgsr(["eval", *eval_args, "--data", *found])


if __name__ == "__main__":
    sys.exit(main())
