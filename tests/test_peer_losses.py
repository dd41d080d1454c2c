"""The field's false- and hard-negative losses against float64 plain-loop references of their
papers' formulas, the cases where each reduces to InfoNCE, and OpenCLIP's SigLipLoss."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipse.losses import LOSSES, Reference, infonce_loss
from clipse.losses.sanw import affinity

REL = 1e-10


def batch(seed: int, size: int = 7, dim: int = 5):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(size, dim, generator=g, dtype=torch.float64), dim=1)
    v = F.normalize(u + 0.8 * torch.randn(size, dim, generator=g, dtype=torch.float64), dim=1)
    return u, v


def directions(u, v, s):
    """Image->text and text->image logits as lists: L[i][j] = s <u_i, v_j>, and its transpose."""
    logits = (s * u @ v.T).tolist()
    return [logits, [list(row) for row in zip(*logits)]]


def dcl_reference(u, v, s, tau_plus, beta=0.0):
    """Chuang et al. (DCL) and, with beta, Robinson et al. (HCL), as the authors' code computes them."""
    losses = []
    for L in directions(u, v, s):
        B, total = len(L), 0.0
        for i in range(B):
            pos = math.exp(L[i][i])
            negs = [math.exp(L[i][j]) for j in range(B) if j != i]
            imp = [math.exp(beta * L[i][j]) for j in range(B) if j != i]
            N = B - 1
            reweighted = sum(a * b for a, b in zip(imp, negs)) / (sum(imp) / N)
            ng = max((-tau_plus * N * pos + reweighted) / (1 - tau_plus), N * math.exp(-s))
            total += -math.log(pos / (pos + ng))
        losses.append(total / B)
    return sum(losses) / 2


def weighted_reference(u, v, s, weight):
    """The weighted-InfoNCE core by the letter, weight(i, j) for sample j as a negative of i."""
    losses = []
    for L in directions(u, v, s):
        B = len(L)
        total = 0.0
        for i in range(B):
            denominator = math.exp(L[i][i]) + sum(weight(i, j) * math.exp(L[i][j]) for j in range(B) if j != i)
            total += -L[i][i] + math.log(denominator)
        losses.append(total / B)
    return sum(losses) / 2


def hn_nce_reference(u, v, s, beta, rho=0.5):
    A = affinity(u, v, rho).tolist()
    B = len(A)

    def weight(i, j):
        mean = sum(math.exp(beta * s * A[i][k]) for k in range(B) if k != i) / (B - 1)
        return math.exp(beta * s * A[i][j]) / mean

    return weighted_reference(u, v, s, weight)


def fnc_reference(u, v, s, threshold, top_k=0, rho=0.5):
    A = affinity(u, v, rho).tolist()
    B = len(A)

    def removed(i, j):
        if top_k:
            order = sorted((k for k in range(B) if k != i), key=lambda k: -A[i][k])
            return j in order[:top_k]
        return A[i][j] > threshold

    return weighted_reference(u, v, s, lambda i, j: 0.0 if removed(i, j) else 1.0)


def decoupled_reference(u, v, s):
    losses = []
    for L in directions(u, v, s):
        B = len(L)
        losses.append(sum(-L[i][i] + math.log(sum(math.exp(L[i][j]) for j in range(B) if j != i))
                          for i in range(B)) / B)
    return sum(losses) / 2


CASES = [
    ("dcl", {"tau_plus": 0.1}, lambda u, v, s: dcl_reference(u, v, s, 0.1)),
    ("dcl", {"tau_plus": 0.3}, lambda u, v, s: dcl_reference(u, v, s, 0.3)),
    ("hcl", {"beta": 0.5, "tau_plus": 0.1}, lambda u, v, s: dcl_reference(u, v, s, 0.1, beta=0.5)),
    ("hcl", {"beta": 2.0, "tau_plus": 0.0}, lambda u, v, s: dcl_reference(u, v, s, 0.0, beta=2.0)),
    ("hn_nce", {"beta": 0.5}, lambda u, v, s: hn_nce_reference(u, v, s, 0.5)),
    ("hn_nce", {"beta": 1.5, "rho": 1.0}, lambda u, v, s: hn_nce_reference(u, v, s, 1.5, rho=1.0)),
    ("fnc", {"fnc_threshold": 0.3}, lambda u, v, s: fnc_reference(u, v, s, 0.3)),
    ("fnc", {"fnc_top_k": 2}, lambda u, v, s: fnc_reference(u, v, s, 0.8, top_k=2)),
    ("decoupled", {}, decoupled_reference),
]


