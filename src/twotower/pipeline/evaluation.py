"""Offline evaluation of a pipeline model, beside the popularity baseline on the same split.

For each user of the evaluated part, the whole item corpus is ranked with the user's training items left out;
Recall, NDCG and hit rate @K and MRR are averaged over users (:class:`~twotower.metrics.CorpusRanking`). The
"recommend the most popular items" baseline is ranked the same way, so the table shows at a glance whether the
model learned anything beyond popularity. TFRS's top-K categorical accuracy (one query per interaction, nothing
left out) is reported too, for comparison with TFRS's tutorials.

Cold users (not in the user vocabulary) are answered by popularity, as serving answers them, and reported apart.
A relevant item outside the item vocabulary counts as relevant and is never retrieved (a miss). Under
``torch.distributed`` each rank ranks its share of the users and interactions; the metrics sum the ranks' states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from twotower import distributed
from twotower.indexes import BruteForce
from twotower.metrics import CorpusRanking, FactorizedTopK
from twotower.pipeline.model import SoftmaxRetrievalModel
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


def _first_rows(groups: Sequence[np.ndarray]) -> np.ndarray:
    """Each group's first position in the part: the row whose query (context included) ranks for its user."""
    return np.array([group.min() for group in groups], dtype=np.int64)


def _relevant_ids(part: PartRows, item_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Item rows of ``positions``; an item outside the vocabulary gets a negative id no index row has."""
    rows = item_rows[positions]
    relevant: np.ndarray = np.where(rows > 0, rows, -1 - part.item_codes[positions].astype(np.int64))
    return relevant


def evaluate_part(
    model: SoftmaxRetrievalModel,
    prepared: PreparedInteractions,
    part: PartRows,
    ks: Sequence[int] = (10, 50, 100),
    batch_size: int = 4096,
    baseline: bool = True,
    top_k_accuracy: bool = True,
    ranking: bool = True,
) -> dict[str, Any]:
    """Rank the corpus for each user of ``part`` with the model and with popularity.

    Each user's query is that of the user's first row in ``part`` (a featurized model's context, such as the
    event time, is that row's). Cold users are ranked by popularity (``cold_users/``) and, by a model that can
    answer them from their other features (a featurized one), by the model too (``cold_users_model/``): which
    of the two serves them better is then a measured choice. ``ranking=False`` computes only TFRS's top-K
    accuracy.

    Returns:
        ``model/{recall,ndcg,hit_rate,precision}@k`` and ``model/mrr``; the same under ``popularity/`` with
        ``baseline``; ``factorized_top_k/top_{k}_categorical_accuracy`` with ``top_k_accuracy``; for cold users
        (answered by popularity) ``cold_users/...``, present only when there are some; and the counts of
        :func:`~twotower.pipeline.prepared.describe_cold` under ``split/``; a featurized model's ranking of the
        cold users under ``cold_users_model/``.
    """
    if len(part) == 0:
        raise ValueError("the part to evaluate holds no interactions")
    ks = tuple(sorted(set(ks)))
    results: dict[str, Any] = {f"split/{key}": value for key, value in describe_cold(prepared, part, "eval").items()}
    buckets = prepared.users.num_oov_buckets
    users, item_rows = part.users.numpy(), part.items.numpy()  # gathered once: PartRows gathers on every access
    warm = np.flatnonzero(users >= buckets)
    popular = popularity_index(prepared)
    model.eval()
    corpus = model.item_index() if ranking or top_k_accuracy else None
    if warm.size and ranking:
        user_rows, groups = _grouped(users[warm])
        results["model/users"] = int(user_rows.shape[0])
        share = distributed.shard_rows(user_rows.shape[0])
        user_rows, groups = user_rows[share], [warm[group] for group in groups[share]]
        model_ranking = CorpusRanking(corpus, ks=ks, name="model")
        baseline_ranking = CorpusRanking(popular, ks=ks, name="popularity") if baseline else None
        for start in range(0, user_rows.shape[0], batch_size):
            rows = user_rows[start : start + batch_size]
            chunk = groups[start : start + batch_size]
            relevant = [_relevant_ids(part, item_rows, group) for group in chunk]
            seen = prepared.seen_of(rows)
            queries = model.query_embeddings(part, _first_rows(chunk), rows)
            model_ranking.update(queries, relevant, seen)
            if baseline_ranking is not None:
                baseline_ranking.update(torch.ones(rows.shape[0], 1), relevant, seen)
        results.update(model_ranking.results())
        if baseline_ranking is not None:
            results.update(baseline_ranking.results())
    cold = np.flatnonzero(users < buckets)
    if cold.size and ranking:
        codes, groups = _grouped(part.user_codes[cold])
        results["cold_users/users"] = int(codes.shape[0])
        groups = groups[distributed.shard_rows(len(groups))]
        cold_ranking = CorpusRanking(popular, ks=ks, name="cold_users")
        by_model = CorpusRanking(corpus, ks=ks, name="cold_users_model") if model.answers_cold_users else None
        for start in range(0, len(groups), batch_size):
            chunk = [cold[group] for group in groups[start : start + batch_size]]
            relevant = [_relevant_ids(part, item_rows, group) for group in chunk]
            cold_ranking.update(torch.ones(len(chunk), 1), relevant)
            if by_model is not None:
                firsts = _first_rows(chunk)
                by_model.update(model.query_embeddings(part, firsts, users[firsts]), relevant)
        results.update(cold_ranking.results())
        if by_model is not None:
            results.update(by_model.results())
    if top_k_accuracy:
        rows = np.flatnonzero((users >= buckets) & (item_rows > 0))
        if rows.size:  # every rank holds the whole part: all of them agree on whether to sync
            rows = rows[distributed.shard_rows(rows.shape[0])]
            accuracy = FactorizedTopK(corpus, ks=TOP_K_ACCURACY_KS)
            for start in range(0, rows.shape[0], batch_size):
                chosen = rows[start : start + batch_size]
                chosen_items = torch.from_numpy(item_rows[chosen])
                with torch.no_grad():
                    accuracy.update(
                        model.query_embeddings(part, chosen, users[chosen]),
                        model.candidate_embeddings(chosen_items),
                        true_candidate_ids=chosen_items,
                    )
            results.update(accuracy.results())
    return results
