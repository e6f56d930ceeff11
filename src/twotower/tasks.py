"""The retrieval task: in-batch softmax loss and metrics for two-tower models, equal to TFRS's.

:class:`Retrieval` reproduces ``tfrs.tasks.Retrieval`` (TensorFlow Recommenders 0.7.7) operation for operation, so
that the same embeddings and options give the same loss and metrics to float32 precision. Where TFRS's code
contradicts its own documentation, :class:`Retrieval` does what the documentation promises; each such place is
listed in the class docstring.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from twotower import distributed
from twotower.batch import RetrievalBatch
from twotower.indexes.base import QueryEmbeddings
from twotower.logits import LogitSteps, score_rows
from twotower.losses import (
    HardNegativeMining,
    Reduction,
    SoftmaxCrossEntropy,
    in_batch_softmax_cross_entropy,
)
from twotower.metrics import FactorizedBatch, FactorizedMetric, NamedMetric
from twotower.sampling import CrossBatchNegatives

#: The dtype of the loss's matrix products (see :class:`Retrieval`'s ``precision``).
Precision = Literal["float32", "bf16"]
_MATMUL_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}

#: ``loss(labels, logits, sample_weight) -> scalar``, the signature of a Keras loss.
LossFunction = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _as_metric_list(value: Any, name: str) -> list[NamedMetric]:
    if value is None:
        return []
    metrics = [value] if isinstance(value, NamedMetric) else list(value)
    for metric in metrics:
        if not isinstance(metric, NamedMetric):
            raise TypeError(f"{name} must hold twotower.metrics.NamedMetric objects, got {type(metric).__name__}")
    return metrics


def _autocast_active(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A region without autocast on ``device_type`` (nothing to do where none is active)."""
    if not _autocast_active(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


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
        fused: compute the default loss by blocks of rows without materialising the ``[nq, nc]`` logits
            (:func:`twotower.losses.in_batch_softmax_cross_entropy`). The result is the same; it is faster at
            every batch size (a batch of up to about 2M logits is one block whose exponentials are kept for the
            backward) and uses far less memory for large batches. It applies when nothing needs the logits (no
            batch metrics to update, no hard-negative selection, no custom loss, no learnable temperature,
            single-head queries). ``None`` (default): whenever it applies; ``True``: always, and a call where
            it cannot apply raises a ``ValueError`` saying why; ``False``: never.
        precision: the dtype of the loss's matrix products. ``"float32"``: the embeddings' own (float32).
            ``"bf16"``: the scores ``Q C^T`` and the gradient products are multiplied in bfloat16 (accumulated in
            float32 by the CPU's bf16 matrix units, AMX or AVX512-BF16, or by a GPU's tensor cores) and widened
            to float32 at once: the temperature, logQ bias, masks, softmax statistics and the loss stay float32.
            About 2-3x faster products on such hardware, with logits rounded to bf16's 8 bits (a relative error
            of 2**-9); slower on a CPU without bf16 units. ``None`` (default): ``"bf16"`` inside a
            ``torch.autocast(..., dtype=torch.bfloat16)`` region of the embeddings' device (so that a model whose
            towers run under autocast gets its loss products in bf16 too), ``"float32"`` otherwise.

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
        batch_metrics: Iterable[NamedMetric] | None = None,
        loss_metrics: Iterable[NamedMetric] | None = None,
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
        precision: Precision | None = None,
    ) -> None:
        super().__init__()
        if precision is not None and precision not in _MATMUL_DTYPES:
            raise ValueError(f"precision must be 'float32', 'bf16' or None, got {precision!r}")
        self.precision = precision
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
        self.name = name or "retrieval"
        self.check_finite = check_finite
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be True, False or None, got {type(fused).__name__}")
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

    def all_metrics(self) -> list[NamedMetric]:
        """Every metric of the task: loss metrics, then batch metrics, then factorized metrics."""
        return [*self._loss_metrics(), *self._batch_metrics(), *self._factorized_metrics()]

    def _loss_metrics(self) -> list[NamedMetric]:
        return [metric for metric in self.loss_metrics if isinstance(metric, NamedMetric)]

    def _batch_metrics(self) -> list[NamedMetric]:
        return [metric for metric in self.batch_metrics if isinstance(metric, NamedMetric)]

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
            query_embeddings: ``[nq, d]`` (or ``[nq, heads, d]``) query representations (tensor or numpy).
            candidate_embeddings: ``[nc, d]`` candidate representations, ``nc >= nq``; rows ``nq..nc-1`` are
                extra negatives shared by every query.
            sample_weight: ``[nq]`` non-negative weights of the queries.
            candidate_sampling_probability: ``[nc]`` sampling probabilities for the logQ correction.
            candidate_ids: ``[nc]`` candidate ids (integer tensor, or a sequence/array of ints, integral floats or
                strings). Used to remove accidental hits, and makes the factorized metrics id-based.
            compute_metrics: update the factorized metrics (costly: they rank the whole corpus).
            compute_batch_metrics: update the batch metrics. Loss metrics are always updated.
            score_mask: ``[nq, nc]`` bool; ``False`` entries are removed from the softmax.
            positive_ids: per query, further ids known to be positives for it (a list of ``nq`` sequences or an
                ``[nq, P]`` array; unknown ids pad): every other column carrying one of them is removed from that
                query's softmax. Needs ``candidate_ids``.

        Returns:
            The scalar loss, differentiable with respect to both embeddings.
        """
        batch = RetrievalBatch.build(
            query_embeddings,
            candidate_embeddings,
            sample_weight=sample_weight,
            candidate_sampling_probability=candidate_sampling_probability,
            candidate_ids=candidate_ids,
            score_mask=score_mask,
            positive_ids=positive_ids,
            check_finite=self.check_finite,
            needs_ids=self.remove_accidental_hits,
        )
        positives = batch  # this rank's queries and positives, before negatives are added
        cross_rank = self._cross_rank()
        if cross_rank:
            batch = batch.across_ranks(with_negative_cache=self.negative_cache is not None)
        batch = self._with_cached_negatives(batch).with_known_positives_masked()
        device_type = batch.queries.device.type
        steps = self._logit_steps(batch)
        need_logits = compute_batch_metrics and bool(self.batch_metrics)
        logits = labels = None
        # The products' dtype is steps.matmul_dtype: an enclosing autocast must not change it behind the steps.
        with _autocast_off(device_type):
            if self._uses_blocked_loss(batch, need_logits):
                loss = self._blocked_loss(batch, steps)
            else:
                logits, labels = self._logits(batch, steps)
                loss = self._loss_of_logits(logits, labels, batch.sample_weight)
        reported = loss.detach()
        if cross_rank:
            loss, reported = self._global_loss(loss, batch.num_queries)
        with torch.no_grad():
            self._update_metrics(positives, reported, logits, labels, compute_metrics, compute_batch_metrics)
            if self.negative_cache is not None and self.training:
                self._push_positives(batch)
        return loss

    def compute_logits(
        self,
        query_embeddings: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_sampling_probability: Any = None,
        candidate_ids: Any = None,
        score_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The processed in-batch logits and their labels (the logit steps of :mod:`twotower.logits`, then
        hard-negative selection).

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
        batch = RetrievalBatch.build(
            query_embeddings,
            candidate_embeddings,
            candidate_sampling_probability=candidate_sampling_probability,
            candidate_ids=candidate_ids,
            score_mask=score_mask,
            check_finite=self.check_finite,
            needs_ids=self.remove_accidental_hits,
        )
        steps = self._logit_steps(batch)
        with _autocast_off(batch.queries.device.type):
            return self._logits(batch, steps)

    def _logit_steps(self, batch: RetrievalBatch) -> LogitSteps:
        """The batch's logit steps with this task's temperature, hit removal and products' dtype."""
        matmul_dtype = self._matmul_dtype(batch.queries.device.type)
        return batch.logit_steps(self.current_temperature(), self.remove_accidental_hits, matmul_dtype)

    def _matmul_dtype(self, device_type: str) -> torch.dtype | None:
        """The dtype of the loss's products: ``precision``'s, or under ``precision=None`` an enclosing bf16
        autocast's."""
        if self.precision is not None:
            return _MATMUL_DTYPES[self.precision]
        if not _autocast_active(device_type):
            return None
        try:
            dtype = torch.get_autocast_dtype(device_type)
        except (TypeError, AttributeError):  # torch < 2.4 asks per device through other functions
            dtype = torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
        return torch.bfloat16 if dtype == torch.bfloat16 else None

    # -- the steps of forward(), in order ------------------------------------------------------------------------

    def _cross_rank(self) -> bool:
        active = distributed.is_distributed()
        return active if self.cross_rank_negatives is None else bool(self.cross_rank_negatives) and active

    def _with_cached_negatives(self, batch: RetrievalBatch) -> RetrievalBatch:
        """The batch with the cached negatives (and their ids and probabilities) appended."""
        cache = self.negative_cache
        if cache is None or len(cache) == 0:
            return batch
        assert cache.embeddings is not None
        if cache.embeddings.shape[1] != batch.candidates.shape[1]:
            raise ValueError(
                f"negative_cache holds {cache.embeddings.shape[1]}-d embeddings, candidates are "
                f"{batch.candidates.shape[1]}-d"
            )
        if batch.ids is not None and cache.codes is None:
            raise ValueError("candidate_ids given, but the negative cache holds no ids: push ids with every batch")
        if batch.probability is not None and cache.probabilities is None:
            raise ValueError("candidate_sampling_probability given, but the cache holds none: push them too")
        return batch.with_extra_negatives(cache.embeddings, cache.codes, cache.probabilities)

    def _uses_blocked_loss(self, batch: RetrievalBatch, need_logits: bool) -> bool:
        """Whether the blocked loss (no materialised logits) computes exactly what the task asks for; with
        ``fused=True``, a reason it cannot is an error."""
        if self.fused is False:
            return False
        keeps_all = self.num_hard_negatives is None or not 0 < self.num_hard_negatives < batch.num_candidates - 1
        reasons = [
            reason
            for reason, applies in (
                ("a learnable temperature", self.learnable_temperature),
                ("batch metrics need the logits", need_logits),
                ("hard-negative mining selects columns", not keeps_all),
                ("multi-head queries", batch.queries.ndim != 2),
                ("a custom loss", type(self.loss_fn) is not SoftmaxCrossEntropy),
            )
            if applies
        ]
        if reasons and self.fused:
            raise ValueError(f"fused=True, but the blocked loss cannot compute this call: {'; '.join(reasons)}")
        return not reasons

    def _blocked_loss(self, batch: RetrievalBatch, steps: LogitSteps) -> torch.Tensor:
        # Same loss, computed by blocks of rows: the [nq, nc] logits are never held in memory.
        per_row = in_batch_softmax_cross_entropy(batch.queries, batch.candidates, steps=steps)
        loss_fn = self.loss_fn
        assert isinstance(loss_fn, SoftmaxCrossEntropy)
        return loss_fn.reduce(per_row, batch.sample_weight)

    def _logits(self, batch: RetrievalBatch, steps: LogitSteps) -> tuple[torch.Tensor, torch.Tensor]:
        """The materialised logits and labels: the logit steps, then hard-negative selection."""
        logits = score_rows(batch.queries, batch.candidates, 0, steps)
        labels = torch.eye(batch.num_queries, batch.num_candidates, dtype=logits.dtype, device=logits.device)
        if self.hard_negative_mining is not None:
            logits, labels = self.hard_negative_mining(logits, labels)
        return logits, labels

    def _loss_of_logits(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if type(self.loss_fn) is SoftmaxCrossEntropy:
            # Labels are one-hot with the positive in column i (column 0 after hard-negative mining): the
            # indexed cross-entropy equals -sum(labels * log_softmax) without the dense product.
            positives = (
                torch.arange(logits.shape[0], device=logits.device)
                if self.hard_negative_mining is None
                else labels.argmax(dim=1)
            )
            per_row = torch.nn.functional.cross_entropy(logits, positives, reduction="none")
            return self.loss_fn.reduce(per_row, weight)
        loss = self.loss_fn(labels, logits, weight)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss must return a scalar tensor")
        return loss

    def _global_loss(self, loss: torch.Tensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Under cross-rank negatives: this rank's loss (``"mean"`` divided by the global query count) and the
        loss summed over ranks, which the loss metrics report."""
        if isinstance(self.loss_fn, SoftmaxCrossEntropy) and self.loss_fn.reduction == "mean":
            total_queries = distributed.all_reduce_sum(torch.tensor(float(num_queries), device=loss.device))
            loss = loss * (num_queries / total_queries)
        return loss, distributed.all_reduce_sum(loss.detach())

    def _update_metrics(
        self,
        batch: RetrievalBatch,
        loss: torch.Tensor,
        logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        compute_metrics: bool,
        compute_batch_metrics: bool,
    ) -> None:
        """Loss metrics with the loss; factorized metrics with this rank's queries and positives; batch metrics
        with the processed logits."""
        for metric in self._loss_metrics():
            metric.update(loss)
        if compute_metrics and self.factorized_metrics_enabled and self.factorized_metrics and batch.queries.ndim == 2:
            num_queries = batch.num_queries
            inputs = FactorizedBatch(
                QueryEmbeddings.trusted(batch.queries),
                batch.candidates[:num_queries].detach(),
                None if batch.ids is None else batch.ids.head(num_queries),
                batch.sample_weight,
            )
            for metric in self._factorized_metrics():
                if type(metric).update is FactorizedMetric.update:
                    metric.update(inputs)
                else:  # a metric written against the four-argument update
                    true_ids = None if inputs.true_ids is None else inputs.true_ids.values
                    metric.update(inputs.queries.embeddings, inputs.true_candidates, true_ids, inputs.sample_weight)
        if compute_batch_metrics and logits is not None and labels is not None:
            for metric in self._batch_metrics():
                metric.update(labels, logits.detach(), batch.sample_weight)

    def _push_positives(self, batch: RetrievalBatch) -> None:
        """Push this batch's positives (with their ids and probabilities) into the negative cache."""
        assert self.negative_cache is not None
        num_queries = batch.num_queries
        self.negative_cache.push(
            batch.candidates[:num_queries].detach(),
            None if batch.ids is None else batch.ids.head(num_queries),
            None if batch.probability is None else batch.probability[:num_queries].detach(),
        )
