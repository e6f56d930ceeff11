"""Metrics against hand computations and TFRS's semantics for ties and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower import BatchAUC, BatchTopKAccuracy, BruteForce, FactorizedTopK, LossMean, Retrieval, Streaming


def test_loss_mean_is_zero_before_updates_and_the_mean_after() -> None:
    metric = LossMean()
    assert metric.results() == {"loss_mean": 0.0}
    for value in (1.0, 2.0, 6.0):
        metric.update(torch.tensor(value))
    assert metric.results()["loss_mean"] == pytest.approx(3.0)


def test_batch_top_k_counts_ties_as_hits() -> None:
    labels = torch.eye(3)
    logits = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 3.0], [5.0, 4.0, 0.0]])
    metric = BatchTopKAccuracy(k=1)
    metric.update(labels, logits, torch.tensor([1.0, 1.0, 2.0]))
    # Row 0: tie with column 1 -> hit. Row 1: two logits above -> miss. Row 2: two above -> miss.
    assert metric.results()["batch_top_1_categorical_accuracy"] == pytest.approx(1 / 4)
    top2 = BatchTopKAccuracy(k=2)
    top2.update(labels, logits)
    assert float(top2.compute()) == pytest.approx(1 / 3)


def test_batch_auc_by_hand() -> None:
    labels = torch.eye(2, 4)
    logits = torch.tensor([[2.0, 1.0, 2.0, 3.0], [0.0, 1.0, -1e37, -5.0]])
    metric = BatchAUC()
    metric.update(labels, logits)
    # Row 0: negatives 1 (below), 2 (tie), 3 (above) -> (1 + 0.5) / 3. Row 1: negatives 0 (below), -5 (below);
    # the removed column is not a negative -> 1.
    assert float(metric.compute()) == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.usefixtures("selection_backend")
def test_factorized_top_k_exact_copies_tie_and_count_as_hits() -> None:
    """Every query's best item is its positive, an exact copy of a corpus row: top-1 must be 1.0 (TFRS: ~0.62)."""
    generator = torch.Generator().manual_seed(0)
    corpus = torch.randn(5000, 64, generator=generator)
    queries = torch.randn(1000, 64, generator=generator)
    best = (queries.double() @ corpus.double().T).argmax(dim=1)
    for index in (BruteForce().index(corpus), Streaming().index_from_dataset(list(corpus.split(700)))):
        metric = FactorizedTopK(index, ks=(1, 5))
        metric.update(queries, corpus[best])
        assert metric.results()["factorized_top_k/top_1_categorical_accuracy"] == 1.0


def test_factorized_top_k_score_based_ties_and_weights() -> None:
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Query 0's true candidate scores 1, tied with corpus rows 0 and 2 -> a hit at k=1 (ties count).
    # Query 1's true candidate scores 0.5: two corpus rows score 1 -> miss at 1 and 2, hit at 3.
    # Query 2's true candidate scores -1: rows 1, 2 score 1, row 0 and 3 score 0 -> miss up to 4.
    true = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, -1.0]])
    weights = torch.tensor([1.0, 2.0, 1.0])
    metric = FactorizedTopK(BruteForce().index(corpus), ks=(1, 2, 3))
    metric.update(queries, true, sample_weight=weights)
    results = metric.results()
    assert results["factorized_top_k/top_1_categorical_accuracy"] == pytest.approx(1 / 4)
    assert results["factorized_top_k/top_2_categorical_accuracy"] == pytest.approx(1 / 4)
    assert results["factorized_top_k/top_3_categorical_accuracy"] == pytest.approx(3 / 4)


def test_factorized_top_k_id_based_against_numpy_ranking() -> None:
    rng = np.random.default_rng(3)
    corpus = rng.normal(size=(300, 8)).astype(np.float32)
    ids = rng.permutation(10_000)[:300]
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    truth = ids[rng.integers(0, 300, size=50)]
    weights = rng.uniform(0, 1, size=50)
    metric = FactorizedTopK(BruteForce().index(torch.as_tensor(corpus), torch.as_tensor(ids)), ks=(1, 10, 100))
    metric.update(
        torch.as_tensor(queries),
        torch.zeros(50, 8),
        torch.as_tensor(truth),
        torch.as_tensor(weights, dtype=torch.float32),
    )
    order = np.argsort(-(queries.astype(np.float64) @ corpus.T.astype(np.float64)), axis=1, kind="stable")
    for k in (1, 10, 100):
        hits = np.array([truth[i] in ids[order[i, :k]] for i in range(50)], dtype=np.float64)
        expected = np.sum(hits * weights) / np.sum(weights)
        assert metric.results()[f"factorized_top_k/top_{k}_categorical_accuracy"] == pytest.approx(expected, rel=1e-6)


