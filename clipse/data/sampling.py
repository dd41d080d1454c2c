"""Batch samplers: plain shuffled batches and topical batches.

Both cover every training pair exactly once per epoch and are deterministic for (seed, epoch).
A trailing batch of a single pair (no negatives, zero loss) is folded into the batch before it.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer


def chunk(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return fold_short_tail([indices[i:i + batch_size] for i in range(0, len(indices), batch_size)])


def fold_short_tail(batches: list[np.ndarray], shortest: int = 2) -> list[np.ndarray]:
    """Fold a last batch of fewer than ``shortest`` pairs into the one before it (a data-parallel
    run needs a pair for each of its processes)."""
    if len(batches) > 1 and len(batches[-1]) < shortest:
        batches[-2:] = [np.concatenate(batches[-2:])]
    return batches


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    return chunk(epoch_rng(seed, epoch).permutation(n), batch_size)


def auto_cluster_count(n: int, batch_size: int) -> int:
    """About four batches per cluster: clusters big enough for whole topical batches."""
    return int(np.clip(n // (4 * batch_size), 1, 64))


class TopicalBatchSampler:
    """Batches drawn from k-means clusters of caption features, round-robin across clusters.

    Each batch comes from one cluster (so its negatives are semantically close, where SANW has
    something to reweigh); consecutive batches cycle through the clusters. Pairs left over
    when a cluster runs out of full batches are pooled into mixed batches at the end.
    """

    def __init__(self, features, batch_size: int, seed: int, n_clusters: int | None = None):
        n = features.shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.n_clusters = n_clusters or auto_cluster_count(n, batch_size)
        km = KMeans(n_clusters=min(self.n_clusters, n), n_init=3, random_state=seed)
        self.labels = km.fit_predict(features)
        self.clusters = [np.flatnonzero(self.labels == c) for c in range(km.n_clusters)]

    @classmethod
    def from_captions(cls, captions: list[str], batch_size: int, seed: int, n_clusters: int | None = None):
        """Cluster TF-IDF features of the captions: fixed and meaningful from the first step,
        unlike embeddings of a model that starts from random weights."""
        features = TfidfVectorizer(ngram_range=(1, 2), min_df=1).fit_transform(captions)
        return cls(features, batch_size, seed, n_clusters)

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = epoch_rng(self.seed, epoch)
        queues, leftovers = [], []
        for members in self.clusters:
            shuffled = rng.permutation(members)
            full = len(shuffled) // self.batch_size * self.batch_size
            queues.append([shuffled[i:i + self.batch_size] for i in range(0, full, self.batch_size)])
            leftovers.append(shuffled[full:])
        order = rng.permutation(len(queues))
        batches = []
        while any(queues):
            for c in order:
                if queues[c]:
                    batches.append(queues[c].pop(0))
        tail = chunk(rng.permutation(np.concatenate(leftovers)), self.batch_size)
        if tail and len(tail[0]) < 2 and batches:
            batches[-1] = np.concatenate([batches[-1], tail.pop(0)])
        return batches + tail
