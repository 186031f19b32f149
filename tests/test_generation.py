"""`pure_sampling`: samples come from the model's distribution, not from settings saved with the checkpoint."""

import copy

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.generation import pure_sampling
from trl_mgsr.testing import build_pair, toy_rows

# what a checkpoint's generation_config.json may carry; suppressing most ids makes any leak visible
SAVED_SETTINGS = {"repetition_penalty": 5.0, "suppress_tokens": list(range(20, 512))}


def sample(model, tokenizer, seed=0):
    prompt = tokenizer(["What is the capital of France?"], return_tensors="pt")
    config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=12,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return model.generate(**prompt, generation_config=config)


@pytest.mark.parametrize("peft", [False, True])
def test_saved_generation_settings_do_not_reach_the_samples(peft, tokenizer):
    clean, _ = build_pair(tokenizer)
    tuned = copy.deepcopy(clean)
    tuned.generation_config.update(**SAVED_SETTINGS)
    if peft:
        config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
        clean, tuned = get_peft_model(clean, config), get_peft_model(tuned, copy.deepcopy(config))
    reference = sample(clean, tokenizer)
    assert not torch.equal(sample(tuned, tokenizer), reference)  # the saved settings do change plain generate
    with pure_sampling(tuned):
        assert torch.equal(sample(tuned, tokenizer), reference)
    inner = tuned.get_base_model() if peft else tuned
    assert inner.generation_config.repetition_penalty == 5.0  # restored afterwards


def test_on_policy_samples_ignore_the_students_saved_settings(tokenizer, tmp_path):
    def first_sample(student_settings):
        student, teacher = build_pair(tokenizer)
        student.generation_config.update(**student_settings)
        args = tiny_args(MGSRConfig, tmp_path, lmbda=1.0, scrg_rounds=0, gradient_checkpointing=False,
                         max_new_tokens=12)
        trainer = MGSRTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(toy_rows(4)))
        batch = trainer.data_collator(toy_rows(2))
        torch.manual_seed(0)
        return trainer.prepare_distillation_batch(batch)["input_ids"]

    assert torch.equal(first_sample(SAVED_SETTINGS), first_sample({}))
