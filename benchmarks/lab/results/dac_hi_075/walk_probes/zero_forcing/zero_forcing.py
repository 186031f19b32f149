"""How much probability a trained student gives the data's first answer token, and how hard each loss pushes it.

python benchmarks/lab/results/dac_hi_075/walk_probes/zero_forcing/zero_forcing.py NAME CONFIG_JSON [LR]
(CONFIG_JSON: the MGSRConfig fields that differ from the defaults, as in `benchmarks/lab/run.py`'s METHODS; LR: the
lab's learning rate, 2e-3 unless given) trains one method (seed 0, the lab's budget), then teacher-forces 48 training
rows of each task (the data's answer) and prints, at the first answer token: the student's probability of the data's
token (mean, and the share of rows under 0.05) and the push on that token's logit, `-dL/dz_label`, of the reverse
DAC-KL (fixed band [0, 0.75], sharpness 50: the defaults' band at its start) and of the cross-entropy. The reverse
KL's push on a token is proportional to the probability the student already gives it, the cross-entropy's to
`1 - q`: a student that gives the answer almost nothing gets almost no push towards it from the reverse KL.
"""
import json
import os
import sys
import tempfile
from dataclasses import replace

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_mgsr.lab.metrics import chat_prompt  # noqa: E402
from trl_mgsr.lab.models import ModelSettings, train_rows  # noqa: E402
from trl_mgsr.lab.runner import Budget, Method, distill, prepare_models, quiet  # noqa: E402
from trl_mgsr.losses.dac_kl import dac_kl_loss  # noqa: E402

torch.set_num_threads(1)
name, config = sys.argv[1], json.loads(sys.argv[2])
budget = replace(Budget(), learning_rate=float(sys.argv[3])) if len(sys.argv) > 3 else Budget()
settings = ModelSettings()
models = prepare_models(settings, "benchmarks/lab/cache", log=lambda message: None)
tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]).eval()
student = AutoModelForCausalLM.from_pretrained(models["student_init"])
with quiet(), tempfile.TemporaryDirectory() as work:
    student = distill(Method("mgsr", config), budget, settings, teacher, student, tokenizer, work)[0].model
student.eval()

rows = train_rows(settings, 48, "zero_forcing")  # interleaved task by task
ids, first = [], []
for row in rows:
    prompt = chat_prompt(tokenizer, row["prompt"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                          {"role": "assistant", "content": row["answer"]}], tokenize=False)
    ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    first.append(len(prompt) - 1)  # the position whose logits predict the first answer token
width = max(map(len, ids))
input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids])
mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
at = torch.arange(len(rows)), torch.tensor(first)
label = input_ids[at[0], at[1] + 1]
with torch.no_grad():
    t = teacher(input_ids=input_ids, attention_mask=mask).logits[at].float()
    z0 = student(input_ids=input_ids, attention_mask=mask).logits[at].float()
z = z0.clone().requires_grad_(True)
grad_rkl, = torch.autograd.grad(dac_kl_loss(z, t, label, lo=0.0, hi=0.75, sharpness=50.0,
                                            divergence="reverse").total, z)
z = z0.clone().requires_grad_(True)
grad_ce, = torch.autograd.grad(F.cross_entropy(z, label, reduction="sum"), z)
q = z0.softmax(-1)[torch.arange(len(rows)), label]
push_rkl, push_ce = -grad_rkl[torch.arange(len(rows)), label], -grad_ce[torch.arange(len(rows)), label]
parts = []
for k, task in enumerate(settings.tasks):
    sel = torch.arange(len(rows)) % len(settings.tasks) == k
    parts.append(f"{task}: q {q[sel].mean():.3f}, q<0.05 {(q[sel] < 0.05).float().mean():.2f}, push reverse KL "
                 f"{push_rkl[sel].mean():.2f} (on q<0.05 {push_rkl[sel & (q < 0.05)].mean():.2f}), CE "
                 f"{push_ce[sel].mean():.2f}")
print(f"{name} (lr {budget.learning_rate:g}), first answer token of 48 training rows a task; " + "; ".join(parts))
