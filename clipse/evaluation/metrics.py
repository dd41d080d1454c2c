"""Retrieval metrics (docs/reference/metrics.md: the CLIP_benchmark protocol plus median rank and mAP@10).

Every image and every caption is encoded once; ``S = text_emb @ image_emb.T``. Ranks are
1-based and **tie-aware**: a query's rank, recall and AP are their expected values when the
candidates tied with its relevant item(s) are put in uniformly random order (McSherry and
Najork, ECIR 2008). Counting only strictly higher candidates would give a collapsed model,
whose scores all tie, perfect recall. Text->image has one relevant image per caption;
image->text has all of the image's captions relevant, and the expectation runs over the order
of the whole tied group (hypergeometric), never favouring the relevant items.

Where the data knows which captions truly describe which images (``relevant``, generated
data), the multi-positive recalls ``mp_*`` count a hit for any truly relevant candidate: an
image's best-ranked caption that describes it, a caption's best-ranked image it describes.

``tie_share`` is the collapse signal: the share of queries whose relevant score ties exactly
with a candidate of different content (identical captions or images tie under any model and do
not count), the larger of the two directions.
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
TIE_KEYS = ("i2t_tie_share", "t2i_tie_share", "tie_share")
MP_METRIC_KEYS = tuple(f"mp_{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS)
MEDIAN_KEYS = ("i2t_mr", "t2i_mr")
# The rule ranks are computed by; ranks saved before it existed counted strictly higher candidates.
RANK_RULE = "tie-aware"
STRICT_RULE = "strict"
# Rows of the score matrix compared at once: keeps the temporaries in cache.
_ROW_BLOCK = 256
_DIRECTIONS = ("t2i", "i2t", "mp_t2i", "mp_i2t")


@dataclass(frozen=True)
class TiedRanks:
    """Where each query's best relevant candidate stands: ``higher`` candidates score strictly
    above it, ``tied`` (relevant ones included, so >= 1) score exactly the same, and
    ``tied_relevant`` (>= 1) of those are relevant."""

    higher: np.ndarray
    tied: np.ndarray
    tied_relevant: np.ndarray

    @classmethod
    def untied(cls, rank: np.ndarray) -> "TiedRanks":
        """Ranks known only as integers (as files of the strict rule kept them)."""
        rank = np.asarray(rank, dtype=np.int64)
        return cls(rank - 1, np.ones_like(rank), np.ones_like(rank))

    def hit_rate(self, k: int) -> np.ndarray:
        """P(rank <= k): 1 - P(none of the group's first ``k - higher`` places is relevant),
        the hypergeometric probability prod_j (tied - relevant - j) / (tied - j)."""
        room = np.clip(k - self.higher, 0, self.tied)
        miss = np.ones(len(self.higher))
        for j in range(k):
            factor = (self.tied - self.tied_relevant - j) / np.maximum(self.tied - j, 1)
            miss = np.where(j < room, miss * np.maximum(factor, 0.0), miss)
        return 1.0 - miss

    def expected_rank(self) -> np.ndarray:
        """``higher`` + the expected place of the first relevant item in its tied group."""
        return self.higher + (self.tied + 1) / (self.tied_relevant + 1)

    def reciprocal_rank(self, depth: int) -> np.ndarray:
        """E[1/rank if rank <= depth else 0] for a single relevant item (ranks uniform over
        higher+1 .. higher+tied)."""
        if not np.all(self.tied_relevant == 1):
            raise ValueError("reciprocal_rank needs one relevant item per query")
        harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, depth + 1))])
        return (harmonic[np.minimum(self.higher + self.tied, depth)] - harmonic[np.minimum(self.higher, depth)]) / self.tied


@dataclass
class RetrievalRanks:
    """Per-query results, kept so that reports can bootstrap over test images."""

    t2i: TiedRanks                 # (C,) each caption's own image among all images
    i2t: TiedRanks                 # (N,) each image's best-ranked own caption
    i2t_ap10: np.ndarray           # (N,) expected AP@10 of each image over its captions
    caption_image: np.ndarray      # (C,) row of each caption's image
    t2i_content_tie: np.ndarray    # (C,) the own image ties with an image of different content
    i2t_content_tie: np.ndarray    # (N,) the best own caption ties with a caption of different content
    # with ground truth only: each image's best truly describing caption, each caption's best
    # truly described image
    mp_i2t: TiedRanks | None = None
    mp_t2i: TiedRanks | None = None
    rule: str = RANK_RULE

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for ``np.savez``; ``from_arrays`` reads them back."""
        arrays = {"rule": np.array(self.rule), "i2t_ap10": self.i2t_ap10, "caption_image": self.caption_image,
                  "t2i_content_tie": self.t2i_content_tie, "i2t_content_tie": self.i2t_content_tie}
        for direction in _DIRECTIONS:
            tied = getattr(self, direction)
            if tied is not None:
                arrays.update({f"{direction}_{field}": getattr(tied, field)
                               for field in ("higher", "tied", "tied_relevant")})
        return arrays

    @classmethod
    def from_arrays(cls, arrays) -> "RetrievalRanks":
        """What ``to_arrays`` wrote, or a file of the strict rule (integer ranks, no tie counts)."""
        if "rule" not in arrays:
            mp = {}
            if "mp_i2t_rank" in arrays:
                mp = {"mp_i2t": TiedRanks.untied(arrays["mp_i2t_rank"]), "mp_t2i": TiedRanks.untied(arrays["mp_t2i_rank"])}
            return cls(t2i=TiedRanks.untied(arrays["t2i_rank"]), i2t=TiedRanks.untied(arrays["i2t_best_rank"]),
                       i2t_ap10=arrays["i2t_ap10"], caption_image=arrays["caption_image"],
                       t2i_content_tie=np.zeros(len(arrays["t2i_rank"]), bool),
                       i2t_content_tie=np.zeros(len(arrays["i2t_best_rank"]), bool), rule=STRICT_RULE, **mp)
        tied = {d: TiedRanks(*(arrays[f"{d}_{f}"] for f in ("higher", "tied", "tied_relevant")))
                for d in _DIRECTIONS if f"{d}_higher" in arrays}
        return cls(**tied, i2t_ap10=arrays["i2t_ap10"], caption_image=arrays["caption_image"],
                   t2i_content_tie=arrays["t2i_content_tie"], i2t_content_tie=arrays["i2t_content_tie"],
                   rule=str(arrays["rule"]))

    @property
    def n_images(self) -> int:
        return len(self.i2t.higher)


def _counts(values: torch.Tensor) -> np.ndarray:
    return values.round().long().numpy()


def retrieval_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image_index,
                    relevant: torch.Tensor | None = None, *, image_content=None,
                    caption_content=None) -> RetrievalRanks:
    """Rank every query of both directions, vectorised (no Python loop over queries).
    ``relevant`` (C, N) bool, where known: caption c truly describes image n.
    ``image_content`` (N,) / ``caption_content`` (C,): equal ids mark identical images or
    captions (ties between them are not collapse); by default every item is its own content.
    Non-finite scores (a model that produced NaN) count as the lowest score."""
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

    scores = torch.nan_to_num(images @ texts.T, nan=float("-inf"))  # (N, C); each score computed once
    own = scores[owner, torch.arange(n_captions)]                   # (C,) caption k with its own image
    best_own = torch.full((n_images,), float("-inf")).scatter_reduce(0, owner, own, reduce="amax")

    # Counts go through float32 sums (exact below 2**24 candidates): much faster than bool sums.
    t2i_higher, t2i_tied = torch.zeros(n_captions), torch.zeros(n_captions)
    i2t_higher, i2t_tied = torch.empty(n_images), torch.empty(n_images)
    for start in range(0, n_images, _ROW_BLOCK):
        rows, best = scores[start:start + _ROW_BLOCK], best_own[start:start + _ROW_BLOCK, None]
        t2i_higher += (rows > own).to(torch.float32).sum(dim=0)
        t2i_tied += (rows == own).to(torch.float32).sum(dim=0)
        i2t_higher[start:start + _ROW_BLOCK] = (rows > best).to(torch.float32).sum(dim=1)
        i2t_tied[start:start + _ROW_BLOCK] = (rows == best).to(torch.float32).sum(dim=1)
    own_at_best = torch.bincount(owner, weights=(own == best_own[owner]).double(), minlength=n_images)

    image_ids = _content_ids(image_content, n_images)
    caption_ids = _content_ids(caption_content, n_captions)
    mp = {} if relevant is None else multi_positive_ranks(scores, relevant, owner)
    return RetrievalRanks(
        t2i=TiedRanks(_counts(t2i_higher), _counts(t2i_tied), np.ones(n_captions, dtype=np.int64)),
        i2t=TiedRanks(_counts(i2t_higher), _counts(i2t_tied), _counts(own_at_best)),
        i2t_ap10=_expected_ap(scores, owner, own, captions_per_image),
        caption_image=owner.numpy(),
        t2i_content_tie=_content_ties(scores, own, image_ids, t2i_tied > 1, along_rows=False),
        i2t_content_tie=_content_ties(scores, best_own, caption_ids, i2t_tied > 1, along_rows=True),
        **mp,
    )


