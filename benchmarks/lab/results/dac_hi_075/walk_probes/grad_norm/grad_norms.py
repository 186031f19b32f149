"""Gradient norms through one lab training (default student, defaults budget, seed 0), before clipping.

python benchmarks/lab/results/dac_hi_075/walk_probes/grad_norm/grad_norms.py [TRAINER] [CONFIG_JSON]
(TRAINER "mgsr" or "gkd", default "mgsr"; e.g. `mgsr '{"scrg_correction_weight": 0}'`) prints, per logging step, the trainer's `grad_norm` (before `max_grad_norm`=1 clips it) and MGSR's term means.
"""
import json
import os
import sys
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_mgsr.lab.models import ModelSettings  # noqa: E402
from trl_mgsr.lab.runner import Budget, Method, distill, prepare_models  # noqa: E402

torch.set_num_threads(1)
trainer_name = sys.argv[1] if len(sys.argv) > 1 else "mgsr"
config = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
models = prepare_models(ModelSettings(), "benchmarks/lab/cache", log=lambda message: None)
tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
student = AutoModelForCausalLM.from_pretrained(models["student_init"])
with tempfile.TemporaryDirectory() as work:
    trainer, _ = distill(Method(trainer_name, config), Budget(), ModelSettings(), teacher, student, tokenizer, work)
for entry in trainer.state.log_history:
    if "grad_norm" in entry:
        terms = {key[5:]: round(value, 3) for key, value in entry.items()
                 if key in ("mgsr/dac_kl", "mgsr/correction", "mgsr/span", "mgsr/on_policy")}
        print(entry["step"], round(entry["grad_norm"], 2), terms)
