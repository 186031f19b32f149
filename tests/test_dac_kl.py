"""DAC-KL (DESIGN.md §3): band sub-network, reference loss, chunked path."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trl_mgsr.losses import DACBandNet, LossTerm, chunked_dac_kl_loss, dac_kl_loss

SUPPORTS = ["full", "band"]
DIRECTIONS = ["forward", "reverse"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stalls on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(B=2, T=9, V=40, dtype=torch.float32, seed=0, masked=((0, 0), (0, 1), (1, 4), (1, 7), (1, 8))):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, t in masked:
        labels[b, t] = -100
    return student, teacher, labels


def perturbed_net(num_features=8, hidden=16, min_width=0.5, seed=0, scale=2.0):
    """A band net whose band really depends on its input (the default one starts constant)."""
    torch.manual_seed(seed)
    net = DACBandNet(num_features, hidden, min_width, init_lo=0.0, init_hi=max(0.95, min_width))
    with torch.no_grad():
        net.out.weight.normal_(0, scale)
        net.out.bias.normal_(0, 1.0)
    return net


class FixedBands(nn.Module):
    """Stands in for DACBandNet: returns given per-position bands (soft edges, like any learned band)."""

    def __init__(self, lo, hi, num_features=8):
        super().__init__()
        self.num_features, self.lo, self.hi = num_features, lo, hi

    def forward(self, features):
        return self.lo.expand(features.shape[0]), self.hi.expand(features.shape[0])


def clipped_teacher(t, lo, hi, s, temperature=1.0):
    """Independent float64 implementation of the DESIGN §3 mask: returns (p~, m) for teacher rows `t` [N, V]."""
    p = torch.softmax(t.double() / temperature, -1)
    ps, idx = p.sort(-1, descending=True)
    c = ps.cumsum(-1)
    col = lambda x: x.double()[:, None] if isinstance(x, torch.Tensor) else x  # noqa: E731
    m = torch.ones_like(ps)
    if isinstance(lo, torch.Tensor) or lo > 0:
        m = m * torch.sigmoid(s * (c - col(lo)))
    if isinstance(hi, torch.Tensor) or hi < 1:
        m = m * torch.sigmoid(s * (col(hi) - (c - ps)))
    m = torch.zeros_like(p).scatter(1, idx, m)
    return m * p / (m * p).sum(-1, keepdim=True), m


def grads(term: LossTerm, *tensors):
    return torch.autograd.grad(term.total, tensors, allow_unused=True)


# --------------------------------------------------------------------------- band sub-network


@pytest.mark.parametrize("min_width", [0.1, 0.5, 0.9, 1.0])
def test_band_net_output_always_valid(min_width):
    net = perturbed_net(num_features=8, min_width=min_width, scale=50.0)
    x = torch.cat([torch.rand(200, 8), torch.randn(50, 8) * 1e4, torch.zeros(1, 8)]).to(torch.bfloat16)
    lo, hi = net(x)
    assert lo.dtype == hi.dtype == torch.float32 and lo.shape == (251,)
    assert (lo >= 0).all() and (hi <= 1).all() and (lo < hi).all()
    assert (hi - lo >= min_width - 1e-6).all()


@pytest.mark.parametrize("band", [(0.0, 0.95), (0.2, 0.9), (0.0, 1.0), (0.3, 0.8), (0.05, 0.55)])
def test_band_net_starts_at_the_configured_band(band):
    torch.manual_seed(0)
    net = DACBandNet(num_features=32, hidden_size=64, min_width=0.5, init_lo=band[0], init_hi=band[1])
    lo, hi = net(torch.softmax(torch.randn(5, 100) * 3, -1).topk(20).values)  # 20 < 32 features: zero-padded
    # within 2 % of the free slack (the inverse-sigmoid clamp that keeps both edges movable)
    torch.testing.assert_close(lo, torch.full((5,), band[0]), atol=0.011, rtol=0)
    torch.testing.assert_close(hi, torch.full((5,), band[1]), atol=0.011, rtol=0)


def test_both_edges_of_a_band_started_at_zero_get_a_real_gradient():
    """An edge initialised at sigmoid(b) = 1e-4 had a 1e-4-times-too-small gradient and never moved."""
    net = DACBandNet(num_features=8, hidden_size=16, min_width=0.5, init_lo=0.0, init_hi=0.95)
    lo, hi = net(torch.rand(4, 8))
    (g_lo,) = torch.autograd.grad(lo.sum(), net.out.bias, retain_graph=True)
    (g_hi,) = torch.autograd.grad(hi.sum(), net.out.bias)
    assert g_lo.abs().max() > 1e-3 and g_hi.abs().max() > 1e-3


def test_band_net_rejects_bad_bands_and_builds_from_config():
    with pytest.raises(ValueError):
        DACBandNet(min_width=0.6, init_lo=0.5, init_hi=0.9)
    with pytest.raises(ValueError):
        DACBandNet(min_width=0.0)
    cfg = SimpleNamespace(dac_features=16, dac_hidden_size=32, dac_min_width=0.4, dac_lo=0.1, dac_hi=0.9)
    net = DACBandNet.from_config(cfg)
    assert net.num_features == 16 and net.hidden.out_features == 32 and net.min_width == 0.4
    lo, hi = net(torch.rand(3, 16))
    torch.testing.assert_close(hi - lo, torch.full((3,), 0.8), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- reference invariants


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
def test_full_band_equals_forward_kl_and_gkd(fn, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = make_batch()
    term = fn(student, teacher, labels, lo=0.0, hi=1.0, min_width=1.0, temperature=temperature)
    valid = labels != -100
    assert term.num_items == valid.sum()
    ours = term.total / term.num_items
    gkd = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=0, temperature=temperature)
    lq = F.log_softmax(student[valid] / temperature, -1)
    lp = F.log_softmax(teacher[valid] / temperature, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    torch.testing.assert_close(ours, gkd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, kl, atol=1e-5, rtol=1e-5)
    (g_ours,), (g_gkd,) = torch.autograd.grad(ours, student), torch.autograd.grad(gkd, student)
    torch.testing.assert_close(g_ours, g_gkd, atol=1e-6, rtol=1e-5)
    # exactly every token kept
    assert term.stats["kept_tokens"] == valid.sum() * teacher.shape[-1]
    assert term.stats["kept_mass"] == valid.sum()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("band", [(0.0, 0.95), (0.3, 0.9), (0.5, 1.0), (0.1, 0.6), "learned"])
def test_band_support_zero_when_student_equals_teacher(band, direction):
    _, teacher, labels = make_batch()
    student = teacher.clone().requires_grad_()
    kw = dict(band_net=perturbed_net()) if band == "learned" else dict(lo=band[0], hi=band[1])
    for fn in (dac_kl_loss, chunked_dac_kl_loss):
        term = fn(student, teacher, labels, student_support="band", divergence=direction, **kw)
        assert abs(term.total.item()) < 1e-5
        (g,) = grads(term, student)
        assert g.abs().max() < 1e-6
    # and it is not zero for a different student
    other = make_batch(seed=1)[0]
    assert dac_kl_loss(other, teacher, labels, student_support="band", divergence=direction, **kw).total > 0.1


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("band", [(0.0, 0.95), (0.3, 0.9), (0.2, 1.0), "learned"])
def test_full_support_zero_exactly_at_clipped_teacher(band, direction):
    _, teacher, labels = make_batch()
    valid = labels != -100
    t = teacher[valid]
    if band == "learned":
        net = perturbed_net()
        lo, hi = net(torch.softmax(t, -1).topk(8).values)
        kw, lo, hi = dict(band_net=net), lo.detach(), hi.detach()
    else:
        (lo, hi), kw = band, dict(lo=band[0], hi=band[1])
    p_clip, m = clipped_teacher(t, lo, hi, s=50.0)
    student = torch.zeros_like(teacher)
    student[valid] = p_clip.log().float()
    for fn in (dac_kl_loss, chunked_dac_kl_loss):
        s = student.clone().requires_grad_()
        term = fn(s, teacher, labels, divergence=direction, **kw)
        assert abs(term.total.item()) < 1e-5
        (g,) = grads(term, s)
        assert g.abs().max() < 1e-6
        # the mask and kept mass are the DESIGN §3 ones, computed independently
        p = torch.softmax(t.double(), -1)
        torch.testing.assert_close(term.stats["kept_mass"].double(), (m * p).sum(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(term.stats["kept_tokens"].double(), m.sum(), atol=1e-3, rtol=1e-5)
        # a slightly different student gets a positive loss and a non-zero gradient
        s2 = (student + 0.3 * torch.randn_like(student)).requires_grad_()
        term2 = fn(s2, teacher, labels, divergence=direction, **kw)
        assert term2.total > 1e-3 and grads(term2, s2)[0].abs().max() > 1e-4


def test_gradients_reach_band_net_and_student_not_teacher():
    student, teacher, labels = make_batch()
    teacher.requires_grad_()
    for support in SUPPORTS:
        for direction in DIRECTIONS:
            for fn in (dac_kl_loss, chunked_dac_kl_loss):
                net = DACBandNet(num_features=8, hidden_size=16, init_lo=0.1, init_hi=0.8)
                term = fn(student, teacher, labels, band_net=net, student_support=support, divergence=direction)
                g_student, g_teacher, *g_net = grads(term, student, teacher, *net.parameters())
                assert g_teacher is None
                assert torch.isfinite(g_student).all() and g_student.abs().sum() > 0
                assert all(g is not None and torch.isfinite(g).all() for g in g_net)
                assert g_net[-1].abs().sum() > 0  # the output bias moves (lo, hi) directly
                assert sum(g.abs().sum() for g in g_net) > 0


def test_stats_and_items():
    student, teacher, labels = make_batch()
    net = perturbed_net()
    term = dac_kl_loss(student, teacher, labels, band_net=net)
    n = int((labels != -100).sum())
    assert term.num_items.dtype == torch.long and term.num_items == n
    assert all(not v.requires_grad for v in term.stats.values())
    lo, hi = term.stats["lo"] / n, term.stats["hi"] / n
    assert 0 <= lo < hi <= 1
    assert 0 < term.stats["kept_mass"] / n <= 1 and 1 <= term.stats["kept_tokens"] / n <= teacher.shape[-1]
    fixed = dac_kl_loss(student, teacher, labels, lo=0.2, hi=0.9)
    torch.testing.assert_close(fixed.stats["lo"], torch.tensor(0.2 * n))
    torch.testing.assert_close(fixed.stats["hi"], torch.tensor(0.9 * n))


def test_invalid_arguments():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError):
        dac_kl_loss(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError):
        dac_kl_loss(student, teacher, labels, student_support="kept")
    with pytest.raises(ValueError):
        dac_kl_loss(student, teacher, labels, divergence="both")
    with pytest.raises(ValueError):
        dac_kl_loss(student, teacher, labels, lo=0.5, hi=0.8, min_width=0.5)
    with pytest.raises(ValueError):
        chunked_dac_kl_loss(student, teacher, labels, chunk_size=0)


# --------------------------------------------------------------------------- anti-collapse


def losses_from_definition(z, t, lo, hi, support, direction, s):
    """Independent float64 DESIGN §3 loss of rows `z`, `t` [N, V] for each band `(lo[g], hi[g])` (soft edges):
    returns [N, G]. Works in sorted teacher order (KL is invariant to a common permutation)."""
    p, q = torch.softmax(t.double(), -1), torch.softmax(z.double(), -1)
    ps, idx = p.sort(-1, descending=True)
    qs = q.gather(-1, idx)
    c = ps.cumsum(-1)
    lo, hi = lo.double()[None, :, None], hi.double()[None, :, None]
    m = torch.sigmoid(s * (c[:, None] - lo)) * torch.sigmoid(s * (hi - (c - ps)[:, None]))  # [N, G, V]
    ps, qs = ps[:, None].expand_as(m), qs[:, None].expand_as(m)
    if support == "full":
        a = m * ps / (m * ps).sum(-1, keepdim=True)
        b = qs
    else:  # kept tokens plus one lumped outcome holding the clipped mass
        a = torch.cat([m * ps, ((1 - m) * ps).sum(-1, keepdim=True)], -1)
        b = torch.cat([m * qs, ((1 - m) * qs).sum(-1, keepdim=True)], -1)
    if direction == "reverse":
        a, b = b, a
    return (a * (a.log() - b.log())).sum(-1)


def allowed_band_grid(min_width, steps=41):
    bands = [(lo, lo + w) for w in torch.linspace(min_width, 1, steps).tolist()
             for lo in torch.linspace(0, 1 - w, steps).tolist()]
    return torch.tensor([b[0] for b in bands]), torch.tensor([b[1] for b in bands])


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reference_matches_the_definition(support, direction):
    student, teacher, labels = make_batch()
    valid = labels != -100
    lo, hi = torch.tensor([0.0, 0.2, 0.05]), torch.tensor([0.95, 0.9, 0.6])
    expected = losses_from_definition(student[valid], teacher[valid], lo, hi, support, direction, 50.0)
    for g in range(len(lo)):
        for fn in (dac_kl_loss, chunked_dac_kl_loss):
            term = fn(student, teacher, labels, band_net=FixedBands(lo[g], hi[g]), student_support=support,
                      divergence=direction)
            torch.testing.assert_close(term.total.double(), expected[:, g].sum(), atol=1e-4, rtol=1e-5)


def _kept_mass_lower_bound(lo, hi, s):
    """∫_0^1 sigmoid(s (x - lo)) sigmoid(s (hi - x)) dx, the guaranteed kept mass (see dac_kl module docstring)."""
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)
    f = torch.sigmoid(s * (x - lo.double()[:, None])) * torch.sigmoid(s * (hi.double()[:, None] - x))
    return torch.trapezoid(f, x, dim=-1)


@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_anti_collapse_band_net_alone_cannot_switch_distillation_off(support, direction):
    torch.manual_seed(0)
    N, V, min_width, s = 16, 24, 0.5, 50.0
    teacher = torch.randn(N, V) * 2
    teacher[: N // 2, 0] += 6.0  # peaked rows: a single token could hold a >= min_width band on its own
    student = torch.randn(N, V) * 2  # frozen, different from the teacher ...
    student[N // 4 : N // 2, 0] += 6.0  # ... and in some rows as sure of the teacher's top token: a tempting band
    labels = torch.zeros(N, dtype=torch.long)
    net = DACBandNet(num_features=8, hidden_size=32, min_width=min_width)
    opt = torch.optim.Adam(net.parameters(), lr=5e-2)
    losses, masses = [], []
    for _ in range(200):
        term = dac_kl_loss(student, teacher, labels, band_net=net, student_support=support, divergence=direction,
                           sharpness=s)
        opt.zero_grad()
        term.total.backward()
        opt.step()
        losses.append(term.total.item())
        masses.append((term.stats["kept_mass"] / term.num_items).item())
    lo_grid, hi_grid = allowed_band_grid(min_width)
    best = losses_from_definition(student, teacher, lo_grid, hi_grid, support, direction, s).min(-1).values.sum().item()
    assert min(losses) < losses[0]  # the sub-network does learn to move the band
    assert best > 0.05 * losses[0]  # the best allowed band is far from switching distillation off ...
    assert min(losses) > 0.97 * best  # ... and training never gets below it (grid tolerance)
    slack = 2 * math.log(2) / s
    assert min(masses) >= min_width - slack
    # per position, the kept mass respects its guarantee for the learned band
    with torch.no_grad():
        lo, hi = net(torch.softmax(teacher, -1).topk(8).values)
        _, m = clipped_teacher(teacher, lo, hi, s)
        kept = (m * torch.softmax(teacher.double(), -1)).sum(-1)
    assert (hi - lo >= min_width - 1e-6).all()
    assert (kept >= _kept_mass_lower_bound(lo, hi, s) - 1e-6).all()
    assert (kept >= min_width - slack).all()


# --------------------------------------------------------------------------- chunked path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("support,direction,top_k", [
    ("full", "forward", None), ("full", "reverse", None), ("band", "forward", None), ("band", "reverse", None),
    ("full", "forward", 12), ("full", "reverse", 12), ("band", "forward", 12),
    ("full", "jsd", None), ("full", "skew_forward", None), ("full", "skew_reverse", 12), ("full", "adaptive", 12)])
def test_chunked_matches_reference(dtype, support, direction, top_k):
    student, teacher, labels = make_batch(dtype=dtype)
    n = int((labels != -100).sum())
    net = perturbed_net()
    kw = dict(band_net=net, student_support=support, divergence=direction, top_k=top_k, temperature=1.5)
    ref = dac_kl_loss(student, teacher, labels, **kw)
    g_ref = grads(ref, student, *net.parameters())
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for chunk in (1, 3, 7, n, n + 5):
        out = chunked_dac_kl_loss(student, teacher, labels, chunk_size=chunk, **kw)
        assert out.num_items == ref.num_items
        torch.testing.assert_close(out.total, ref.total, atol=1e-4, rtol=1e-5)
        for k in ref.stats:
            torch.testing.assert_close(out.stats[k], ref.stats[k], atol=1e-4, rtol=1e-5)
        g_out = grads(out, student, *net.parameters())
        assert g_out[0].dtype == dtype
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_matches_reference_fixed_band_and_scaled_output(direction):
    student, teacher, labels = make_batch()
    kw = dict(lo=0.1, hi=0.8, divergence=direction)
    ref = dac_kl_loss(student, teacher, labels, **kw)
    out = chunked_dac_kl_loss(student, teacher, labels, chunk_size=4, **kw)
    torch.testing.assert_close(out.total, ref.total)
    (g_ref,), (g_out,) = torch.autograd.grad(3 * ref.total, student), torch.autograd.grad(3 * out.total, student)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
def test_top_k_equal_to_vocab_is_exact_and_small_top_k_approximates(fn):
    student, teacher, labels = make_batch(V=40)
    net = perturbed_net()
    exact = fn(student, teacher, labels, band_net=net)
    full_k = fn(student, teacher, labels, band_net=net, top_k=40)
    torch.testing.assert_close(full_k.total, exact.total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(full_k, student)[0], grads(exact, student)[0], atol=1e-6, rtol=1e-5)
    # peaked teachers whose top-10 already hold > 0.999 of the mass: tail tokens are clipped either way
    peaked = teacher.clone()
    peaked[..., :10] += 12.0
    a = fn(student, peaked, labels, lo=0.0, hi=0.9)
    b = fn(student, peaked, labels, lo=0.0, hi=0.9, top_k=10)
    torch.testing.assert_close(a.total, b.total, atol=1e-4, rtol=1e-4)
    # but a top-k far too small for the band is a visible approximation, not a silent no-op
    c = fn(student, teacher, labels, lo=0.0, hi=0.9, top_k=2)
    assert (c.total - fn(student, teacher, labels, lo=0.0, hi=0.9).total).abs() > 1e-3


# --------------------------------------------------------------------------- numerical robustness


def _extreme_cases(V=30):
    g = torch.Generator().manual_seed(3)
    one_hot = torch.zeros(2, 5, V)
    one_hot[..., 4] = 1e4
    signs = torch.where(torch.rand(2, 5, V, generator=g) > 0.5, 1e4, -1e4)
    return {
        "one_hot_teacher": (torch.randn(2, 5, V, generator=g), one_hot),
        "uniform_teacher": (torch.randn(2, 5, V, generator=g), torch.zeros(2, 5, V)),
        "extreme_logits": (-signs, signs),
        "one_hot_both_disagree": (one_hot.roll(1, -1), one_hot),
    }


@pytest.mark.parametrize("case", list(_extreme_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
def test_finite_on_extreme_inputs(case, dtype, fn):
    s0, t = _extreme_cases()[case]
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3] = -100
    for support in SUPPORTS:
        for direction in DIRECTIONS:
            for band in ("learned", (0.0, 0.95), (0.3, 1.0)):
                net = DACBandNet(num_features=8, hidden_size=16) if band == "learned" else None
                kw = dict(band_net=net) if net else dict(lo=band[0], hi=band[1])
                s = s0.to(dtype).requires_grad_()
                term = fn(s, t.to(dtype), labels, student_support=support, divergence=direction, top_k=None, **kw)
                params = list(net.parameters()) if net else []
                g = grads(term, s, *params)
                assert torch.isfinite(term.total) and term.total >= -1e-4, (support, direction, band)
                assert all(x is not None and torch.isfinite(x).all() for x in g), (support, direction, band)
                assert all(torch.isfinite(v) for v in term.stats.values())


@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_all_positions_masked(fn, support, direction):
    student, teacher, _ = make_batch()
    labels = torch.full(student.shape[:2], -100)
    net = DACBandNet(num_features=8, hidden_size=16)
    term = fn(student, teacher, labels, band_net=net, student_support=support, divergence=direction)
    assert term.total.item() == 0.0 and term.num_items.item() == 0
    term.total.backward()  # a valid (all-zero) gradient path
    assert student.grad is not None and (student.grad == 0).all()
    assert all(torch.isfinite(v) for v in term.stats.values())


def test_chunked_graph_refuses_a_second_backward():
    """Its stored gradients are scaled in place by the first backward, so a second one would be wrong."""
    student, teacher, labels = make_batch()
    term = chunked_dac_kl_loss(student, teacher, labels, chunk_size=4)
    (term.total / 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        term.total.backward()


@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("band", ["learned", (0.0, 0.95), (0.0, 1.0)])
def test_minus_inf_vocab_entries_are_dropped_tokens(fn, support, direction, band):
    """Entries that both models mask with -inf (0 log 0 = 0) give the loss of the vocabulary without them, and
    finite gradients for the student and the band net."""
    student, teacher, labels = make_batch(V=40)
    masked = torch.zeros(40, dtype=torch.bool)
    masked[[3, 17, 35, 36, 37]] = True
    full_s = student.detach().masked_fill(masked, float("-inf")).requires_grad_()
    full_t = teacher.masked_fill(masked, float("-inf"))
    small_s = student.detach()[..., ~masked].requires_grad_()
    net = perturbed_net() if band == "learned" else None
    kw = dict(band_net=net) if net else dict(lo=band[0], hi=band[1])
    common = dict(student_support=support, divergence=direction, **kw)
    full = fn(full_s, full_t, labels, **common)
    small = fn(small_s, teacher[..., ~masked], labels, **common)
    params = list(net.parameters()) if net else []
    g_full, *band_full = grads(full, full_s, *params)
    g_small, *band_small = grads(small, small_s, *params)
    torch.testing.assert_close(full.total, small.total, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(g_full).all() and (g_full[..., masked] == 0).all()
    torch.testing.assert_close(g_full[..., ~masked], g_small, rtol=1e-4, atol=1e-6)
    for a, b in zip(band_full, band_small):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- divergences other than the KLs


def _kl64(a, b):
    return (a * (a.log() - b.log())).sum(-1)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward", "skew_reverse", "adaptive"])
def test_divergences_match_their_definitions(divergence):
    """Against float64 formulas on the clipped teacher of `clipped_teacher` (beta 0.3, skew 0.2)."""
    student, teacher, labels = make_batch()
    valid = labels != -100
    lo, hi, s = 0.1, 0.8, 50.0
    pt, _ = clipped_teacher(teacher[valid], torch.full((int(valid.sum()),), lo, dtype=torch.float64),
                            torch.full((int(valid.sum()),), hi, dtype=torch.float64), s)
    q = torch.softmax(student[valid].double(), -1)
    if divergence == "jsd":
        m = 0.3 * pt + 0.7 * q
        expected = 0.3 * _kl64(pt, m) + 0.7 * _kl64(q, m)
    elif divergence == "skew_forward":
        expected = _kl64(pt, 0.2 * pt + 0.8 * q)
    elif divergence == "adaptive":  # AKL: the head is the teacher's top tokens until half its mass is reached
        w = torch.stack([_head_gap_share(a, b) for a, b in zip(pt, q)])
        expected = w * _kl64(pt, q) + (1 - w) * _kl64(q, pt)
    else:
        expected = _kl64(q, 0.2 * q + 0.8 * pt)
    for fn in (dac_kl_loss, chunked_dac_kl_loss):
        term = fn(student, teacher, labels, lo=lo, hi=hi, sharpness=s, divergence=divergence, beta=0.3, skew=0.2)
        torch.testing.assert_close(term.total.double(), expected.sum(), atol=1e-4, rtol=1e-4)


def test_band_zero_one_jsd_is_gkds_generalized_jsd():
    from trl_mgsr._trl import GKDTrainer

    student, teacher, labels = make_batch()
    for beta in (0.0, 0.3, 0.5, 1.0):
        ours = chunked_dac_kl_loss(student, teacher, labels, lo=0.0, hi=1.0, divergence="jsd", beta=beta)
        gkd = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, reduction="sum")
        torch.testing.assert_close(ours.total, gkd, atol=1e-4, rtol=1e-5)


def _head_gap_share(p, q):
    """One row, by a plain loop: the share of sum |p - q| on the teacher's top tokens holding its first half."""
    above, head, total = 0.0, 0.0, 0.0
    for i in sorted(range(len(p)), key=lambda i: -float(p[i])):
        gap = abs(float(p[i]) - float(q[i]))
        head += gap if above < 0.5 else 0.0
        total += gap
        above += float(p[i])
    return torch.tensor(head / total, dtype=torch.float64)


