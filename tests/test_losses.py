"""SANW losses against an independent float64 reference written with plain Python loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipse.losses import (
    infonce_loss,
    sanw_bandpass_loss,
    sanw_debias_loss,
    weighted_infonce,
)
from clipse.losses.infonce import InfoNCE
from clipse.losses.sanw import (
    affinity,
    band_response,
    debias_raw_weights,
    mass_preserving,
)
from clipse.losses.sanw_bandpass import SanwBandpass
from clipse.losses.sanw_debias import SanwDebias


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def reference_loss(u, v, s, weight_fn, rho=0.5):
    """docs/reference/losses.md by the letter: loops over i, j; returns (loss, weights as nested lists)."""
    B = len(u)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    s = min(s, 100.0)
    l = [[s * dot(u[i], v[j]) for j in range(B)] for i in range(B)]
    A = [[rho * dot(v[i], v[j]) + (1 - rho) * dot(u[i], u[j]) for j in range(B)] for i in range(B)]
    w = [[1.0] * B for _ in range(B)]
    for i in range(B):
        raw = {j: weight_fn(A[i][j]) for j in range(B) if j != i}
        total = sum(raw.values())
        for j in raw:
            w[i][j] = raw[j] * (B - 1) / total
    i2t = t2i = 0.0
    for i in range(B):
        i2t += -l[i][i] + math.log(math.exp(l[i][i]) + sum(w[i][j] * math.exp(l[i][j]) for j in range(B) if j != i))
        t2i += -l[i][i] + math.log(math.exp(l[i][i]) + sum(w[i][j] * math.exp(l[j][i]) for j in range(B) if j != i))
    return (i2t / B + t2i / B) / 2, w


def debias_fn(alpha, delta, lam):
    return lambda a: 1 - alpha * _sigmoid(lam * (a - delta))


def bandpass_fn(alpha, m1, m2, gamma):
    return lambda a: 1 + alpha * _sigmoid((a - m1) / gamma) * _sigmoid((m2 - a) / gamma)


def embeddings(B, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)
    v = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=1)
    return u, v


CASES = [
    ("infonce", lambda u, v, s: infonce_loss(u, v, s), lambda a: 1.0, 0.5),
    ("debias", lambda u, v, s: sanw_debias_loss(u, v, s, alpha=0.3, delta=0.2, lam=2.0),
     debias_fn(0.3, 0.2, 2.0), 0.5),
    ("debias_text_affinity", lambda u, v, s: sanw_debias_loss(u, v, s, alpha=0.5, delta=0.0, lam=5.0, rho=1.0),
     debias_fn(0.5, 0.0, 5.0), 1.0),
    ("bandpass", lambda u, v, s: sanw_bandpass_loss(u, v, s, alpha=0.2, m1=0.1, m2=0.9, gamma=0.5),
     bandpass_fn(0.2, 0.1, 0.9, 0.5), 0.5),
    ("bandpass_sharp", lambda u, v, s: sanw_bandpass_loss(u, v, s, alpha=2.0, m1=-0.2, m2=0.3, gamma=0.05, rho=0.2),
     bandpass_fn(2.0, -0.2, 0.3, 0.05), 0.2),
]


@pytest.mark.parametrize("name,loss_fn,weight_fn,rho", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("B", [1, 2, 5, 9])
def test_matches_loop_reference(name, loss_fn, weight_fn, rho, B):
    u, v = embeddings(B, seed=B)
    loss, _ = loss_fn(u, v, 14.3)
    ref, _ = reference_loss(u.tolist(), v.tolist(), 14.3, weight_fn, rho)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name,loss_fn,weight_fn,rho", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_core_with_reference_weights(name, loss_fn, weight_fn, rho):
    """The affinity carries no gradient (docs/reference/losses.md), so the loss's gradient is the core's gradient
    with the weights held at their values: gradcheck the core with the loop reference's weights."""
    u, v = embeddings(6, seed=3)
    _, ref_w = reference_loss(u.tolist(), v.tolist(), 7.0, weight_fn, rho)
    weights = torch.tensor(ref_w, dtype=torch.float64)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    inputs = (u.requires_grad_(True), v.requires_grad_(True), scale)
    assert torch.autograd.gradcheck(lambda a, b, s: weighted_infonce(a, b, s, weights), inputs)


