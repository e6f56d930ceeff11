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

from typing import Any, Literal

import torch
from torch import nn

from twotower import _native
from twotower._checks import require_finite, require_tensor_like
from twotower.ids import encode_ids
from twotower.logits import (
    MAX_FLOAT,
    MIN_FLOAT,
    LogitSteps,
    matmul_operands,
    sampling_correction_bias,
    score_rows,
)

__all__ = [
    "MAX_FLOAT",
    "MIN_FLOAT",
    "HardNegativeMining",
    "Reduction",
    "RemoveAccidentalHits",
    "SamplingProbabilityCorrection",
    "SoftmaxCrossEntropy",
    "in_batch_softmax_cross_entropy",
    "sampling_correction_bias",
]

Reduction = Literal["sum", "mean"]
# Logits per block of the blocked loss: 8 MiB of float32 (the block-size sweep is in benchmarks/README.md).
_BLOCK_ELEMENTS = 1 << 21
# Up to this many logits (256 MiB of float32) the blocked loss keeps its exponentials for the backward instead of
# recomputing them (the sweep is in benchmarks/README.md).
_KEPT_ELEMENTS = 1 << 26
# With gradients on and float32 (or float64) products, the forward computes the gradients for unit row weights
# while each block is in cache, and the backward only scales them (see _InBatchSoftmax); False falls back to the
# kept or recomputed exponentials (for benchmarks/blocked_loss.py and the tests of those paths).
_EAGER_GRADIENTS = True