def test_adaptive_is_forward_kl_when_only_the_head_differs_and_reverse_when_only_the_tail_does():
    teacher = torch.log(torch.tensor([[[0.3, 0.3, 0.2, 0.2]]]))  # head: the first two tokens (0 and 0.3 above them)
    labels = torch.zeros(1, 1, dtype=torch.long)
    for student_p, other in (([0.4, 0.2, 0.2, 0.2], "forward"), ([0.3, 0.3, 0.25, 0.15], "reverse")):
        student = torch.log(torch.tensor([[student_p]]))
        kw = dict(lo=0.0, hi=1.0)
        adaptive = chunked_dac_kl_loss(student, teacher, labels, divergence="adaptive", **kw).total
        plain = chunked_dac_kl_loss(student, teacher, labels, divergence=other, **kw).total
        torch.testing.assert_close(adaptive, plain)


@pytest.mark.parametrize("divergence", ["jsd", "skew_forward", "skew_reverse", "adaptive"])
def test_divergences_vanish_at_the_teacher_and_not_elsewhere(divergence):
    student, teacher, labels = make_batch()
    same = teacher.clone().requires_grad_()
    for fn in (dac_kl_loss, chunked_dac_kl_loss):
        assert abs(fn(same, teacher, labels, lo=0.0, hi=1.0, divergence=divergence).total.item()) < 1e-4
        assert fn(student, teacher, labels, lo=0.0, hi=1.0, divergence=divergence).total.item() > 0.1
    with pytest.raises(ValueError, match="student_support='band'"):
        dac_kl_loss(student, teacher, labels, student_support="band", divergence=divergence)


