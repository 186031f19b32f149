"""A training script written against GKDConfig/GKDTrainer runs unchanged with MGSRConfig/MGSRTrainer."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM
from trl.experimental.gkd import GKDConfig, GKDTrainer

from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.testing import build_pair, toy_rows


def gkd_script(Config, Trainer, tokenizer, output_dir, peft=False, **overrides):
    """What a GKD user's script looks like; only the two class names change between runs."""
    student, teacher = build_pair(tokenizer, "llama")
    train = Dataset.from_list(toy_rows(8))
    evaluation = Dataset.from_list(toy_rows(4))
    args = Config(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_new_tokens=6,
        max_length=64,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        **overrides,
    )
    trainer = Trainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        if peft
        else None,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(output_dir / "final"))
    return trainer, metrics


CASES = {
    "full_lmbda0": dict(lmbda=0.0),
    "full_lmbda_half": dict(lmbda=0.5),
    "full_lmbda1": dict(lmbda=1.0),
    "seq_kd": dict(lmbda=0.0, seq_kd=True),
    "grad_accum_2": dict(lmbda=0.5, gradient_accumulation_steps=2),
    "lora": dict(lmbda=0.5, peft=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gkd_script_runs_with_mgsr(case, tokenizer, tmp_path):
    overrides = dict(CASES[case])
    peft = overrides.pop("peft", False)
    trainer, metrics = gkd_script(MGSRConfig, MGSRTrainer, tokenizer, tmp_path, peft=peft, **overrides)
    assert trainer.state.global_step == 2
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"mgsr/dac_kl", "eval_mgsr/dac_kl"} <= logged and "mgsr/sft" not in logged  # SFT term off by default
    assert (tmp_path / "checkpoint-2" / "mgsr_state.pt").is_file()

    if peft:
        assert isinstance(trainer.model, PeftModel)
        base, _ = build_pair(tokenizer, "llama")
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "final"))
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    trained = trainer.model.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, trained(ids).logits)


def test_same_script_is_a_valid_gkd_script(tokenizer, tmp_path):
    # Guards the test above: the script really is a GKD script (it runs with TRL's own classes).
    trainer, metrics = gkd_script(GKDConfig, GKDTrainer, tokenizer, tmp_path, lmbda=0.5)
    assert trainer.state.global_step == 2 and "eval_loss" in metrics


def test_model_card_names_mgsr(tokenizer, tmp_path):
    trainer, _ = gkd_script(MGSRConfig, MGSRTrainer, tokenizer, tmp_path, lmbda=0.0)
    card = (tmp_path / "README.md").read_text()  # written with every checkpoint, as TRL does
    assert "MGSR" in card and "2407.10068" in card and "mgsr" in card
