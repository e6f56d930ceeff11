"""The ranking math of the retrieval metrics as pure functions (torchmetrics' functional side).

Each takes tensors and returns per-query values; the stateful classes of :mod:`twotower.metrics` validate
their inputs, call these, and accumulate weighted means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from twotower.logits import MIN_FLOAT

#: A logit at or below this was removed from the softmax (accidental hit or score mask) rather than computed.
REMOVED_LOGIT = MIN_FLOAT / 2


def batch_top_k_hits(logits: torch.Tensor, positive_column: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each row's positive ranks among the ``k`` highest logits of its row: ``[nq]`` bool.

    As TensorFlow's ``in_top_k``, ties count in the positive's favour (a hit when fewer than ``k`` logits are
    strictly greater), and a row whose positive logit is not finite is a miss.

    Args:
        logits: ``[nq, nc]``.
        positive_column: ``[nq]`` int64, the positive's column in each row.
        k: the cut-off, ``>= 1``.
    """
    positive_logit = logits.gather(1, positive_column[:, None])
    num_above = (logits > positive_logit).sum(dim=1)
    return (num_above < k) & torch.isfinite(positive_logit[:, 0])


def batch_auc(logits: torch.Tensor, positive_column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ranking AUC of the positive against the row's negatives.

    ``AUC_i = (#negatives below the positive + 0.5 * #tied negatives) / #negatives``; columns removed from the
    softmax (at or below :data:`REMOVED_LOGIT`) are not negatives.

    Returns:
        ``(auc [nq] float64, has_negatives [nq] bool)``: a row without negatives has AUC 0 and should be skipped.
    """
    positive_logit = logits.gather(1, positive_column[:, None])
    is_negative = torch.ones_like(logits, dtype=torch.bool)
    is_negative.scatter_(1, positive_column[:, None], False)
    is_negative &= logits > REMOVED_LOGIT
    below = ((logits < positive_logit) & is_negative).sum(dim=1).to(torch.float64)
    tied = ((logits == positive_logit) & is_negative).sum(dim=1).to(torch.float64)
    num_negatives = is_negative.sum(dim=1).to(torch.float64)
    return (below + 0.5 * tied) / num_negatives.clamp(min=1.0), num_negatives > 0


def top_k_hits_by_id(matches: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Whether the true id is among the first ``k`` retrieved, for each ``k``: ``[nq, len(ks)]`` float64.

    Args:
        matches: ``[nq, w]`` bool, retrieved slot ``j`` of query ``i`` holds its true id.
        ks: the cut-offs (a ``k`` beyond ``w`` reads the whole row).
    """
    found = torch.cumsum(matches.to(torch.int64), dim=1) > 0
    return torch.stack([found[:, min(k, found.shape[1]) - 1] for k in ks], dim=1).to(torch.float64)


def top_k_hits_by_score(top_scores: torch.Tensor, positive_scores: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Whether fewer than ``k`` retrieved scores are strictly greater than the true candidate's, for each ``k``
    (ties count as hits, as TFRS's score-based top-K): ``[nq, len(ks)]`` float64.

    Args:
        top_scores: ``[nq, w]`` the best scores of each query, descending.
        positive_scores: ``[nq]`` each query's score of its true candidate.
        ks: the cut-offs.
    """
    above = torch.cumsum((top_scores > positive_scores[:, None]).to(torch.int64), dim=1)
    return torch.stack([above[:, min(k, above.shape[1]) - 1] < k for k in ks], dim=1).to(torch.float64)


def ranking_metrics(hits: torch.Tensor, num_relevant: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Hit rate, recall, precision and NDCG at each ``k``, then MRR, per query.

    Args:
        hits: ``[nq, w]``: is retrieved slot ``j`` of query ``i`` one of its relevant items (1/0).
        num_relevant: ``[nq]`` how many distinct relevant items each query has.
        ks: the cut-offs.

    Returns:
        ``[nq, 4 len(ks) + 1]`` float64: for each ``k`` the columns ``hit_rate@k = 1[a hit in the first k]``,
        ``recall@k = hits / |R|``, ``precision@k = hits / k``, ``ndcg@k = DCG / IDCG`` (``DCG = sum 1/log2(j+1)``
        over hits at ranks ``j <= k``, ``IDCG`` that of ``min(|R|, k)`` hits at the top); last ``mrr``, the inverse
        rank of the first hit (0 if none). A query with no relevant item gets zeros.
    """
    hits = hits.to(torch.float64)
    num_relevant = num_relevant.to(torch.float64)
    width = hits.shape[1]
    discounts = 1.0 / torch.log2(torch.arange(2, width + 2, dtype=torch.float64))
    cumulative_hits = torch.cumsum(hits, dim=1)
    cumulative_gain = torch.cumsum(hits * discounts, dim=1)
    columns = []
    for k in ks:
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
    return torch.stack(columns, dim=1)
