"""Evaluation: retrieval metrics with tie-aware ranks (``metrics``), encoding a split once and
scoring it (``encoding``), and the statistics of comparing two sets of runs on one test set:
paired bootstrap and power (``statistics``). docs/reference/metrics.md states the definitions."""

from clipse.evaluation.metrics import (
                                       METRIC_KEYS,
                                       MP_METRIC_KEYS,
                                       TIE_KEYS,
                                       RetrievalRanks,
                                       TiedRanks,
                                       metrics_from_ranks,
                                       retrieval_metrics,
                                       retrieval_ranks,
)

__all__ = ["METRIC_KEYS", "MP_METRIC_KEYS", "TIE_KEYS", "RetrievalRanks", "TiedRanks", "metrics_from_ranks",
           "retrieval_metrics", "retrieval_ranks"]
