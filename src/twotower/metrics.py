"""Metrics for retrieval, built on torchmetrics (state, update, compute, reset and distributed sync).

Three families, matching the three metric arguments of :class:`twotower.tasks.Retrieval`:

* loss metrics, updated with the loss value: :class:`LossMean`;
* batch metrics, updated with ``(labels, logits, sample_weight)`` of the in-batch softmax:
  :class:`BatchTopKAccuracy`, :class:`BatchAUC`;
* factorized metrics, updated with ``(query_embeddings, true_candidate_embeddings, true_candidate_ids,
  sample_weight)`` and ranking the whole corpus: :class:`FactorizedMetric` is their interface.

Every metric reports a dict ``{name: value}`` through :meth:`RetrievalMetric.results`, so a task or a training
loop can log them without knowing which family they belong to. A weighted mean with no weight (no updates yet)
is 0, as Keras's ``divide_no_nan`` makes it.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from twotower._checks import (
    encode_ids,
    per_query_ids,
    require_embeddings,
    require_finite,
    require_floating,
    require_tensor,
)
from twotower.indexes import BruteForce, Ids, Streaming, TopK
from twotower.losses import MIN_FLOAT

# A logit at or below this was removed from the softmax (accidental hit or score mask) rather than computed.
_REMOVED_LOGIT = MIN_FLOAT / 2


class RetrievalMetric(Metric, abc.ABC):
    """A torchmetrics ``Metric`` with a name, reporting ``{name: value}`` pairs."""

    full_state_update = False

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name

    def value(self) -> torch.Tensor:
        """``compute()``, without torchmetrics' warning when there was no update (the value is then 0)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            value: torch.Tensor = self.compute()
        return value

    def results(self) -> dict[str, float]:
        """Return the metric's current values as ``{name: float}``."""
        return {self.name: float(self.value())}


