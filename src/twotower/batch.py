"""One call's inputs to the retrieval task, checked and converted once: :class:`RetrievalBatch`.

:class:`twotower.tasks.Retrieval` builds a batch from its arguments (:meth:`RetrievalBatch.build`), extends it
with negatives from other ranks or a cache, and hands it to every later step: the logit steps, the loss and the
metrics read its fields and never check or encode again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from twotower import distributed
from twotower._checks import as_float_vector, require_embeddings, require_finite, require_shape
from twotower.ids import EncodedIds, encode_ids, per_query_ids, per_query_membership, same_kind
from twotower.logits import LogitSteps, sampling_correction_bias


@dataclass(frozen=True)
class RetrievalBatch:
    """The checked inputs of one call of the task.

    Row ``i < num_queries`` of ``candidates`` is query ``i``'s positive; the rows after them are extra negatives
    shared by every query (the batch's own, other ranks' positives, cached embeddings).

    Attributes:
        queries: ``[nq, d]`` or ``[nq, heads, d]``, float32 (half precision is widened) or float64.
        candidates: ``[nc, d]``, the dtype and device of ``queries``, ``nc >= nq``.
        sample_weight: ``[nq]`` finite non-negative weights, or ``None``.
        probability: ``[nc]`` sampling probabilities in ``[0, 1]``, or ``None``.
        ids: ``[nc]`` encoded candidate ids, or ``None``.
        score_mask: ``[nq, nc]`` bool, ``False`` removes the logit, or ``None``.
        positive_ids: per query, further ids known to be positives for it (checked, same kind as ``ids``), or
            ``None``; :meth:`with_known_positives_masked` turns them into mask entries.
    """

    queries: torch.Tensor
    candidates: torch.Tensor
    sample_weight: torch.Tensor | None = None
    probability: torch.Tensor | None = None
    ids: EncodedIds | None = None
    score_mask: torch.Tensor | None = None
    positive_ids: list[np.ndarray] | None = None

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.candidates.shape[0])

    @classmethod
    def build(
        cls,
        query_embeddings: Any,
        candidate_embeddings: Any,
        *,
        sample_weight: Any = None,
        candidate_sampling_probability: Any = None,
        candidate_ids: Any = None,
        score_mask: Any = None,
        positive_ids: Any = None,
        check_finite: bool = True,
        needs_ids: bool = False,
    ) -> RetrievalBatch:
        """Check every argument of :meth:`twotower.tasks.Retrieval.forward` once (see there for the forms each
        may take); ``needs_ids`` (accidental-hit removal) makes ``candidate_ids`` required. Raises a
        ``TypeError``/``ValueError`` naming the argument that is wrong."""
        queries, candidates = _check_embeddings(query_embeddings, candidate_embeddings, check_finite)
        num_queries, num_candidates = queries.shape[0], candidates.shape[0]
        weight = None
        if sample_weight is not None:
            weight = as_float_vector(sample_weight, "sample_weight", num_queries, queries.device, queries.dtype)
            if bool((weight < 0).any()):
                raise ValueError("sample_weight must be non-negative")
        probability = None
        if candidate_sampling_probability is not None:
            probability = as_float_vector(
                candidate_sampling_probability,
                "candidate_sampling_probability",
                num_candidates,
                queries.device,
                queries.dtype,
            )
            if bool(((probability < 0) | (probability > 1)).any()):
                raise ValueError("candidate_sampling_probability must lie in [0, 1]")
        ids = None
        if candidate_ids is not None:
            ids = encode_ids(candidate_ids, "candidate_ids", num_candidates)
        elif needs_ids:
            raise ValueError("remove_accidental_hits=True requires candidate_ids")
        mask = None
        if score_mask is not None:
            mask = _check_mask(score_mask, num_queries, num_candidates).to(queries.device)
        positives = None
        if positive_ids is not None:
            if ids is None:
                raise ValueError("positive_ids requires candidate_ids")
            positives = per_query_ids(positive_ids, num_queries, "positive_ids")
            same_kind(positives, ids.is_string, "positive_ids", "candidate_ids")
        return cls(queries, candidates, weight, probability, ids, mask, positives)

    def across_ranks(self, with_negative_cache: bool = False) -> RetrievalBatch:
        """Under ``torch.distributed``: the batch with every rank's candidates (gathered with gradient), this
        rank's positives first, so that row ``i`` is still column ``i``; ids and probabilities gathered alike
        (:func:`twotower.distributed.global_candidates`). All ranks must call it together. Per-rank inputs
        (a score mask, known positives, ``with_negative_cache``) cannot be combined with it."""
        if self.score_mask is not None or self.positive_ids is not None or with_negative_cache:
            raise ValueError(
                "score_mask, positive_ids and negative_cache are per-rank inputs: they cannot be combined with "
                "cross_rank_negatives (pass cross_rank_negatives=False to keep negatives per rank)"
            )
        candidates, ids, probability = distributed.global_candidates(
            self.num_queries, self.candidates, self.ids, self.probability
        )
        encoded = None if ids is None else encode_ids(ids, "candidate_ids")
        return dataclasses.replace(self, candidates=candidates, ids=encoded, probability=probability)

    def with_extra_negatives(
        self, embeddings: torch.Tensor, ids: np.ndarray | None, probability: torch.Tensor | None
    ) -> RetrievalBatch:
        """The batch with ``embeddings`` ``[m, d]`` appended as negatives shared by every query, with their ids
        and probabilities (each required exactly when the batch has them). Their mask columns are ``True``."""
        if embeddings.shape[1:] != self.candidates.shape[1:]:
            raise ValueError(
                f"the extra negatives are {embeddings.shape[1]}-d, the batch's candidates {self.candidates.shape[1]}-d"
            )
        combined_ids = self.ids
        if self.ids is not None:
            if ids is None:
                raise ValueError("candidate_ids given, but the extra negatives have no ids")
            combined_ids = EncodedIds.concatenate([self.ids, ids]).to(self.ids.codes.device)
        combined_probability = self.probability
        if self.probability is not None:
            if probability is None:
                raise ValueError("candidate_sampling_probability given, but the extra negatives have none")
            combined_probability = torch.cat([self.probability, probability.to(self.probability)])
        mask = self.score_mask
        if mask is not None:
            extra = torch.ones(mask.shape[0], embeddings.shape[0], dtype=torch.bool, device=mask.device)
            mask = torch.cat([mask, extra], dim=1)
        candidates = torch.cat([self.candidates, embeddings.to(self.candidates)])
        return dataclasses.replace(
            self, candidates=candidates, ids=combined_ids, probability=combined_probability, score_mask=mask
        )

    def with_known_positives_masked(self) -> RetrievalBatch:
        """The batch with each query's other columns carrying one of its known positive ids removed from its
        softmax (its own positive column stays); the batch itself when there are none."""
        if self.positive_ids is None:
            return self
        assert self.ids is not None  # build() requires candidate_ids with positive_ids
        removed = torch.as_tensor(per_query_membership(self.ids.values, self.positive_ids))
        diagonal = torch.arange(self.num_queries)
        removed[diagonal, diagonal] = False
        mask = ~removed.to(self.queries.device)
        if self.score_mask is not None:
            mask &= self.score_mask
        return dataclasses.replace(self, score_mask=mask, positive_ids=None)

    def logit_steps(
        self,
        temperature: float | torch.Tensor | None,
        remove_accidental_hits: bool,
        matmul_dtype: torch.dtype | None = None,
    ) -> LogitSteps:
        """The :class:`~twotower.logits.LogitSteps` of this batch, its products in ``matmul_dtype``."""
        bias = None if self.probability is None else sampling_correction_bias(self.probability)
        codes = None
        if remove_accidental_hits:
            assert self.ids is not None  # build(needs_ids=True) requires them
            codes = self.ids.codes.to(self.queries.device)
        return LogitSteps(temperature, bias, codes, self.score_mask, matmul_dtype)


def _check_embeddings(
    query_embeddings: Any, candidate_embeddings: Any, check_finite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    queries = require_embeddings(query_embeddings, "query_embeddings", (2, 3))
    candidates = require_embeddings(candidate_embeddings, "candidate_embeddings", (2,))
    if queries.dtype != candidates.dtype:
        raise TypeError(
            f"query_embeddings and candidate_embeddings must share a dtype, got {queries.dtype} and {candidates.dtype}"
        )
    if queries.device != candidates.device:
        raise ValueError(
            f"query_embeddings and candidate_embeddings must be on one device, got {queries.device} "
            f"and {candidates.device}"
        )
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(
            f"query_embeddings and candidate_embeddings must have the same embedding dimension, got "
            f"{queries.shape[-1]} and {candidates.shape[-1]}"
        )
    if queries.shape[0] == 0:
        raise ValueError("query_embeddings must hold at least one query, got 0 rows")
    if candidates.shape[0] < queries.shape[0]:
        raise ValueError(
            f"candidate_embeddings must have at least as many rows as query_embeddings (one positive per "
            f"query, then extra negatives), got {candidates.shape[0]} < {queries.shape[0]}"
        )
    if check_finite:
        require_finite(queries, "query_embeddings")
        require_finite(candidates, "candidate_embeddings")
    if queries.dtype in (torch.float16, torch.bfloat16):
        # Half precision cannot hold the removal constants (about 3.4e36) nor a stable softmax.
        queries, candidates = queries.float(), candidates.float()
    return queries, candidates


def _check_mask(score_mask: Any, num_queries: int, num_candidates: int) -> torch.Tensor:
    if isinstance(score_mask, np.ndarray) and score_mask.dtype == np.bool_:
        score_mask = torch.from_numpy(score_mask)
    if not isinstance(score_mask, torch.Tensor) or score_mask.dtype != torch.bool:
        raise TypeError("score_mask must be a torch.bool tensor (or a numpy bool array)")
    require_shape(score_mask, "score_mask", (num_queries, num_candidates))
    return score_mask
