"""Metrics for retrieval, built on torchmetrics (state, update, compute, reset and distributed sync).

Three families, matching the three metric arguments of :class:`twotower.tasks.Retrieval`:

* loss metrics, updated with the loss value: :class:`LossMean`;
* batch metrics, updated with ``(labels, logits, sample_weight)`` of the in-batch softmax:
  :class:`BatchTopKAccuracy`, :class:`BatchAUC`;
* factorized metrics, updated with ``(query_embeddings, true_candidate_embeddings, true_candidate_ids,
  sample_weight)`` (or one checked :class:`FactorizedBatch`) and ranking the whole corpus:
  :class:`FactorizedMetric` is their interface, :class:`FactorizedTopK` TFRS's; :class:`CorpusRanking` ranks
  with several relevant items and exclusions per query.

The math is in :mod:`twotower.metrics.functional` as pure functions; the classes validate, call it and keep
weighted means. Every metric is a :class:`NamedMetric`, reporting ``{name: value}`` through ``results()``, so a
task or a training loop can log them without knowing which family they belong to. A weighted mean with no weight
(no updates yet) is 0, as Keras's ``divide_no_nan`` makes it.
"""

from __future__ import annotations

import warnings
from typing import Any

from twotower.metrics import functional
from twotower.metrics.base import NamedMetric, WeightedMean, WeightedMeans, check_sample_weight
from twotower.metrics.batch import BatchAUC, BatchTopKAccuracy, LossMean
from twotower.metrics.corpus import (
    CorpusRanking,
    FactorizedBatch,
    FactorizedMetric,
    FactorizedTopK,
    check_query_embeddings,
)

__all__ = [
    "BatchAUC",
    "BatchTopKAccuracy",
    "CorpusRanking",
    "FactorizedBatch",
    "FactorizedMetric",
    "FactorizedTopK",
    "LossMean",
    "NamedMetric",
    "WeightedMean",
    "WeightedMeans",
    "check_query_embeddings",
    "check_sample_weight",
    "functional",
]


def __getattr__(name: str) -> Any:
    # The old name collided with torchmetrics.retrieval.RetrievalMetric (another contract): kept one release.
    if name == "RetrievalMetric":
        warnings.warn(
            "twotower.metrics.RetrievalMetric is renamed NamedMetric (it collided with torchmetrics' RetrievalMetric)",
            DeprecationWarning,
            stacklevel=2,
        )
        return NamedMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
