"""One SGD step of MGSRTrainer on fixed data; returns the weight change (= -gradient with lr 1) of the student and,
under keys `band.*`, of the DAC-KL band sub-network.

Imported by the tests for the single-process runs and launched with `torchrun` for the multi-process ones:
`torchrun --nproc_per_node 2 tests/grad_step.py OUT.pt PER_DEVICE GA SFT DAC SPAN LMBDA [STEPS LORA]`.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset

from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.testing import build_pair, build_tokenizer, toy_rows


def grad_step(output_dir, per_device, ga, sft=1.0, dac=1.0, span=0.0, lmbda=0.0, steps=1, lora=False):
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    student, teacher = build_pair(tokenizer, "llama")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    # Answers of different lengths, so a mean of micro-batch means would differ from the token mean.
    rows = toy_rows(4 * steps)
    args = MGSRConfig(
        str(output_dir),
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=ga,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        save_strategy="steps" if steps > 1 else "no",  # multi-step runs end with a checkpoint
        save_steps=steps,
        logging_steps=1,
        max_new_tokens=5,
        max_length=64,
        sft_weight=sft,
        dac_weight=dac,
        span_weight=span,
        lmbda=lmbda,
        # fully on-policy there are no data labels for the band's own objective: the joint one still trains it, so
        # that the band's gradient sync across ranks is exercised
        dac_band_objective="joint" if lmbda >= 1 else "label",
        dac_learning_rate=1.0,
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = MGSRTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_config,
    )
    band = trainer.dac_band_net
    band_before = {k: v.detach().clone() for k, v in band.named_parameters()} if band is not None else {}
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    delta = {k: (v.detach().cpu() - before[k]) for k, v in model.named_parameters()}
    if band is not None:
        delta.update({f"band.{k}": (v.detach().cpu() - band_before[k]) for k, v in band.named_parameters()})
    return delta, trainer


if __name__ == "__main__":
    out, per_device, ga, sft, dac, span, lmbda = sys.argv[1:8]
    steps, lora = (int(sys.argv[8]), sys.argv[9] == "lora") if len(sys.argv) > 8 else (1, False)
    delta, trainer = grad_step(
        os.path.dirname(out), int(per_device), int(ga), float(sft), float(dac), float(span), float(lmbda), steps, lora
    )
    if trainer.accelerator.is_main_process:
        torch.save(delta, out)
    else:  # every rank must end with the same weights
        torch.save(delta, out + ".rank1")
    # Leave together: a rank exiting while the other still runs a collective aborts gloo ("terminate called ...").
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