def _check_logits_labels(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = require_tensor_like(logits, "logits"), require_tensor_like(labels, "labels")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [num_queries, num_candidates], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    return logits, labels


class SamplingProbabilityCorrection(nn.Module):
    """Subtract the log of each candidate's sampling probability from its logits (logQ correction).

    In-batch negatives are drawn in proportion to how often items occur in the training data; subtracting
    ``log p`` corrects the softmax towards the full-corpus one (Yi et al., RecSys 2019). Probabilities are
    clipped to ``[1e-6, 1]`` first, as TFRS does, so ``p = 0`` acts as ``1e-6``.
    """

    def forward(self, logits: torch.Tensor, candidate_sampling_probability: torch.Tensor) -> torch.Tensor:
        """Correct ``logits`` ``[nq, nc]`` with probabilities of any shape that broadcasts to it (``[nc]``, one
        per column, or ``[nq, nc]``, one per entry, as TFRS broadcasts); returns ``[nq, nc]``."""
        logits = require_tensor_like(logits, "logits")
        probability = require_tensor_like(candidate_sampling_probability, "candidate_sampling_probability")
        if logits.ndim != 2:
            raise ValueError(f"logits must be 2-D [num_queries, num_candidates], got shape {tuple(logits.shape)}")
        if probability.dtype == torch.bool or probability.is_complex():
            raise TypeError(f"candidate_sampling_probability must hold real numbers, got dtype {probability.dtype}")
        try:
            shape = torch.broadcast_shapes(probability.shape, logits.shape)  # type: ignore[no-untyped-call]
        except RuntimeError:
            shape = None
        if shape != logits.shape:
            raise ValueError(
                f"candidate_sampling_probability must broadcast to the logits' shape {tuple(logits.shape)} (e.g. "
                f"({logits.shape[1]},) or {tuple(logits.shape)}), got {tuple(probability.shape)}"
            )
        probability = probability.to(device=logits.device, dtype=logits.dtype if logits.is_floating_point() else None)
        require_finite(probability, "candidate_sampling_probability")
        return logits + sampling_correction_bias(probability)


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
            candidate_ids: ``[nc]`` ids of the candidates: integers or strings (a tensor, an array or a list).

        Returns:
            ``[nq, nc]`` logits with ``MIN_FLOAT`` added at the accidental hits.
        """
        logits, labels = _check_logits_labels(logits, labels)
        codes = encode_ids(candidate_ids, "candidate_ids", logits.shape[1]).codes.to(logits.device)
        positive_ids = codes[labels.argmax(dim=1)]
        duplicate = (positive_ids[:, None] == codes[None, :]).to(logits.dtype) - labels.to(logits.dtype)
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
        logits, labels = _check_logits_labels(logits, labels)
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
        logits, labels = _check_logits_labels(logits, labels)
        log_probabilities = torch.log_softmax(logits, dim=1)
        return self.reduce(-(labels.to(logits.dtype) * log_probabilities).sum(dim=1), sample_weight)

    def reduce(self, per_row: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Weight and reduce per-row cross-entropies ``[nq]`` to the scalar loss."""
        if sample_weight is not None:
            if sample_weight.shape != per_row.shape:
                raise ValueError(
                    f"sample_weight must have shape {tuple(per_row.shape)}, got {tuple(sample_weight.shape)}"
                )
            per_row = per_row * sample_weight.to(per_row.dtype)
        total = per_row.sum()
        if self.reduction == "mean":
            return total / max(per_row.shape[0], 1)
        return total

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class _InBatchSoftmax(torch.autograd.Function):
    """Per-query cross-entropy of the in-batch softmax, computed by blocks of rows with
    :func:`twotower.logits.score_rows`, never holding the logits as one ``[nq, nc]`` tensor.

    Up to ``_KEPT_ELEMENTS`` logits, the forward keeps each block's exponentials ``exp(l - max)`` and the backward
    only multiplies them (three products in all, the softmax's row scalings moved onto the thin ``[n, d]``
    factors). Above it, the forward keeps each row's log-sum-exp only and the backward recomputes a block's
    logits into one reused buffer and turns them into gradients while they are in cache (a fourth product, for
    memory bounded by one block). With ``steps.matmul_dtype`` the products run in that dtype and everything
    between them in float32.

    With gradients wanted and the products in the inputs' dtype, neither is done ("eager gradients"): the forward
    turns each block, while it is still in cache, into its gradient for unit row weights, ``G = softmax - I``
    (masked), and accumulates ``G C`` and ``G^T Q``; the backward scales them by the rows' upstream gradient
    ``g``. Both factor exactly when ``g`` is one value for every row (any mean or sum reduction); ``G C`` also
    factors row by row, so only ``G^T diag(g) Q`` is recomputed (two products per block) for unequal row weights.
    Three products in all, none of them over logits fetched back from memory: at batch 4096 the kept blocks are
    64 MiB that every product read from memory, about a third of the loss's time on this machine."""

    @staticmethod
    def forward(
        ctx: Any, queries: torch.Tensor, candidates: torch.Tensor, steps: LogitSteps, block_rows: int, eager: bool
    ) -> torch.Tensor:
        num_queries, num_candidates = queries.shape[0], candidates.shape[0]
        # The steps' tensors (bias, codes, mask) never need gradient: kept on ctx rather than saved.
        ctx.steps, ctx.block_rows = steps, block_rows
        operands = matmul_operands(queries, candidates, steps)
        ctx.eager = eager and operands[0].dtype == queries.dtype
        if ctx.eager:
            return _InBatchSoftmax._forward_eager(ctx, queries, candidates, steps, block_rows)
        # Up to _KEPT_ELEMENTS logits, the forward keeps every block's exponentials for the backward, which then
        # only multiplies them: a fourth product (recomputing the logits) costs more than keeping them.
        ctx.kept = num_queries * num_candidates <= _KEPT_ELEMENTS
        kept: list[torch.Tensor] = []
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        buffer = None if ctx.kept else queries.new_empty(min(block_rows, num_queries), num_candidates)
        low_precision = operands[0].dtype != queries.dtype
        for start in range(0, num_queries, block_rows):
            block = operands[0][start : start + block_rows]
            if ctx.kept and low_precision:
                # The exponentials are kept in the products' dtype: one native pass from the (bf16) product
                # or the float32 logits to them, without widening and narrowing copies of the block.
                logits = score_rows(block, operands[1], start, steps, widen=False)
                # A copy: without the kernel, the statistics below overwrite float32 logits in place.
                positive = logits.diagonal(offset=start).to(queries.dtype, copy=True)
                narrowed = _native.softmax_rows_bf16(logits) if operands[0].dtype == torch.bfloat16 else None
                if narrowed is not None:
                    maxima, sums, exponentials = narrowed
                    pieces.append((positive, maxima, sums))
                    kept.append(exponentials)
                    continue
                logits = logits.to(queries.dtype)
            else:
                logits = score_rows(
                    block, operands[1], start, steps, out=None if buffer is None else buffer[: len(block)]
                )
                positive = logits.diagonal(offset=start).clone()
            pieces.append((positive, *_row_statistics(logits)))
            if ctx.kept:
                # In the products' dtype: the backward multiplies them as they are.
                kept.append(logits.to(operands[0].dtype))
        per_row, row_maxima, log_sums, sums = _per_row_losses(pieces)
        if ctx.kept:
            ctx.save_for_backward(queries, candidates, sums, *kept)
        else:
            # The backward needs their sum only: in a fully masked row, where it is inexact, the mask zeroes the
            # gradient.
            ctx.save_for_backward(queries, candidates, row_maxima + log_sums)
        return per_row

    @staticmethod
    def backward(ctx: Any, grad_per_row: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.eager:
            return _InBatchSoftmax._backward_eager(ctx, grad_per_row)
        if ctx.kept:
            return _InBatchSoftmax._backward_kept(ctx, grad_per_row)
        queries, candidates, log_normalisers = ctx.saved_tensors
        # d CE_i / d logit_ij = g_i (softmax_ij - [j == i]) / temperature; masked logits are constants.
        steps: LogitSteps = ctx.steps
        scales = _row_scales(grad_per_row, steps)
        return _InBatchSoftmax._recomputed(
            queries, candidates, log_normalisers, steps, ctx.block_rows, scales,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip

    @staticmethod
    def _forward_eager(
        ctx: Any, queries: torch.Tensor, candidates: torch.Tensor, steps: LogitSteps, block_rows: int
    ) -> torch.Tensor:
        """The loss, and its gradients for unit row weights saved for the backward (see the class)."""
        num_queries, num_candidates = queries.shape[0], candidates.shape[0]
        need_queries, need_candidates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        buffer = queries.new_empty(min(block_rows, num_queries), num_candidates)
        unit_grad_queries = queries.new_empty(queries.shape) if need_queries else None
        # G^T Q accumulated transposed, [d, nc]: as Q_b^T G the product streams G by rows (about 15% faster
        # than G^T Q_b, which reads it by columns).
        unit_grad_candidates_t = queries.new_zeros(queries.shape[1], num_candidates) if need_candidates else None
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, num_queries, block_rows):
            block = queries[start : start + block_rows]
            rows_of_block = slice(start, start + block.shape[0])
            logits = score_rows(block, candidates, start, steps, out=buffer[: block.shape[0]])
            positive = logits.diagonal(offset=start).clone()
            maxima, sums = _row_statistics(logits)  # the block now holds exp(l - max)
            pieces.append((positive, maxima, sums))
            inverse_sums = sums.reciprocal()[:, None]
            if steps.score_mask is not None:
                # Masked logits are constants (no gradient, the positive's included): the gradient block itself.
                gradient = logits.mul_(inverse_sums)
                gradient.diagonal(offset=start).sub_(1.0)
                gradient.mul_(steps.score_mask[rows_of_block])
                if unit_grad_queries is not None:
                    torch.mm(gradient, candidates, out=unit_grad_queries[rows_of_block])
                if unit_grad_candidates_t is not None:
                    unit_grad_candidates_t.addmm_(block.T, gradient)
            else:
                # The softmax's row scalings on the thin [b, d] factors; the positives' -1 terms after the loop.
                if unit_grad_queries is not None:
                    torch.mm(logits, candidates, out=unit_grad_queries[rows_of_block])
                    unit_grad_queries[rows_of_block].mul_(inverse_sums)
                if unit_grad_candidates_t is not None:
                    unit_grad_candidates_t.addmm_((block * inverse_sums).T, logits)
        per_row, row_maxima, log_sums, _ = _per_row_losses(pieces)
        unit_grad_candidates = None
        if unit_grad_candidates_t is not None:
            unit_grad_candidates = unit_grad_candidates_t.T.contiguous()
        if steps.score_mask is None:
            if unit_grad_queries is not None:
                unit_grad_queries.sub_(candidates[:num_queries])
            if unit_grad_candidates is not None:
                unit_grad_candidates[:num_queries] -= queries
        # The log-normalisers serve the recomputation of G^T diag(g) Q for unequal row weights.
        ctx.save_for_backward(queries, candidates, row_maxima + log_sums, unit_grad_queries, unit_grad_candidates)
        return per_row

    @staticmethod
    def _backward_eager(ctx: Any, grad_per_row: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, candidates, log_normalisers, unit_grad_queries, unit_grad_candidates = ctx.saved_tensors
        steps: LogitSteps = ctx.steps
        scales = _row_scales(grad_per_row, steps)
        scales = scales.to(queries.dtype)
        grad_queries = None if unit_grad_queries is None else unit_grad_queries * scales[:, None]
        grad_candidates = None
        if unit_grad_candidates is not None:
            if queries.shape[0] > 0 and bool((scales == scales[0]).all()):
                grad_candidates = unit_grad_candidates * scales[0]
            else:
                grad_candidates = _InBatchSoftmax._recomputed(
                    queries, candidates, log_normalisers, steps, ctx.block_rows, scales, False, True
                )[1]
        return grad_queries, grad_candidates, None, None, None

    @staticmethod
    def _recomputed(
        queries: torch.Tensor,
        candidates: torch.Tensor,
        log_normalisers: torch.Tensor,
        steps: LogitSteps,
        block_rows: int,
        scales: torch.Tensor,
        need_queries: bool,
        need_candidates: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        """The gradients from each block's logits computed again, ``scales`` ``[nq]`` the rows' upstream
        gradients over the temperature."""
        block_queries, block_candidates = matmul_operands(queries, candidates, steps)
        low_precision = block_queries.dtype != queries.dtype
        grad_queries = torch.empty_like(queries) if need_queries else None
        grad_candidates = torch.zeros_like(candidates) if need_candidates and low_precision else None
        # In float, G^T Q is accumulated transposed, as in the eager forward.
        grad_candidates_t = (
            queries.new_zeros(queries.shape[1], candidates.shape[0]) if need_candidates and not low_precision else None
        )
        scales = scales.to(queries.dtype).contiguous()
        buffer = queries.new_empty(min(block_rows, queries.shape[0]), candidates.shape[0])
        for start in range(0, queries.shape[0], block_rows):
            block = block_queries[start : start + block_rows]
            rows_of_block = slice(start, start + block.shape[0])
            rows = torch.arange(block.shape[0], device=block.device)
            logits = score_rows(block, block_candidates, start, steps, out=buffer[: block.shape[0]])
            scale = scales[rows_of_block]
            # In place, in one pass where the kernel is built: each pass over the block costs as much as a product.
            if not _native.softmax_gradient_rows(logits, log_normalisers[rows_of_block], scale):
                logits.sub_(log_normalisers[rows_of_block, None]).exp_().mul_(scale[:, None])
            gradient = logits
            gradient[rows, rows + start] -= scale
            if steps.score_mask is not None:
                # Masked logits are constants: no gradient flows through them, the positive's included.
                gradient.mul_(steps.score_mask[rows_of_block])
            if low_precision:
                gradient = gradient.to(block_queries.dtype)
            if grad_queries is not None:
                if low_precision:
                    grad_queries[rows_of_block] = gradient @ block_candidates
                else:
                    torch.mm(gradient, candidates, out=grad_queries[rows_of_block])
            if grad_candidates is not None:
                grad_candidates += gradient.T @ block
            if grad_candidates_t is not None:
                grad_candidates_t.addmm_(block.T, gradient)
        if grad_candidates_t is not None:
            grad_candidates = grad_candidates_t.T.contiguous()
        return grad_queries, grad_candidates, None, None, None

    @staticmethod
    def _backward_kept(ctx: Any, grad_per_row: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, candidates, sums, *kept = ctx.saved_tensors
        steps: LogitSteps = ctx.steps
        scale = _row_scales(grad_per_row, steps)
        num_queries = queries.shape[0]
        product_queries, product_candidates = matmul_operands(queries, candidates, steps)
        need_queries, need_candidates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        query_pieces: list[torch.Tensor] = []
        grad_candidates: torch.Tensor | None = None
        # d loss_i / d logit_ij = g_i (E_ij / s_i - [j == i]), E the kept exponentials and s their row sums.
        row_scales = (scale / sums)[:, None]
        # The kept blocks are only read (a backward run again with retain_graph must find them unchanged).
        for index, exponentials in enumerate(kept):
            start = index * ctx.block_rows
            rows_of_block = slice(start, start + exponentials.shape[0])
            row_scale = row_scales[rows_of_block]
            if steps.score_mask is not None:
                # Masked logits are constants (no gradient, the positive's included): the gradient block is needed.
                gradient = exponentials.to(queries.dtype) * row_scale
                gradient.diagonal(offset=start).sub_(scale[rows_of_block])
                gradient = gradient.mul_(steps.score_mask[rows_of_block]).to(exponentials.dtype)
                query_piece = gradient @ product_candidates if need_queries else None
                candidate_piece = gradient.T @ product_queries[rows_of_block] if need_candidates else None
            else:
                # The diagonal scalings move onto the thin [n, d] factors: the block is only read by the products.
                query_piece = (
                    (exponentials @ product_candidates).to(queries.dtype).mul_(row_scale) if need_queries else None
                )
                candidate_piece = None
                if need_candidates:
                    scaled_queries = (queries[rows_of_block] * row_scale).to(exponentials.dtype)
                    if len(kept) > 1 and exponentials.dtype == candidates.dtype:
                        # Several float blocks: accumulated in place by the GEMM itself (as fast as a fresh
                        # product, without the addition).
                        if grad_candidates is None:
                            grad_candidates = torch.zeros_like(candidates)
                        grad_candidates.addmm_(exponentials.T, scaled_queries)
                    else:
                        # (Q^T E)^T rather than E^T Q: the same product, and the faster kernel for one wide E.
                        candidate_piece = (scaled_queries.T @ exponentials).T
            if query_piece is not None:
                query_pieces.append(query_piece.to(queries.dtype))
            if candidate_piece is not None:
                candidate_piece = candidate_piece.to(candidates.dtype)
                grad_candidates = candidate_piece if grad_candidates is None else grad_candidates.add_(candidate_piece)
        grad_queries = None
        if need_queries:
            grad_queries = query_pieces[0] if len(query_pieces) == 1 else torch.cat(query_pieces)
        if steps.score_mask is None:
            # The positives' -g_i terms, one per row, for the whole batch at once.
            if grad_queries is not None:
                grad_queries.sub_(scale[:, None] * candidates[:num_queries])
            if grad_candidates is not None:
                grad_candidates[:num_queries] -= scale[:, None] * queries
        return grad_queries, grad_candidates, None, None, None


def _per_row_losses(
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per-row loss, row maxima, log-sums, sums)``, each ``[nq]``, from the blocks' ``(positive logits,
    row maxima, sums of exp(l - max))`` in row order."""
    # Each row's maximum and log(sum(exp(l - max))) are kept apart: their sum would absorb the second when
    # the maximum is MIN_FLOAT (a fully masked row).
    positives, row_maxima, sums = (
        pieces[0] if len(pieces) == 1 else tuple(torch.cat(column) for column in zip(*pieces, strict=True))
    )
    # log(sum) - (positive - max), Keras's order: with every logit of a row masked to MIN_FLOAT,
    # max + log(sum) - positive rounds ln(nc) away (MIN_FLOAT + ln(nc) == MIN_FLOAT in float32).
    log_sums = sums.log()
    return log_sums - (positives - row_maxima), row_maxima, log_sums, sums


def _row_scales(grad_per_row: torch.Tensor, steps: LogitSteps) -> torch.Tensor:
    """``[nq]`` each row's upstream gradient over the temperature: d CE_i / d logit_ij is
    ``scale_i (softmax_ij - [j == i])``."""
    return grad_per_row / steps.temperature if steps.temperature is not None else grad_per_row


def _row_statistics(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima and sums of ``exp(l - max)`` of a float block, with the exponentials written over it."""
    statistics = _native.softmax_rows(logits)
    if statistics is not None:
        # One pass over each row (four passes over the whole block in torch).
        return statistics
    # The arithmetic of torch.logsumexp, max + log(sum(exp(l - max))), keeping exp(l - max) in place.
    maxima = logits.amax(dim=1)
    return maxima, logits.sub_(maxima[:, None]).exp_().sum(dim=1)


def in_batch_softmax_cross_entropy(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float | None = None,
    bias: torch.Tensor | None = None,
    candidate_codes: torch.Tensor | None = None,
    score_mask: torch.Tensor | None = None,
    block_rows: int | None = None,
    *,
    steps: LogitSteps | None = None,
) -> torch.Tensor:
    """Per-query softmax cross-entropy of the in-batch task, without materialising the logits.

    Equal to the logit steps of :mod:`twotower.logits` followed by :class:`SoftmaxCrossEntropy`'s per-row term:
    ``logsumexp(l_i) - l_ii`` with ``l = Q C^T / temperature + bias``, accidental hits (same code as the
    positive) and masked entries removed as TFRS removes them.

    Args:
        queries: ``[nq, d]``; row ``i``'s positive is candidate ``i``.
        candidates: ``[nc, d]``, ``nc >= nq``.
        temperature: divides the logits (a float: a learnable temperature needs the materialised loss).
        bias: ``[nc]`` added to every row (``-log p`` for the sampling correction).
        candidate_codes: ``[nc]`` integer ids: negatives sharing the positive's id are removed.
        score_mask: ``[nq, nc]`` bool, ``False`` removes the logit.
        block_rows: rows per block; by default blocks of about 2M logits, which stay in cache at large batches
            and make small batches a single block. Up to 64M logits (256 MiB of float32) in all, every block's
            exponentials are kept for the backward; above, memory is one block of ``block_rows * nc`` logits.
        steps: the four settings above as one :class:`~twotower.logits.LogitSteps` (then leave them unset), which
            also sets the products' dtype (``matmul_dtype=torch.bfloat16`` for bf16 matrix units).

    Returns:
        ``[nq]`` cross-entropies, differentiable with respect to ``queries`` and ``candidates``.
    """
    if steps is None:
        steps = LogitSteps(temperature, bias, candidate_codes, score_mask)
    elif any(value is not None for value in (temperature, bias, candidate_codes, score_mask)):
        raise ValueError("pass the logit settings either as steps or one by one, not both")
    if isinstance(steps.temperature, torch.Tensor):
        raise TypeError("the blocked loss takes a float temperature (a learnable one needs the materialised loss)")
    if block_rows is None:
        block_rows = max(1, _BLOCK_ELEMENTS // max(candidates.shape[0], 1))
    # Inside the Function grad mode is off and needs_input_grad ignores it: whether gradients are wanted at all
    # (not in evaluation, under no_grad) is decided here.
    eager = _EAGER_GRADIENTS and torch.is_grad_enabled() and (queries.requires_grad or candidates.requires_grad)
    result: torch.Tensor = _InBatchSoftmax.apply(queries, candidates, steps, block_rows, eager)  # type: ignore[no-untyped-call]
    return result