def _content_ids(content, n: int) -> torch.Tensor:
    if content is None:
        return torch.arange(n)
    ids = torch.as_tensor(np.asarray(content), dtype=torch.long)
    if ids.shape != (n,):
        raise ValueError(f"content ids have shape {tuple(ids.shape)}, expected ({n},)")
    return ids


def _content_ties(scores: torch.Tensor, target: torch.Tensor, content: torch.Tensor, any_tie: torch.Tensor,
                  along_rows: bool) -> np.ndarray:
    """Per query (a row of ``scores`` when ``along_rows``, else a column): does its ``target``
    score tie with candidates of more than one content? Only queries with ``any_tie`` are looked
    at; content ids go through float32 (exact below 2**24), like the counts."""
    flagged = torch.zeros(len(any_tie), dtype=torch.bool)
    queries = any_tie.nonzero().flatten()
    if not len(queries):
        return flagged.numpy()
    ids, inf = content.to(torch.float32), float("inf")
    if along_rows:
        for start in range(0, len(queries), _ROW_BLOCK):
            chosen = queries[start:start + _ROW_BLOCK]
            tied = scores[chosen] == target[chosen, None]
            low = torch.where(tied, ids, inf).amin(dim=1)
            flagged[chosen] = low != torch.where(tied, ids, -inf).amax(dim=1)
        return flagged.numpy()
    every = len(queries) == len(any_tie)
    low, high, wanted = torch.full((len(queries),), inf), torch.full((len(queries),), -inf), target[queries]
    for start in range(0, scores.shape[0], _ROW_BLOCK):
        rows = scores[start:start + _ROW_BLOCK]
        tied = (rows if every else rows[:, queries]) == wanted
        block_ids = ids[start:start + _ROW_BLOCK, None]
        low = torch.minimum(low, torch.where(tied, block_ids, inf).amin(dim=0))
        high = torch.maximum(high, torch.where(tied, block_ids, -inf).amax(dim=0))
    flagged[queries] = low != high
    return flagged.numpy()


