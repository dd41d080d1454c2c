"""Retrieval metrics against a plain-loop reference and a case worked out by hand, and the
tie rule against a brute force over every order of the tied candidates."""

import itertools
import math
import random
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipse.evaluation.metrics import (
    METRIC_KEYS,
    TIE_KEYS,
    metrics_from_ranks,
    retrieval_metrics,
    retrieval_ranks,
)


def reference_metrics(S, owner):
    """docs/reference/metrics.md by the letter. ``S[k][i]``: score of caption k against image i."""
    C, N = len(S), len(S[0])
    out = {}
    t2i = []
    for k in range(C):
        own = S[k][owner[k]]
        t2i.append(1 + sum(1 for i in range(N) if S[k][i] > own))
    best, aps = [], []
    for i in range(N):
        column = [S[k][i] for k in range(C)]
        relevant = [k for k in range(C) if owner[k] == i]
        ranks = [1 + sum(1 for x in column if x > column[k]) for k in relevant]
        best.append(min(ranks))
        ranked = sorted(range(C), key=lambda k: -column[k])
        hits, ap = 0, 0.0
        for position, k in enumerate(ranked[:10], start=1):
            if owner[k] == i:
                hits += 1
                ap += hits / position
        aps.append(ap / min(len(relevant), 10))
    for name, ranks in (("i2t", best), ("t2i", t2i)):
        for K in (1, 5, 10):
            out[f"{name}_r{K}"] = sum(r <= K for r in ranks) / len(ranks)
        out[f"{name}_mr"] = statistics.median(ranks)
    out["i2t_map10"] = sum(aps) / N
    out["t2i_map10"] = sum(1 / r if r <= 10 else 0 for r in t2i) / C
    out["r1_mean"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    out["rsum"] = sum(out[f"{d}_r{K}"] for d in ("i2t", "t2i") for K in (1, 5, 10))
    return out


def test_hand_computed_three_images():
    # Captions 0-1 belong to image 0, caption 2 to image 1, captions 3-5 to image 2.
    # Rows: a caption's scores against images 0, 1, 2 (image embeddings are the identity).
    S = torch.tensor([
        [0.90, 0.10, 0.30],   # own image 0 ranks 1
        [0.20, 0.80, 0.50],   # own image 0 ranks 3
        [0.40, 0.60, 0.70],   # own image 1 ranks 2
        [0.10, 0.20, 0.95],   # own image 2 ranks 1
        [0.50, 0.45, 0.40],   # own image 2 ranks 3
        [0.60, 0.35, 0.05],   # own image 2 ranks 3
    ])
    owner = [0, 0, 1, 2, 2, 2]
    m = retrieval_metrics(torch.eye(3), S, owner)
    # Text->image ranks 1,3,2,1,3,3: R@1 2/6, median of 1,1,2,3,3,3 is 2.5, RR mean 3.5/6.
    assert m["t2i_r1"] == pytest.approx(2 / 6)
    assert m["t2i_r5"] == m["t2i_r10"] == 1.0
    assert m["t2i_mr"] == 2.5
    assert m["t2i_map10"] == pytest.approx(3.5 / 6)
    # Image 0's captions by score: c0 .9 (hit), c5, c4, c2, c1 .2 (hit), c3: best 1, AP (1 + 2/5)/2.
    # Image 1: c1 .8, c2 .6 (hit): best 2, AP 1/2.
    # Image 2: c3 .95 (hit), c2, c1, c4 .4 (hit), c0, c5 .05 (hit): best 1, AP (1 + 2/4 + 3/6)/3.
    assert m["i2t_r1"] == pytest.approx(2 / 3)
    assert m["i2t_r5"] == m["i2t_r10"] == 1.0
    assert m["i2t_mr"] == 1.0
    assert m["i2t_map10"] == pytest.approx((0.7 + 0.5 + 2 / 3) / 3)
    assert m["r1_mean"] == pytest.approx(0.5)
    assert m["rsum"] == pytest.approx(5.0)
    assert tuple(m) == METRIC_KEYS + TIE_KEYS


@pytest.mark.parametrize("seed", range(7))
def test_matches_loop_reference_with_1_to_7_captions(seed):
    rng = random.Random(seed)
    n_images = rng.randint(2, 30) if seed < 6 else 300  # 300: more images than one block of rows
    owner = [i for i in range(n_images) for _ in range(rng.randint(1, 7))]
    rng.shuffle(owner)
    g = torch.Generator().manual_seed(seed)
    dim = rng.choice([2, 4, 16])  # low dimension: hard retrieval, ranks spread widely
    images = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    # captions near their image, with noise, so recalls are neither 0 nor 1
    texts = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(len(owner), dim, generator=g), dim=1)
    got = retrieval_metrics(images, texts, owner)
    S = (texts @ images.T).tolist()
    want = reference_metrics(S, owner)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_more_than_ten_captions_per_image_and_fewer_than_ten_candidates():
    g = torch.Generator().manual_seed(3)
    owner = [0] * 12 + [1] * 2
    images = torch.randn(2, 3, generator=g)
    texts = torch.randn(14, 3, generator=g)
    want = reference_metrics((texts @ images.T).tolist(), owner)
    got = retrieval_metrics(images, texts, owner)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_perfect_retrieval_scores_one():
    images = torch.eye(4)
    owner = [0, 0, 1, 2, 3, 3, 3]
    m = retrieval_metrics(images, images[owner], owner)
    assert m["i2t_r1"] == m["t2i_r1"] == 1.0 and m["i2t_mr"] == m["t2i_mr"] == 1.0
    assert m["t2i_map10"] == 1.0
    # image 3 has 3 captions, all tie at the top: they fill positions 1-3, AP 1
    assert m["i2t_map10"] == 1.0