@pytest.mark.parametrize("name,params,reference", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("seed", range(3))
def test_each_loss_matches_its_float64_reference(name, params, reference, seed):
    u, v = batch(seed)
    s = 4.0 + seed
    got, stats = LOSSES[name](**params)(u, v, torch.tensor(s, dtype=torch.float64))
    assert got.item() == pytest.approx(reference(u, v, s), rel=REL)
    assert all(torch.as_tensor(value).dim() == 0 for value in stats.values())


@pytest.mark.parametrize("name,params", [
    ("dcl", {"tau_plus": 0.0}),
    ("hcl", {"beta": 0.0, "tau_plus": 0.0}),
    ("hn_nce", {"beta": 0.0}),
    ("fnc", {"fnc_threshold": 1.5}),  # no affinity is above 1: nothing is removed
])
def test_it_reduces_to_infonce_where_its_paper_says(name, params):
    u, v = batch(11)
    s = torch.tensor(6.0, dtype=torch.float64)
    assert LOSSES[name](**params)(u, v, s)[0].item() == pytest.approx(infonce_loss(u, v, s)[0].item(), rel=REL)


def test_hcl_without_hardness_is_dcl():
    u, v = batch(12)
    s = torch.tensor(5.0, dtype=torch.float64)
    assert (LOSSES["hcl"](beta=0.0, tau_plus=0.2)(u, v, s)[0].item()
            == pytest.approx(LOSSES["dcl"](tau_plus=0.2)(u, v, s)[0].item(), rel=REL))


@pytest.mark.parametrize("seed", range(3))
def test_siglip_matches_openclips_siglip_loss(seed):
    from open_clip.loss import SigLipLoss

    u, v = batch(seed, size=9)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor([-10.0 + seed], dtype=torch.float64)
    got = LOSSES["siglip"]()(u, v, scale, logit_bias=bias)[0]
    want = SigLipLoss(rank=0, world_size=1)(u, v, scale, bias)
    assert got.item() == pytest.approx(want.item(), rel=REL)


def test_siglip_gives_the_model_its_bias_and_the_weights_follow_their_sources():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    LOSSES["siglip"](init_logit_bias=-7.0).prepare_model(model)
    assert model.logit_bias.item() == -7.0 and model.logit_bias.requires_grad
    u, v = batch(3)
    teacher = Reference(image=batch(4)[0], text=batch(4)[1])
    for name, params in (("hn_nce", {"beta": 1.0}), ("fnc", {"fnc_top_k": 2})):
        loss = LOSSES[name](**params)
        assert loss.uses_affinity
        assert torch.equal(loss.negative_weights(u, v, teacher, scale=5.0),
                           loss.negative_weights(teacher.image, teacher.text, scale=5.0))


def test_weights_average_one_or_remove_exactly_the_chosen_negatives():
    u, v = batch(5, size=8)
    off = ~torch.eye(8, dtype=torch.bool)
    hn = LOSSES["hn_nce"](beta=1.0).negative_weights(u, v, scale=5.0)
    assert torch.allclose(hn[off].view(8, 7).mean(dim=1), torch.ones(8, dtype=torch.float64))
    assert torch.equal(hn.diagonal(), torch.ones(8, dtype=torch.float64))
    fnc = LOSSES["fnc"](fnc_top_k=3).negative_weights(u, v)
    assert torch.equal((fnc == 0).sum(dim=1), torch.full((8,), 3)) and torch.equal(fnc.diagonal(), torch.ones(8))


@pytest.mark.parametrize("name,params", [("dcl", {"tau_plus": 0.1}), ("hcl", {"beta": 0.5, "tau_plus": 0.1}),
                                         ("hn_nce", {"beta": 0.5}), ("decoupled", {})])
def test_gradients_agree_with_finite_differences(name, params):
    """Affinity weights carry no gradient by design: they come from a fixed teacher here, so that
    finite differences of the embeddings see the same weights."""
    u, v = batch(7, size=5, dim=3)
    teacher = Reference(image=batch(9, size=5, dim=3)[0], text=batch(9, size=5, dim=3)[1])
    u.requires_grad_(True)
    v.requires_grad_(True)
    loss = LOSSES[name](**params)
    given = {"reference": teacher} if loss.uses_affinity else {}
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, torch.tensor(3.0, dtype=torch.float64), **given)[0],
                                    (u, v))


def test_a_batch_of_one_pair_has_no_negatives():
    u, v = batch(8, size=1)
    s = torch.tensor(5.0, dtype=torch.float64)
    for name in ("dcl", "hcl", "decoupled", "hn_nce", "fnc"):
        value = LOSSES[name]()(u, v, s)[0]
        assert torch.isfinite(value), name