def _expected_ap(scores: torch.Tensor, owner: torch.Tensor, own: torch.Tensor,
                 captions_per_image: torch.Tensor) -> np.ndarray:
    """Expected AP@10 of every image over its ranked captions, ties in random order.
    AP@10 = (1 / min(R, 10)) * sum_k rel_k * (relevant in the top k) / k; for place k inside a
    tied group of ``tied`` items (``relevant`` of them relevant, ``above`` items and
    ``relevant_above`` relevant ones strictly above it), E[rel_k * hits_k] =
    relevant / tied * (relevant_above + 1 + (k - 1 - above) * (relevant - 1) / (tied - 1))."""
    n_images, n_captions = scores.shape
    depth = min(MAP_DEPTH, n_captions)
    listed = min(depth + 1, n_captions)   # one more than the depth: tells whether the last group goes on
    top = torch.topk(scores, listed, dim=1)
    values, is_own = top.values, owner[top.indices] == torch.arange(n_images)[:, None]
    place_value = values[:, :depth, None]                          # (N, depth, 1)
    above = values[:, None, :] > place_value                       # (N, depth, listed)
    same = values[:, None, :] == place_value
    n_above, tied = above.sum(-1).double(), same.sum(-1).double()
    relevant_above, relevant = (above & is_own[:, None]).sum(-1).double(), (same & is_own[:, None]).sum(-1).double()
    if listed < n_captions:  # the group of the last listed value may go on past the list: count it whole
        cut = values[:, depth - 1] == values[:, listed - 1]
        boundary = values[:, :depth] == values[:, listed - 1:listed]   # (N, depth)
        rows = cut.nonzero().flatten()
        if len(rows):
            value = torch.full((n_images,), float("nan"))
            value[rows] = values[rows, listed - 1]
            whole = torch.zeros(n_images, dtype=torch.float64)
            for start in range(0, len(rows), _ROW_BLOCK):
                chosen = rows[start:start + _ROW_BLOCK]
                whole[chosen] = (scores[chosen] == value[chosen, None]).to(torch.float32).sum(dim=1).double()
            own_whole = torch.bincount(owner, weights=(own == value[owner]).double(), minlength=n_images)
            tied = torch.where(boundary, whole[:, None], tied)
            relevant = torch.where(boundary, own_whole[:, None], relevant)
    place = torch.arange(depth, dtype=torch.float64)               # k - 1
    expected = relevant / tied * (relevant_above + 1 + (place - n_above) * (relevant - 1) / (tied - 1).clamp(min=1))
    ap = (expected / (place + 1)).sum(dim=1) / captions_per_image.clamp(max=MAP_DEPTH).double()
    return ap.numpy()