@pytest.mark.parametrize("name,loss_fn,weight_fn,rho", CASES, ids=[c[0] for c in CASES])
def test_autograd_equals_reference_gradient(name, loss_fn, weight_fn, rho):
    """Gradient of the real loss w.r.t. embeddings equals the reference with weights held fixed."""
    u, v = embeddings(5, seed=11)
    u.requires_grad_(True)
    v.requires_grad_(True)
    loss, _ = loss_fn(u, v, 9.0)
    loss.backward()
    _, ref_w = reference_loss(u.detach().tolist(), v.detach().tolist(), 9.0, weight_fn, rho)
    w = torch.tensor(ref_w, dtype=torch.float64)
    u2, v2 = u.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)
    logits = 9.0 * u2 @ v2.T
    B = logits.shape[0]
    total = 0
    for i in range(B):
        total = total + (-logits[i, i] + torch.log(sum(w[i, j] * torch.exp(logits[i, j]) for j in range(B)))) / B / 2
        total = total + (-logits[i, i] + torch.log(sum(w[i, j] * torch.exp(logits[j, i]) for j in range(B)))) / B / 2
    total.backward()
    assert torch.allclose(u.grad, u2.grad, atol=1e-12)
    assert torch.allclose(v.grad, v2.grad, atol=1e-12)


def test_alpha_zero_reproduces_infonce():
    u, v = embeddings(16, D=32, seed=5, dtype=torch.float32)
    base, _ = infonce_loss(u, v, 20.0)
    debias, _ = sanw_debias_loss(u, v, 20.0, alpha=0.0, delta=0.3, lam=1.0)
    bandpass, _ = sanw_bandpass_loss(u, v, 20.0, alpha=0.0, m1=0.1, m2=0.9, gamma=0.5)
    clip = (F.cross_entropy(20.0 * u @ v.T, torch.arange(16)) + F.cross_entropy(20.0 * v @ u.T, torch.arange(16))) / 2
    assert base.item() == pytest.approx(clip.item(), rel=1e-6)
    assert debias.item() == pytest.approx(base.item(), rel=1e-6)
    assert bandpass.item() == pytest.approx(base.item(), rel=1e-6)


@pytest.mark.parametrize("B", [2, 3, 17])
def test_negative_weights_average_one_per_row(B):
    u, v = embeddings(B, seed=B)
    aff = affinity(u, v)
    for raw in (debias_raw_weights(aff, alpha=0.3, delta=0.2, lam=2.0),
                1 + 0.2 * band_response(aff, m1=0.1, m2=0.9, gamma=0.5)):
        w = mass_preserving(raw)
        off = ~torch.eye(B, dtype=torch.bool)
        assert torch.allclose(w.diagonal(), torch.ones(B, dtype=w.dtype))
        assert torch.allclose(w[off].view(B, B - 1).mean(dim=1), torch.ones(B, dtype=w.dtype))


def test_debias_weights_fall_as_affinity_rises():
    aff = torch.linspace(-1, 1, 41, dtype=torch.float64)
    raw = debias_raw_weights(aff, alpha=0.3, delta=0.2, lam=2.0)
    assert torch.all(raw[1:] < raw[:-1])
    # and after normalisation within one row: a more similar negative gets less weight
    row_aff = torch.tensor([[1.0, -0.5, 0.0, 0.4, 0.9]], dtype=torch.float64).expand(5, 5).clone()
    w = mass_preserving(debias_raw_weights(row_aff, alpha=0.3, delta=0.2, lam=2.0))
    assert torch.all(w[0, 1:-1] > w[0, 2:])


def test_bandpass_weights_peak_inside_band():
    m1, m2 = 0.1, 0.9
    aff = torch.linspace(-1, 1, 201, dtype=torch.float64)
    band = band_response(aff, m1=m1, m2=m2, gamma=0.5)
    peak = aff[band.argmax()].item()
    assert m1 <= peak <= m2
    assert peak == pytest.approx((m1 + m2) / 2, abs=0.011)
    inside = band[(aff >= m1) & (aff <= m2)].min()
    outside = band[(aff < m1 - 0.5) | (aff > m2 + 0.05)].max()
    assert inside > outside


@pytest.mark.parametrize("loss_fn", [
    lambda u, v, s: infonce_loss(u, v, s),
    lambda u, v, s: sanw_debias_loss(u, v, s, alpha=0.99, delta=0.0, lam=50.0),
    lambda u, v, s: sanw_bandpass_loss(u, v, s, alpha=5.0, m1=0.5, m2=0.6, gamma=0.01),
])
@pytest.mark.parametrize("case", ["B1", "B2", "identical", "near_clamp", "over_clamp"])
def test_finite_in_edge_cases(loss_fn, case):
    B = {"B1": 1, "B2": 2}.get(case, 8)
    u, v = embeddings(B, seed=1, dtype=torch.float32)
    scale = 20.0
    if case == "identical":
        u = u[:1].expand(B, -1).clone()
        v = u.clone()
    if case in ("near_clamp", "over_clamp"):
        scale = 99.99 if case == "near_clamp" else 1e6
    u.requires_grad_(True)
    loss, stats = loss_fn(u, v, scale)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(u.grad).all()
    if case == "B1":
        assert loss.item() == 0.0
    if case == "identical":  # every logit equal: each direction is log(B) regardless of weights
        assert loss.item() == pytest.approx(math.log(B), rel=1e-5)
    if B > 1:
        assert all(torch.isfinite(x) for x in stats.values())


