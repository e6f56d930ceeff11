"""Metrics that rank the whole corpus for each query: :class:`FactorizedTopK` (TFRS's) and
:class:`CorpusRanking` (recall, precision, NDCG, hit rate, MRR with exclusions)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from twotower._checks import require_finite, require_floating
from twotower.ids import EncodedIds, Ids, encode_ids, per_query_ids, per_query_membership, same_kind
from twotower.indexes import BruteForce, QueryEmbeddings, Streaming, TopK
from twotower.metrics import functional
from twotower.metrics.base import NamedMetric, WeightedMeans, check_sample_weight, weights_or_ones


@dataclass(frozen=True)
class FactorizedBatch:
    """The checked inputs of :meth:`FactorizedMetric.update`.

    Attributes:
        queries: ``[nq, d]`` finite query embeddings.
        true_candidates: ``[nq, d]`` finite embeddings of each query's true candidate.
        true_ids: ``[nq]`` encoded ids of the true candidates, or ``None`` (score-based).
        sample_weight: ``[nq]`` finite non-negative weights, or ``None``.
    """

    queries: QueryEmbeddings
    true_candidates: torch.Tensor
    true_ids: EncodedIds | None = None
    sample_weight: torch.Tensor | None = None

    @classmethod
    def check(
        cls,
        query_embeddings: Any,
        true_candidate_embeddings: Any,
        true_candidate_ids: Any = None,
        sample_weight: Any = None,
        index: TopK | None = None,
    ) -> FactorizedBatch:
        """Validate the arguments of :meth:`FactorizedMetric.update` (raising errors that name them)."""
        queries = check_query_embeddings(query_embeddings, index)
        true_candidates = require_floating(true_candidate_embeddings, "true_candidate_embeddings", (2,))
        if true_candidates.shape != queries.embeddings.shape:
            raise ValueError(
                f"true_candidate_embeddings must have the shape of query_embeddings "
                f"{tuple(queries.embeddings.shape)}, got {tuple(true_candidates.shape)}"
            )
        require_finite(true_candidates, "true_candidate_embeddings")
        num_queries = queries.num_queries
        ids = None if true_candidate_ids is None else encode_ids(true_candidate_ids, "true_candidate_ids", num_queries)
        weights = None if sample_weight is None else check_sample_weight(sample_weight, num_queries)
        return cls(queries, true_candidates, ids, weights)


def check_query_embeddings(query_embeddings: Any, index: TopK | None = None) -> QueryEmbeddings:
    """``query_embeddings`` as finite ``[nq, d]`` floating :class:`QueryEmbeddings` (of the index's dimension,
    when the index is built), or an error naming it; checked :class:`QueryEmbeddings` pass through."""
    if isinstance(query_embeddings, QueryEmbeddings):
        queries = query_embeddings.embeddings
    else:
        queries = require_floating(query_embeddings, "query_embeddings", (2,))
    if queries.shape[1] == 0:
        raise ValueError(f"query_embeddings must have at least one embedding dimension, got {tuple(queries.shape)}")
    if index is not None and index.num_candidates and queries.shape[1] != index.dimension:
        raise ValueError(
            f"query_embeddings have dimension {queries.shape[1]} but the index holds {index.dimension}-d candidates"
        )
    if isinstance(query_embeddings, QueryEmbeddings):
        return query_embeddings
    require_finite(queries, "query_embeddings")
    return QueryEmbeddings(queries.detach())


class FactorizedMetric(NamedMetric, abc.ABC):
    """Interface of metrics that rank the whole candidate corpus for each query.

    :class:`twotower.tasks.Retrieval` calls :meth:`update` with one :class:`FactorizedBatch` it has checked
    already; called by hand, ``update`` takes the batch's query embeddings ``[nq, d]``, the embeddings of each
    query's true candidate ``[nq, d]``, their ids (``None``, a 1-D tensor, or a numpy array or sequence of ints or
    strings, ``nq`` long) and the sample weights ``[nq]`` or ``None``, and checks them. A subclass implements
    :meth:`update_checked` (a subclass that overrides ``update`` itself is called with those four arguments).
    """

    higher_is_better = True
    index: TopK

    def update(
        self,
        query_embeddings: Any,
        true_candidate_embeddings: Any = None,
        true_candidate_ids: Any = None,
        sample_weight: Any = None,
    ) -> None:
        """Rank the corpus for each query and accumulate the metric."""
        if isinstance(query_embeddings, FactorizedBatch):
            inputs = query_embeddings
        else:
            inputs = FactorizedBatch.check(
                query_embeddings, true_candidate_embeddings, true_candidate_ids, sample_weight, self.index
            )
        self.update_checked(inputs)

    @abc.abstractmethod
    def update_checked(self, inputs: FactorizedBatch) -> None:
        """Accumulate checked inputs (called by :meth:`update`, within torchmetrics' update bookkeeping)."""


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


class FactorizedTopK(FactorizedMetric, WeightedMeans):
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

    def update_checked(self, inputs: FactorizedBatch) -> None:
        """Retrieve the top ``max(ks)`` for each query and count hits (see the class docstring)."""
        k_max = max(self.ks)
        if inputs.true_ids is not None:
            retrieved = self.index.search(inputs.queries, k_max).ids
            hits = functional.top_k_hits_by_id(_id_matches(retrieved, inputs.true_ids.values), self.ks)
        else:
            if not self.index.is_exact():
                raise ValueError("score-based FactorizedTopK needs an exact index: pass true_candidate_ids")
            scores = self.index.top_scores(inputs.queries, k_max)
            # Same arithmetic as the corpus scan: an exact copy of the true candidate ties with it.
            positive = self.index.score_pairs(inputs.queries.embeddings, inputs.true_candidates).to(scores.device)
            hits = functional.top_k_hits_by_score(scores, positive, self.ks)
        weights = weights_or_ones(inputs.sample_weight, inputs.queries.num_queries)
        self._accumulate_rows(hits.detach().cpu(), weights)

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


class CorpusRanking(WeightedMeans):
    """Recall@K, Precision@K, NDCG@K, hit rate@K and MRR over the whole corpus, in one retrieval pass.

    Unlike :class:`FactorizedTopK`, a query may have several relevant items, and items can be excluded per query
    (for example those the user interacted with in training), as is usual in offline evaluation. The formulas are
    those of :func:`~twotower.metrics.functional.ranking_metrics`. Queries are averaged with their sample
    weights; a query with no relevant item is skipped. Names are ``{name}/recall@{k}`` etc. and ``{name}/mrr``.

    Args:
        candidates: a :class:`~twotower.indexes.TopK` index, a ``[n, d]`` tensor, or an iterable of batches.
        ks: the cut-offs.
        name: prefix of the reported names.
    """

    higher_is_better = True

    def __init__(self, candidates: Any, ks: Sequence[int] = (10, 50, 100), name: str = "corpus", **kwargs: Any) -> None:
        checked_ks = _check_ks(ks)
        # Columns: hit rate, recall, precision, ndcg for each k; then mrr.
        super().__init__(name, 4 * len(checked_ks) + 1, **kwargs)
        self.ks = checked_ks
        self.index = _as_index(candidates, max(self.ks))

    def update(
        self,
        query_embeddings: Any,
        relevant_ids: Any,
        exclusions: Any = None,
        sample_weight: Any = None,
    ) -> None:
        """Rank the corpus for ``query_embeddings`` ``[nq, d]`` and accumulate.

        Args:
            query_embeddings: ``[nq, d]`` (or checked :class:`~twotower.indexes.QueryEmbeddings`).
            relevant_ids: per query, the relevant ids: a list of ``nq`` sequences, or a ``[nq, R]`` array.
            exclusions: per query, ids to leave out of the ranking (same forms), or ``None``.
            sample_weight: ``[nq]`` non-negative weights.
        """
        queries = check_query_embeddings(query_embeddings, self.index)
        num_queries = queries.num_queries
        relevant = per_query_ids(relevant_ids, num_queries, "relevant_ids")
        same_kind(relevant, self.index.ids.is_string, "relevant_ids", "the index's identifiers")
        weights = weights_or_ones(
            None if sample_weight is None else check_sample_weight(sample_weight, num_queries), num_queries
        )
        retrieved = self.index.search(queries, max(self.ks), exclusions).ids
        retrieved_np = retrieved.detach().cpu().numpy() if isinstance(retrieved, torch.Tensor) else retrieved
        hits = torch.as_tensor(per_query_membership(retrieved_np, relevant))
        num_relevant = torch.tensor([len(np.unique(row)) for row in relevant], dtype=torch.float64)
        values = functional.ranking_metrics(hits, num_relevant, self.ks)
        self._accumulate_rows(values, weights * (num_relevant > 0))

    def results(self) -> dict[str, float]:
        """``{name}/{hit_rate,recall,precision,ndcg}@{k}`` for each k, and ``{name}/mrr``."""
        metrics = ("hit_rate", "recall", "precision", "ndcg")
        return self._named([f"{self.name}/{metric}@{k}" for k in self.ks for metric in metrics] + [f"{self.name}/mrr"])