# --------------------------------------------------------------------------- the band's own objective


def _train_with_band(teacher, labels, mode, steps=300):
    """Train free student logits `[N, V]` and a band net together: `mode` "fixed" (band [0, 0.95]) or "label"
    (reverse DAC-KL with the band detached, the band on `band_label_loss`). Returns (KL(teacher || student) against
    the UNCLIPPED teacher, mean lo, mean hi)."""
    from trl_mgsr.losses import band_features, band_label_loss
    from trl_mgsr.losses.terms import labelled_rows

    torch.manual_seed(0)
    n, v = teacher.shape
    z = torch.zeros(n, v, requires_grad=True)
    net = DACBandNet(8, 16, 0.5, 0.0, 0.95)
    opt, band_opt = torch.optim.Adam([z], lr=0.1), torch.optim.Adam(net.parameters(), lr=1e-2)
    rows = labelled_rows(labels)
    for _ in range(steps):
        lo, hi = net(band_features(teacher, rows, 1.0, 8))
        if mode == "fixed":
            loss = chunked_dac_kl_loss(z, teacher, labels, lo=0.0, hi=0.95, divergence="reverse").total
        else:
            loss = chunked_dac_kl_loss(z, teacher, labels, band=(lo.detach(), hi.detach()), divergence="reverse").total
            loss = loss + band_label_loss(lo, hi, teacher, rows, labels).total
        opt.zero_grad()
        band_opt.zero_grad()
        (loss / n).backward()
        opt.step()
        band_opt.step()
    p, q = teacher.log_softmax(-1), z.detach().log_softmax(-1)
    lo, hi = net(band_features(teacher, rows, 1.0, 8))
    return (p.exp() * (p - q)).sum(-1).mean().item(), lo.mean().item(), hi.mean().item()


