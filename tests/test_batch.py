"""The batch is built once: ids encoded once, embeddings checked once, and check_finite=False turns it all off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import twotower.batch
import twotower.indexes.base
import twotower.metrics.corpus
from reference import reference_logits, reference_loss
from twotower import Retrieval
from twotower.indexes import BruteForce
from twotower.metrics import FactorizedTopK


def _string_batch(n: int = 64, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    rng = np.random.default_rng(0)
    queries = torch.as_tensor(rng.normal(size=(n, d)).astype(np.float32))
    candidates = torch.as_tensor(rng.normal(size=(n, d)).astype(np.float32))
    ids = [f"item{value}" for value in rng.integers(0, n // 2, size=n)]
    corpus_ids = [f"item{value}" for value in range(n // 2)]
    return queries, candidates, ids, corpus_ids


def _counting(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> list[Any]:
    calls: list[Any] = []
    original: Callable[..., Any] = getattr(target, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, counted)
    return calls


def test_string_ids_are_encoded_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    queries, candidates, ids, corpus_ids = _string_batch()
    corpus = torch.randn(len(corpus_ids), 8)
    task = Retrieval(
        metrics=FactorizedTopK(BruteForce(k=10).index(corpus, corpus_ids), ks=(1, 10)),
        remove_accidental_hits=True,
    )
    uniques = _counting(monkeypatch, np, "unique")
    loss = task(queries, candidates, candidate_ids=ids)
    # The old code sorted the strings in _prepare, in the metric and in the index lookup (3+ per call).
    assert len(uniques) == 1
    logits, labels = reference_logits(queries.numpy(), candidates.numpy(), ids=ids, remove_accidental_hits=True)
    assert float(loss) == pytest.approx(reference_loss(logits, labels), rel=1e-5)


@pytest.mark.parametrize("check_finite", [True, False])
def test_embeddings_are_checked_once_or_not_at_all(monkeypatch: pytest.MonkeyPatch, check_finite: bool) -> None:
    queries, candidates, ids, corpus_ids = _string_batch()
    corpus = torch.randn(len(corpus_ids), 8)
    task = Retrieval(
        metrics=FactorizedTopK(BruteForce(k=10).index(corpus, corpus_ids), ks=(1, 10)), check_finite=check_finite
    )
    modules = (twotower.batch, twotower.metrics.corpus, twotower.indexes.base)
    recorded = [_counting(monkeypatch, module, "require_finite") for module in modules]
    task(queries, candidates, candidate_ids=ids)
    embeddings_checked = [tensor for calls in recorded for tensor in calls if tensor.ndim == 2]
    # The old code checked the queries three times with factorized metrics, twice of them despite check_finite.
    assert len(embeddings_checked) == (2 if check_finite else 0)


def test_fused_true_refuses_a_call_it_cannot_compute_and_says_why() -> None:
    queries, candidates, _, _ = _string_batch(n=8)
    with pytest.raises(ValueError, match=r"fused=True, but .*hard-negative mining selects columns"):
        Retrieval(fused=True, num_hard_negatives=2)(queries, candidates)
    with pytest.raises(TypeError, match="fused must be True, False or None"):
        Retrieval(fused="yes")  # type: ignore[arg-type]
    blocked = Retrieval(fused=True)(queries, candidates)
    logits, labels = reference_logits(queries.numpy(), candidates.numpy())
    assert float(blocked) == pytest.approx(reference_loss(logits, labels), rel=1e-5)


def test_numpy_embeddings_and_integral_float_ids_through_the_task() -> None:
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(6, 4)).astype(np.float32)
    candidates = rng.normal(size=(9, 4)).astype(np.float32)
    ids = np.array([1, 2, 1, 3, 4, 2, 5, 6, 1], dtype=np.float32)
    loss = Retrieval(remove_accidental_hits=True)(queries, candidates, candidate_ids=ids)
    logits, labels = reference_logits(queries, candidates, ids=ids.tolist(), remove_accidental_hits=True)
    assert float(loss) == pytest.approx(reference_loss(logits, labels), rel=1e-5)
