"""Dataset formats accepted by `MGSRTrainer` and the collator that turns rows into distillation batches.

Accepted rows (one format per dataset):
- `messages`: a conversation whose last message is the assistant's answer (GKD's format);
- `prompt` + `completion` as strings (TRL's standard prompt-completion format);
- `prompt` + `completion` as message lists (TRL's conversational prompt-completion format).

Conversations are rendered with the tokenizer's chat template (which writes any BOS itself). For the standard format
the prompt starts with the tokenizer's leading special tokens (BOS for Llama-style tokenizers) and the completion gets
the eos token appended unless it already ends with it, as TRL's SFT tokenizes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

FORMAT_HELP = (
    "MGSRTrainer accepts rows with a `messages` column (a list of {'role', 'content'} dicts ending with the "
    "assistant's answer) or with `prompt` and `completion` columns (both strings, or both lists of messages)."
)


def detect_format(columns: Sequence[str]) -> str:
    """Return "messages" or "prompt_completion" for a dataset with these columns, or raise naming what is missing."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    missing = "`completion`" if "prompt" in columns else "`messages` (or `prompt` and `completion`)"
    raise ValueError(f"The dataset has columns {sorted(columns)} but no column {missing}. {FORMAT_HELP}")


def _check_messages(value: Any, column: str, row: int, need_assistant_last: bool) -> None:
    ok = isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise ValueError(
            f"Row {row}: column `{column}` must be a non-empty list of {{'role': str, 'content': str}} dicts, "
            f"got {str(value)[:120]!r}."
        )
    if need_assistant_last and value[-1]["role"] != "assistant":
        raise ValueError(
            f"Row {row}: the last message of column `{column}` must have role 'assistant' (the completion to "
            f"distill), got role {value[-1]['role']!r}."
        )


def split_prompt_completion(example: dict, tokenizer, row: int = 0) -> tuple[str, str]:
    """Render one row as `(prompt_text, completion_text)`; raise a `ValueError` naming the bad column."""
    if "messages" in example:
        messages = example["messages"]
        _check_messages(messages, "messages", row, need_assistant_last=True)
        if len(messages) < 2:
            raise ValueError(f"Row {row}: column `messages` needs at least one prompt message before the answer.")
        return _render_conversation(messages[:-1], messages[-1:], tokenizer, row, "messages")
    if "prompt" not in example or "completion" not in example:
        raise ValueError(f"Row {row} has columns {sorted(example)}. {FORMAT_HELP}")
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        eos = tokenizer.eos_token or ""
        return prompt, completion if completion.endswith(eos) else completion + eos
    if isinstance(prompt, list) and isinstance(completion, list):
        _check_messages(prompt, "prompt", row, need_assistant_last=False)
        _check_messages(completion, "completion", row, need_assistant_last=True)
        return _render_conversation(prompt, completion, tokenizer, row, "completion")
    raise ValueError(
        f"Row {row}: columns `prompt` and `completion` must both be strings or both be lists of messages, got "
        f"{type(prompt).__name__} and {type(completion).__name__}."
    )


def _render_conversation(prompt_msgs, completion_msgs, tokenizer, row, column) -> tuple[str, str]:
    if tokenizer.chat_template is None:
        raise ValueError(
            f"Row {row}: column `{column}` holds messages but the tokenizer has no chat template; set "
            "`tokenizer.chat_template` or use the standard prompt/completion string format."
        )
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            f"Row {row}: the chat template does not render the prompt as a prefix of the full conversation, so the "
            "completion cannot be located; use a template whose generation prompt is a prefix of the next turn."
        )
    return prompt_text, full_text[len(prompt_text) :]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Ids of a plain-text prompt with the tokenizer's leading special tokens (e.g. BOS), as `tokenizer(text)` adds
    them, but never twice: a text that already starts with them (e.g. a rendered chat template) is kept as it is."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # length is the caller's business
    return with_prefix(ids, _special_prefix(tokenizer))


