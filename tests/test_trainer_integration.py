"""MGSRTrainer inside the rest of TRL/transformers: the features a GKD user may turn on keep working."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback, get_linear_schedule_with_warmup

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRTrainer
from trl_mgsr.testing import CHAT_TEMPLATE, build_llama, build_pair, build_tokenizer, toy_rows


def make(tokenizer, tmp_path, student=None, teacher=None, train=None, trainer_kwargs=None, **overrides):
    if student is None:
        student, teacher = build_pair(tokenizer)
    args = tiny_args(MGSRConfig, tmp_path, **{"gradient_checkpointing": False, "lmbda": 0.0, **overrides})
    return MGSRTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                       train_dataset=train if train is not None else Dataset.from_list(toy_rows(8)),
                       **(trainer_kwargs or {}))


def test_activation_offloading_context_wraps_each_step(tokenizer, tmp_path):
    class Counting:
        entered = 0

        def __enter__(self):
            Counting.entered += 1

        def __exit__(self, *exc):
            return False

    trainer = make(tokenizer, tmp_path)
    trainer.maybe_activation_offload_context = Counting()  # what SFTTrainer installs for `activation_offloading`
    trainer.train()
    assert Counting.entered == 2


def test_user_optimizer_and_scheduler(tokenizer, tmp_path):
    """The user's scheduler was built over their optimizer's groups: the band net gets its own optimizer."""
    student, teacher = build_pair(tokenizer)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=4)
    trainer = make(tokenizer, tmp_path, student, teacher, max_steps=4,
                   trainer_kwargs={"optimizers": (optimizer, scheduler)})
    before = {k: v.clone() for k, v in trainer.dac_band_net.state_dict().items()}
    trainer.train()
    assert len(optimizer.param_groups) == 1 and trainer.state.global_step == 4
    after = trainer.dac_band_net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_max_grad_norm_clips_the_band_net_with_the_student(tokenizer, tmp_path):
    norms = []

    class Probe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for p in [*trainer.model.parameters(), *trainer.dac_band_net.parameters()]
                     if p.grad is not None]
            band = [p.grad for p in trainer.dac_band_net.parameters()]
            norms.append((torch.norm(torch.stack([g.norm() for g in grads])).item(), all(g is not None for g in band)))

    trainer = make(tokenizer, tmp_path, max_grad_norm=1e-3, dac_weight=10.0, trainer_kwargs={"callbacks": [Probe()]})
    trainer.train()
    assert len(norms) == 2
    for total, band_has_grads in norms:
        assert band_has_grads and total == pytest.approx(1e-3, rel=1e-3)


def test_resume_true_without_checkpoint_raises(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path)
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        trainer.train(resume_from_checkpoint=True)


def test_seq_kd_teacher_never_samples_ids_the_student_lacks(tokenizer, tmp_path):
    vocab = len(tokenizer)
    student = build_llama(tokenizer, hidden_size=32, num_layers=2, seed=0)
    teacher = build_llama(tokenizer, hidden_size=64, num_layers=3, vocab_size=vocab + 64, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight[vocab:] = 0.0  # padding rows (logit 0), competitive with a flattened teacher
        teacher.lm_head.weight[:vocab] *= 0.05
    trainer = make(tokenizer, tmp_path, student, teacher, seq_kd=True, truncate_teacher_vocab=True, max_new_tokens=16)
    assert trainer.teacher_generation_config.suppress_tokens == list(range(vocab, vocab + 64))
    trainer.train()
    assert trainer.state.global_step == 2


def test_streaming_dataset(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, train=Dataset.from_list(toy_rows(8)).to_iterable_dataset())
    trainer.train()
    assert trainer.state.global_step == 2


def test_streaming_dataset_is_validated_on_its_first_row(tokenizer, tmp_path):
    bad = Dataset.from_list([{"text": "no prompt here"}] * 4).to_iterable_dataset()
    with pytest.raises(ValueError, match=r"train_dataset: .*columns"):
        make(tokenizer, tmp_path, train=bad)


def test_chat_template_path_is_applied_before_validation(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    trainer = make(tokenizer, tmp_path / "out", chat_template_path=str(template))
    trainer.train()
    assert trainer.processing_class.chat_template == CHAT_TEMPLATE


def test_setting_lmbda_changes_the_coin(tokenizer, tmp_path):
    class GoOnPolicy(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer.lmbda = 1.0

    trainer = make(tokenizer, tmp_path, max_steps=3, trainer_kwargs={"callbacks": [GoOnPolicy()]})
    trainer.train()
    assert [e["mgsr/on_policy"] for e in trainer.state.log_history if "mgsr/on_policy" in e] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("peft", [False, True])
def test_teacher_sharing_the_students_weights_is_refused(peft, tokenizer, tmp_path):
    from peft import LoraConfig

    student, _ = build_pair(tokenizer)
    kwargs = {"peft_config": LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")} if peft else {}
    with pytest.raises(ValueError, match="shares weights with the student"):
        make(tokenizer, tmp_path, student, student, trainer_kwargs=kwargs)


def test_adaptive_schedule_without_evaluation_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"schedule='adaptive'.*no evaluation.*eval_dataset"):
        make(tokenizer, tmp_path, schedule="adaptive")
    with pytest.warns(UserWarning, match="init_threshold=0.5 for the whole run"):
        make(tokenizer, tmp_path, schedule="adaptive", init_threshold=0.5)
    evaluated = make(tokenizer, tmp_path, schedule="adaptive", eval_strategy="steps", eval_steps=1,
                     trainer_kwargs={"eval_dataset": Dataset.from_list(toy_rows(2))})
    assert evaluated.schedule.threshold == 0.0


def test_model_card_is_titled_after_the_output_directory(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path / "my-student")
    trainer.create_model_card(dataset_name="some/dataset")
    card = (tmp_path / "my-student" / "README.md").read_text()
    assert "# Model Card for my-student" in card


def test_only_the_trainers_own_evaluation_drives_the_adaptive_schedule(tokenizer, tmp_path):
    trainer = make(tokenizer, tmp_path, schedule="adaptive", eval_strategy="steps", eval_steps=1,
                   trainer_kwargs={"eval_dataset": Dataset.from_list(toy_rows(2))})
    trainer.evaluate(Dataset.from_list(toy_rows(4)))  # an ad hoc dataset
    assert trainer.schedule.last_eval_loss is None
    metrics = trainer.evaluate()
    assert trainer.schedule.last_eval_loss == metrics["eval_loss"]


def test_collator_pickles_without_the_trainer(tokenizer, tmp_path):
    """DataLoader workers started with spawn pickle the collator: it must not drag the models along."""
    import pickle

    trainer = make(tokenizer, tmp_path, dataloader_num_workers=1, span_weight=0.1)  # the collator computes span ids
    collator = pickle.loads(pickle.dumps(trainer.data_collator))
    assert len(pickle.dumps(trainer.data_collator)) < 200_000
    torch.testing.assert_close(collator(toy_rows(2))["span_ids"], trainer.data_collator(toy_rows(2))["span_ids"])
