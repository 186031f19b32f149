"""The SFT term: summed cross-entropy over completion tokens, with its token count."""

import torch
import torch.nn.functional as F

from trl_mgsr.losses import sft_loss


def test_sum_and_count_match_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = -100
    term = sft_loss(logits, labels)
    assert term.num_items.item() == 10
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(term.total, expected)


def test_no_completion_tokens_gives_zero_not_nan():
    """fp16 logits whose sum overflows, and -inf entries, must not turn an empty term into NaN."""
    big = torch.full((2, 4, 50), -60000.0, dtype=torch.float16)
    minus_inf = torch.randn(2, 4, 50).index_fill(-1, torch.tensor([3]), float("-inf"))
    for logits in (big, minus_inf):
        logits.requires_grad_()
        term = sft_loss(logits, torch.full((2, 4), -100))
        assert term.total.item() == 0.0 and term.num_items.item() == 0
        term.total.backward()
        assert (logits.grad == 0).all()
