"""The pure ranking functions of twotower.metrics.functional, against loops written from their definitions."""

from __future__ import annotations

import math

import numpy as np
import torch

from twotower.metrics import functional


def test_ranking_metrics_match_their_definitions() -> None:
    rng = np.random.default_rng(0)
    num_queries, width, ks = 9, 12, (1, 3, 10, 20)
    hits = rng.random((num_queries, width)) < 0.25
    num_relevant = np.array([max(int(row.sum()), 1) + int(rng.integers(0, 3)) for row in hits])
    values = functional.ranking_metrics(torch.as_tensor(hits), torch.as_tensor(num_relevant), ks).numpy()
    assert values.shape == (num_queries, 4 * len(ks) + 1)
    for i in range(num_queries):
        column = 0
        for k in ks:
            top = hits[i, :k]
            found = int(top.sum())
            dcg = sum(1.0 / math.log2(j + 2) for j in range(len(top)) if top[j])
            idcg = sum(1.0 / math.log2(j + 2) for j in range(min(num_relevant[i], k)))
            expected = [float(found > 0), found / num_relevant[i], found / k, dcg / idcg]
            np.testing.assert_allclose(values[i, column : column + 4], expected, rtol=1e-12)
            column += 4
        first = next((j for j in range(width) if hits[i, j]), None)
        assert values[i, -1] == (0.0 if first is None else 1.0 / (first + 1))


def test_batch_auc_and_top_k_match_their_definitions() -> None:
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 3, size=(8, 6)).astype(np.float32)  # many ties
    logits[2, 4] = functional.MIN_FLOAT  # a removed column is no negative
    positive = rng.integers(0, 6, size=8)
    auc, has_negatives = functional.batch_auc(torch.as_tensor(logits), torch.as_tensor(positive))
    for i in range(8):
        negatives = [logits[i, j] for j in range(6) if j != positive[i] and logits[i, j] > functional.REMOVED_LOGIT]
        p = logits[i, positive[i]]
        expected = (sum(n < p for n in negatives) + 0.5 * sum(n == p for n in negatives)) / len(negatives)
        assert bool(has_negatives[i])
        assert float(auc[i]) == expected
    for k in (1, 2, 5):
        hits = functional.batch_top_k_hits(torch.as_tensor(logits), torch.as_tensor(positive), k)
        expected_hits = [sum(logits[i] > logits[i, positive[i]]) < k for i in range(8)]
        assert hits.tolist() == expected_hits


def test_top_k_hits_by_score_count_ties_as_hits() -> None:
    top = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    # One score (3.0) lies above the positive's 2.0: a hit from k = 2 on.
    hits = functional.top_k_hits_by_score(top, torch.tensor([2.0]), (1, 2, 4))
    assert hits.tolist() == [[0.0, 1.0, 1.0]]
    by_id = functional.top_k_hits_by_id(torch.tensor([[False, False, True, False]]), (1, 2, 3, 10))
    assert by_id.tolist() == [[0.0, 0.0, 1.0, 1.0]]