def test_scale_is_clamped_at_100():
    u, v = embeddings(6, seed=2)
    at_limit, _ = infonce_loss(u, v, 100.0)
    beyond, _ = infonce_loss(u, v, torch.tensor(1e4, dtype=torch.float64))
    assert at_limit.item() == beyond.item()


def test_stats_match_reference_counts():
    u, v = embeddings(12, seed=9)
    _, stats = sanw_bandpass_loss(u, v, 10.0, alpha=1.5, m1=-0.1, m2=0.2, gamma=0.05)
    fn = bandpass_fn(1.5, -0.1, 0.2, 0.05)
    _, w = reference_loss(u.tolist(), v.tolist(), 10.0, fn)
    off = [w[i][j] for i in range(12) for j in range(12) if i != j]
    assert stats["weight_mean"].item() == pytest.approx(sum(off) / len(off))
    assert stats["weight_min"].item() == pytest.approx(min(off))
    assert stats["weight_max"].item() == pytest.approx(max(off))
    mean = sum(off) / len(off)
    assert stats["weight_std"].item() == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in off) / len(off)))
    assert stats["share_suppressed"].item() == pytest.approx(sum(x < 0.9 for x in off) / len(off))
    assert stats["share_emphasised"].item() == pytest.approx(sum(x > 1.1 for x in off) / len(off))
    aff = affinity(u, v)
    band = band_response(aff, m1=-0.1, m2=0.2, gamma=0.05)
    offmask = ~torch.eye(12, dtype=torch.bool)
    assert stats["band_coverage"].item() == pytest.approx((band[offmask] > 0.5).double().mean().item())
    assert stats["affinity_mean"].item() == pytest.approx(aff[offmask].mean().item())
    assert 0 < stats["share_suppressed"].item() < 1 and 0 < stats["share_emphasised"].item() < 1


def test_invalid_parameters_raise():
    u, v = embeddings(3)
    with pytest.raises(ValueError, match="alpha"):
        sanw_debias_loss(u, v, 10.0, alpha=1.0, delta=0.2, lam=1.0)
    with pytest.raises(ValueError, match="m1 < m2"):
        sanw_bandpass_loss(u, v, 10.0, alpha=0.1, m1=0.9, m2=0.8, gamma=0.5)


@pytest.mark.parametrize("loss,params,problem", [
    (SanwDebias, dict(alpha=0.0), None),
    (SanwDebias, dict(alpha=0.999), None),
    (SanwDebias, dict(alpha=1.0), "alpha=1.0: SANW-Debias needs 0 <= alpha < 1 (weights must stay positive)"),
    (SanwDebias, dict(alpha=-0.1), "alpha=-0.1: SANW-Debias needs 0 <= alpha < 1 (weights must stay positive)"),
    (SanwDebias, dict(rho=0.0), None),
    (SanwDebias, dict(rho=1.0), None),
    (SanwDebias, dict(rho=1.01), "rho=1.01: needs 0 <= rho <= 1"),
    (SanwBandpass, dict(rho=-0.01), "rho=-0.01: needs 0 <= rho <= 1"),
    (SanwBandpass, dict(alpha=0.0), None),
    (SanwBandpass, dict(alpha=-0.01), "alpha=-0.01: SANW-Bandpass needs alpha >= 0"),
    (SanwBandpass, dict(m1=0.5, m2=0.5), "m1=0.5, m2=0.5: the band needs m1 < m2"),
    (SanwBandpass, dict(gamma=0.0), "gamma=0.0: needs gamma > 0"),
    (SanwBandpass, dict(gamma=1e-6), None),
])
def test_validity_rules_at_their_boundaries(loss, params, problem):
    assert loss(**params).problems() == ([] if problem is None else [problem])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError, match=r"^sanw_bandpass: alpha=-1.0: .*; m1=0.9, m2=0.1: .*; gamma=0.0: .*; rho=2.0: "):
        SanwBandpass(alpha=-1.0, m1=0.9, m2=0.1, gamma=0.0, rho=2.0).checked()


def test_strength_ramps_only_the_strength_and_never_past_full():
    loss = SanwDebias(alpha=0.4, delta=0.1, lam=2.0)
    assert loss.ramped(0.25) == SanwDebias(alpha=0.1, delta=0.1, lam=2.0)
    assert loss.ramped(1.0) is loss and loss.ramped(3.0) is loss
    assert loss.ramped(-1.0).strength_value == 0.0 and loss.strength_value == 0.4
    assert InfoNCE().ramped(0.5) == InfoNCE() and InfoNCE().strength_value == 0.0
