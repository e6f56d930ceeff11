"""Evaluating approximate indexes against exact ones, as FAISS's ``contrib/evaluation.py``: recall and speed."""

from __future__ import annotations

import time

import numpy as np
import torch

from twotower._checks import require_finite, require_floating
from twotower.ids import Ids
from twotower.indexes.base import TopK


def recall_against_exact(approximate: TopK, exact: TopK, queries: torch.Tensor, k: int) -> tuple[float, float, float]:
    """Recall@k of ``approximate`` against ``exact`` on ``queries``, and both indexes' queries/s.

    Returns:
        ``(recall, approximate queries/s, exact queries/s)``: recall is the mean fraction of each query's exact
        top-``k`` ids that the approximate index also returns in its top ``k``.
    """
    started = time.perf_counter()
    _, truth = exact(queries, k=k)
    exact_rate = queries.shape[0] / (time.perf_counter() - started)
    started = time.perf_counter()
    _, found = approximate(queries, k=k)
    approximate_rate = queries.shape[0] / (time.perf_counter() - started)
    return recall_at_k(found, truth), approximate_rate, exact_rate


def recall_at_k(found: Ids, truth: Ids) -> float:
    """Mean over rows of the fraction of ``truth``'s ids (``[nq, k]``) that the same row of ``found`` also holds.

    ``found`` may be wider or narrower than ``truth``; ids are compared as values (int or str)."""
    truth_np = truth.cpu().numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)
    found_np = found.cpu().numpy() if isinstance(found, torch.Tensor) else np.asarray(found)
    if truth_np.ndim != 2 or found_np.ndim != 2 or truth_np.shape[0] != found_np.shape[0]:
        raise ValueError(f"found and truth must be [nq, k] with the same nq, got {found_np.shape} and {truth_np.shape}")
    if truth_np.shape[1] == 0:
        raise ValueError("truth must hold at least one id per row")
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(truth_np, found_np, strict=True)]
    return float(np.mean(hits)) / int(truth_np.shape[1])


def checked_tuning_queries(tuning_queries: torch.Tensor | None, target_recall: float | None) -> np.ndarray | None:
    """``tuning_queries`` (the queries an index's ``target_recall`` tuning measures recall on) as a float32
    C-contiguous ``[q, d]`` array, refused by name unless they are a finite, non-empty floating-point matrix given
    with a ``target_recall``; ``None`` when none are given."""
    if tuning_queries is None:
        return None
    if target_recall is None:
        raise ValueError("tuning_queries are for target_recall, which is not set")
    tuning = require_floating(tuning_queries, "tuning_queries", (2,))
    require_finite(tuning, "tuning_queries")
    if tuning.shape[0] == 0:
        raise ValueError("tuning_queries must hold at least one query, got shape (0, d)")
    return np.ascontiguousarray(tuning.detach().cpu().to(torch.float32).numpy())


def require_tuning_dimension(tuning_queries: np.ndarray, dimension: int) -> np.ndarray:
    """``tuning_queries`` (from :func:`checked_tuning_queries`) if they have the corpus's ``dimension``, else a
    ``ValueError`` naming them."""
    if tuning_queries.shape[1] != dimension:
        raise ValueError(
            f"tuning_queries must have the corpus's dimension {dimension}, got shape {tuning_queries.shape}"
        )
    return tuning_queries