def test_image_counts_weigh_like_a_resample():
    g = torch.Generator().manual_seed(0)
    owner = [0, 0, 1, 2, 2, 2, 3]
    images = torch.randn(4, 3, generator=g)
    texts = torch.randn(7, 3, generator=g)
    ranks = retrieval_ranks(images, texts, owner)
    counts = np.array([2, 0, 1, 3])
    weighted = metrics_from_ranks(ranks, counts)
    # a resample repeats queries but keeps the candidate lists: ranks stay, weights change
    assert weighted["i2t_r1"] == pytest.approx(np.average(ranks.i2t.hit_rate(1), weights=counts))
    caption_w = counts[np.array(owner)]
    assert weighted["t2i_r5"] == pytest.approx(np.average(ranks.t2i.hit_rate(5), weights=caption_w))
    assert weighted["t2i_mr"] == np.median(np.repeat(ranks.t2i.expected_rank(), caption_w))


def test_bad_index_raises():
    with pytest.raises(ValueError, match="^every image needs at least one caption$"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], [0, 1])
    with pytest.raises(ValueError, match="^caption_image_index points outside the image rows$"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 2])  # one past the last row
    with pytest.raises(ValueError, match=r"^caption_image_index has shape \(3,\), expected \(2,\)$"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 1, 1])


def test_a_single_image_is_a_valid_evaluation_set():
    m = retrieval_metrics(torch.eye(2)[:1], torch.eye(2)[[0, 0]], [0, 0])
    assert m["i2t_r1"] == m["t2i_r1"] == 1.0


# ---- ties: every order of the tied candidates, enumerated ------------------------------------


def orders(scores):
    """Every ranking of the candidates that agrees with ``scores``: the groups of equal scores
    from the highest down, each group in every order."""
    groups = [[c for c in range(len(scores)) if scores[c] == value] for value in sorted(set(scores), reverse=True)]
    for parts in itertools.product(*(itertools.permutations(group) for group in groups)):
        yield tuple(c for part in parts for c in part)