def with_prefix(ids: list[int], prefix: list[int]) -> list[int]:
    """`ids` starting with `prefix` (added unless already there)."""
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens `tokenizer(text)` puts before the text's own ids ([] for most GPT-style tokenizers)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Left-pad lists of ints to one `[B, max_len]` long tensor."""
    width = max((len(r) for r in rows), default=0)
    padded = [[value] * (width - len(r)) + list(r) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token, counted from there (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class MGSRDataCollator:
    """Collate raw rows into a left-padded distillation batch.

    Returns `input_ids`, `attention_mask`, `labels` (`[B, T]`, -100 on prompt and padding), `prompts` and
    `prompt_attention_mask` (`[B, P]`, the prompts alone, left-padded, for generation) and, when a span
    extractor is given, `span_ids` (`[B, T]`, -1 outside spans).

    Truncation to `max_length` cuts the completion on the right; a prompt longer than `max_length - 1` tokens
    keeps its last `max_length - 1` tokens so that at least one completion token remains.
    """

    tokenizer: Any
    max_length: int | None = 1024
    span_fn: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token; set one (e.g. `tokenizer.pad_token = tokenizer.eos_token`)."
            )
        self._prefix = _special_prefix(self.tokenizer)

    def encode(self, example: dict[str, Any], row: int = 0) -> tuple[list[int], list[int]]:
        """`(prompt_ids, completion_ids)` of one row, before truncation."""
        return self.encode_rows([example], first_row=row)[0]

    def encode_rows(self, examples: list[dict[str, Any]], first_row: int = 0) -> list[tuple[list[int], list[int]]]:
        """`(prompt_ids, completion_ids)` of each row, before truncation: the texts of every row, then one tokenizer
        call for all prompts and one for all completions (a call per text cost more than the step's loss on the
        lab). A malformed row raises a `ValueError` naming it (`first_row` + its index)."""
        texts = [split_prompt_completion(example, self.tokenizer, row=first_row + i)
                 for i, example in enumerate(examples)]
        # verbose=False: no "longer than the specified maximum sequence length" message; `truncation_report` is ours
        prompts, completions = (self.tokenizer([t[k] for t in texts], add_special_tokens=False,
                                               verbose=False)["input_ids"] for k in (0, 1))
        # standard format: BOS as TRL's SFT adds it; a rendered conversation is kept as it is
        prompts = [with_prefix(ids, self._prefix) if isinstance(example.get("prompt"), str) else ids
                   for ids, example in zip(prompts, examples)]
        return list(zip(prompts, completions))

    def truncate(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
        """Fit `max_length`: the completion loses its end; a prompt over `max_length - 1` keeps its last tokens."""
        if self.max_length is None:
            return prompt_ids, completion_ids
        prompt_ids = prompt_ids[-(self.max_length - 1) :] if self.max_length > 1 else prompt_ids[-1:]
        return prompt_ids, completion_ids[: max(self.max_length - len(prompt_ids), 1)]

    def truncation_report(self, rows, name: str = "dataset", limit: int = 1000) -> str | None:
        """A one-line warning counting the rows among the first `limit` that `max_length` truncates, or None."""
        if self.max_length is None:
            return None
        checked = cut_prompts = cut_completions = 0
        for i, example in enumerate(rows):
            if i >= limit:
                break
            checked += 1
            try:
                prompt_ids, completion_ids = self.encode(example, row=i)
            except ValueError:  # a malformed row is the collator's error to raise, with its position
                continue
            if len(prompt_ids) > self.max_length - 1:
                cut_prompts += 1
            elif len(prompt_ids) + len(completion_ids) > self.max_length:
                cut_completions += 1
        if not cut_prompts + cut_completions:
            return None
        parts = []
        if cut_prompts:
            parts.append(f"{cut_prompts} prompt(s) are longer than max_length - 1 and keep only their last "
                         f"{self.max_length - 1} tokens (cut on the left) with a 1-token completion")
        if cut_completions:
            parts.append(f"{cut_completions} completion(s) lose their end (cut on the right)")
        scope = f"the first {checked}" if checked == limit else f"{checked}"
        return (f"{name}: {cut_prompts + cut_completions} of {scope} rows are longer than max_length="
                f"{self.max_length} tokens: {'; '.join(parts)}. Raise max_length or shorten those rows.")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        try:
            encoded = self.encode_rows(examples)
        except ValueError as err:  # only a dataset's first row is checked at trainer construction
            raise ValueError(f"A batch has a malformed row (rows counted within the batch): {err}") from None
        prompts, sequences = [], []
        for prompt_ids, completion_ids in encoded:
            prompt_ids, completion_ids = self.truncate(prompt_ids, completion_ids)
            prompts.append(prompt_ids)
            sequences.append(prompt_ids + completion_ids)

        pad = self.tokenizer.pad_token_id
        input_ids = left_pad(sequences, pad)
        width = input_ids.shape[1]
        padding = width - torch.tensor([len(s) for s in sequences], dtype=torch.long).unsqueeze(1)
        completion_start = padding + torch.tensor([len(p) for p in prompts], dtype=torch.long).unsqueeze(1)
        positions = torch.arange(width).unsqueeze(0)
        batch = {
            "input_ids": input_ids,
            "attention_mask": (positions >= padding).long(),
            "labels": input_ids.masked_fill(positions < completion_start, -100),
            "prompts": left_pad(prompts, pad),
            "prompt_attention_mask": left_pad([[1] * len(p) for p in prompts], 0),
        }
        if self.span_fn is not None:
            batch["span_ids"] = self.span_fn(self.tokenizer, input_ids, batch["labels"] != -100)
        return batch