class _WeightedMean(RetrievalMetric):
    """A weighted mean accumulated in float64: ``sum(w * x) / sum(w)``, 0 while ``sum(w) == 0``."""

    weighted_sum: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.add_state("weighted_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, values: torch.Tensor, sample_weight: torch.Tensor | None) -> None:
        values = values.detach().to(torch.float64).reshape(-1)
        if sample_weight is None:
            weights = torch.ones_like(values)
        else:
            weights = sample_weight.detach().to(device=values.device, dtype=torch.float64).reshape(-1)
            if weights.shape != values.shape:
                raise ValueError(f"sample_weight must have shape {tuple(values.shape)}, got {tuple(weights.shape)}")
        self.weighted_sum += (values * weights).sum()
        self.total_weight += weights.sum()

    def compute(self) -> torch.Tensor:
        if float(self.total_weight) == 0.0:
            return torch.zeros((), dtype=torch.float64, device=self.weighted_sum.device)
        return self.weighted_sum / self.total_weight


class LossMean(_WeightedMean):
    """Running mean of the loss values it is updated with (one unit weight per update)."""

    def __init__(self, name: str = "loss_mean", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def update(self, loss: torch.Tensor) -> None:
        """Add one loss value (a scalar tensor)."""
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        self._accumulate(loss.reshape(1), None)


def _check_batch_inputs(
    labels: Any, logits: Any, sample_weight: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate in-batch metric inputs.

    Returns:
        ``(labels, logits, positive column of each row [nq], sample_weight)`` as tensors.
    """
    labels, logits = require_tensor(labels, "labels"), require_tensor(logits, "logits")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [num_queries, num_candidates], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if logits.dtype.is_floating_point and bool(torch.isnan(logits).any()):
        raise ValueError("logits contain NaN")
    weights = None if sample_weight is None else check_sample_weight(sample_weight, logits.shape[0])
    return labels, logits, labels.argmax(dim=1), weights


def check_sample_weight(sample_weight: Any, num_rows: int) -> torch.Tensor:
    """``sample_weight`` as a finite, non-negative ``[num_rows]`` tensor (``[num_rows, 1]`` is squeezed)."""
    weights = require_tensor(sample_weight, "sample_weight")
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"sample_weight must hold real numbers, got dtype {weights.dtype}")
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.shape != (num_rows,):
        raise ValueError(f"sample_weight must have shape ({num_rows},), got {tuple(weights.shape)}")
    require_finite(weights.to(torch.float64), "sample_weight")
    if bool((weights < 0).any()):
        raise ValueError("sample_weight must be non-negative")
    return weights


class BatchTopKAccuracy(_WeightedMean):
    """In-batch top-k accuracy: does the positive rank among the ``k`` highest logits of its row?

    As TensorFlow's ``in_top_k`` (behind Keras's ``TopKCategoricalAccuracy``), ties count in the positive's
    favour: a row is a hit when fewer than ``k`` logits are strictly greater than the positive's. Rows are
    averaged with their sample weights.
    """

    def __init__(self, k: int = 1, name: str | None = None, **kwargs: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        super().__init__(name or f"batch_top_{k}_categorical_accuracy", **kwargs)
        self.k = k

    def update(self, labels: torch.Tensor, logits: torch.Tensor, sample_weight: torch.Tensor | None = None) -> None:
        """Update with ``labels`` and ``logits`` ``[nq, nc]`` and optional ``sample_weight`` ``[nq]``."""
        labels, logits, positive_column, sample_weight = _check_batch_inputs(labels, logits, sample_weight)
        logits = logits.detach()
        positive_logit = logits.gather(1, positive_column[:, None])
        num_above = (logits > positive_logit).sum(dim=1)
        hits = (num_above < self.k) & torch.isfinite(positive_logit[:, 0])
        self._accumulate(hits, sample_weight)


class BatchAUC(_WeightedMean):
    """Exact in-batch ranking AUC: the probability that the positive outscores a negative of its own row.

    Per row, ``AUC_i = (#negatives below the positive + 0.5 * #tied negatives) / #negatives``, averaged over rows
    with their sample weights; this is the quantity TFRS's documentation describes for a batch AUC. Unlike
    Keras's ``AUC`` (200 fixed thresholds on ``sigmoid(logits)``, pooled over rows) it does not saturate when the
    sampling correction shifts the logits. Columns removed from the softmax (accidental hits, masked scores) are
    not counted as negatives; a row without negatives is skipped.
    """

    def __init__(self, name: str = "batch_auc", **kwargs: Any) -> None:
        super().__init__(name, **kwargs)

    def update(self, labels: torch.Tensor, logits: torch.Tensor, sample_weight: torch.Tensor | None = None) -> None:
        """Update with ``labels`` and ``logits`` ``[nq, nc]`` and optional ``sample_weight`` ``[nq]``."""
        labels, logits, positive_column, sample_weight = _check_batch_inputs(labels, logits, sample_weight)
        logits = logits.detach()
        positive_logit = logits.gather(1, positive_column[:, None])
        is_negative = torch.ones_like(logits, dtype=torch.bool)
        is_negative.scatter_(1, positive_column[:, None], False)
        is_negative &= logits > _REMOVED_LOGIT
        below = ((logits < positive_logit) & is_negative).sum(dim=1).to(torch.float64)
        tied = ((logits == positive_logit) & is_negative).sum(dim=1).to(torch.float64)
        num_negatives = is_negative.sum(dim=1).to(torch.float64)
        has_negatives = num_negatives > 0
        auc = (below + 0.5 * tied) / num_negatives.clamp(min=1.0)
        weights = torch.ones_like(auc) if sample_weight is None else sample_weight.reshape(-1).to(torch.float64)
        self._accumulate(auc[has_negatives], weights[has_negatives])


class FactorizedMetric(RetrievalMetric):
    """Interface of metrics that rank the whole candidate corpus for each query.

    :class:`twotower.tasks.Retrieval` calls :meth:`update` with the batch's query embeddings ``[nq, d]``, the
    embeddings of each query's true candidate ``[nq, d]``, their ids (``None``, a 1-D tensor, or a numpy array or
    sequence of ints or strings, ``nq`` long) and the sample weights ``[nq]`` or ``None``.
    """

    @abc.abstractmethod
    def update(
        self,
        query_embeddings: torch.Tensor,
        true_candidate_embeddings: torch.Tensor,
        true_candidate_ids: Any = None,
        sample_weight: torch.Tensor | None = None,
    ) -> None:
        """Rank the corpus for each query and accumulate the metric."""


def check_query_embeddings(query_embeddings: Any, index: TopK) -> torch.Tensor:
    """``query_embeddings`` as a finite ``[nq, d]`` floating tensor of the index's dimension, or an error naming it."""
    queries = require_embeddings(query_embeddings, "query_embeddings", (2,))
    if index.num_candidates and queries.shape[1] != index.dimension:
        raise ValueError(
            f"query_embeddings have dimension {queries.shape[1]} but the index holds {index.dimension}-d candidates"
        )
    require_finite(queries, "query_embeddings")
    return queries


def check_factorized_inputs(
    query_embeddings: Any,
    true_candidate_embeddings: Any,
    sample_weight: Any,
    index: TopK | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate the arguments of :meth:`FactorizedMetric.update`; returns them as tensors."""
    if index is not None:
        queries = check_query_embeddings(query_embeddings, index)
    else:
        queries = require_embeddings(query_embeddings, "query_embeddings", (2,))
        require_finite(queries, "query_embeddings")
    true_candidates = require_floating(true_candidate_embeddings, "true_candidate_embeddings", (2,))
    if true_candidates.shape != queries.shape:
        raise ValueError(
            f"true_candidate_embeddings must have the shape of query_embeddings {tuple(queries.shape)}, "
            f"got {tuple(true_candidates.shape)}"
        )
    require_finite(true_candidates, "true_candidate_embeddings")
    weights = None if sample_weight is None else check_sample_weight(sample_weight, queries.shape[0])
    return queries, true_candidates, weights


def _weights_or_ones(sample_weight: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    if sample_weight is None:
        return torch.ones(num_rows, dtype=torch.float64)
    weights = sample_weight.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    require_finite(weights, "sample_weight")
    if bool((weights < 0).any()):
        raise ValueError("sample_weight must be non-negative")
    return weights


def _as_index(candidates: Any, k: int) -> TopK:
    if isinstance(candidates, TopK):
        return candidates
    if isinstance(candidates, torch.Tensor):
        return BruteForce(k=k).index(candidates)
    if isinstance(candidates, Iterable):
        return Streaming(k=k).index_from_dataset(candidates)
    raise TypeError(
        "candidates must be a twotower.indexes.TopK index, a [n, d] tensor or an iterable of candidate batches, "
        f"got {type(candidates).__name__}"
    )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(sorted(set(values)))


class _WeightedMeans(RetrievalMetric):
    """Several weighted means kept side by side: ``sums[m] / total_weight``, 0 while ``total_weight == 0``."""

    sums: torch.Tensor
    total_weight: torch.Tensor

    def __init__(self, name: str, size: int, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.add_state("sums", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate_rows(self, values: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``values`` ``[nq, size]`` with per-row ``weights`` ``[nq]`` (float64, CPU)."""
        self.sums += (values * weights[:, None]).sum(dim=0).to(self.sums.device)
        self.total_weight += weights.sum().to(self.total_weight.device)

    def compute(self) -> torch.Tensor:
        """``[size]`` weighted means (0 before any update)."""
        if float(self.total_weight) == 0.0:
            return torch.zeros_like(self.sums)
        return self.sums / self.total_weight

    def _named(self, names: list[str]) -> dict[str, float]:
        return dict(zip(names, self.value().reshape(-1).tolist(), strict=True))


class FactorizedTopK(FactorizedMetric, _WeightedMeans):
    """Top-K categorical accuracy over the whole corpus, with TFRS's exact semantics.

    For each query the index retrieves the ``max(ks)`` best candidates; for each ``k`` in ``ks`` a weighted mean of
    hits is kept and reported as ``{name}/top_{k}_categorical_accuracy``.

    * Id-based (``true_candidate_ids`` given): a hit at ``k`` if the true id is among the first ``k`` ids.
    * Score-based (no ids; needs an exact index): a hit at ``k`` if fewer than ``k`` retrieved scores are strictly
      greater than the true candidate's score, so ties count as hits. The true score is computed with the corpus
      scan's arithmetic, so an exact copy of the true candidate in the corpus ties with it (TFRS's elementwise
      product-sum misses about 38% of such copies at D = 64).

    Args:
        candidates: a :class:`~twotower.indexes.TopK` index, a ``[n, d]`` tensor (a :class:`BruteForce` index is
            built), or an iterable of candidate batches (wrapped in a :class:`Streaming` index).
        ks: the cut-offs.
        name: prefix of the reported names.
    """

    def __init__(
        self,
        candidates: Any,
        ks: Sequence[int] = (1, 5, 10, 50, 100),
        name: str = "factorized_top_k",
        **kwargs: Any,
    ) -> None:
        checked_ks = _check_ks(ks)
        super().__init__(name, len(checked_ks), **kwargs)
        self.ks = checked_ks
        self.index = _as_index(candidates, max(self.ks))

    def update(
        self,
        query_embeddings: torch.Tensor,
        true_candidate_embeddings: torch.Tensor,
        true_candidate_ids: Any = None,
        sample_weight: torch.Tensor | None = None,
    ) -> None:
        """Retrieve the top ``max(ks)`` for each query ``[nq, d]`` and count hits (see the class docstring)."""
        query_embeddings, true_candidate_embeddings, sample_weight = check_factorized_inputs(
            query_embeddings, true_candidate_embeddings, sample_weight, self.index
        )
        num_queries = query_embeddings.shape[0]
        weights = _weights_or_ones(sample_weight, num_queries)
        k_max = max(self.ks)
        if true_candidate_ids is not None:
            _, true_ids = encode_ids(true_candidate_ids, "true_candidate_ids", num_queries)
            _, retrieved = self.index(query_embeddings, k=k_max)
            matches = _id_matches(retrieved, true_ids)
            first_k = torch.cumsum(matches, dim=1) > 0
            hit_at = [first_k[:, min(k, first_k.shape[1]) - 1] for k in self.ks]
        else:
            if not self.index.is_exact():
                raise ValueError("score-based FactorizedTopK needs an exact index: pass true_candidate_ids")
            scores = self.index._top_scores(query_embeddings, k_max)
            # Same arithmetic as the corpus scan: an exact copy of the true candidate ties with it.
            positive = self.index.score_pairs(query_embeddings, true_candidate_embeddings).to(scores.device)
            above = torch.cumsum((scores > positive[:, None]).to(torch.int64), dim=1)
            hit_at = [above[:, min(k, above.shape[1]) - 1] < k for k in self.ks]
        self._accumulate_rows(torch.stack([hit.detach().cpu().to(torch.float64) for hit in hit_at], dim=1), weights)

    def results(self) -> dict[str, float]:
        """``{name}/top_{k}_categorical_accuracy`` for each k."""
        return self._named([f"{self.name}/top_{k}_categorical_accuracy" for k in self.ks])


def _id_matches(retrieved: Ids, true_ids: np.ndarray) -> torch.Tensor:
    """``[nq, k]`` bool: does retrieved id ``[i, j]`` equal ``true_ids[i]``?"""
    if isinstance(retrieved, torch.Tensor):
        if true_ids.dtype.kind not in "iu":
            raise TypeError("true_candidate_ids must be integers, like the index's identifiers")
        truth = torch.as_tensor(true_ids.astype(np.int64), device=retrieved.device)
        return (retrieved == truth[:, None]).cpu()
    if true_ids.dtype.kind not in "USO":
        raise TypeError("true_candidate_ids must be strings, like the index's identifiers")
    return torch.as_tensor(retrieved == true_ids.astype(str)[:, None])


def _relevance_matrix(retrieved: Ids, relevant: list[np.ndarray]) -> torch.Tensor:
    """``[nq, k]`` bool: is retrieved id ``[i, j]`` one of query ``i``'s relevant ids?"""
    retrieved_np = retrieved.detach().cpu().numpy() if isinstance(retrieved, torch.Tensor) else retrieved
    num_queries, width = retrieved_np.shape
    lengths = np.array([row.shape[0] for row in relevant], dtype=np.int64)
    flat_relevant = np.concatenate(relevant) if relevant else np.zeros(0, dtype=retrieved_np.dtype)
    if flat_relevant.size and retrieved_np.dtype.kind in "USO":
        flat_relevant, flat_retrieved = flat_relevant.astype(str), retrieved_np.astype(str).reshape(-1)
    else:
        flat_retrieved = retrieved_np.reshape(-1)
    # One vocabulary for both sides, then (query, id) keys: membership is a single sorted lookup.
    vocabulary, codes = np.unique(np.concatenate([flat_retrieved, flat_relevant]), return_inverse=True)
    size = max(len(vocabulary), 1)
    retrieved_keys = np.repeat(np.arange(num_queries), width) * size + codes[: flat_retrieved.shape[0]]
    relevant_keys = np.repeat(np.arange(num_queries), lengths) * size + codes[flat_retrieved.shape[0] :]
    return torch.as_tensor(np.isin(retrieved_keys, relevant_keys).reshape(num_queries, width))


class CorpusRanking(_WeightedMeans):
    """Recall@K, Precision@K, NDCG@K, hit rate@K and MRR over the whole corpus, in one retrieval pass.

    Unlike :class:`FactorizedTopK`, a query may have several relevant items, and items can be excluded per query
    (for example those the user interacted with in training), as is usual in offline evaluation.

    Per query with relevant set ``R`` and ranked list ``r_1..r_K`` (exclusions removed):

    * ``hit_rate@k = 1[any r_j in R, j <= k]``
    * ``recall@k = |{r_j in R, j <= k}| / |R|``
    * ``precision@k = |{r_j in R, j <= k}| / k``
    * ``ndcg@k = DCG / IDCG`` with ``DCG = sum_{j<=k, r_j in R} 1 / log2(j + 1)`` and ``IDCG`` the DCG of
      ``min(|R|, k)`` hits at the top
    * ``mrr = 1 / rank`` of the first relevant item within ``max(ks)``, 0 if none.

    Queries are averaged with their sample weights; a query with no relevant item is skipped.
    Names are ``{name}/recall@{k}`` etc. and ``{name}/mrr``.

    Args:
        candidates: a :class:`~twotower.indexes.TopK` index, a ``[n, d]`` tensor, or an iterable of batches.
        ks: the cut-offs.
        name: prefix of the reported names.
    """

    def __init__(self, candidates: Any, ks: Sequence[int] = (10, 50, 100), name: str = "corpus", **kwargs: Any) -> None:
        checked_ks = _check_ks(ks)
        # Columns: hit rate, recall, precision, ndcg for each k; then mrr.
        super().__init__(name, 4 * len(checked_ks) + 1, **kwargs)
        self.ks = checked_ks
        self.index = _as_index(candidates, max(self.ks))

    def update(
        self,
        query_embeddings: torch.Tensor,
        relevant_ids: Any,
        exclusions: Any = None,
        sample_weight: torch.Tensor | None = None,
    ) -> None:
        """Rank the corpus for ``query_embeddings`` ``[nq, d]`` and accumulate.

        Args:
            query_embeddings: ``[nq, d]``.
            relevant_ids: per query, the relevant ids: a list of ``nq`` sequences, or a ``[nq, R]`` array.
            exclusions: per query, ids to leave out of the ranking (same forms), or ``None``.
            sample_weight: ``[nq]`` non-negative weights.
        """
        query_embeddings = check_query_embeddings(query_embeddings, self.index)
        num_queries = query_embeddings.shape[0]
        relevant = per_query_ids(relevant_ids, num_queries, "relevant_ids")
        for row in relevant:
            if row.size and (row.dtype.kind in "USO") != self.index.ids.is_string:
                kind = "strings" if self.index.ids.is_string else "integers"
                raise TypeError(f"relevant_ids must hold {kind}, like the index's identifiers, got dtype {row.dtype}")
        weights = _weights_or_ones(
            None if sample_weight is None else check_sample_weight(sample_weight, num_queries), num_queries
        )
        k_max = max(self.ks)
        if exclusions is None:
            _, retrieved = self.index(query_embeddings, k=k_max)
        else:
            _, retrieved = self.index.query_with_exclusions(query_embeddings, exclusions, k=k_max)
        hits = _relevance_matrix(retrieved, relevant).to(torch.float64)
        width = hits.shape[1]
        num_relevant = torch.tensor([len(np.unique(row)) for row in relevant], dtype=torch.float64)
        discounts = 1.0 / torch.log2(torch.arange(2, width + 2, dtype=torch.float64))
        cumulative_hits = torch.cumsum(hits, dim=1)
        cumulative_gain = torch.cumsum(hits * discounts, dim=1)
        columns = []
        for k in self.ks:
            last = min(k, width) - 1
            found = cumulative_hits[:, last]
            # IDCG: min(|R|, k) hits at the top; the ideal list may be longer than what was retrieved.
            ideal_length = torch.minimum(num_relevant, torch.tensor(float(k))).clamp(min=1).long()
            ideal = (1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))).cumsum(0)[ideal_length - 1]
            columns += [
                (found > 0).to(torch.float64),
                found / num_relevant.clamp(min=1),
                found / k,
                cumulative_gain[:, last] / ideal,
            ]
        first_hit = torch.where(hits.any(dim=1), hits.argmax(dim=1).to(torch.float64) + 1, torch.inf)
        columns.append(1.0 / first_hit)
        values = torch.stack(columns, dim=1)
        has_relevant = num_relevant > 0
        self._accumulate_rows(values, weights * has_relevant)

    def results(self) -> dict[str, float]:
        """``{name}/{hit_rate,recall,precision,ndcg}@{k}`` for each k, and ``{name}/mrr``."""
        metrics = ("hit_rate", "recall", "precision", "ndcg")
        return self._named([f"{self.name}/{metric}@{k}" for k in self.ks for metric in metrics] + [f"{self.name}/mrr"])