def test_band_trained_with_the_student_keeps_it_no_further_from_the_teacher_than_the_fixed_band():
    """Student and band trained together on data drawn from the teacher: the band's own objective never sees
    the student, so it cannot pull the target toward it (the joint objective did: issue 14)."""
    torch.manual_seed(0)
    teacher = torch.randn(96, 24) * 2.5
    labels = torch.distributions.Categorical(logits=teacher).sample()
    kl_fixed, _, _ = _train_with_band(teacher, labels, "fixed")
    kl_label, _, hi = _train_with_band(teacher, labels, "label")
    assert kl_label <= kl_fixed
    assert hi > 0.96  # the data's labels reach into the tail: the band widens to keep them


def test_both_band_edges_move_when_the_data_calls_for_it():
    """Labels are the teacher's second token behind a confident wrong head: lo rises past the head, hi falls."""
    torch.manual_seed(0)
    teacher = torch.randn(96, 24)
    top = teacher.argsort(-1, descending=True)
    teacher.scatter_(1, top[:, :1], 4.0)
    teacher.scatter_(1, top[:, 1:2], 3.6)
    _, lo, hi = _train_with_band(teacher, top[:, 1], "label")
    assert lo > 0.2 and hi < 0.94  # started at (0.0, 0.95) up to the init clamp