def multi_positive_ranks(scores: torch.Tensor, relevant: torch.Tensor, owner: torch.Tensor) -> dict[str, TiedRanks]:
    """The best truly relevant candidate of every query in both directions, from the (N, C) scores."""
    relevant = torch.as_tensor(relevant, dtype=torch.bool).T   # (N, C)
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant has shape {tuple(relevant.T.shape)}, expected {tuple(scores.T.shape)}")
    if not relevant[owner, torch.arange(len(owner))].all():
        raise ValueError("relevant must hold every caption's own image")
    masked = scores.masked_fill(~relevant, float("-inf"))
    best_caption, best_image = masked.amax(dim=1), masked.amax(dim=0)   # (N,), (C,)
    n_images, n_captions = scores.shape
    i2t = [torch.empty(n_images) for _ in range(3)]                    # higher, tied, tied relevant
    t2i = [torch.zeros(n_captions) for _ in range(3)]
    for start in range(0, n_images, _ROW_BLOCK):
        block = slice(start, start + _ROW_BLOCK)
        rows, rows_relevant, best = scores[block], relevant[block], best_caption[block, None]
        i2t[0][block] = (rows > best).to(torch.float32).sum(1)
        tied = rows == best
        i2t[1][block] = tied.to(torch.float32).sum(1)
        i2t[2][block] = (tied & rows_relevant).to(torch.float32).sum(1)
        t2i[0] += (rows > best_image).to(torch.float32).sum(dim=0)
        tied = rows == best_image
        t2i[1] += tied.to(torch.float32).sum(dim=0)
        t2i[2] += (tied & rows_relevant).to(torch.float32).sum(dim=0)
    return {"mp_i2t": TiedRanks(*map(_counts, i2t)), "mp_t2i": TiedRanks(*map(_counts, t2i))}


