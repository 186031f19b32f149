"""Span correlation consistency loss: reference vs. an independent float64 computation, invariants, chunked parity."""

from __future__ import annotations

import pytest
import torch

from trl_mgsr.losses import LossTerm, chunked_span_loss, span_loss
from trl_mgsr.losses import span as span_mod

DISTANCES = ["kl", "l2", "l1"]
B, T, V = 3, 14, 37

# three rows: prompt (-100) then completion; spans of 3, 2, 1 (dropped upstream, but -1 here is the same) tokens
SPAN_IDS = torch.tensor(
    [
        [-1, -1, -1, 0, 0, 0, -1, 1, 1, 2, 2, 2, 2, -1],
        [-1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0],  # a long span cut by a -100 label at 10
        [0, 0, 1, 1, 1, 1, 1, -1, -1, 2, 2, -1, -1, -1],  # spans on -100 labels (left padding) give no pair
    ]
)
LABELS = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
LABELS[0, :3] = -100
LABELS[1, :6] = -100
LABELS[1, 10] = -100
LABELS[2, :3] = -100
# expected pairs (b, k): row 0: (3,4) (4,5) (7,8) (9..12) -> 2+1+3; row 1: 6..9 -> 3, 11..13 -> 2;
# row 2: 3..6 -> 3 (positions 0..2 have labels -100), 9 -> 1
NUM_PAIRS = 6 + 5 + 4


