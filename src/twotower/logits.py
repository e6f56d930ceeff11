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
    """

    temperature: float | torch.Tensor | None = None
    bias: torch.Tensor | None = None
    candidate_codes: torch.Tensor | None = None
    score_mask: torch.Tensor | None = None

    @property
    def removes_entries(self) -> bool:
        """Whether some logits may be removed (set to, or pushed below, :data:`MIN_FLOAT`)."""
        return self.candidate_codes is not None or self.score_mask is not None


def sampling_correction_bias(probability: torch.Tensor) -> torch.Tensor:
    """The logQ term added to each column's logit: ``-log(clip(p, 1e-6, 1))``, shape of ``probability``."""
    return -torch.log(probability.clamp(1e-6, 1.0))


def score_rows(queries: torch.Tensor, candidates: torch.Tensor, start: int, steps: LogitSteps) -> torch.Tensor:
    """Logits of query rows ``start .. start + len(queries)`` of the batch against every candidate.

    Args:
        queries: ``[b, d]`` (or ``[b, heads, d]``) a block of the batch's query rows; row ``r`` is batch row
            ``start + r``, whose positive is candidate column ``start + r``.
        candidates: ``[nc, d]`` every candidate of the batch.
        start: the block's first batch row.
        steps: the batch's :class:`LogitSteps`.

    Returns:
        ``[b, nc]`` logits, a fresh tensor (callers may modify it in place).
    """
    if queries.ndim == 3:
        logits = torch.einsum("qhd,cd->qhc", queries, candidates).amax(dim=1)
    else:
        logits = queries @ candidates.T
    if steps.temperature is not None:
        logits = logits / steps.temperature
    if steps.bias is not None:
        logits = logits + steps.bias
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
        if logits.requires_grad:
            logits = logits.index_put(hits, removal, accumulate=True)
        else:
            logits.index_put_(hits, removal, accumulate=True)
    if steps.score_mask is not None:
        logits = torch.where(steps.score_mask[rows], logits, torch.full_like(logits, MIN_FLOAT))
    return logits
