"""Composable pieces of the in-batch softmax loss, after TFRS's ``layers/loss.py``.

Each piece is a small ``nn.Module`` that takes the ``[num_queries, num_candidates]`` logits (and, where needed,
the one-hot labels) and returns processed logits, so that they can be used alone or chained by
:class:`twotower.tasks.Retrieval`:

* :class:`SamplingProbabilityCorrection` -- the logQ correction for candidates sampled non-uniformly.
* :class:`RemoveAccidentalHits` -- pushes negatives that share the positive's id out of the softmax.
* :class:`HardNegativeMining` -- keeps the positive and the ``n`` highest-scoring negatives of each row.

and the default loss, :class:`SoftmaxCrossEntropy`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from twotower._checks import require_finite

#: The value TFRS adds to a logit to remove it from the softmax: float32's lowest value / 100, so that adding
#: it to any ordinary logit neither overflows nor stays comparable with real logits.
MIN_FLOAT = float(torch.finfo(torch.float32).min) / 100.0
#: The value TFRS adds to the positive's logit so that top-k selection always keeps it.
MAX_FLOAT = float(torch.finfo(torch.float32).max) / 100.0

Reduction = Literal["sum", "mean"]


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [num_queries, num_candidates], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")


class SamplingProbabilityCorrection(nn.Module):
    """Subtract the log of each candidate's sampling probability from its logits (logQ correction).

    In-batch negatives are drawn in proportion to how often items occur in the training data; subtracting
    ``log p`` corrects the softmax towards the full-corpus one (Yi et al., RecSys 2019). Probabilities are
    clipped to ``[1e-6, 1]`` first, as TFRS does, so ``p = 0`` acts as ``1e-6``.
    """

    def forward(self, logits: torch.Tensor, candidate_sampling_probability: torch.Tensor) -> torch.Tensor:
        """Correct ``logits`` ``[nq, nc]`` with probabilities ``[nc]``; returns ``[nq, nc]``."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D [num_queries, num_candidates], got shape {tuple(logits.shape)}")
        probability = candidate_sampling_probability
        if probability.shape != (logits.shape[1],):
            raise ValueError(
                f"candidate_sampling_probability must have shape ({logits.shape[1]},), got {tuple(probability.shape)}"
            )
        require_finite(probability, "candidate_sampling_probability")
        probability = probability.to(logits.dtype)
        return logits - torch.log(probability.clamp(1e-6, 1.0))


class RemoveAccidentalHits(nn.Module):
    """Push negatives that have the same id as the row's positive out of the softmax.

    An accidental hit is a column ``j`` other than the positive whose candidate id equals the positive's id: it is
    the same item, so treating it as a negative would penalise the model for scoring the positive highly.
    ``MIN_FLOAT`` is added to those logits; the positive column is untouched.
    """

    def forward(self, labels: torch.Tensor, logits: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Mask accidental hits.

        Args:
            labels: ``[nq, nc]`` one-hot labels; the positive of row ``i`` is ``argmax(labels[i])``.
            logits: ``[nq, nc]`` logits.
            candidate_ids: ``[nc]`` integer ids of the candidates (encode strings first, e.g. with ``np.unique``).

        Returns:
            ``[nq, nc]`` logits with ``MIN_FLOAT`` added at the accidental hits.
        """
        _check_logits_labels(logits, labels)
        if candidate_ids.shape != (logits.shape[1],):
            raise ValueError(f"candidate_ids must have shape ({logits.shape[1]},), got {tuple(candidate_ids.shape)}")
        candidate_ids = candidate_ids.to(logits.device)
        positive_ids = candidate_ids[labels.argmax(dim=1)]
        duplicate = (positive_ids[:, None] == candidate_ids[None, :]).to(logits.dtype) - labels.to(logits.dtype)
        return logits + duplicate * MIN_FLOAT


class HardNegativeMining(nn.Module):
    """Keep, per row, the positive and the ``num_hard_negatives`` negatives with the largest logits.

    Args:
        num_hard_negatives: how many negatives to keep. As TFRS documents (and unlike TFRS's code, which keeps only
            the positive for 0), a value ``<= 0`` or ``>=`` the number of negatives keeps every negative, and the
            logits and labels are returned unchanged.
    """

    def __init__(self, num_hard_negatives: int) -> None:
        super().__init__()
        if isinstance(num_hard_negatives, bool) or not isinstance(num_hard_negatives, int):
            raise TypeError(f"num_hard_negatives must be an int, got {type(num_hard_negatives).__name__}")
        self.num_hard_negatives = num_hard_negatives

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Select columns.

        Args:
            logits: ``[nq, nc]`` logits.
            labels: ``[nq, nc]`` one-hot labels.

        Returns:
            ``(logits, labels)`` of shape ``[nq, n + 1]``: the positive in column 0, then the hardest negatives in
            descending order of logit, or the inputs unchanged when every
            negative is kept.
        """
        _check_logits_labels(logits, labels)
        num_negatives = logits.shape[1] - 1
        n = self.num_hard_negatives
        if n <= 0 or n >= num_negatives:
            return logits, labels
        # Selection needs no gradient; gathering from the original logits keeps the graph intact.
        with torch.no_grad():
            # TFRS adds MAX_FLOAT to the positive; +inf also keeps a positive whose logit was masked to MIN_FLOAT
            # (TFRS's sum is then 0 and can lose the positive to ordinary negatives).
            ranking = logits.detach().masked_fill(labels > 0, float("inf"))
            # Which of several tied negatives is kept does not change the loss: they carry the same logit.
            indices = torch.topk(ranking, n + 1, dim=1, sorted=True).indices
        return logits.gather(1, indices), labels.gather(1, indices)

    def extra_repr(self) -> str:
        return f"num_hard_negatives={self.num_hard_negatives}"


class SoftmaxCrossEntropy(nn.Module):
    """Categorical cross-entropy from logits, Keras's ``CategoricalCrossentropy(from_logits=True)``.

    Per row ``i``: ``CE_i = -sum_j labels[i, j] * log_softmax(logits[i])[j]``. With ``reduction="sum"`` (TFRS's
    default) the loss is ``sum_i w_i * CE_i``; with ``"mean"`` it is that sum divided by the number of rows
    (Keras's ``SUM_OVER_BATCH_SIZE``, which divides by the row count, not by the sum of the weights).
    """

    def __init__(self, reduction: Reduction = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction: Reduction = reduction

    def forward(
        self, labels: torch.Tensor, logits: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the scalar loss for ``labels`` and ``logits`` ``[nq, nc]`` and optional weights ``[nq]``."""
        _check_logits_labels(logits, labels)
        log_probabilities = torch.log_softmax(logits, dim=1)
        per_row = -(labels.to(logits.dtype) * log_probabilities).sum(dim=1)
        if sample_weight is not None:
            if sample_weight.shape != (logits.shape[0],):
                raise ValueError(
                    f"sample_weight must have shape ({logits.shape[0]},), got {tuple(sample_weight.shape)}"
                )
            per_row = per_row * sample_weight.to(per_row.dtype)
        total = per_row.sum()
        if self.reduction == "mean":
            return total / max(logits.shape[0], 1)
        return total

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