def _logits(seed, scale=3.0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def _naive(student, teacher, labels, span_ids, distance, temperature=1.0):
    """Pair by pair in float64 with plain probabilities (no log space), for comparison."""
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    for b in range(student.shape[0]):
        for k in range(student.shape[1] - 1):
            s_id = span_ids[b, k].item()
            if s_id == -1 or span_ids[b, k + 1].item() != s_id or labels[b, k] == -100 or labels[b, k + 1] == -100:
                continue
            n += 1
            ps = torch.softmax(student[b, k : k + 2].double() / temperature, -1)
            pt = torch.softmax(teacher[b, k : k + 2].double() / temperature, -1)
            cs, ct = ps[0] * ps[1], pt[0] * pt[1]
            cs, ct = cs / cs.sum(), ct / ct.sum()
            if distance == "kl":
                total = total + (ct * (ct.log() - cs.log())).sum()
            elif distance == "l2":
                total = total + ((ct - cs) ** 2).sum()
            else:
                total = total + (ct - cs).abs().sum()
    return total, n


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_reference_matches_naive_float64(distance, temperature):
    student, teacher = _logits(1), _logits(2)
    term = span_loss(student, teacher, LABELS, SPAN_IDS, distance=distance, temperature=temperature)
    assert isinstance(term, LossTerm)
    expected, n = _naive(student, teacher, LABELS, SPAN_IDS, distance, temperature)
    assert n == NUM_PAIRS and term.num_items.item() == NUM_PAIRS and term.num_items.dtype == torch.long
    assert term.total.item() > 0
    torch.testing.assert_close(term.total.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("fn", [span_loss, chunked_span_loss])
def test_zero_when_student_equals_teacher(distance, fn):
    teacher = _logits(3)
    student = teacher.clone().requires_grad_(True)
    term = fn(student, teacher, LABELS, SPAN_IDS, distance=distance)
    assert term.num_items.item() == NUM_PAIRS
    assert abs(term.total.item()) < 1e-6
    term.total.backward()
    assert torch.isfinite(student.grad).all()
    if distance != "l1":  # kl and squared l2 are smooth with a minimum there: zero gradient
        assert student.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("fn", [span_loss, chunked_span_loss])
def test_gradient_reaches_both_positions_of_a_pair_and_only_them(distance, fn):
    student, teacher = _logits(4, requires_grad=True), _logits(5)
    teacher.requires_grad_(True)
    span_ids = torch.full((B, T), -1)
    span_ids[1, 7:9] = 0  # a single pair (7, 8) in row 1
    labels = torch.zeros(B, T, dtype=torch.long)
    term = fn(student, teacher, labels, span_ids, distance=distance)
    assert term.num_items.item() == 1
    term.total.backward()
    grad_norm = student.grad.abs().sum(-1)
    assert grad_norm[1, 7] > 0 and grad_norm[1, 8] > 0
    grad_norm[1, 7] = grad_norm[1, 8] = 0
    assert (grad_norm == 0).all()
    assert teacher.grad is None  # the teacher is detached


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("fn", [span_loss, chunked_span_loss])
def test_no_multi_token_span_gives_zero_and_valid_backward(distance, fn):
    student, teacher = _logits(6, requires_grad=True), _logits(7)
    for span_ids in (torch.full((B, T), -1), torch.arange(T).repeat(B, 1)):  # no span / only 1-token spans
        student.grad = None
        term = fn(student, teacher, LABELS, span_ids, distance=distance)
        assert term.num_items.item() == 0
        assert term.total.item() == 0.0 and not torch.isnan(term.total)
        term.total.backward()
        assert student.grad is not None and (student.grad == 0).all()
    # spans only over -100 labels (prompt, padding) give no pair either
    term = fn(student, teacher, torch.full((B, T), -100), SPAN_IDS, distance=distance)
    assert term.num_items.item() == 0 and term.total.item() == 0.0


def _grad(fn, student, teacher, **kw):
    student = student.detach().clone().requires_grad_(True)
    term = fn(student, teacher, kw.pop("labels", LABELS), kw.pop("span_ids", SPAN_IDS), **kw)
    (grad,) = torch.autograd.grad(term.total * 1.7, student)  # a non-unit upstream gradient
    return term, grad


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk_size", [1, 3, NUM_PAIRS + 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_reference_fp32(distance, chunk_size, temperature):
    student, teacher = _logits(8), _logits(9)
    ref, ref_grad = _grad(span_loss, student, teacher, distance=distance, temperature=temperature)
    out, out_grad = _grad(
        chunked_span_loss, student, teacher, distance=distance, temperature=temperature, chunk_size=chunk_size
    )
    assert out.num_items.item() == ref.num_items.item() == NUM_PAIRS
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-6)
    # l1's gradient uses sign(ĉs - ĉt): where both are tiny and nearly equal, rounding may flip it, hence an
    # absolute tolerance relative to the gradient's scale
    scale = ref_grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(out_grad, ref_grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("chunk_size", [1, 3, NUM_PAIRS + 5])
def test_chunked_matches_reference_bf16(distance, chunk_size):
    student, teacher = _logits(10, dtype=torch.bfloat16), _logits(11, dtype=torch.bfloat16)
    ref, ref_grad = _grad(span_loss, student, teacher, distance=distance)
    out, out_grad = _grad(chunked_span_loss, student, teacher, distance=distance, chunk_size=chunk_size)
    assert out.total.dtype == ref.total.dtype == torch.float32
    assert out_grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.total, ref.total, rtol=1e-4, atol=1e-5)
    scale = ref_grad.float().abs().max().item()
    assert scale > 0
    torch.testing.assert_close(out_grad.float(), ref_grad.float(), rtol=2e-2, atol=1e-2 * scale)


def test_chunked_on_non_contiguous_shifted_logits():
    """The trainer passes `logits[:, :-1]`; the chunked path must not need a contiguous copy to be right."""
    full_s, full_t = _logits(12), _logits(13)
    pad = torch.zeros(B, 1, V)
    student = torch.cat([full_s, pad], 1).requires_grad_(True)
    teacher = torch.cat([full_t, pad], 1)
    term = chunked_span_loss(student[:, :-1], teacher[:, :-1], LABELS, SPAN_IDS, chunk_size=4)
    (grad,) = torch.autograd.grad(term.total, student)
    ref, ref_grad = _grad(span_loss, full_s, full_t)
    torch.testing.assert_close(term.total, ref.total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[:, :-1], ref_grad / 1.7, rtol=1e-4, atol=1e-6)
    assert (grad[:, -1] == 0).all()


def test_chunked_works_on_at_most_chunk_size_pairs_at_a_time(monkeypatch):
    seen = []
    for name in ("_chunk_value", "_chunk_grad"):
        original = getattr(span_mod, name)

        def spy(student_logits, teacher_logits, b, k, *args, _original=original):
            seen.append(b.numel())
            return _original(student_logits, teacher_logits, b, k, *args)

        monkeypatch.setattr(span_mod, name, spy)
    student = _logits(14, requires_grad=True)
    term = chunked_span_loss(student, _logits(15), LABELS, SPAN_IDS, chunk_size=4)
    term.total.backward()
    n_chunks = -(-NUM_PAIRS // 4)
    assert len(seen) == 2 * n_chunks  # forward, then recomputation in backward
    assert max(seen) == 4 and sum(seen[:n_chunks]) == NUM_PAIRS


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("fn", [span_loss, chunked_span_loss])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite(distance, fn, dtype):
    g = torch.Generator().manual_seed(16)
    student = (torch.randint(0, 2, (B, T, V), generator=g).float() * 2e4 - 1e4).to(dtype).requires_grad_(True)
    teacher = (torch.randint(0, 2, (B, T, V), generator=g).float() * 2e4 - 1e4).to(dtype)
    teacher[0, 3:6] = -1e4
    teacher[0, 3:6, 0] = 1e4  # one-hot teacher
    term = fn(student, teacher, LABELS, SPAN_IDS, distance=distance)
    assert torch.isfinite(term.total)
    term.total.backward()
    assert torch.isfinite(student.grad.float()).all()


def test_argument_errors():
    s, t = _logits(17), _logits(18)
    with pytest.raises(ValueError, match="distance"):
        span_loss(s, t, LABELS, SPAN_IDS, distance="cosine")
    with pytest.raises(ValueError, match="not aligned"):
        span_loss(s, t, LABELS[:, 1:], SPAN_IDS)
    with pytest.raises(ValueError, match="differ"):
        chunked_span_loss(s, t[..., 1:], LABELS, SPAN_IDS)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_span_loss(s, t, LABELS, SPAN_IDS, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_span_loss(s, t, LABELS, SPAN_IDS, temperature=0.0)


@pytest.mark.parametrize("distance", DISTANCES)
def test_masked_vocab_entries_minus_inf(distance):
    """Vocabulary padding masked with -inf (in both models) must not give NaN, and both paths must agree."""
    student, teacher = _logits(19), _logits(20)
    student[..., -5:] = float("-inf")
    teacher[..., -5:] = float("-inf")
    ref, ref_grad = _grad(span_loss, student, teacher, distance=distance)
    out, out_grad = _grad(chunked_span_loss, student, teacher, distance=distance, chunk_size=4)
    assert torch.isfinite(ref.total) and torch.isfinite(out.total)
    assert torch.isfinite(ref_grad).all() and torch.isfinite(out_grad).all()
    torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_grad, ref_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- span log-likelihood consistency


def _naive_loglik(student, teacher, labels, span_ids):
    """Span by span in float64: 0.5 * (mean log q - mean log p)^2 over the labelled tokens of spans with a pair."""
    ls = student.double().log_softmax(-1)
    lt = teacher.double().log_softmax(-1)
    total, spans = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        runs, prev = [], None
        for k in range(T):  # contiguous labelled tokens of one span id
            sid = int(span_ids[b, k])
            if sid == -1 or labels[b, k] == -100:
                prev = None
                continue
            if prev != sid:
                runs.append([])
            runs[-1].append(k)
            prev = sid
        for run in runs:
            if len(run) < 2:
                continue
            y = labels[b, run]
            gap = (ls[b, run, y] - lt[b, run, y]).mean()
            total = total + 0.5 * gap.square()
            spans += 1
    return total, spans


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_loglik_span_matches_a_naive_computation_in_value_and_gradient(chunk):
    from trl_mgsr.losses import span_loglik_loss

    student, teacher = _logits(1, requires_grad=True), _logits(2)
    term = span_loglik_loss(student, teacher, LABELS, SPAN_IDS, chunk_size=chunk)
    expected, spans = _naive_loglik(student, teacher, LABELS, SPAN_IDS)
    assert int(term.num_items) == spans == 7
    torch.testing.assert_close(term.total.double(), expected, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(term.total, student)
    (g_ref,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-4)


def test_loglik_span_is_zero_with_zero_push_where_the_student_matches_and_sees_opposite_errors():
    from trl_mgsr.losses import span_loglik_loss

    teacher = _logits(2)
    same = teacher.clone().requires_grad_()
    term = span_loglik_loss(same, teacher, LABELS, SPAN_IDS)
    (g,) = torch.autograd.grad(term.total, same)
    assert term.total.item() == 0.0 and g.abs().max() == 0.0
    # a student less sure of every span token than the teacher: a non-zero loss (the product correlation
    # softmax(z_k + z_k+1) missed such errors)
    lower = teacher.clone()
    lower.scatter_add_(-1, LABELS.clamp(min=0).unsqueeze(-1), torch.full((B, T, 1), -2.0))
    assert span_loglik_loss(lower, teacher, LABELS, SPAN_IDS).total.item() > 0.1
