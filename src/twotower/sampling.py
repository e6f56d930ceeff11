"""Sampling probabilities and extra negatives for the in-batch softmax.

In-batch negatives are drawn with the data's popularity: a popular item is a negative in many batches, so the
plain in-batch softmax over-penalises it. The logQ correction subtracts ``log p`` from each column's logit, where
``p`` is the probability that the column's item is among the batch's candidates (Yi et al., RecSys 2019). This
module supplies those probabilities and the negatives that go with them:

* :class:`StreamingFrequencyEstimator`: the hashed "last step / average gap" estimator of Yi et al.: per-batch
  inclusion probabilities from a stream of ids, in constant memory;
* :class:`CountingEstimator`: exact counts, for vocabularies that fit in memory;
* :class:`UniformSampler`, :class:`PopularitySampler`: extra negatives drawn from the corpus (Yang et al.,
  WWW 2020, mixed negative sampling), with their inclusion probabilities;
* :func:`mixed_inclusion_probability`: the probability of a column's item appearing among the columns of a batch
  made of in-batch and sampled candidates, the quantity the correction needs for mixed negatives;
* :class:`CrossBatchNegatives`: a FIFO of recent candidate embeddings reused as extra negatives.

All probabilities lie in ``(0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from twotower._checks import require_finite, require_number, require_positive_int, require_tensor
from twotower.ids import encode_ids


def _as_int_ids(ids: Any, name: str, num_items: int | None = None) -> torch.Tensor:
    """``ids`` as a 1-D int64 CPU tensor; with ``num_items``, each must lie in ``[0, num_items)``."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{name} must hold integer ids, got dtype {ids.dtype}")
        checked = ids.reshape(-1).to(torch.int64).cpu()
    else:
        try:
            values = np.asarray(ids)
        except ValueError as error:
            raise ValueError(f"{name} must be a sequence of integer ids: {error}") from error
        if values.dtype.kind not in "iu" and values.size:
            raise TypeError(f"{name} must hold integer ids (hash strings first), got dtype {values.dtype}")
        checked = torch.as_tensor(values.reshape(-1).astype(np.int64))
    if num_items is not None and checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= num_items):
        raise ValueError(f"{name} must lie in [0, {num_items}), got {int(checked.min())}..{int(checked.max())}")
    return checked


class StreamingFrequencyEstimator:
    """Per-batch inclusion probability of each id, estimated from the stream (Yi et al., RecSys 2019, Alg. 2).

    Each id is hashed into one of ``num_buckets`` buckets; a bucket remembers the step it was last seen at (A)
    and a moving average of the gaps between its appearances (B): ``B <- (1 - alpha) B + alpha (t - A)``. An id
    that appears every ``g`` steps on average has probability ``1 / g`` of being in a batch, so the estimate is
    ``1 / B`` (clipped to ``(0, 1]``).

    Collisions merge ids into one bucket and overestimate rare ids; with ``num_buckets`` several times the number
    of distinct ids they are rare. The relative error of a steady id's estimate is of order ``sqrt(alpha / 2)``
    for gaps with a geometric distribution (the moving average's spread), hence the small default ``alpha``.

    Args:
        num_buckets: size of the hash tables.
        alpha: learning rate of the moving average, in ``(0, 1]``.
        initial_gap: the average gap assumed for a bucket never seen (its first appearances count from there).
    """

    def __init__(self, num_buckets: int = 1 << 20, alpha: float = 0.01, initial_gap: float = 100.0) -> None:
        num_buckets = require_positive_int(num_buckets, "num_buckets")
        alpha = require_number(alpha, "alpha", 0.0, 1.0, low_open=True)
        initial_gap = require_number(initial_gap, "initial_gap", 1.0, float(np.finfo(np.float64).max))
        self.num_buckets, self.alpha = num_buckets, alpha
        self.last_step = torch.zeros(num_buckets, dtype=torch.float64)
        self.average_gap = torch.full((num_buckets,), float(initial_gap), dtype=torch.float64)
        self.seen = torch.zeros(num_buckets, dtype=torch.bool)
        self.step = 0

    def _buckets(self, ids: torch.Tensor) -> torch.Tensor:
        # A multiplicative hash spreads consecutive ids over the table (Knuth's constant, 64-bit wrap-around).
        return ((ids * -7046029254386353131) >> 16) % self.num_buckets

    def update(self, ids: Any) -> torch.Tensor:
        """Record one batch (a step) of candidate ids ``[b]``; returns their probabilities ``[b]`` after it."""
        ids = _as_int_ids(ids, "ids")
        self.step += 1
        buckets = torch.unique(self._buckets(ids))
        gaps = self.step - self.last_step[buckets]
        first = ~self.seen[buckets]
        updated = (1 - self.alpha) * self.average_gap[buckets] + self.alpha * gaps
        # A bucket's first appearance has no real gap: keep the prior until a second one.
        self.average_gap[buckets] = torch.where(first, self.average_gap[buckets], updated)
        self.last_step[buckets] = float(self.step)
        self.seen[buckets] = True
        return self.probability(ids)

    def probability(self, ids: Any) -> torch.Tensor:
        """Current per-batch inclusion probabilities ``[b]`` of ``ids`` (no update)."""
        ids = _as_int_ids(ids, "ids")
        return (1.0 / self.average_gap[self._buckets(ids)]).clamp(1e-9, 1.0).to(torch.float32)


