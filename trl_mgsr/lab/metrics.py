"""The lab's metrics of a student on held-out prompts of each task.

- `sampled`: share of valid responses sampled with the MiniLLM protocol (temperature 1, top-k 0, top-p 1),
  `samples` per prompt;
- `greedy`: share of valid greedy responses, one per prompt;
- `teacher_nll`: the teacher's negative log-likelihood per completion token of the student's samples (nats; how
  plausible the student's own outputs are to the teacher);
- `distinct_valid`: mean number of distinct valid responses per prompt among its `samples` samples (diversity;
  meaningful on the many-answers task).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from ..data import position_ids_from_mask
from ..generation import pure_sampling
from ..scrg import assemble_on_policy_batch, completion_from_generate
from .tasks import TASKS


def chat_prompt(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _left_padded(tokenizer, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    return ids, mask


@torch.no_grad()
def respond(model, tokenizer, prompts: list[str], *, greedy: bool, max_new_tokens: int = 32):
    """One response per prompt: `(texts, input_ids, attention_mask, labels)`, the tensors in GKD's on-policy layout
    (left-padded prompt + completion up to its end token, labels -100 off the completion). Uses the global RNG."""
    prompt_ids, prompt_mask = _left_padded(tokenizer, [chat_prompt(tokenizer, p) for p in prompts])
    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                              **({"do_sample": False} if greedy else
                                 {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}))
    with pure_sampling(model):
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    completion, completion_mask = completion_from_generate(out, prompt_ids.shape[1], eos)
    texts = tokenizer.batch_decode(completion.masked_fill(completion_mask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return (texts, *assemble_on_policy_batch(prompt_ids, prompt_mask, completion, completion_mask,
                                             tokenizer.pad_token_id))


@torch.no_grad()
def completion_nll(model, input_ids, attention_mask, labels) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens under `model`, and their count."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask)).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll.item(), int((target != -100).sum())


def evaluate_student(model, teacher, tokenizer, eval_rows: dict[str, list[dict]], *, samples: int = 4,
                     seed: int = 0, max_new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """`{task: {"sampled", "greedy", "teacher_nll", "distinct_valid"}}` on each task's held-out rows."""
    model.eval()
    results = {}
    for name, rows in eval_rows.items():
        task = TASKS[name]
        prompts = [r["prompt"] for r in rows]
        torch.manual_seed(seed)
        repeated = [p for p in prompts for _ in range(samples)]
        texts, ids, mask, labels = respond(model, tokenizer, repeated, greedy=False, max_new_tokens=max_new_tokens)
        valid = [task.check(p, t) for p, t in zip(repeated, texts)]
        nll, count = completion_nll(teacher, ids, mask, labels)
        distinct = [len({" ".join(texts[i].split()) for i in range(k * samples, (k + 1) * samples) if valid[i]})
                    for k in range(len(prompts))]
        greedy_texts = respond(model, tokenizer, prompts, greedy=True, max_new_tokens=max_new_tokens)[0]
        results[name] = {
            "sampled": sum(valid) / len(valid),
            "greedy": sum(task.check(p, t) for p, t in zip(prompts, greedy_texts)) / len(prompts),
            "teacher_nll": nll / max(count, 1),
            "distinct_valid": sum(distinct) / len(distinct),
        }
    return results
