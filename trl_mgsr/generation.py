"""Sampling from a model's own distribution."""

from __future__ import annotations

import contextlib

from transformers import GenerationConfig


@contextlib.contextmanager
def pure_sampling(model):
    """Let `model.generate` sample from the model's own distribution, whatever its saved `generation_config.json` says.

    transformers fills every field a `generate` call leaves unset from `model.generation_config`, so a checkpoint that
    ships e.g. `repetition_penalty=1.1` (Qwen2.5-Instruct) would reshape every sample. For the duration, the model's
    config keeps only its special token ids; the caller's `GenerationConfig` says everything else.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model generates with it
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield model
    finally:
        inner.generation_config = saved
