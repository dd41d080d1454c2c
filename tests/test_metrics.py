"""Retrieval metrics against a plain-loop reference and a case worked out by hand."""

import random
import statistics

import numpy as np
import pytest
import torch

from clipse.metrics import METRIC_KEYS, metrics_from_ranks, retrieval_metrics, retrieval_ranks


def reference_metrics(S, owner):
    """docs/metrics.md by the letter. ``S[k][i]``: score of caption k against image i."""
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
    assert tuple(m) == METRIC_KEYS


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
    assert weighted["i2t_r1"] == pytest.approx(np.average(ranks.i2t_best_rank <= 1, weights=counts))
    caption_w = counts[np.array(owner)]
    assert weighted["t2i_r5"] == pytest.approx(np.average(ranks.t2i_rank <= 5, weights=caption_w))
    assert weighted["t2i_mr"] == np.median(np.repeat(ranks.t2i_rank, caption_w))


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