# --------------------------------------------------------------------------- rescue (dac_rescue_weight)


def test_rescue_matches_its_definition():
    """rescue r: per position, the divergence + r (-log sum_i m_i q_i), the student's log-mass in the band."""
    student, teacher, labels = make_batch()
    valid = labels != -100
    n, lo, hi, s, r = int(valid.sum()), 0.1, 0.8, 50.0, 3.0
    pt, m = clipped_teacher(teacher[valid], torch.full((n,), lo, dtype=torch.float64),
                            torch.full((n,), hi, dtype=torch.float64), s)
    q = torch.softmax(student[valid].double(), -1)
    kept = (m * q).sum(-1)
    for divergence, base in (("reverse", _kl64(q, pt)), ("forward", _kl64(pt, q))):
        expected = base - r * kept.log()
        for fn in (dac_kl_loss, chunked_dac_kl_loss):
            term = fn(student, teacher, labels, lo=lo, hi=hi, sharpness=s, divergence=divergence, rescue=r)
            torch.testing.assert_close(term.total.double(), expected.sum(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("divergence,top_k,band", [
    ("reverse", None, "learned"), ("reverse", 12, "learned"), ("forward", None, "learned"),
    ("reverse", None, (0.0, 0.75)), ("forward", 12, (0.1, 0.8)), ("skew_reverse", None, "learned")])
def test_rescue_chunked_matches_reference(divergence, top_k, band):
    """The closed-form path (forward, reverse) and the autograd one give the reference's loss and gradients,
    student and band sub-network (the divergence's: the rescue holds the mask constant)."""
    student, teacher, labels = make_batch()
    net = perturbed_net() if band == "learned" else None
    kw = dict(divergence=divergence, top_k=top_k, temperature=1.5, rescue=5.0,
              **(dict(band_net=net) if net else dict(lo=band[0], hi=band[1])))
    params = list(net.parameters()) if net else []
    ref = dac_kl_loss(student, teacher, labels, **kw)
    g_ref = grads(ref, student, *params)
    for chunk in (1, 7, 100):
        out = chunked_dac_kl_loss(student, teacher, labels, chunk_size=chunk, **kw)
        torch.testing.assert_close(out.total, ref.total, atol=1e-4, rtol=1e-5)
        for a, b in zip(grads(out, student, *params), g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
@pytest.mark.parametrize("divergence,top_k", [("reverse", None), ("forward", 12), ("skew_reverse", None)])
def test_rescue_never_moves_the_band(fn, divergence, top_k):
    """The rescue holds the mask constant: the band sub-network gets the same gradient with it as without it (a
    rescue that could widen the band would let the band move toward the student), while the student's changes."""
    student, teacher, labels = make_batch()
    net = perturbed_net()
    kw = dict(band_net=net, divergence=divergence, top_k=top_k)
    plain, rescued = (grads(fn(student, teacher, labels, rescue=r, **kw), student, *net.parameters())
                      for r in (0.0, 5.0))
    for a, b in zip(plain[1:], rescued[1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (plain[0] - rescued[0]).abs().max() > 1e-3


@pytest.mark.parametrize("fn", [dac_kl_loss, chunked_dac_kl_loss])
def test_rescue_pulls_a_confidently_wrong_student_where_reverse_kl_does_not(fn):
    """Teacher sure of token 0, student sure of token 3: reverse KL is large there but its gradient vanishes
    (`-q (D + L)` is 0 on the student's token and ~0 elsewhere); the rescue's, `r (q - m q / K)`, moves the
    student's token down and the teacher's up by a good part of r (not all of it: the soft mask keeps ~e^-12.5 of
    token 3, as much as the student's q_0 ~ e^-12, so K is shared). Where the student already sits in the band the
    rescue adds ~nothing."""
    V, r = 10, 5.0
    teacher = torch.full((2, V), -8.0)
    teacher[:, 0] = 8.0
    student = torch.zeros(2, V)
    student[0, 3] = 12.0  # confidently wrong
    student[1, 0] = 12.0  # confidently right
    student.requires_grad_()
    labels = torch.zeros(2, dtype=torch.long)
    kw = dict(lo=0.0, hi=0.75, divergence="reverse")
    plain, rescued = fn(student, teacher, labels, **kw), fn(student, teacher, labels, rescue=r, **kw)
    (g_plain,), (g_rescued,) = grads(plain, student), grads(rescued, student)
    assert plain.total > 10  # far from the teacher ...
    assert g_plain.abs().max() < 1e-3  # ... and no gradient to leave
    assert -g_rescued[0, 0] > 0.5 * r and g_rescued[0, 3] > 0.5 * r  # descent: teacher's token up, student's down
    torch.testing.assert_close(g_rescued[1], g_plain[1], atol=1e-3, rtol=0)  # 2 r (1 - K) ~ 6e-4 there


def test_rescue_needs_full_support_and_a_non_negative_weight():
    student, teacher, labels = make_batch()
    for bad in (dict(rescue=-1.0), dict(rescue=1.0, student_support="band")):
        with pytest.raises(ValueError, match="rescue"):
            dac_kl_loss(student, teacher, labels, **bad)


def test_rescue_brings_a_confidently_wrong_student_to_the_teacher_by_gradient_descent():
    """Student logits trained by plain gradient descent from a confident wrong token: with the reverse KL alone they
    stay on the plateau; with the rescue they reach the teacher's token."""
    V = 10
    teacher = torch.full((4, V), -6.0)
    teacher[:, 0] = 6.0
    labels = torch.zeros(4, dtype=torch.long)
    finals = {}
    for rescue in (0.0, 5.0):
        student = torch.zeros(4, V)
        student[:, 3] = 12.0
        student.requires_grad_()
        opt = torch.optim.SGD([student], lr=1.0)
        for _ in range(100):
            opt.zero_grad()
            chunked_dac_kl_loss(student, teacher, labels, lo=0.0, hi=0.75, divergence="reverse",
                                rescue=rescue).total.backward()
            opt.step()
        finals[rescue] = student.detach().softmax(-1)[:, 0]
    assert (finals[0.0] < 0.01).all()
    assert (finals[5.0] > 0.95).all()