class CountingEstimator:
    """Exact per-batch inclusion probabilities from counts, for integer ids ``0..num_items-1``.

    After ``N`` recorded ids of which ``c_i`` were item ``i``, an item's frequency is ``f_i = c_i / N`` and its
    probability to be among ``batch_size`` independent draws is ``1 - (1 - f_i) ** batch_size``. Items never seen
    get ``min_count`` pseudo-counts, so that their probability is small but positive.
    """

    def __init__(self, num_items: int, min_count: float = 0.5) -> None:
        num_items = require_positive_int(num_items, "num_items")
        min_count = require_number(min_count, "min_count", 0.0, float(np.finfo(np.float64).max), low_open=True)
        self.counts = torch.zeros(num_items, dtype=torch.float64)
        self.min_count = min_count

    def _check(self, ids: Any) -> torch.Tensor:
        return _as_int_ids(ids, "ids", int(self.counts.shape[0]))

    def update(self, ids: Any) -> torch.Tensor:
        """Record a batch of ids ``[b]``; returns their inclusion probabilities ``[b]`` for a batch of ``b``."""
        ids = self._check(ids)
        self.counts += torch.bincount(ids, minlength=self.counts.shape[0]).to(torch.float64)
        return self.probability(ids, batch_size=ids.numel())

    def frequencies(self) -> torch.Tensor:
        """``[num_items]`` per-draw frequencies (pseudo-counts included)."""
        counts = self.counts.clamp(min=self.min_count)
        return counts / counts.sum()

    def probability(self, ids: Any, batch_size: int) -> torch.Tensor:
        """Probability ``[b]`` that each id is among ``batch_size`` draws."""
        batch_size = require_positive_int(batch_size, "batch_size")
        ids = self._check(ids)
        frequency = self.frequencies()[ids]
        return (1.0 - (1.0 - frequency) ** batch_size).clamp(1e-9, 1.0).to(torch.float32)


class _Sampler:
    """A distribution over items ``0..n-1`` (``probabilities`` per draw) to draw extra negatives from."""

    def __init__(self, probabilities: torch.Tensor, unique_allowed: bool) -> None:
        self.probabilities = probabilities.to(torch.float64)
        self.unique_allowed = unique_allowed

    @property
    def num_items(self) -> int:
        return int(self.probabilities.shape[0])

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None, unique: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``num_samples`` items.

        Returns:
            ``(ids [num_samples], inclusion [num_samples])``: the items, and each one's probability of being among
            the ``num_samples`` draws (with replacement: ``1 - (1 - s_i) ** num_samples``; uniform without
            replacement: ``num_samples / n``).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if unique:
            if not self.unique_allowed:
                raise ValueError(
                    "unique sampling is only offered where the inclusion probability is exact (uniform): "
                    "sample with replacement instead"
                )
            if num_samples > self.num_items:
                raise ValueError(f"cannot draw {num_samples} unique negatives from a corpus of {self.num_items} items")
            ids = torch.randperm(self.num_items, generator=generator)[:num_samples]
        else:
            ids = torch.multinomial(self.probabilities, num_samples, replacement=True, generator=generator)
        return ids, self.inclusion(ids, num_samples, unique)

    def inclusion(self, ids: Any, num_samples: int, unique: bool = False) -> torch.Tensor:
        """Probability ``[b]`` that each of ``ids`` is among ``num_samples`` draws of this sampler."""
        num_samples = require_positive_int(num_samples, "num_samples")
        ids = _as_int_ids(ids, "ids", self.num_items)
        if unique:
            return torch.full(ids.shape, min(1.0, num_samples / self.num_items), dtype=torch.float32)
        per_draw = self.probabilities[ids]
        return (1.0 - (1.0 - per_draw) ** num_samples).to(torch.float32)


class UniformSampler(_Sampler):
    """Every item of the corpus equally likely (``unique=True`` draws without replacement)."""

    def __init__(self, num_items: int) -> None:
        num_items = require_positive_int(num_items, "num_items")
        super().__init__(torch.full((num_items,), 1.0 / num_items, dtype=torch.float64), unique_allowed=True)


