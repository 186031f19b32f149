"""SCRG inside MGSRTrainer's on-policy hook."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr._trl import GKDTrainer
from trl_mgsr.data import position_ids_from_mask
from trl_mgsr.scrg import completion_from_generate
from trl_mgsr.testing import build_pair, toy_rows


def make(tokenizer, tmp_path, peft=False, **overrides):
    student, teacher = build_pair(tokenizer)
    trainer = MGSRTrainer(
        model=student, teacher_model=teacher, args=tiny_args(MGSRConfig, tmp_path, **overrides),
        train_dataset=Dataset.from_list(toy_rows(8)), processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if peft else None,
    )
    trainer.model_wrapped = trainer.model
    return trainer


def on_policy_batch(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer.prepare_distillation_batch(batch)


@pytest.mark.parametrize("rule", [{"scrg_error": "max_divergence"},
                                  # a random teacher is nearly uniform: only a ratio near 1 rejects its tokens
                                  {"scrg_error": "first_rejected", "scrg_reject_ratio": 0.999}])
@pytest.mark.parametrize("continuation", ["stop", "regenerate"])
@pytest.mark.parametrize("block_size", [0, 3])
def test_on_policy_step_runs_scrg_and_logs_its_metrics(tokenizer, tmp_path, rule, continuation, block_size):
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=8, scrg_continuation=continuation,
                   scrg_block_size=block_size, **rule)
    batch = on_policy_batch(trainer)
    metrics = trainer._metrics["train"]
    for key in ("scrg_corrected_frac", "scrg_error_pos", "scrg_divergence", "scrg_regen_len"):
        assert len(metrics[f"mgsr/{key}"]) == 1
    # Random tiny models disagree almost everywhere: SCRG corrects some row.
    assert metrics["mgsr/scrg_corrected_frac"][0] > 0
    completion = batch["labels"][:, batch["prompts"].shape[1]:] != -100
    assert int(completion.sum(1).max()) <= 8  # never beyond max_new_tokens


@pytest.mark.parametrize("block_size, divergence", [(0, "forward"), (3, "forward"), (0, "reverse")])
def test_correction_term_is_the_kl_at_each_corrected_token(tokenizer, tmp_path, monkeypatch, block_size, divergence):
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=8, scrg_error="first_rejected",
                   scrg_reject_ratio=0.999, scrg_block_size=block_size, scrg_correction_weight=2.0,
                   scrg_correction_divergence=divergence)
    results = []
    scrg = trainer._scrg
    monkeypatch.setattr(trainer, "_scrg", lambda *a, **k: results.append(scrg(*a, **k)) or results[-1])
    batch = on_policy_batch(trainer)
    result, prompt_width = results[0], batch["prompts"].shape[1]
    kept = batch["mgsr_correction_labels"]
    rows, cols = (kept != -100).nonzero(as_tuple=True)
    assert len(rows) > 0 and torch.equal(rows, result.corrected.nonzero().squeeze(1))  # one token per corrected row
    assert torch.equal(cols - prompt_width, result.error_pos[rows])  # at the correction ...
    assert torch.equal(kept[rows, cols], result.teacher_token[rows])  # ... which holds the teacher's token
    assert torch.equal(batch["labels"][rows, cols], kept[rows, cols])

    counts = trainer.count_items([batch])
    assert counts["correction"] == len(rows)
    with torch.no_grad():
        with_term = trainer.compute_loss(trainer.model, batch, num_items_in_batch=counts)
        logits = trainer._forward(trainer.model, batch["input_ids"], batch["attention_mask"]).logits
        teacher = trainer.teacher_logits(batch)
        trainer.args.scrg_correction_weight = 0.0
        without = trainer.compute_loss(trainer.model, batch, num_items_in_batch=counts)
    # KL(teacher || student) (or KL(student || teacher)) of the position predicting each corrected token, mean over
    # the corrections
    log_p, log_q = (F.log_softmax(x[rows, cols - 1].double(), -1) for x in (teacher, logits))
    if divergence == "reverse":
        log_p, log_q = log_q, log_p
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert torch.allclose((with_term - without).double(), 2.0 * kl, atol=1e-5)
    assert len(trainer._metrics["train"]["mgsr/correction"]) == 1


def test_scrg_rounds_zero_is_gkds_hook(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, lmbda=1.0, scrg_rounds=0)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    torch.manual_seed(3)
    ours = trainer.generate_on_policy_outputs(trainer.model, dict(batch), trainer.generation_config)
    torch.manual_seed(3)
    gkd = GKDTrainer.generate_on_policy_outputs(trainer.model, dict(batch), trainer.generation_config)
    for a, b in zip(ours, gkd):
        assert torch.equal(a, b)
    assert "mgsr/scrg_corrected_frac" not in trainer._metrics["train"]


def test_sampling_logits_equal_teacher_forced_student_logits(tokenizer, tmp_path):
    # SCRG's first round reuses the sampling pass's logits instead of a student forward; they must agree.
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=8)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model, prompts, mask = trainer.model, batch["prompts"], batch["prompt_attention_mask"]
    out = model.generate(input_ids=prompts, attention_mask=mask, generation_config=trainer.generation_config,
                         return_dict_in_generate=True, output_logits=True)
    ids, cmask = completion_from_generate(out.sequences, prompts.shape[1], trainer.generation_config.eos_token_id)
    full_mask = torch.cat([mask, cmask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits
    forced = logits[:, prompts.shape[1] - 1 : -1]
    sampled = torch.stack(out.logits, dim=1)
    real = cmask.bool()
    torch.testing.assert_close(sampled[real], forced[real], rtol=1e-4, atol=1e-4)


def test_full_training_run_lmbda_one_with_lora(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, peft=True, lmbda=1.0, max_steps=3)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "mgsr/scrg_corrected_frac" in e]
    assert len(logged) == 3 and all(e["mgsr/on_policy"] == 1.0 for e in logged)


@pytest.mark.parametrize("continuation", ["regenerate", "stop"])
@pytest.mark.parametrize("block_size", [0, 3])
def test_reused_scrg_teacher_logits_give_the_same_loss_and_gradients(tokenizer, tmp_path, continuation, block_size):
    # The loss takes SCRG's teacher logits where the revised rows still match them; with the cache dropped the
    # teacher runs on the whole batch. Same loss, same student gradients, either way.
    # At ratio 0.5 the random tiny teacher rejects a token in some rows and none in others (seed 0).
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=8, scrg_error="first_rejected",
                   scrg_reject_ratio=0.5, scrg_continuation=continuation, per_device_train_batch_size=8,
                   scrg_block_size=block_size)
    torch.manual_seed(0)
    batch = on_policy_batch(trainer)
    corrected = trainer._metrics["train"]["mgsr/scrg_corrected_frac"][0]
    assert 0 < corrected < 1
    completion = batch["labels"][:, batch["prompts"].shape[1]:] != -100
    reused = batch["mgsr_teacher_valid"] >= completion.sum(1)
    # revising after sampling, a re-generated row needs the teacher again; revising while sampling, none does
    all_reused = continuation == "stop" or block_size > 0
    assert reused.any() and all_reused == bool(reused.all())
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def loss_and_grads(inputs):
        for p in params:
            p.grad = None
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    calls = []
    hook = trainer.teacher_model.register_forward_hook(lambda m, a, k, out: calls.append(k["input_ids"].shape[0]),
                                                       with_kwargs=True)
    loss, grads = loss_and_grads(dict(batch))
    fresh = {k: v for k, v in batch.items() if k not in ("mgsr_teacher_logits", "mgsr_teacher_valid")}
    ref_loss, ref_grads = loss_and_grads(fresh)
    hook.remove()
    assert calls == ([] if all_reused else [int((~reused).sum())]) + [batch["input_ids"].shape[0]]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads):  # SCRG while sampling: teacher logits from KV-cached forwards, float32 noise
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6 if block_size == 0 else 1e-5)


@pytest.mark.parametrize("block_size", [0, 3])
def test_scrg_stop_ends_corrected_rows_at_the_correction_without_generating(tokenizer, tmp_path, block_size):
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=8, scrg_error="first_rejected",
                   scrg_reject_ratio=0.999, scrg_continuation="stop", scrg_block_size=block_size)
    generate_calls = []
    original = trainer.model.generate
    trainer.model.generate = lambda *a, **k: generate_calls.append(1) or original(*a, **k)
    on_policy_batch(trainer)
    metrics = trainer._metrics["train"]
    assert generate_calls == ([1] if block_size == 0 else [])  # the sampling pass only, or SCRG's own decoding
    assert metrics["mgsr/scrg_corrected_frac"][0] > 0 and metrics["mgsr/scrg_regen_len"][0] == 0


@pytest.mark.parametrize("overrides,streamed", [
    ({}, True),  # the default: SCRG while sampling
    ({"scrg_block_size": 0}, False),
    ({"scrg_error": "max_divergence"}, False),  # needs the whole sample
])
def test_scrg_runs_while_sampling_where_it_can(tokenizer, tmp_path, monkeypatch, overrides, streamed):
    import trl_mgsr.trainer as trainer_module

    used = []
    for name in ("stream_scrg", "scrg_revise"):
        original = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    trainer = make(tokenizer, tmp_path, lmbda=1.0, max_new_tokens=8, **overrides)
    on_policy_batch(trainer)
    assert used == ["stream_scrg" if streamed else "scrg_revise"]
    trainer.generation_config.repetition_penalty = 1.3  # a sampling setting the decoding loop does not apply
    used.clear()
    on_policy_batch(trainer)
    assert used == ["scrg_revise"]
