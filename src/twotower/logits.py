"""The logit steps of the in-batch softmax, in one place: every loss path computes its logits here.

TFRS's ``Retrieval.call`` turns the query and candidate embeddings into logits in a fixed order:

1. scores ``Q C^T`` (a multi-head query scores each candidate by its best head);
2. divided by the temperature;
3. plus the logQ bias ``-log p`` of each column (sampling correction);
4. accidental hits (another column with the positive's id) pushed out by adding :data:`MIN_FLOAT`;
5. masked entries replaced by :data:`MIN_FLOAT`.

:func:`score_rows` does steps 1-5 for a block of query rows; the materialised loss of
:class:`twotower.tasks.Retrieval` calls it once for all rows, the blocked (fused) loss of
:mod:`twotower.losses` once per block, forward and backward, as open_clip's ``get_logits`` serves its dense and
chunked losses. :class:`LogitSteps` carries the settings of one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The value TFRS adds to a logit to remove it from the softmax: float32's lowest value / 100, so that adding
#: it to any ordinary logit neither overflows nor stays comparable with real logits.
MIN_FLOAT = float(torch.finfo(torch.float32).min) / 100.0
#: The value TFRS adds to the positive's logit so that top-k selection always keeps it.
MAX_FLOAT = float(torch.finfo(torch.float32).max) / 100.0


@dataclass(frozen=True)
class LogitSteps:
    """How one batch's scores become logits (steps 2-5 of the module docstring).

    Attributes:
        temperature: divides the scores: a float, a scalar tensor (learnable, with gradient) or ``None``.
        bias: ``[nc]`` added to every row (``-log p``), or ``None``.
        candidate_codes: ``[nc]`` integer codes of the candidates' ids (equal exactly when the ids are): a column
            other than the positive with the positive's code is removed. ``None`` keeps accidental hits.
        score_mask: ``[nq, nc]`` bool; ``False`` removes the logit. ``None`` keeps all.
        matmul_dtype: the dtype the scores ``Q C^T`` (and the blocked loss's gradient products) are multiplied
            in, e.g. ``torch.bfloat16`` for the CPU's bf16 matrix units; the product is widened back at once,
            so that steps 2-5 and the softmax run in the embeddings' float32. ``None``: the embeddings' dtype.
    """

    temperature: float | torch.Tensor | None = None
    bias: torch.Tensor | None = None
    candidate_codes: torch.Tensor | None = None
    score_mask: torch.Tensor | None = None
    matmul_dtype: torch.dtype | None = None

    @property
    def removes_entries(self) -> bool:
        """Whether some logits may be removed (set to, or pushed below, :data:`MIN_FLOAT`)."""
        return self.candidate_codes is not None or self.score_mask is not None


def sampling_correction_bias(probability: torch.Tensor) -> torch.Tensor:
    """The logQ term added to each column's logit: ``-log(clip(p, 1e-6, 1))``, shape of ``probability``."""
    return -torch.log(probability.clamp(1e-6, 1.0))


def matmul_operands(
    queries: torch.Tensor, candidates: torch.Tensor, steps: LogitSteps
) -> tuple[torch.Tensor, torch.Tensor]:
    """``queries`` and ``candidates`` in ``steps.matmul_dtype`` (unchanged without one): cast once by a caller
    that multiplies them block after block."""
    dtype = steps.matmul_dtype
    if dtype is None or dtype == queries.dtype:
        return queries, candidates
    return queries.to(dtype), candidates.to(dtype)


def score_rows(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    start: int,
    steps: LogitSteps,
    out: torch.Tensor | None = None,
    widen: bool = True,
) -> torch.Tensor:
    """Logits of query rows ``start .. start + len(queries)`` of the batch against every candidate.

    Args:
        queries: ``[b, d]`` (or ``[b, heads, d]``) a block of the batch's query rows; row ``r`` is batch row
            ``start + r``, whose positive is candidate column ``start + r``. May already be in
            ``steps.matmul_dtype`` (see :func:`matmul_operands`).
        candidates: ``[nc, d]`` every candidate of the batch, in the dtype of ``queries``.
        start: the block's first batch row.
        steps: the batch's :class:`LogitSteps`.
        out: an optional ``[b, nc]`` buffer (no gradient) the logits are written into: a blocked loss reuses
            one buffer for all its blocks, where a fresh allocation of several MiB per block costs page faults.
        widen: ``False`` returns the product of a 2-D block in ``steps.matmul_dtype`` (not widened) when no step
            after the scores applies, for a caller whose next pass reads it as it is.

    Returns:
        ``[b, nc]`` logits, float32 or wider (``out`` itself when given; otherwise a fresh tensor, which
        callers may modify in place).
    """
    if queries.ndim == 3:
        multiplied = _widened(torch.einsum("qhd,cd->qhc", *matmul_operands(queries, candidates, steps)))
        logits = multiplied.amax(dim=1)
        if out is not None:
            logits = out.copy_(logits)
    elif not widen and out is None and not steps.removes_entries and steps.temperature is None and steps.bias is None:
        operands = matmul_operands(queries, candidates, steps)
        return operands[0] @ operands[1].T
    else:
        logits = _product(*matmul_operands(queries, candidates, steps), out)
    # A fresh tensor without gradient is changed in place: each out-of-place step would allocate another block.
    temperature_grad = isinstance(steps.temperature, torch.Tensor) and steps.temperature.requires_grad
    in_place = not logits.requires_grad and not temperature_grad
    if steps.temperature is not None:
        logits = logits.div_(steps.temperature) if in_place else logits / steps.temperature
    if steps.bias is not None:
        logits = logits.add_(steps.bias) if in_place else logits + steps.bias
    rows = slice(start, start + queries.shape[0])
    if steps.candidate_codes is not None:
        codes = steps.candidate_codes
        duplicate = codes[rows, None] == codes[None, :]
        diagonal = torch.arange(queries.shape[0], device=logits.device)
        duplicate[diagonal, diagonal + start] = False
        # Only the duplicates change: adding MIN_FLOAT at their positions is TFRS's arithmetic (elsewhere TFRS
        # adds 0 * MIN_FLOAT = -0.0, which leaves every value as it is) without two more passes over the block.
        hits = duplicate.nonzero(as_tuple=True)
        removal = torch.full((hits[0].shape[0],), MIN_FLOAT, dtype=logits.dtype, device=logits.device)
        if in_place:
            logits.index_put_(hits, removal, accumulate=True)
        else:
            logits = logits.index_put(hits, removal, accumulate=True)
    if steps.score_mask is not None:
        if in_place:
            logits.masked_fill_(~steps.score_mask[rows], MIN_FLOAT)
        else:
            logits = torch.where(steps.score_mask[rows], logits, torch.full_like(logits, MIN_FLOAT))
    return logits


def _widened(product: torch.Tensor) -> torch.Tensor:
    """A product of half-precision operands, widened to float32 (others unchanged)."""
    return product.float() if product.dtype in (torch.float16, torch.bfloat16) else product


def _product(queries: torch.Tensor, candidates: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``queries @ candidates.T``, widened to float32, into ``out`` when given."""
    if out is None:
        return _widened(queries @ candidates.T)
    if out.dtype == queries.dtype:
        return torch.mm(queries, candidates.T, out=out)
    # torch's CPU matmul has no bf16 x bf16 -> float32 variant: the bf16 product is widened into the buffer.
    return out.copy_(queries @ candidates.T)
