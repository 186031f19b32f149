"""Offline fixtures: a tokenizer trained on the fly and tiny student/teacher models built from configs.

Used by the test suite, the demo and the benchmarks. Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"

#: A ChatML-like template: `<|role|>\ncontent<eos>` per message, generation prompt `<|assistant|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student model to imitate a large teacher model.",
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea and the sky.",
    "The student makes mistakes, and the teacher corrects them one token at a time.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "List three colors: red, green and blue.",
    "Translate to German: good morning. Guten Morgen.",
    "Numbers like 42 and 3.14 appear in text, as do émigrés, naïve cafés and 東京.",
    "A transformer predicts the next token from the previous tokens.",
]


def build_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 512, same_pad_and_eos: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (default: `SAMPLE_TEXTS`) in memory.

    The tokenizer pads on the left, has a chat template, and `pad`/`eos`/`bos` special tokens. With
    `same_pad_and_eos=True` the pad token is the eos token (the Llama/Qwen convention that breaks naive masking).
    """
    texts = list(texts) if texts is not None else SAMPLE_TEXTS * 4
    specials = [PAD, EOS, BOS, "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS if same_pad_and_eos else PAD,
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _special_token_kwargs(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_llama(tokenizer, hidden_size: int = 32, num_layers: int = 2, vocab_size: int | None = None, seed: int = 0):
    """A tiny randomly initialised `LlamaForCausalLM` (float32, eager attention) sized to `tokenizer`."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="eager",
        **_special_token_kwargs(tokenizer),
    )
    return LlamaForCausalLM(config)


def build_gpt2(tokenizer, hidden_size: int = 32, num_layers: int = 2, vocab_size: int | None = None, seed: int = 0):
    """A tiny randomly initialised `GPT2LMHeadModel` (float32, eager attention) sized to `tokenizer`."""
    import torch

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer),
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=2,
        n_positions=512,
        attn_implementation="eager",
        **_special_token_kwargs(tokenizer),
    )
    return GPT2LMHeadModel(config)


def build_pair(tokenizer, family: str = "llama", seed: int = 0):
    """A (student, teacher) pair of one `family` ("llama" or "gpt2"); the teacher is wider and deeper."""
    build = {"llama": build_llama, "gpt2": build_gpt2}[family]
    student = build(tokenizer, hidden_size=32, num_layers=2, seed=seed)
    teacher = build(tokenizer, hidden_size=64, num_layers=3, seed=seed + 1)
    return student, teacher


def toy_rows(n: int = 8, fmt: str = "messages") -> list[dict]:
    """`n` instruction rows in one of the accepted dataset formats.

    `fmt`: "messages" (GKD's format), "prompt_completion" (standard strings) or
    "conversational" (TRL's prompt/completion as message lists).
    """
    rows = []
    for i in range(n):
        text = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
        question, answer = f"Repeat: {text[:24]}", text
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif fmt == "prompt_completion":
            rows.append({"prompt": question + "\nAnswer:", "completion": " " + answer})
        elif fmt == "conversational":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
        else:
            raise ValueError(f"unknown fmt {fmt!r}")
    return rows