def brute_force_metrics(S, owner, relevant=None):
    """The tie rule by enumeration: each query's rank, hits and AP averaged over every order of
    its tied candidates (all equally likely), in float64. ``S[k][i]``: caption k vs image i;
    ``relevant[k][i]``: caption k truly describes image i (multi-positive recalls)."""
    C, N = len(S), len(S[0])

    def query(scores, is_relevant, depth_ap=None):
        ranks, hits, aps = [], {K: [] for K in (1, 5, 10)}, []
        for order in orders(scores):
            rank = 1 + next(p for p, c in enumerate(order) if is_relevant[c])
            ranks.append(rank)
            for K in hits:
                hits[K].append(rank <= K)
            if depth_ap is not None:
                found, ap = 0, 0.0
                for position, c in enumerate(order[:10], start=1):
                    if is_relevant[c]:
                        found += 1
                        ap += found / position
                aps.append(ap / depth_ap)
        return (statistics.fmean(ranks), {K: statistics.fmean(v) for K, v in hits.items()},
                statistics.fmean(aps) if aps else None)

    t2i = [query(S[k], [i == owner[k] for i in range(N)]) for k in range(C)]
    i2t = [query([S[k][i] for k in range(C)], [owner[k] == i for k in range(C)],
                 min(sum(o == i for o in owner), 10)) for i in range(N)]
    out = {}
    for name, per_query in (("i2t", i2t), ("t2i", t2i)):
        for K in (1, 5, 10):
            out[f"{name}_r{K}"] = statistics.fmean(q[1][K] for q in per_query)
        out[f"{name}_mr"] = statistics.median(q[0] for q in per_query)
    out["i2t_map10"] = statistics.fmean(q[2] for q in i2t)
    out["t2i_map10"] = statistics.fmean(
        statistics.fmean(1 / (1 + order.index(owner[k])) if order.index(owner[k]) < 10 else 0.0
                         for order in orders(S[k])) for k in range(C))
    out["r1_mean"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    out["rsum"] = sum(out[f"{d}_r{K}"] for d in ("i2t", "t2i") for K in (1, 5, 10))
    if relevant is not None:
        mp_t2i = [query(S[k], relevant[k]) for k in range(C)]
        mp_i2t = [query([S[k][i] for k in range(C)], [relevant[k][i] for k in range(C)]) for i in range(N)]
        for K in (1, 5, 10):
            out[f"mp_i2t_r{K}"] = statistics.fmean(q[1][K] for q in mp_i2t)
            out[f"mp_t2i_r{K}"] = statistics.fmean(q[1][K] for q in mp_t2i)
    return out


def tied_case(seed: int, n_images: int, n_captions: int):
    """Integer embeddings over a tiny vocabulary: scores are exact small integers, with many ties."""
    rng = random.Random(seed)
    owner = list(range(n_images)) + [rng.randrange(n_images) for _ in range(n_captions - n_images)]
    rng.shuffle(owner)
    images = torch.tensor([[rng.randint(0, 2) for _ in range(3)] for _ in range(n_images)], dtype=torch.float32)
    texts = torch.tensor([[rng.randint(0, 2) for _ in range(3)] for _ in range(n_captions)], dtype=torch.float32)
    relevant = torch.rand(n_captions, n_images, generator=torch.Generator().manual_seed(seed)) < 0.3
    relevant[torch.arange(n_captions), torch.tensor(owner)] = True
    return images, texts, owner, relevant


@pytest.mark.parametrize("seed", range(6))
def test_tied_scores_agree_with_every_order_enumerated(seed):
    # up to 7 captions: an image's candidate list is enumerated in at most 7! orders
    images, texts, owner, relevant = tied_case(seed, n_images=3 + seed % 3, n_captions=6 + seed % 2)
    S = (texts @ images.T).double().tolist()
    assert any(len(set(row)) < len(row) for row in S)  # the case really has ties
    want = brute_force_metrics(S, owner, relevant.tolist())
    got = metrics_from_ranks(retrieval_ranks(images, texts, owner, relevant))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_a_group_tied_across_the_tenth_place_counts_whole():
    """AP@10 with a tied group that starts inside the first ten places and goes on past them."""
    # image 0 (first coordinate): 7 captions of image 1 above, then its own 3 tied with 2 more
    # of image 1's at places 8-12; image 1 (second coordinate) sees every caption apart
    first = [9, 8, 7, 6, 5, 4, 3] + [1] * 5
    texts = torch.tensor([[float(x), float(k)] for k, x in enumerate(first)])
    owner = [1] * 7 + [0, 0, 0, 1, 1]
    images = torch.eye(2)
    got = metrics_from_ranks(retrieval_ranks(images, texts, owner))
    want = brute_force_metrics((texts @ images.T).double().tolist(), owner)
    for key in ("i2t_map10", "i2t_r10", "i2t_mr"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_constant_embeddings_score_chance_not_perfection():
    n_images, per_image = 100, 5
    owner = np.repeat(np.arange(n_images), per_image)
    n_captions = len(owner)
    m = retrieval_metrics(F.normalize(torch.ones(n_images, 8), dim=1), F.normalize(torch.ones(n_captions, 8), dim=1),
                          owner)
    for K in (1, 5, 10):
        assert m[f"t2i_r{K}"] == pytest.approx(K / n_images, abs=1e-12)
        # an image hits at K unless all K places go to other images' captions
        chance = 1 - math.comb(n_captions - per_image, K) / math.comb(n_captions, K)
        assert m[f"i2t_r{K}"] == pytest.approx(chance, abs=1e-12)
    assert m["t2i_mr"] == (n_images + 1) / 2
    assert m["i2t_mr"] == (n_captions + 1) / (per_image + 1)
    assert m["t2i_map10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / n_images, abs=1e-12)
    assert m["tie_share"] == m["i2t_tie_share"] == m["t2i_tie_share"] == 1.0


def test_two_tied_candidates_share_the_first_place():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 score alike for every caption
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(images, texts[[0, 0, 1]], [0, 1, 2])
    # captions 0 and 1: their image ties with one other at the top: rank 1.5, R@1 one half
    assert m["t2i_r1"] == pytest.approx((0.5 + 0.5 + 1) / 3, abs=1e-12)
    assert m["t2i_mr"] == 1.5 and m["t2i_map10"] == pytest.approx((0.75 + 0.75 + 1) / 3, abs=1e-12)
    assert m["t2i_tie_share"] == pytest.approx(2 / 3)


def test_identical_content_ties_but_is_not_collapse():
    """Byte-identical captions tie under any model: the rule still applies, the collapse signal ignores them."""
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # captions 1 and 2 say the same
    owner = [0, 1, 2, 2]
    ranks = retrieval_ranks(images, texts, owner, caption_content=[0, 1, 1, 2])
    m = metrics_from_ranks(ranks)
    assert m["i2t_r1"] == pytest.approx((1 + 0.5 + 1) / 3)   # image 1's caption ties with image 2's
    assert m["i2t_tie_share"] == 0.0
    assert metrics_from_ranks(retrieval_ranks(images, texts, owner))["i2t_tie_share"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"^content ids have shape \(2,\), expected \(4,\)$"):
        retrieval_ranks(images, texts, owner, caption_content=[0, 1])


def test_non_finite_embeddings_score_chance():
    images = torch.full((4, 2), float("nan"))
    m = retrieval_metrics(images, torch.eye(2)[[0, 1, 0, 1]], [0, 1, 2, 3])
    assert m["t2i_r1"] == pytest.approx(0.25) and m["i2t_r1"] == pytest.approx(0.25)


def test_no_ties_give_the_strict_ranks():
    g = torch.Generator().manual_seed(5)
    images, texts = torch.randn(40, 6, generator=g), torch.randn(120, 6, generator=g)
    owner = np.repeat(np.arange(40), 3)
    ranks = retrieval_ranks(images, texts, owner)
    assert (ranks.t2i.tied == 1).all() and (ranks.i2t.tied == 1).all()
    S = texts @ images.T
    strict = 1 + (S > S[np.arange(120), owner][:, None]).sum(1).numpy()
    assert np.array_equal(ranks.t2i.expected_rank(), strict)
    assert set(np.unique(ranks.t2i.hit_rate(5))) <= {0.0, 1.0}
