"""twotower against the real TFRS 0.7.7 on random inputs: every Retrieval option and the factorized metric.

Needs TensorFlow and TFRS, kept out of twotower's dependencies: `bash benchmarks/tfrs_env.sh` builds a separate
environment and runs this file there. Without them every test here is skipped with that reason.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tfrs = pytest.importorskip(
    "tensorflow_recommenders", reason="TensorFlow Recommenders is not installed: run benchmarks/tfrs_env.sh"
)
import tensorflow as tf  # noqa: E402

from twotower import BatchTopKAccuracy, BruteForce, FactorizedTopK, Retrieval  # noqa: E402

SHAPES = [(1, 0, 4), (3, 0, 8), (8, 5, 4), (17, 3, 16)]
OPTIONS = list(itertools.product([None, 0.2], [None, 1, 3, 50], [False, True], [False, True], [False, True]))


def _inputs(nq: int, extras: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    nc = nq + extras
    probability = rng.uniform(0, 1, size=nc).astype(np.float32)
    probability[rng.uniform(size=nc) < 0.2] = 0.0  # clipped to 1e-6 by both
    return {
        "queries": rng.normal(size=(nq, d)).astype(np.float32),
        "candidates": rng.normal(size=(nc, d)).astype(np.float32),
        "ids": rng.integers(0, max(2, nc // 2), size=nc).astype(np.int64),
        "probability": probability,
        "weights": rng.uniform(0, 2, size=nq).astype(np.float32),
    }


@pytest.mark.parametrize(("nq", "extras", "d"), SHAPES)
@pytest.mark.parametrize(("temperature", "hard", "remove", "with_p", "with_w"), OPTIONS)
def test_loss_matches_tfrs(
    nq: int, extras: int, d: int, temperature: float | None, hard: int | None, remove: bool, with_p: bool, with_w: bool
) -> None:
    data = _inputs(nq, extras, d, seed=nq * 1000 + extras * 10 + d)
    call_tf: dict[str, object] = {"candidate_ids": tf.constant(data["ids"])}
    call_tt: dict[str, object] = {"candidate_ids": torch.as_tensor(data["ids"])}
    if with_p:
        call_tf["candidate_sampling_probability"] = tf.constant(data["probability"])
        call_tt["candidate_sampling_probability"] = torch.as_tensor(data["probability"])
    if with_w:
        call_tf["sample_weight"] = tf.constant(data["weights"])
        call_tt["sample_weight"] = torch.as_tensor(data["weights"])
    theirs = tfrs.tasks.Retrieval(temperature=temperature, num_hard_negatives=hard, remove_accidental_hits=remove)
    expected = float(
        theirs(tf.constant(data["queries"]), tf.constant(data["candidates"]), compute_metrics=False, **call_tf)
    )
    ours = Retrieval(temperature=temperature, num_hard_negatives=hard, remove_accidental_hits=remove)
    got = float(ours(torch.as_tensor(data["queries"]), torch.as_tensor(data["candidates"]), **call_tt))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_batch_top_k_accuracy_matches_keras(k: int) -> None:
    data = _inputs(12, 4, 8, seed=k)
    metric_tf = tf.keras.metrics.TopKCategoricalAccuracy(k=k)
    theirs = tfrs.tasks.Retrieval(batch_metrics=[metric_tf])
    theirs(tf.constant(data["queries"]), tf.constant(data["candidates"]), sample_weight=tf.constant(data["weights"]))
    metric = BatchTopKAccuracy(k=k)
    Retrieval(batch_metrics=[metric])(
        torch.as_tensor(data["queries"]), torch.as_tensor(data["candidates"]), torch.as_tensor(data["weights"])
    )
    assert float(metric.compute()) == pytest.approx(float(metric_tf.result()), rel=1e-6)


@pytest.mark.parametrize("id_based", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_factorized_top_k_matches_tfrs(id_based: bool, weighted: bool) -> None:
    rng = np.random.default_rng(int(id_based) * 2 + int(weighted))
    corpus = rng.normal(size=(500, 16)).astype(np.float32)
    ids = np.arange(500).astype(np.int64) * 3
    queries = rng.normal(size=(64, 16)).astype(np.float32)
    chosen = rng.integers(0, 500, size=64)
    # Score-based: true candidates off the corpus, so TFRS's rounding of exact copies (tested below) plays no part.
    true = corpus[chosen] if id_based else rng.normal(size=(64, 16)).astype(np.float32)
    weights = rng.uniform(0, 1, size=64).astype(np.float32) if weighted else None
    ks = (1, 5, 10, 50, 100)
    index_tf = tfrs.layers.factorized_top_k.BruteForce(k=100)
    index_tf.index(tf.constant(corpus), tf.constant(ids))
    metric_tf = tfrs.metrics.FactorizedTopK(candidates=index_tf, ks=ks)
    metric_tf.update_state(
        tf.constant(queries),
        tf.constant(true),
        true_candidate_ids=tf.constant(ids[chosen]) if id_based else None,
        sample_weight=None if weights is None else tf.constant(weights),
    )
    expected = {
        f"factorized_top_k/top_{k}_categorical_accuracy": float(value)
        for k, value in zip(ks, metric_tf.result(), strict=True)
    }
    metric = FactorizedTopK(BruteForce(k=100).index(torch.as_tensor(corpus), torch.as_tensor(ids)), ks=ks)
    metric.update(
        torch.as_tensor(queries),
        torch.as_tensor(true),
        torch.as_tensor(ids[chosen]) if id_based else None,
        None if weights is None else torch.as_tensor(weights),
    )
    got = metric.results()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name


class TestDocumentedDifferences:
    """Where TFRS's code contradicts its documentation; twotower follows the documentation."""

    def test_zero_hard_negatives(self) -> None:
        data = _inputs(6, 0, 4, seed=0)
        theirs = float(
            tfrs.tasks.Retrieval(num_hard_negatives=0)(tf.constant(data["queries"]), tf.constant(data["candidates"]))
        )
        ours = float(
            Retrieval(num_hard_negatives=0)(torch.as_tensor(data["queries"]), torch.as_tensor(data["candidates"]))
        )
        everything = float(Retrieval()(torch.as_tensor(data["queries"]), torch.as_tensor(data["candidates"])))
        assert theirs == 0.0  # TFRS keeps only the positive
        assert ours == pytest.approx(everything)  # documented: all negatives kept

    def test_exact_copies_tie_in_score_based_top_k(self) -> None:
        rng = np.random.default_rng(1)
        corpus = rng.normal(size=(2000, 64)).astype(np.float32)
        queries = rng.normal(size=(500, 64)).astype(np.float32)
        best = np.argmax(queries.astype(np.float64) @ corpus.T.astype(np.float64), axis=1)
        index_tf = tfrs.layers.factorized_top_k.BruteForce(k=10)
        index_tf.index(tf.constant(corpus))
        metric_tf = tfrs.metrics.FactorizedTopK(candidates=index_tf, ks=(1,))
        metric_tf.update_state(tf.constant(queries), tf.constant(corpus[best]))
        metric = FactorizedTopK(BruteForce(k=10).index(torch.as_tensor(corpus)), ks=(1,))
        metric.update(torch.as_tensor(queries), torch.as_tensor(corpus[best]))
        assert float(metric_tf.result()[0]) < 0.9  # rounding makes the copy outrank the positive
        assert metric.results()["factorized_top_k/top_1_categorical_accuracy"] == 1.0

    def test_candidate_ids_with_extra_negatives(self) -> None:
        data = _inputs(4, 3, 4, seed=2)
        index_tf = tfrs.layers.factorized_top_k.BruteForce(k=5)
        index_tf.index(tf.constant(data["candidates"]), tf.constant(data["ids"]))
        theirs = tfrs.tasks.Retrieval(metrics=tfrs.metrics.FactorizedTopK(candidates=index_tf, ks=(1, 5)))
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
            theirs(
                tf.constant(data["queries"]), tf.constant(data["candidates"]), candidate_ids=tf.constant(data["ids"])
            )
        ours = Retrieval(
            metrics=FactorizedTopK(
                BruteForce(k=5).index(torch.as_tensor(data["candidates"]), torch.as_tensor(data["ids"])), ks=(1, 5)
            )
        )
        ours(
            torch.as_tensor(data["queries"]),
            torch.as_tensor(data["candidates"]),
            candidate_ids=torch.as_tensor(data["ids"]),
        )
        assert len(ours.metric_results()) == 2


def test_score_mask_and_mean_reduction_match_tfrs() -> None:
    data = _inputs(8, 4, 8, seed=11)
    mask = np.random.default_rng(0).uniform(size=(8, 12)) > 0.3
    keras_mean = tf.keras.losses.CategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE
    )
    for reduction, loss in (("sum", None), ("mean", keras_mean)):
        theirs = tfrs.tasks.Retrieval(loss=loss, temperature=0.5)
        expected = float(
            theirs(
                tf.constant(data["queries"]),
                tf.constant(data["candidates"]),
                sample_weight=tf.constant(data["weights"]),
                score_mask=tf.constant(mask),
            )
        )
        ours = Retrieval(temperature=0.5, reduction=reduction)  # type: ignore[arg-type]
        got = float(
            ours(
                torch.as_tensor(data["queries"]),
                torch.as_tensor(data["candidates"]),
                torch.as_tensor(data["weights"]),
                score_mask=torch.as_tensor(mask),
            )
        )
        assert got == pytest.approx(expected, rel=1e-5), reduction
