"""Metrics of one batch: the loss, and the in-batch softmax's top-K accuracy and AUC."""

from __future__ import annotations

from typing import Any

import torch

from twotower._checks import require_tensor
from twotower.metrics import functional
from twotower.metrics.base import WeightedMean, check_sample_weight


class LossMean(WeightedMean):
    """Running mean of the loss values it is updated with (one unit weight per update)."""

    higher_is_better = False

    def __init__(self, name: str = "loss_mean", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def update(self, loss: torch.Tensor) -> None:
        """Add one loss value (a scalar tensor)."""
        loss = require_tensor(loss, "loss")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self._accumulate(loss.reshape(1), None)


def _check_batch_inputs(
    labels: Any, logits: Any, sample_weight: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate in-batch metric inputs: ``(logits, positive column of each row [nq], sample_weight)``."""
    labels, logits = require_tensor(labels, "labels"), require_tensor(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [num_queries, num_candidates], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if logits.dtype.is_floating_point and bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN")
    weights = None if sample_weight is None else check_sample_weight(sample_weight, logits.shape[0])
    return logits.detach(), labels.argmax(dim=1), weights


class BatchTopKAccuracy(WeightedMean):
    """In-batch top-k accuracy: does the positive rank among the ``k`` highest logits of its row?

    As TensorFlow's ``in_top_k`` (behind Keras's ``TopKCategoricalAccuracy``), ties count in the positive's
    favour: a row is a hit when fewer than ``k`` logits are strictly greater than the positive's
    (:func:`~twotower.metrics.functional.batch_top_k_hits`). Rows are averaged with their sample weights.
    """

    higher_is_better = True

    def __init__(self, k: int = 1, name: str | None = None, **kwargs: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        super().__init__(name or f"batch_top_{k}_categorical_accuracy", **kwargs)
        self.k = k

    def update(self, labels: torch.Tensor, logits: torch.Tensor, sample_weight: torch.Tensor | None = None) -> None:
        """Update with ``labels`` and ``logits`` ``[nq, nc]`` and optional ``sample_weight`` ``[nq]``."""
        logits, positive_column, sample_weight = _check_batch_inputs(labels, logits, sample_weight)
        self._accumulate(functional.batch_top_k_hits(logits, positive_column, self.k), sample_weight)


class BatchAUC(WeightedMean):
    """Exact in-batch ranking AUC: the probability that the positive outscores a negative of its own row.

    Per row, ``AUC_i = (#negatives below the positive + 0.5 * #tied negatives) / #negatives``, averaged over rows
    with their sample weights (:func:`~twotower.metrics.functional.batch_auc`); this is the quantity TFRS's
    documentation describes for a batch AUC. Unlike Keras's ``AUC`` (200 fixed thresholds on
    ``sigmoid(logits)``, pooled over rows) it does not saturate when the sampling correction shifts the logits.
    Columns removed from the softmax (accidental hits, masked scores) are not counted as negatives; a row
    without negatives is skipped.
    """

    higher_is_better = True

    def __init__(self, name: str = "batch_auc", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def update(self, labels: torch.Tensor, logits: torch.Tensor, sample_weight: torch.Tensor | None = None) -> None:
        """Update with ``labels`` and ``logits`` ``[nq, nc]`` and optional ``sample_weight`` ``[nq]``."""
        logits, positive_column, sample_weight = _check_batch_inputs(labels, logits, sample_weight)
        auc, has_negatives = functional.batch_auc(logits, positive_column)
        weights = torch.ones_like(auc) if sample_weight is None else sample_weight.reshape(-1).to(torch.float64)
        self._accumulate(auc[has_negatives], weights[has_negatives.to(weights.device)])