def metrics_from_ranks(ranks: RetrievalRanks, image_counts: np.ndarray | None = None) -> dict[str, float]:
    """The metric dict. ``image_counts`` weighs each image (and its captions) that many
    times, as a bootstrap resample of the test images does; ``None`` weighs all once."""
    counts = np.ones(ranks.n_images) if image_counts is None else np.asarray(image_counts, float)
    caption_counts = counts[ranks.caption_image]
    metrics = {}
    for prefix, tied, weights, ap10 in (("i2t", ranks.i2t, counts, ranks.i2t_ap10),
                                        ("t2i", ranks.t2i, caption_counts, ranks.t2i.reciprocal_rank(MAP_DEPTH))):
        for k in RECALL_KS:
            metrics[f"{prefix}_r{k}"] = float(np.average(tied.hit_rate(k), weights=weights))
        metrics[f"{prefix}_mr"] = float(np.median(np.repeat(tied.expected_rank(), weights.astype(int))))
        metrics[f"{prefix}_map10"] = float(np.average(ap10, weights=weights))
    metrics["r1_mean"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    metrics["i2t_tie_share"] = float(np.average(ranks.i2t_content_tie, weights=counts))
    metrics["t2i_tie_share"] = float(np.average(ranks.t2i_content_tie, weights=caption_counts))
    metrics["tie_share"] = max(metrics["i2t_tie_share"], metrics["t2i_tie_share"])
    if ranks.mp_i2t is not None:
        for k in RECALL_KS:
            metrics[f"mp_i2t_r{k}"] = float(np.average(ranks.mp_i2t.hit_rate(k), weights=counts))
            metrics[f"mp_t2i_r{k}"] = float(np.average(ranks.mp_t2i.hit_rate(k), weights=caption_counts))
    return {key: metrics[key] for key in metric_keys(ranks)}


def metric_keys(ranks: RetrievalRanks) -> tuple[str, ...]:
    """The standard metrics, the tie shares, and the multi-positive ones where the ranks have them."""
    return METRIC_KEYS + TIE_KEYS + (MP_METRIC_KEYS if ranks.mp_i2t is not None else ())


def resampled_metrics(ranks: RetrievalRanks, image_counts: np.ndarray) -> dict[str, np.ndarray]:
    """``metrics_from_ranks`` for many resamples at once: ``image_counts`` is (R, N), one row of
    image weights per resample; returns every metric but the median ranks and tie shares as an
    (R,) array. Each is a weighted mean, so a resample is one matrix product."""
    counts = np.asarray(image_counts, float)
    per_image_captions = np.bincount(ranks.caption_image, minlength=ranks.n_images)
    caption_weight = counts @ per_image_captions

    def over_captions(values: np.ndarray) -> np.ndarray:
        return counts @ np.bincount(ranks.caption_image, weights=values, minlength=ranks.n_images) / caption_weight

    total = counts.sum(axis=1)
    out = {}
    for k in RECALL_KS:
        out[f"i2t_r{k}"] = counts @ ranks.i2t.hit_rate(k) / total
        out[f"t2i_r{k}"] = over_captions(ranks.t2i.hit_rate(k))
    out["i2t_map10"] = counts @ ranks.i2t_ap10 / total
    out["t2i_map10"] = over_captions(ranks.t2i.reciprocal_rank(MAP_DEPTH))
    out["r1_mean"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    if ranks.mp_i2t is not None:
        for k in RECALL_KS:
            out[f"mp_i2t_r{k}"] = counts @ ranks.mp_i2t.hit_rate(k) / total
            out[f"mp_t2i_r{k}"] = over_captions(ranks.mp_t2i.hit_rate(k))
    return {key: out[key] for key in metric_keys(ranks) if key in out}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image_index) -> dict[str, float]:
    """The public API: metrics for N images and C captions; ``caption_image_index[k]`` is the row
    of caption k's image. Recalls are fractions in [0, 1] (expected values over the order of
    tied candidates); MR is a median of expected ranks. Every image and caption counts as its own
    content for ``tie_share`` (``retrieval_ranks`` takes content ids)."""
    return metrics_from_ranks(retrieval_ranks(image_emb, text_emb, caption_image_index))


def metrics_table(metrics: dict[str, float]) -> str:
    """One row per direction, recalls in percent."""
    header = f"{'':12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MR':>8}{'mAP@10':>9}"
    rows = [header]
    for prefix, label in (("i2t", "image->text"), ("t2i", "text->image")):
        rows.append(f"{label:12}" + "".join(f"{100 * metrics[f'{prefix}_r{k}']:8.2f}" for k in (1, 5, 10))
                    + f"{metrics[f'{prefix}_mr']:8.1f}{100 * metrics[f'{prefix}_map10']:9.2f}")
    rows.append(f"R@1 mean {100 * metrics['r1_mean']:.2f}   RSUM {100 * metrics['rsum']:.2f}   "
                f"tied with other content: {100 * metrics['i2t_tie_share']:.2f}% of images, "
                f"{100 * metrics['t2i_tie_share']:.2f}% of captions")
    return "\n".join(rows)
