"""The retrieval task: in-batch softmax loss and metrics for two-tower models, equal to TFRS's.

:class:`Retrieval` reproduces ``tfrs.tasks.Retrieval`` (TensorFlow Recommenders 0.7.7) operation for operation, so
that the same embeddings and options give the same loss and metrics to float32 precision. Where TFRS's code
contradicts its own documentation, :class:`Retrieval` does what the documentation promises; each such place is
listed in the class docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower import distributed
from twotower._checks import (
    as_float_vector,
    encode_ids,
    per_query_ids,
    require_embeddings,
    require_finite,
    require_shape,
    require_tensor,
)
from twotower.losses import (
    MIN_FLOAT,
    HardNegativeMining,
    Reduction,
    RemoveAccidentalHits,
    SoftmaxCrossEntropy,
    in_batch_softmax_cross_entropy,
    sampling_correction_bias,
)
from twotower.metrics import FactorizedMetric, RetrievalMetric
from twotower.sampling import CrossBatchNegatives

#: ``loss(labels, logits, sample_weight) -> scalar``, the signature of a Keras loss.
LossFunction = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class _Prepared:
    """Validated inputs of one call: embeddings (float32 at least), logit bias, id codes, mask."""

    queries: torch.Tensor
    candidates: torch.Tensor
    bias: torch.Tensor | None
    codes: torch.Tensor | None
    score_mask: torch.Tensor | None


def _as_metric_list(value: Any, name: str) -> list[RetrievalMetric]:
    if value is None:
        return []
    metrics = [value] if isinstance(value, RetrievalMetric) else list(value)
    for metric in metrics:
        if not isinstance(metric, RetrievalMetric):
            raise TypeError(f"{name} must hold twotower.metrics.RetrievalMetric objects, got {type(metric).__name__}")
    return metrics


class Retrieval(nn.Module):
    """A factorized retrieval task: the in-batch softmax loss of a two-tower model, with its metrics.

    Row ``i`` of the query embeddings was paired with row ``i`` of the candidate embeddings by the user; every
    other candidate of the batch is a negative for it. Candidates beyond the number of queries are extra negatives
    shared by all queries.

    Args:
        loss: ``loss(labels, logits, sample_weight) -> scalar``. Defaults to :class:`SoftmaxCrossEntropy` with
            ``reduction``.
        metrics: a :class:`~twotower.metrics.FactorizedMetric` or a sequence of them, ranking the whole corpus.
        batch_metrics: metrics updated with ``(labels, logits, sample_weight)`` of the processed in-batch logits.
        loss_metrics: metrics updated with the loss value.
        temperature: the logits are divided by it; must be a finite number > 0.
        num_hard_negatives: keep only the positive and this many highest-scoring negatives per row.
        remove_accidental_hits: push negatives sharing the positive's id out of the softmax (needs
            ``candidate_ids``).
        name: the task's name.
        reduction: ``"sum"`` (TFRS's default: the weighted sum of the per-query losses) or ``"mean"`` (that sum
            divided by the number of queries). Ignored when ``loss`` is given.
        check_finite: check embeddings for NaN/inf on every call (one device synchronisation per call).
        learnable_temperature: learn the temperature (from ``temperature`` as the initial value), as
            ``exp(log_temperature)`` clamped to ``temperature_range``.
        temperature_range: the bounds of a learnable temperature.
        negative_cache: a :class:`~twotower.sampling.CrossBatchNegatives`: its embeddings join every batch as extra
            negatives, and in training mode each batch's positives are pushed into it after the loss.
        cross_rank_negatives: under ``torch.distributed``, score each rank's queries against every rank's
            candidates (gathered with gradient), so the loss summed over ranks is the single-process loss of the
            global batch. ``None`` (default) turns it on whenever a process group of several ranks is
            initialised. Each rank's loss covers its own queries; ``"mean"`` divides by the global query count.
        fused: compute the default loss by blocks of rows without materialising the ``[nq, nc]`` logits, when
            nothing needs them (no batch metrics to update, no hard-negative selection, no custom loss). The
            result is the same; it is faster at every batch size (a batch of up to about 2M logits is one block
            whose exponentials are kept for the backward) and uses far less memory for large batches. ``None``
            (default) and ``True`` do so whenever possible, ``False`` never.

    Differences from TFRS 0.7.7, where we follow TFRS's documentation rather than its code:

    * ``num_hard_negatives <= 0`` keeps every negative (TFRS's code keeps only the positive for 0, so its loss
      is 0, and fails for negative values).
    * With ``candidate_ids`` and extra negatives (``nc > nq``), the factorized metrics receive the ids of the
      positives, ``candidate_ids[:nq]`` (TFRS passes all ``nc`` ids and fails).
    * A single metric object is accepted for ``metrics`` (as TFRS's constructor does) and never dropped.

    Beyond TFRS: ``score_mask`` is validated, sample weights must be non-negative, and probabilities must lie in
    ``[0, 1]`` (TFRS clips anything).
    """

    def __init__(
        self,
        loss: LossFunction | None = None,
        metrics: FactorizedMetric | Sequence[FactorizedMetric] | None = None,
        batch_metrics: Iterable[RetrievalMetric] | None = None,
        loss_metrics: Iterable[RetrievalMetric] | None = None,
        temperature: float | None = None,
        num_hard_negatives: int | None = None,
        remove_accidental_hits: bool = False,
        name: str | None = None,
        *,
        reduction: Reduction = "sum",
        check_finite: bool = True,
        fused: bool | None = None,
        learnable_temperature: bool = False,
        temperature_range: tuple[float, float] = (1e-2, 10.0),
        negative_cache: CrossBatchNegatives | None = None,
        cross_rank_negatives: bool | None = None,
    ) -> None:
        super().__init__()
        if temperature is not None:
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError(f"temperature must be a number or None, got {type(temperature).__name__}")
            if not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        if not isinstance(remove_accidental_hits, bool):
            raise TypeError(f"remove_accidental_hits must be a bool, got {type(remove_accidental_hits).__name__}")
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be callable as loss(labels, logits, sample_weight), got {type(loss).__name__}")
        self.loss_fn: LossFunction = loss if loss is not None else SoftmaxCrossEntropy(reduction)
        self.temperature = None if temperature is None else float(temperature)
        self.learnable_temperature = learnable_temperature
        self.temperature_range = temperature_range
        if learnable_temperature:
            low, high = temperature_range
            if temperature is None:
                raise ValueError("learnable_temperature=True needs an initial temperature")
            if not 0 < low < high or not math.isfinite(high):
                raise ValueError(f"temperature_range must be (low, high) with 0 < low < high, got {temperature_range}")
            if not low <= temperature <= high:
                raise ValueError(f"temperature {temperature} lies outside temperature_range {temperature_range}")
            # Log-parametrised: positive by construction, and multiplicative steps at every scale.
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        if negative_cache is not None and not isinstance(negative_cache, CrossBatchNegatives):
            raise TypeError(f"negative_cache must be a CrossBatchNegatives, got {type(negative_cache).__name__}")
        self.negative_cache = negative_cache
        self.cross_rank_negatives = cross_rank_negatives
        self.num_hard_negatives = num_hard_negatives
        self.hard_negative_mining = HardNegativeMining(num_hard_negatives) if num_hard_negatives is not None else None
        self.remove_accidental_hits = remove_accidental_hits
        self.accidental_hits = RemoveAccidentalHits()
        self.name = name or "retrieval"
        self.check_finite = check_finite
        self.fused = fused
        #: Set by :meth:`twotower.models.Model.fit`/``evaluate``: factorized metrics run only while True.
        self.factorized_metrics_enabled = True
        self.factorized_metrics = nn.ModuleList(_as_metric_list(metrics, "metrics"))
        for metric in self.factorized_metrics:
            if not isinstance(metric, FactorizedMetric):
                raise TypeError(f"metrics must be FactorizedMetric objects, got {type(metric).__name__}")
        self.batch_metrics = nn.ModuleList(_as_metric_list(batch_metrics, "batch_metrics"))
        self.loss_metrics = nn.ModuleList(_as_metric_list(loss_metrics, "loss_metrics"))

    def set_factorized_metrics(self, metrics: FactorizedMetric | Sequence[FactorizedMetric] | None) -> None:
        """Replace the factorized metrics (one metric or a sequence; TFRS drops a single one set this way)."""
        new = _as_metric_list(metrics, "metrics")
        for metric in new:
            if not isinstance(metric, FactorizedMetric):
                raise TypeError(f"metrics must be FactorizedMetric objects, got {type(metric).__name__}")
        self.factorized_metrics = nn.ModuleList(new)

    def all_metrics(self) -> list[RetrievalMetric]:
        """Every metric of the task: loss metrics, then batch metrics, then factorized metrics."""
        return [*self._loss_metrics(), *self._batch_metrics(), *self._factorized_metrics()]

    def _loss_metrics(self) -> list[RetrievalMetric]:
        return [metric for metric in self.loss_metrics if isinstance(metric, RetrievalMetric)]

    def _batch_metrics(self) -> list[RetrievalMetric]:
        return [metric for metric in self.batch_metrics if isinstance(metric, RetrievalMetric)]

    def _factorized_metrics(self) -> list[FactorizedMetric]:
        return [metric for metric in self.factorized_metrics if isinstance(metric, FactorizedMetric)]

    def metric_results(self) -> dict[str, float]:
        """The current value of every metric, ``{name: value}``."""
        results: dict[str, float] = {}
        for metric in self.all_metrics():
            results.update(metric.results())
        return results

    def reset_metrics(self) -> None:
        """Reset every metric's state."""
        for metric in self.all_metrics():
            metric.reset()

    def current_temperature(self) -> float | torch.Tensor | None:
        """The temperature in use: ``None``, a float, or (learnable) a scalar tensor with gradient."""
        if self.learnable_temperature:
            low, high = self.temperature_range
            return self.log_temperature.exp().clamp(low, high)
        return self.temperature

    def _prepare(
        self,
        query_embeddings: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_sampling_probability: Any,
        candidate_ids: Any,
        score_mask: torch.Tensor | None,
    ) -> _Prepared:
        """Validate the inputs and turn them into the tensors that steps 1-6 need."""
        queries, candidates = self._check_embeddings(query_embeddings, candidate_embeddings)
        num_queries, num_candidates = queries.shape[0], candidates.shape[0]
        bias = None
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
            bias = sampling_correction_bias(probability)
        codes = None
        if self.remove_accidental_hits:
            if candidate_ids is None:
                raise ValueError("remove_accidental_hits=True requires candidate_ids")
            codes, _ = encode_ids(candidate_ids, "candidate_ids", num_candidates)
            codes = codes.to(queries.device)
        elif candidate_ids is not None:
            encode_ids(candidate_ids, "candidate_ids", num_candidates)
        if score_mask is not None:
            if not isinstance(score_mask, torch.Tensor) or score_mask.dtype != torch.bool:
                raise TypeError("score_mask must be a torch.bool tensor")
            require_shape(score_mask, "score_mask", (num_queries, num_candidates))
            score_mask = score_mask.to(queries.device)
        return _Prepared(queries, candidates, bias, codes, score_mask)

    def _logits(self, prepared: _Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-7 on prepared inputs: the full logits and labels."""
        queries, candidates = prepared.queries, prepared.candidates
        if queries.ndim == 3:
            scores = torch.einsum("qhd,cd->qhc", queries, candidates).amax(dim=1)
        else:
            scores = queries @ candidates.T
        labels = torch.eye(queries.shape[0], candidates.shape[0], dtype=scores.dtype, device=scores.device)
        temperature = self.current_temperature()
        if temperature is not None:
            scores = scores / temperature
        if prepared.bias is not None:
            scores = scores + prepared.bias
        if prepared.codes is not None:
            scores = self.accidental_hits(labels, scores, prepared.codes)
        if prepared.score_mask is not None:
            scores = torch.where(prepared.score_mask, scores, torch.full_like(scores, MIN_FLOAT))
        if self.hard_negative_mining is not None:
            scores, labels = self.hard_negative_mining(scores, labels)
        return scores, labels

    def compute_logits(
        self,
        query_embeddings: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_sampling_probability: Any = None,
        candidate_ids: Any = None,
        score_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-7 of the task: the processed in-batch logits and their labels.

        Args:
            query_embeddings: ``[nq, d]``, or ``[nq, heads, d]`` (each query scored by its best head).
            candidate_embeddings: ``[nc, d]`` with ``nc >= nq``; row ``i < nq`` is query ``i``'s positive.
            candidate_sampling_probability: ``[nc]`` probabilities in ``[0, 1]`` (clipped below at 1e-6).
            candidate_ids: ``[nc]`` ids (integers or strings), required by ``remove_accidental_hits``.
            score_mask: ``[nq, nc]`` bool; ``False`` removes the score from the softmax.

        Returns:
            ``(logits, labels)``, both ``[nq, nc]``, or ``[nq, n + 1]`` with ``num_hard_negatives = n``.
            Half-precision embeddings give float32 logits.
        """
        return self._logits(
            self._prepare(
                query_embeddings, candidate_embeddings, candidate_sampling_probability, candidate_ids, score_mask
            )
        )

    def _can_fuse(self, prepared: _Prepared, need_logits: bool) -> bool:
        """Whether the blocked loss (no materialised logits) computes exactly what the task asks for."""
        keeps_all = self.num_hard_negatives is None or not (
            0 < self.num_hard_negatives < prepared.candidates.shape[0] - 1
        )
        return (
            self.fused is not False
            and not self.learnable_temperature
            and not need_logits
            and keeps_all
            and prepared.queries.ndim == 2
            and type(self.loss_fn) is SoftmaxCrossEntropy
        )

    def forward(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        candidate_embeddings: torch.Tensor | np.ndarray,
        sample_weight: Any = None,
        candidate_sampling_probability: Any = None,
        candidate_ids: Any = None,
        compute_metrics: bool = True,
        compute_batch_metrics: bool = True,
        score_mask: torch.Tensor | None = None,
        positive_ids: Any = None,
    ) -> torch.Tensor:
        """Compute the loss and update the metrics.

        Args:
            query_embeddings: ``[nq, d]`` (or ``[nq, heads, d]``) query representations.
            candidate_embeddings: ``[nc, d]`` candidate representations, ``nc >= nq``; rows ``nq..nc-1`` are
                extra negatives shared by every query.
            sample_weight: ``[nq]`` non-negative weights of the queries.
            candidate_sampling_probability: ``[nc]`` sampling probabilities for the logQ correction.
            candidate_ids: ``[nc]`` candidate ids (integer tensor, or a sequence/array of ints or strings). Used to
                remove accidental hits, and makes the factorized metrics id-based.
            compute_metrics: update the factorized metrics (costly: they rank the whole corpus).
            compute_batch_metrics: update the batch metrics. Loss metrics are always updated.
            score_mask: ``[nq, nc]`` bool; ``False`` entries are removed from the softmax.
            positive_ids: per query, further ids known to be positives for it (a list of ``nq`` sequences or an
                ``[nq, P]`` array; unknown ids pad): every other column carrying one of them is removed from that
                query's softmax. Needs ``candidate_ids``.

        Returns:
            The scalar loss, differentiable with respect to both embeddings.
        """
        # numpy arrays (as TFRS's layers take them) become tensors once, here.
        query_embeddings = require_tensor(query_embeddings, "query_embeddings")
        candidate_embeddings = require_tensor(candidate_embeddings, "candidate_embeddings")
        local_candidates, local_ids = candidate_embeddings, candidate_ids
        cross_rank = self._cross_rank()
        if cross_rank:
            if score_mask is not None or positive_ids is not None or self.negative_cache is not None:
                raise ValueError(
                    "score_mask, positive_ids and negative_cache are per-rank inputs: they cannot be combined with "
                    "cross_rank_negatives (pass cross_rank_negatives=False to keep negatives per rank)"
                )
            candidate_embeddings, candidate_ids, candidate_sampling_probability = self._gather_ranks(
                query_embeddings, candidate_embeddings, candidate_ids, candidate_sampling_probability
            )
        num_batch_candidates = candidate_embeddings.shape[0] if isinstance(candidate_embeddings, torch.Tensor) else 0
        candidate_embeddings, candidate_sampling_probability, candidate_ids, score_mask = self._with_cache(
            candidate_embeddings, candidate_sampling_probability, candidate_ids, score_mask
        )
        if positive_ids is not None:
            score_mask = self._mask_known_positives(query_embeddings, candidate_ids, positive_ids, score_mask)
        prepared = self._prepare(
            query_embeddings, candidate_embeddings, candidate_sampling_probability, candidate_ids, score_mask
        )
        num_queries = query_embeddings.shape[0]
        weight = None
        if sample_weight is not None:
            weight = as_float_vector(
                sample_weight, "sample_weight", num_queries, prepared.queries.device, prepared.queries.dtype
            )
            if bool((weight < 0).any()):
                raise ValueError("sample_weight must be non-negative")
        need_logits = compute_batch_metrics and bool(self.batch_metrics)
        logits = labels = None
        if self._can_fuse(prepared, need_logits):
            # Same loss, computed by blocks of rows: the [nq, nc] logits are never held in memory.
            per_row = in_batch_softmax_cross_entropy(
                prepared.queries,
                prepared.candidates,
                self.temperature,
                prepared.bias,
                prepared.codes,
                prepared.score_mask,
            )
            loss_fn = self.loss_fn
            assert isinstance(loss_fn, SoftmaxCrossEntropy)
            loss = loss_fn.reduce(per_row, weight)
        else:
            logits, labels = self._logits(prepared)
            if type(self.loss_fn) is SoftmaxCrossEntropy:
                # Labels are one-hot with the positive in column i (column 0 after hard-negative mining): the
                # indexed cross-entropy equals -sum(labels * log_softmax) without the dense product.
                positives = (
                    torch.arange(logits.shape[0], device=logits.device)
                    if self.hard_negative_mining is None
                    else labels.argmax(dim=1)
                )
                loss = self.loss_fn.reduce(
                    torch.nn.functional.cross_entropy(logits, positives, reduction="none"), weight
                )
            else:
                loss = self.loss_fn(labels, logits, weight)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss must return a scalar tensor")
        reported = loss.detach()
        if cross_rank:
            if isinstance(self.loss_fn, SoftmaxCrossEntropy) and self.loss_fn.reduction == "mean":
                total_queries = distributed.all_reduce_sum(torch.tensor(float(num_queries), device=loss.device))
                loss = loss * (num_queries / total_queries)
            reported = distributed.all_reduce_sum(loss.detach())

        with torch.no_grad():
            for metric in self._loss_metrics():
                metric.update(reported)
            if (
                compute_metrics
                and self.factorized_metrics_enabled
                and self.factorized_metrics
                and query_embeddings.ndim == 2
            ):
                true_ids = None
                if local_ids is not None:
                    true_ids = local_ids[:num_queries]
                for metric in self._factorized_metrics():
                    metric.update(
                        query_embeddings.detach(),
                        local_candidates[:num_queries].detach(),
                        true_ids,
                        weight,
                    )
            if compute_batch_metrics and logits is not None and labels is not None:
                for metric in self._batch_metrics():
                    metric.update(labels, logits.detach(), weight)
            if self.negative_cache is not None and self.training:
                self._push_positives(
                    candidate_embeddings[:num_batch_candidates][:num_queries],
                    candidate_ids,
                    candidate_sampling_probability,
                    num_queries,
                )
        return loss

    def _cross_rank(self) -> bool:
        active = distributed.is_distributed()
        return active if self.cross_rank_negatives is None else bool(self.cross_rank_negatives) and active

    def _gather_ranks(
        self, queries: torch.Tensor, candidates: torch.Tensor, candidate_ids: Any, probability: Any
    ) -> tuple[torch.Tensor, Any, Any]:
        """Every rank's candidates, this rank's positives first; ids and probabilities gathered alike."""
        queries, _ = self._check_embeddings(queries, candidates)
        if probability is not None:
            probability = as_float_vector(
                probability, "candidate_sampling_probability", candidates.shape[0], candidates.device, torch.float32
            )
        gathered, ids, probabilities = distributed.global_candidates(
            queries.shape[0], candidates, candidate_ids, probability
        )
        return gathered, ids, probabilities

    def _with_cache(
        self, candidates: torch.Tensor, probability: Any, candidate_ids: Any, score_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any, Any, torch.Tensor | None]:
        """Append the cached negatives (and their ids, probabilities and mask columns) to the batch's candidates."""
        cache = self.negative_cache
        if cache is None or len(cache) == 0 or not isinstance(candidates, torch.Tensor):
            return candidates, probability, candidate_ids, score_mask
        assert cache.embeddings is not None
        cached = cache.embeddings.to(device=candidates.device, dtype=candidates.dtype)
        if cached.shape[1] != candidates.shape[1]:
            raise ValueError(
                f"negative_cache holds {cached.shape[1]}-d embeddings, candidates are {candidates.shape[1]}-d"
            )
        if candidate_ids is not None:
            if cache.codes is None:
                raise ValueError("candidate_ids given, but the negative cache holds no ids: push ids with every batch")
            _, values = encode_ids(candidate_ids, "candidate_ids", candidates.shape[0])
            candidate_ids = np.concatenate([values, cache.codes])
        elif self.remove_accidental_hits:
            raise ValueError("remove_accidental_hits=True requires candidate_ids")
        if probability is not None:
            if cache.probabilities is None:
                raise ValueError("candidate_sampling_probability given, but the cache holds none: push them too")
            batch = as_float_vector(probability, "candidate_sampling_probability", candidates.shape[0],
                                    candidates.device, torch.float32)  # fmt: skip
            probability = torch.cat([batch, cache.probabilities.to(batch.device, torch.float32)])
        if score_mask is not None:
            if not isinstance(score_mask, torch.Tensor) or score_mask.dtype != torch.bool:
                raise TypeError("score_mask must be a torch.bool tensor")
            require_shape(score_mask, "score_mask", (score_mask.shape[0], candidates.shape[0]))
            extra = torch.ones(score_mask.shape[0], cached.shape[0], dtype=torch.bool, device=score_mask.device)
            score_mask = torch.cat([score_mask, extra], dim=1)
        return torch.cat([candidates, cached]), probability, candidate_ids, score_mask

    def _push_positives(self, positives: torch.Tensor, candidate_ids: Any, probability: Any, num_queries: int) -> None:
        assert self.negative_cache is not None
        ids = None if candidate_ids is None else encode_ids(candidate_ids, "candidate_ids")[1][:num_queries]
        probabilities = None
        if probability is not None:
            probabilities = (
                torch.as_tensor(np.asarray(probability, dtype=np.float32))
                if not isinstance(probability, torch.Tensor)
                else probability
            )
            probabilities = probabilities.reshape(-1)[:num_queries].detach()
        self.negative_cache.push(positives.detach(), ids, probabilities)

    @staticmethod
    def _mask_known_positives(
        query_embeddings: torch.Tensor, candidate_ids: Any, positive_ids: Any, score_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """A score mask removing, for each query, the other columns that carry one of its known positive ids."""
        if candidate_ids is None:
            raise ValueError("positive_ids requires candidate_ids")
        num_queries = query_embeddings.shape[0]
        _, values = encode_ids(candidate_ids, "candidate_ids")
        rows = per_query_ids(positive_ids, num_queries, "positive_ids")
        flat = np.concatenate([np.asarray(row).reshape(-1) for row in rows]) if rows else np.zeros(0)
        if flat.size and (flat.dtype.kind in "USO") != (values.dtype.kind in "USO"):
            raise TypeError("positive_ids must hold ids of the same kind (integers or strings) as candidate_ids")
        # One vocabulary for candidate ids and known positives, then a (query, id) membership test.
        vocabulary, codes = np.unique(np.concatenate([values.astype(str), flat.astype(str)]), return_inverse=True)
        candidate_codes = torch.as_tensor(codes[: values.shape[0]])
        owners = np.repeat(np.arange(num_queries), [len(np.asarray(row).reshape(-1)) for row in rows])
        known = torch.zeros(num_queries, len(vocabulary), dtype=torch.bool)
        known[torch.as_tensor(owners), torch.as_tensor(codes[values.shape[0] :])] = True
        removed = known[:, candidate_codes]
        diagonal = torch.arange(num_queries)
        removed[diagonal, diagonal] = False
        mask = ~removed.to(query_embeddings.device)
        return mask if score_mask is None else mask & score_mask.to(mask.device)

    def _check_embeddings(
        self, query_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = require_embeddings(query_embeddings, "query_embeddings", (2, 3))
        candidates = require_embeddings(candidate_embeddings, "candidate_embeddings", (2,))
        if queries.dtype != candidates.dtype:
            raise TypeError(
                f"query_embeddings and candidate_embeddings must share a dtype, got {queries.dtype} "
                f"and {candidates.dtype}"
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
        if self.check_finite:
            require_finite(queries, "query_embeddings")
            require_finite(candidates, "candidate_embeddings")
        if queries.dtype in (torch.float16, torch.bfloat16):
            # Half precision cannot hold the removal constants (about 3.4e36) nor a stable softmax.
            queries, candidates = queries.float(), candidates.float()
        return queries, candidates
