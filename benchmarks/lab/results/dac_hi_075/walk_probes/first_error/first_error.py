"""Where sampled `walk` answers go wrong: the position of the first wrong letter, after one lab training (seed 0).

python benchmarks/lab/results/dac_hi_075/walk_probes/first_error/first_error.py NAME CONFIG_JSON [TASKS...]
(CONFIG_JSON: the MGSRConfig fields that differ from the defaults, as in `benchmarks/lab/run.py`'s METHODS; TASKS:
the lab's tasks, default all three: the shipped multi-task teacher; `walk` alone uses the cached walk teacher)
prints the sampled validity on `walk`'s evaluation prompts (16 samples each, as the lab) and, over the invalid
samples, how many first go wrong at each letter position ("len": right letters, wrong length).
"""
import collections
import json
import os
import sys
import tempfile
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_mgsr.lab.metrics import respond  # noqa: E402
from trl_mgsr.lab.models import ModelSettings, eval_rows  # noqa: E402
from trl_mgsr.lab.runner import Budget, Method, distill, prepare_models, quiet  # noqa: E402
from trl_mgsr.lab.tasks import TASKS  # noqa: E402

torch.set_num_threads(1)
name, config = sys.argv[1], json.loads(sys.argv[2])
settings = replace(ModelSettings(), tasks=tuple(sys.argv[3:]) or ModelSettings().tasks)
models = prepare_models(settings, "benchmarks/lab/cache", log=lambda message: None)
tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
student = AutoModelForCausalLM.from_pretrained(models["student_init"])
with quiet(), tempfile.TemporaryDirectory() as work:
    student = distill(Method("mgsr", config), Budget(), settings, teacher, student, tokenizer, work)[0].model
walk = TASKS["walk"]
prompts = [row["prompt"] for row in eval_rows(settings)["walk"] for _ in range(16)]
torch.manual_seed(0)
texts = respond(student.eval(), tokenizer, prompts, greedy=False)[0]
first_error, valid = collections.Counter(), 0
for prompt, text in zip(prompts, texts):
    gold, got = walk.answer(prompt).split(), text.split()
    if got == gold:
        valid += 1
        continue
    wrong = [i for i, (a, b) in enumerate(zip(got, gold)) if a != b]
    first_error[wrong[0] if wrong else "len"] += 1
print(f"{name}: walk sampled validity {valid / len(prompts):.3f}; first wrong position of the "
      f"{len(prompts) - valid} invalid samples: {dict(sorted(first_error.items(), key=lambda kv: str(kv[0]).zfill(3)))}")
