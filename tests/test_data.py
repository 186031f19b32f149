import pytest
import torch
from datasets import Dataset

from conftest import tiny_args
from trl_mgsr import MGSRConfig, MGSRDataCollator, MGSRTrainer
from trl_mgsr.testing import build_pair, build_tokenizer, toy_rows


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "conversational"])
def test_each_format_trains(fmt, tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = MGSRTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(MGSRConfig, tmp_path, max_steps=3, lmbda=0.5),
        train_dataset=Dataset.from_list(toy_rows(8, fmt)),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "conversational"])
def test_collator_labels_cover_exactly_the_completion(fmt, tokenizer):
    rows = toy_rows(3, fmt)
    batch = MGSRDataCollator(tokenizer, max_length=256)(rows)
    for i, row in enumerate(rows):
        completion_ids = batch["input_ids"][i][batch["labels"][i] != -100]
        text = tokenizer.decode(completion_ids)
        answer = row["messages"][-1]["content"] if fmt == "messages" else (
            row["completion"] if fmt == "prompt_completion" else row["completion"][0]["content"]
        )
        assert answer.strip() in text and text.endswith(tokenizer.eos_token)
        # The prompt tensor is the sequence minus its completion, left-padded the same way.
        n_prompt = int(batch["prompt_attention_mask"][i].sum())
        real = batch["input_ids"][i][batch["attention_mask"][i] == 1]
        assert torch.equal(batch["prompts"][i][-n_prompt:], real[:n_prompt])
        assert len(real) == n_prompt + len(completion_ids)


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "conversational"])
@pytest.mark.parametrize("max_length", [None, 12])
def test_a_batch_holds_each_row_as_collated_alone(fmt, max_length, tokenizer):
    """The collator tokenizes a batch in one call per column and pads it in one go: every row of the batch must be
    that row collated on its own, left-padded (prompt, sequence, masks, labels)."""
    rows = toy_rows(5, fmt)
    rows[1] = {**rows[1]}  # a longer row, so the others are padded (and, with max_length, cut)
    if fmt == "prompt_completion":
        rows[1]["completion"] = " and so on" * 6 + rows[1]["completion"]
    elif fmt == "messages":
        rows[1]["messages"] = rows[1]["messages"][:-1] + [{"role": "assistant", "content": "so on " * 6}]
    else:
        rows[1]["completion"] = [{"role": "assistant", "content": "so on " * 6}]
    collate = MGSRDataCollator(tokenizer, max_length=max_length)
    batch = collate(rows)
    for i, row in enumerate(rows):
        alone = collate([row])
        for key, mask_key in [("input_ids", "attention_mask"), ("labels", "attention_mask"),
                              ("attention_mask", "attention_mask"), ("prompts", "prompt_attention_mask")]:
            width = alone[key].shape[1]
            assert torch.equal(batch[key][i, -width:], alone[key][0]), (key, i)
            assert not batch[mask_key][i, :-width].any(), (key, i)  # the rest is padding
        assert (batch["labels"][i, : -alone["labels"].shape[1]] == -100).all()


def test_pad_equal_to_eos_keeps_the_end_token_in_labels():
    tok = build_tokenizer(same_pad_and_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    batch = MGSRDataCollator(tok, max_length=256)(toy_rows(3, "prompt_completion"))
    for i in range(3):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert labelled[-1] == tok.eos_token_id  # the end token is a target ...
        assert (labelled == tok.eos_token_id).sum() == 1  # ... and padding (same id) is not


def test_truncation_keeps_the_prompt_and_cuts_the_completion(tokenizer):
    row = {"prompt": "Question: what is the capital of France?", "completion": " Paris " * 40}
    prompt_len = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    batch = MGSRDataCollator(tokenizer, max_length=prompt_len + 5)([row])
    assert batch["input_ids"].shape[1] == prompt_len + 5
    assert int(batch["prompt_attention_mask"].sum()) == prompt_len
    assert int((batch["labels"] != -100).sum()) == 5


def test_prompt_longer_than_max_length_keeps_one_completion_token(tokenizer):
    row = {"prompt": "word " * 100, "completion": " end"}
    batch = MGSRDataCollator(tokenizer, max_length=16)([row])
    assert batch["input_ids"].shape[1] == 16
    assert int((batch["labels"] != -100).sum()) == 1


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"text": "hello"}], r"no column `messages` \(or `prompt` and `completion`\)"),
        ([{"prompt": "hello"}], r"no column `completion`"),
        ([{"messages": "not a list"}], r"column `messages` must be a non-empty list"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}],
         r"last message of column `messages` must have role 'assistant'"),
        ([{"prompt": "q", "completion": 3}], r"columns `prompt` and `completion` must both be strings"),
        ([{"prompt": [{"role": "user", "content": "q"}], "completion": [{"content": "a"}]}],
         r"column `completion` must be a non-empty list"),
    ],
)
def test_malformed_dataset_fails_at_construction_naming_the_column(rows, match, tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    with pytest.raises(ValueError, match=match):
        MGSRTrainer(
            model=student,
            teacher_model=teacher,
            args=tiny_args(MGSRConfig, tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


def test_malformed_later_row_fails_in_the_collator_naming_row_and_column(tokenizer):
    rows = toy_rows(2, "messages") + [{"messages": [{"role": "user", "content": "only a question"}]}]
    with pytest.raises(ValueError, match=r"Row 2: the last message of column `messages`"):
        MGSRDataCollator(tokenizer)(rows)


def test_eval_dataset_is_validated_too(tokenizer, tmp_path):
    student, teacher = build_pair(tokenizer)
    with pytest.raises(ValueError, match=r"eval_dataset\['held'\]"):
        MGSRTrainer(
            model=student,
            teacher_model=teacher,
            args=tiny_args(MGSRConfig, tmp_path),
            train_dataset=Dataset.from_list(toy_rows(4)),
            eval_dataset={"held": Dataset.from_list([{"question": "x"}])},
            processing_class=tokenizer,
        )


def bos_tokenizer():
    """The test tokenizer, made to add BOS like Llama's (`tokenizer(text)` starts with `<bos>`)."""
    from tokenizers import processors

    tok = build_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


def test_string_prompts_start_with_bos_once_as_in_trl_sft():
    tok = bos_tokenizer()
    rows = [{"prompt": "What is 2+2?", "completion": "4"}, {"prompt": "<bos>Say hi.", "completion": "hi"}]
    batch = MGSRDataCollator(tok)(rows)
    for i in range(2):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        prompt = batch["prompts"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert prompt == tok(rows[i]["prompt"].removeprefix("<bos>"))["input_ids"]  # what TRL's SFT tokenizes
    assert (batch["labels"][:, -1] == tok.eos_token_id).all()
    assert (batch["labels"][batch["input_ids"] == tok.bos_token_id] == -100).all()


def test_rendered_conversations_get_no_extra_bos():
    tok = bos_tokenizer()  # its chat template writes no BOS: none is added to the rendered text
    batch = MGSRDataCollator(tok)(toy_rows(2, "messages"))
    assert not (batch["input_ids"] == tok.bos_token_id).any()
