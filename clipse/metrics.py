"""Retrieval metrics (docs/metrics.md: the CLIP_benchmark protocol plus median rank and mAP@10).

Every image and every caption is encoded once; ``S = text_emb @ image_emb.T``. Ranks are
1-based: 1 + the number of candidates scored strictly higher. Text->image has one relevant
image per caption; image->text has all of the image's captions relevant.

Where the data knows which captions truly describe which images (``relevant``, generated
data), the multi-positive recalls ``mp_*`` count a hit for any truly relevant candidate: an
image's best-ranked caption that describes it, a caption's best-ranked image it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MAP_DEPTH = 10
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_mr", "i2t_map10",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_mr", "t2i_map10",
    "r1_mean", "rsum",
)
MP_METRIC_KEYS = tuple(f"mp_{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)
# Rows of the score matrix compared at once: keeps the temporaries in cache.
_ROW_BLOCK = 256


@dataclass
class RetrievalRanks:
    """Per-query results, kept so that reports can bootstrap over test images."""

    t2i_rank: np.ndarray          # (C,) rank of each caption's image among all images
    i2t_best_rank: np.ndarray     # (N,) rank of each image's best-ranked caption
    i2t_ap10: np.ndarray          # (N,) AP@10 of each image over its captions
    caption_image: np.ndarray     # (C,) row of each caption's image
    # with ground truth only: rank of each image's best truly describing caption, of each
    # caption's best truly described image
    mp_i2t_rank: np.ndarray | None = None  # (N,)
    mp_t2i_rank: np.ndarray | None = None  # (C,)


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image_index,
                    relevant: torch.Tensor | None = None) -> RetrievalRanks:
    """Rank every query of both directions, vectorised (no Python loop over queries).
    ``relevant`` (C, N) bool, where known: caption c truly describes image n."""
    images = image_emb.detach().float().cpu()
    texts = text_emb.detach().float().cpu()
    owner = torch.as_tensor(np.asarray(caption_image_index), dtype=torch.long)
    n_images, n_captions = images.shape[0], texts.shape[0]
    if owner.shape != (n_captions,):
        raise ValueError(f"caption_image_index has shape {tuple(owner.shape)}, expected ({n_captions},)")
    if n_captions and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError("caption_image_index points outside the image rows")
    captions_per_image = torch.bincount(owner, minlength=n_images)
    if n_images == 0 or (captions_per_image == 0).any():
        raise ValueError("every image needs at least one caption")

    scores = images @ texts.T                                   # (N, C); each score computed once
    own = scores[owner, torch.arange(n_captions)]               # (C,) caption k with its own image
    best_own = torch.full((n_images,), float("-inf")).scatter_reduce(0, owner, own, reduce="amax")

    # Counts go through float32 sums (exact below 2**24 candidates): much faster than bool sums.
    t2i_higher = torch.zeros(n_captions)
    i2t_higher = torch.empty(n_images)
    for start in range(0, n_images, _ROW_BLOCK):
        rows = scores[start:start + _ROW_BLOCK]
        t2i_higher += (rows > own).to(torch.float32).sum(dim=0)
        i2t_higher[start:start + _ROW_BLOCK] = (rows > best_own[start:start + _ROW_BLOCK, None]).to(torch.float32).sum(dim=1)

    # AP@10 = (1 / min(R, 10)) * sum_k P@k * rel_k over the first 10 positions of the ranked
    # caption list (positions, not tie-aware ranks, so that AP stays <= 1 when scores tie).
    depth = min(MAP_DEPTH, n_captions)
    top_captions = torch.topk(scores, depth, dim=1).indices
    own_caption = (owner[top_captions] == torch.arange(n_images)[:, None]).double()
    position = torch.arange(1, depth + 1, dtype=torch.float64)
    ap10 = (own_caption * own_caption.cumsum(dim=1) / position).sum(dim=1) / captions_per_image.clamp(max=MAP_DEPTH).double()
    mp_ranks = {} if relevant is None else multi_positive_ranks(scores, relevant, owner)
    return RetrievalRanks(
        t2i_rank=(t2i_higher.long() + 1).numpy(),
        i2t_best_rank=(i2t_higher.long() + 1).numpy(),
        i2t_ap10=ap10.numpy(),
        caption_image=owner.numpy(),
        **mp_ranks,
    )


def multi_positive_ranks(scores: torch.Tensor, relevant: torch.Tensor, owner: torch.Tensor) -> dict[str, np.ndarray]:
    """Ranks of the best truly relevant candidate in both directions, from the (N, C) scores."""
    relevant = torch.as_tensor(relevant, dtype=torch.bool).T   # (N, C)
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant has shape {tuple(relevant.T.shape)}, expected {tuple(scores.T.shape)}")
    if not relevant[owner, torch.arange(len(owner))].all():
        raise ValueError("relevant must hold every caption's own image")
    masked = scores.masked_fill(~relevant, float("-inf"))
    best_caption, best_image = masked.amax(dim=1), masked.amax(dim=0)   # (N,), (C,)
    i2t_higher = torch.empty(scores.shape[0])
    t2i_higher = torch.zeros(scores.shape[1])
    for start in range(0, scores.shape[0], _ROW_BLOCK):
        rows = scores[start:start + _ROW_BLOCK]
        i2t_higher[start:start + _ROW_BLOCK] = (rows > best_caption[start:start + _ROW_BLOCK, None]).to(torch.float32).sum(1)
        t2i_higher += (rows > best_image).to(torch.float32).sum(dim=0)
    return {"mp_i2t_rank": (i2t_higher.long() + 1).numpy(), "mp_t2i_rank": (t2i_higher.long() + 1).numpy()}


def metrics_from_ranks(ranks: RetrievalRanks, image_counts: np.ndarray | None = None) -> dict[str, float]:
    """The metric dict. ``image_counts`` weighs each image (and its captions) that many
    times, as a bootstrap resample of the test images does; ``None`` weighs all once."""
    counts = np.ones(len(ranks.i2t_best_rank)) if image_counts is None else np.asarray(image_counts, float)
    caption_counts = counts[ranks.caption_image]

    def directional(rank: np.ndarray, weights: np.ndarray, ap10: np.ndarray, prefix: str) -> dict:
        out = {f"{prefix}_r{k}": float(np.average(rank <= k, weights=weights)) for k in RECALL_KS}
        out[f"{prefix}_mr"] = float(np.median(np.repeat(rank, weights.astype(int))))
        out[f"{prefix}_map10"] = float(np.average(ap10, weights=weights))
        return out

    t2i_rr = np.where(ranks.t2i_rank <= MAP_DEPTH, 1.0 / ranks.t2i_rank, 0.0)
    metrics = {
        **directional(ranks.i2t_best_rank, counts, ranks.i2t_ap10, "i2t"),
        **directional(ranks.t2i_rank, caption_counts, t2i_rr, "t2i"),
    }
    metrics["r1_mean"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    if ranks.mp_i2t_rank is not None:
        for k in RECALL_KS:
            metrics[f"mp_i2t_r{k}"] = float(np.average(ranks.mp_i2t_rank <= k, weights=counts))
            metrics[f"mp_t2i_r{k}"] = float(np.average(ranks.mp_t2i_rank <= k, weights=caption_counts))
    return {key: metrics[key] for key in metric_keys(ranks)}


def metric_keys(ranks: RetrievalRanks) -> tuple[str, ...]:
    """The standard metrics, and the multi-positive ones where the ranks have them."""
    return METRIC_KEYS + (MP_METRIC_KEYS if ranks.mp_i2t_rank is not None else ())


MEDIAN_KEYS = ("i2t_mr", "t2i_mr")


def resampled_metrics(ranks: RetrievalRanks, image_counts: np.ndarray) -> dict[str, np.ndarray]:
    """``metrics_from_ranks`` for many resamples at once: ``image_counts`` is (R, N), one row of
    image weights per resample; returns every metric but the median ranks as an (R,) array.
    Each is a weighted mean, so a resample is one matrix product."""
    counts = np.asarray(image_counts, float)
    n_images = len(ranks.i2t_best_rank)
    per_image_captions = np.bincount(ranks.caption_image, minlength=n_images)
    caption_weight = counts @ per_image_captions

    def over_captions(values: np.ndarray) -> np.ndarray:
        return counts @ np.bincount(ranks.caption_image, weights=values, minlength=n_images) / caption_weight

    total = counts.sum(axis=1)
    out = {}
    for k in RECALL_KS:
        out[f"i2t_r{k}"] = counts @ (ranks.i2t_best_rank <= k) / total
        out[f"t2i_r{k}"] = over_captions((ranks.t2i_rank <= k).astype(float))
    out["i2t_map10"] = counts @ ranks.i2t_ap10 / total
    out["t2i_map10"] = over_captions(np.where(ranks.t2i_rank <= MAP_DEPTH, 1.0 / ranks.t2i_rank, 0.0))
    out["r1_mean"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    if ranks.mp_i2t_rank is not None:
        for k in RECALL_KS:
            out[f"mp_i2t_r{k}"] = counts @ (ranks.mp_i2t_rank <= k) / total
            out[f"mp_t2i_r{k}"] = over_captions((ranks.mp_t2i_rank <= k).astype(float))
    return {key: out[key] for key in metric_keys(ranks) if key not in MEDIAN_KEYS}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image_index) -> dict[str, float]:
    """The public API: metrics for N images and C captions; ``caption_image_index[k]`` is the row
    of caption k's image. Recalls are fractions in [0, 1]; MR is a (possibly .5) median rank."""
    return metrics_from_ranks(retrieval_ranks(image_emb, text_emb, caption_image_index))
