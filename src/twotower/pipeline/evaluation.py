"""Offline evaluation of a pipeline model, beside the popularity baseline on the same split.

For each user of the evaluated part, the whole item corpus is ranked with the user's training items left out;
Recall, NDCG and hit rate @K and MRR are averaged over users (:class:`~twotower.metrics.CorpusRanking`). The
"recommend the most popular items" baseline is ranked the same way, so the table shows at a glance whether the
model learned anything beyond popularity. TFRS's top-K categorical accuracy (one query per interaction, nothing
left out) is reported too, for comparison with TFRS's tutorials.

Cold users (not in the user vocabulary) are answered by popularity, as serving answers them, and reported apart.
A relevant item outside the item vocabulary counts as relevant and is never retrieved (a miss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from twotower.indexes import BruteForce
from twotower.metrics import CorpusRanking, FactorizedTopK
from twotower.pipeline.model import IdRetrievalModel
from twotower.pipeline.prepared import PartRows, PreparedInteractions, describe_cold

TOP_K_ACCURACY_KS = (1, 5, 10, 50, 100)


def popularity_index(prepared: PreparedInteractions) -> BruteForce:
    """An exact index that ranks item rows by training count: 1-d embeddings equal to the counts."""
    counts = torch.as_tensor(prepared.item_counts[1:], dtype=torch.float32)[:, None]
    return BruteForce(k=100).index(counts, torch.arange(1, counts.shape[0] + 1))


def _grouped(keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct ``keys`` and, for each, the positions holding it."""
    order = np.argsort(keys, kind="stable")
    distinct, starts = np.unique(keys[order], return_index=True)
    return distinct, np.split(order, starts[1:])


def _relevant_ids(part: PartRows, positions: np.ndarray) -> np.ndarray:
    """Item rows of ``positions``; an item outside the vocabulary gets a negative id no index row has."""
    rows = part.items.numpy()[positions]
    relevant: np.ndarray = np.where(rows > 0, rows, -1 - part.item_codes[positions].astype(np.int64))
    return relevant


def evaluate_part(
    model: IdRetrievalModel,
    prepared: PreparedInteractions,
    part: PartRows,
    ks: Sequence[int] = (10, 50, 100),
    batch_size: int = 4096,
    baseline: bool = True,
    top_k_accuracy: bool = True,
) -> dict[str, Any]:
    """Rank the corpus for each user of ``part`` with the model and with popularity.

    Returns:
        ``model/{recall,ndcg,hit_rate,precision}@k`` and ``model/mrr``; the same under ``popularity/`` with
        ``baseline``; ``factorized_top_k/top_{k}_categorical_accuracy`` with ``top_k_accuracy``; for cold users
        (answered by popularity) ``cold_users/...``, present only when there are some; and the counts of
        :func:`~twotower.pipeline.prepared.describe_cold` under ``split/``.
    """
    if len(part) == 0:
        raise ValueError("the part to evaluate holds no interactions")
    ks = tuple(sorted(set(ks)))
    results: dict[str, Any] = {f"split/{key}": value for key, value in describe_cold(prepared, part, "eval").items()}
    buckets = prepared.users.num_oov_buckets
    users = part.users.numpy()
    warm = np.flatnonzero(users >= buckets)
    popular = popularity_index(prepared)
    model.eval()
    if warm.size:
        user_rows, groups = _grouped(users[warm])
        groups = [warm[group] for group in groups]
        ranking = CorpusRanking(model.item_index(), ks=ks, name="model")
        baseline_ranking = CorpusRanking(popular, ks=ks, name="popularity") if baseline else None
        for start in range(0, user_rows.shape[0], batch_size):
            rows = user_rows[start : start + batch_size]
            relevant = [_relevant_ids(part, group) for group in groups[start : start + batch_size]]
            seen = prepared.seen_of(rows)
            with torch.no_grad():
                queries = model.user_embedding(torch.from_numpy(rows))
            ranking.update(queries, relevant, seen)
            if baseline_ranking is not None:
                baseline_ranking.update(torch.ones(rows.shape[0], 1), relevant, seen)
        results.update(ranking.results())
        if baseline_ranking is not None:
            results.update(baseline_ranking.results())
        results["model/users"] = int(user_rows.shape[0])
    cold = np.flatnonzero(users < buckets)
    if cold.size:
        codes, groups = _grouped(part.user_codes[cold])
        cold_ranking = CorpusRanking(popular, ks=ks, name="cold_users")
        for start in range(0, codes.shape[0], batch_size):
            chunk = groups[start : start + batch_size]
            cold_ranking.update(torch.ones(len(chunk), 1), [_relevant_ids(part, cold[group]) for group in chunk])
        results.update({f"{name}": value for name, value in cold_ranking.results().items()})
        results["cold_users/users"] = int(codes.shape[0])
    if top_k_accuracy:
        rows = np.flatnonzero((users >= buckets) & (part.items.numpy() > 0))
        if rows.size:
            accuracy = FactorizedTopK(model.item_index(), ks=TOP_K_ACCURACY_KS)
            for start in range(0, rows.shape[0], batch_size):
                chosen = torch.from_numpy(rows[start : start + batch_size])
                with torch.no_grad():
                    accuracy.update(
                        model.user_embedding(part.users[chosen]),
                        model.item_embedding(part.items[chosen]),
                        true_candidate_ids=part.items[chosen],
                    )
            results.update(accuracy.results())
    return results
