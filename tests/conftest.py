"""Shared offline fixtures: a tokenizer trained on the fly and tiny student/teacher models. No network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset

from trl_mgsr.testing import build_pair, build_tokenizer, toy_rows

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def pair(tokenizer):
    return build_pair(tokenizer, "llama")


@pytest.fixture
def rows_dataset():
    def make(n=8, fmt="messages"):
        return Dataset.from_list(toy_rows(n, fmt))

    return make


def tiny_args(cls, output_dir, **overrides):
    """Config kwargs for a fast CPU run; `cls` is MGSRConfig or GKDConfig."""
    kwargs = dict(
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_new_tokens=6,
        max_length=64,
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-3,
        seed=0,
    )
    kwargs.update(overrides)
    return cls(str(output_dir), **kwargs)