class PopularitySampler(_Sampler):
    """Items drawn with probability proportional to ``count ** alpha`` (``alpha = 0``: uniform; 1: popularity).

    Args:
        counts: ``[num_items]`` non-negative counts (e.g. training interactions per item).
        alpha: the exponent, ``>= 0`` (word2vec uses 0.75).
    """

    def __init__(self, counts: Sequence[float] | torch.Tensor | np.ndarray, alpha: float = 0.75) -> None:
        try:
            array = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
            weights = torch.as_tensor(array.astype(np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(f"counts must be a sequence of numbers: {error}") from error
        if array.dtype.kind not in "biuf":
            raise TypeError(f"counts must hold numbers, got dtype {array.dtype}")
        if weights.ndim != 1 or weights.numel() == 0:
            raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(weights.shape)}")
        require_finite(weights, "counts")
        if bool((weights < 0).any()):
            raise ValueError("counts must be non-negative")
        # A finite exponent: counts ** inf is 0 or inf, which no sampling distribution is.
        alpha = require_number(alpha, "alpha", 0.0, 64.0)
        weights = weights**alpha
        if float(weights.sum()) <= 0:
            raise ValueError("counts must not all be zero")
        if not bool(torch.isfinite(weights.sum())):
            raise ValueError(f"counts ** alpha overflows float64 (alpha {alpha}): use a smaller alpha")
        super().__init__(weights / weights.sum(), unique_allowed=False)


def mixed_inclusion_probability(in_batch: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Probability that an item is among a batch's columns when they mix in-batch and sampled candidates.

    The two draws are independent: ``1 - (1 - q) (1 - s)`` with ``q`` the in-batch inclusion probability and
    ``s`` the sampler's, elementwise (shapes broadcast).
    """
    in_batch, sampled = require_tensor(in_batch, "in_batch"), require_tensor(sampled, "sampled")
    for name, value in (("in_batch", in_batch), ("sampled", sampled)):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must hold probabilities (a floating-point tensor), got dtype {value.dtype}")
        require_finite(value, name)
        if bool(((value < 0) | (value > 1)).any()):
            raise ValueError(f"{name} probabilities must lie in [0, 1]")
    try:
        torch.broadcast_shapes(in_batch.shape, sampled.shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        raise ValueError(
            f"in_batch and sampled must have broadcastable shapes, got {tuple(in_batch.shape)} and "
            f"{tuple(sampled.shape)}"
        ) from None
    return (1.0 - (1.0 - in_batch) * (1.0 - sampled)).clamp(min=1e-9)


class CrossBatchNegatives:
    """A FIFO of recent candidate embeddings, reused as extra negatives in later batches (no gradient).

    Staleness: an embedding in the cache was computed by the candidate tower as it was up to ``capacity / b``
    steps ago (``b`` the batch size), so it lags the current tower. With a small learning rate or a slowly moving
    tower this lag is harmless and buys many more negatives per step for free; with fast-moving towers keep the
    cache short. Cached candidates also carry their ids (for accidental-hit removal) and their inclusion
    probabilities as recorded when they were pushed.

    Args:
        capacity: how many embeddings to keep.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.embeddings: torch.Tensor | None = None
        self.codes: np.ndarray | None = None
        self.probabilities: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])

    def push(self, embeddings: torch.Tensor, ids: Any = None, probabilities: torch.Tensor | None = None) -> None:
        """Add a batch ``[b, d]`` (detached), its ids and probabilities; the oldest entries fall out."""
        embeddings = embeddings.detach()
        if self.embeddings is not None and embeddings.shape[1:] != self.embeddings.shape[1:]:
            raise ValueError(f"embeddings must have dimension {self.embeddings.shape[1]}, got {embeddings.shape[1]}")
        values = None if ids is None else encode_ids(ids, "ids", embeddings.shape[0]).values
        if self.embeddings is not None and (values is None) != (self.codes is None):
            raise ValueError("push ids with every batch or with none")
        if self.embeddings is not None and (probabilities is None) != (self.probabilities is None):
            raise ValueError("push probabilities with every batch or with none")
        self.embeddings = embeddings if self.embeddings is None else torch.cat([self.embeddings, embeddings])
        self.embeddings = self.embeddings[-self.capacity :]
        if values is not None:
            self.codes = values if self.codes is None else np.concatenate([self.codes, values])
            self.codes = self.codes[-self.capacity :]
        if probabilities is not None:
            probabilities = probabilities.detach().reshape(-1)
            self.probabilities = (
                probabilities if self.probabilities is None else torch.cat([self.probabilities, probabilities])
            )[-self.capacity :]
