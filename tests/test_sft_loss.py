"""The SFT term: summed cross-entropy over completion tokens, with its token count."""

import pytest
import torch
import torch.nn.functional as F

from trl_mgsr.losses import chunked_sft_loss, sft_loss


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


def _sft_inputs(dtype, labelled="scattered"):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, 13, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 13, (3, 7), generator=g)
    if labelled == "scattered":  # non-consecutive rows exercise the index path, runs the slice path
        labels[0, :3] = -100
        labels[1, 4] = -100
        labels[2, 6] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("labelled", ["scattered", "all"])
def test_chunked_matches_reference_values_and_gradients(dtype, chunk_size, labelled):
    logits, labels = _sft_inputs(dtype, labelled)
    ref_in, fast_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = sft_loss(ref_in, labels)
    fast = chunked_sft_loss(fast_in, labels, chunk_size=chunk_size)
    assert fast.num_items.item() == ref.num_items.item()
    torch.testing.assert_close(fast.total, ref.total, rtol=1e-5, atol=1e-5)
    # a non-unit upstream gradient, as the trainer's weight / count gives
    (ref.total * 0.37).backward()
    (fast.total * 0.37).backward()
    assert fast_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fast_in.grad, ref_in.grad, rtol=tol, atol=tol)
    assert (fast_in.grad.view(-1, 13)[labels.view(-1) == -100] == 0).all()
    torch.testing.assert_close(fast_in.detach(), logits)  # the input logits are not modified


def test_chunked_edge_cases():
    logits, labels = _sft_inputs(torch.float32)
    logits[..., 5] = float("-inf")  # a masked vocabulary entry no label points at
    labels[labels == 5] = 0
    x = logits.clone().requires_grad_()
    term = chunked_sft_loss(x, labels, chunk_size=2)
    term.total.backward()
    assert torch.isfinite(term.total) and torch.isfinite(x.grad).all() and (x.grad[..., 5] == 0).all()

    empty = torch.randn(2, 4, 9, requires_grad=True)
    term = chunked_sft_loss(empty, torch.full((2, 4), -100))
    assert term.total.item() == 0.0 and term.num_items.item() == 0
    term.total.backward()
    assert (empty.grad == 0).all()

    with pytest.raises(ValueError, match="chunk_size"):
        chunked_sft_loss(empty, labels[:2, :4], chunk_size=0)