def test_single_metric_set_after_construction_is_kept() -> None:
    corpus = torch.randn(20, 3)
    task = Retrieval()
    task.set_factorized_metrics(FactorizedTopK(corpus, ks=(1,)))
    task(torch.randn(4, 3), corpus[:4])
    assert "factorized_top_k/top_1_categorical_accuracy" in task.metric_results()


def test_factorized_bad_input() -> None:
    metric = FactorizedTopK(torch.randn(10, 3), ks=(1,))
    with pytest.raises(ValueError, match="true_candidate_embeddings"):
        metric.update(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="query_embeddings contains"):
        metric.update(torch.full((2, 3), float("nan")), torch.randn(2, 3))
    with pytest.raises(ValueError, match="ks"):
        FactorizedTopK(torch.randn(10, 3), ks=(0,))
    with pytest.raises(TypeError, match="candidates"):
        FactorizedTopK(3.0)


def test_corpus_ranking_by_hand() -> None:
    """Scores order items 0 > 1 > 2 > 3 > 4 for every query (corpus scores 5, 4, 3, 2, 1)."""
    from twotower import CorpusRanking

    corpus = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    metric = CorpusRanking(BruteForce().index(corpus, ["a", "b", "c", "d", "e"]), ks=(1, 3))
    queries = torch.ones(3, 1)
    relevant = [["b", "d"], ["a"], ["e", "c", "zzz"]]
    # Query 0 excludes "a": ranking b, c, d, e. Query 2 excludes "c": ranking a, b, d, e.
    metric.update(queries, relevant, exclusions=[["a"], [], ["c"]], sample_weight=torch.tensor([1.0, 1.0, 2.0]))
    log2 = np.log2
    per_query = {
        # hit@1, recall@1, precision@1, ndcg@1, hit@3, recall@3, precision@3, ndcg@3, mrr
        0: [1, 1 / 2, 1, 1, 1, 2 / 2, 2 / 3, (1 + 1 / log2(4)) / (1 + 1 / log2(3)), 1],
        1: [1, 1, 1, 1, 1, 1, 1 / 3, 1, 1],
        # relevant {e, c, zzz} (3 items); c excluded, top 3 = a, b, d: no hit within 3; e is at rank 4.
        2: [0, 0, 0, 0, 0, 0, 0, 0, 1 / 4],
    }
    weights = {0: 1.0, 1: 1.0, 2: 2.0}
    names = [
        "corpus/hit_rate@1", "corpus/recall@1", "corpus/precision@1", "corpus/ndcg@1",
        "corpus/hit_rate@3", "corpus/recall@3", "corpus/precision@3", "corpus/ndcg@3", "corpus/mrr",
    ]  # fmt: skip
    results = metric.results()
    for column, name in enumerate(names):
        expected = sum(weights[q] * per_query[q][column] for q in per_query) / 4.0
        if name == "corpus/mrr":
            # MRR looks within max(ks) = 3 only: query 2's hit at rank 4 does not count.
            expected = (1.0 + 1.0 + 0.0) / 4.0
        assert results[name] == pytest.approx(expected), name


def test_corpus_ranking_against_numpy_reference() -> None:
    from twotower import CorpusRanking

    rng = np.random.default_rng(11)
    corpus = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(40, 8)).astype(np.float32)
    relevant = [rng.choice(500, size=rng.integers(1, 8), replace=False) for _ in range(40)]
    seen = [rng.choice(500, size=rng.integers(0, 30), replace=False) for _ in range(40)]
    metric = CorpusRanking(torch.as_tensor(corpus), ks=(5, 20))
    metric.update(torch.as_tensor(queries), relevant, exclusions=seen)
    scores = queries.astype(np.float64) @ corpus.T.astype(np.float64)
    recall, ndcg = {5: [], 20: []}, {5: [], 20: []}
    for i in range(40):
        ranking = [j for j in np.argsort(-scores[i], kind="stable") if j not in set(seen[i])]
        for k in (5, 20):
            top = ranking[:k]
            hits = [1.0 if j in set(relevant[i]) else 0.0 for j in top]
            recall[k].append(sum(hits) / len(relevant[i]))
            dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(relevant[i]), k)))
            ndcg[k].append(dcg / idcg)
    results = metric.results()
    for k in (5, 20):
        assert results[f"corpus/recall@{k}"] == pytest.approx(np.mean(recall[k]), rel=1e-9)
        assert results[f"corpus/ndcg@{k}"] == pytest.approx(np.mean(ndcg[k]), rel=1e-9)
