"""TFRS's own calling conventions, found by running TFRS's test cases against twotower: each one works here
and gives the numpy answer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from reference import MIN_FLOAT
from twotower.indexes import BruteForce, Faiss, FaissSearchParameters, Streaming, default_factory
from twotower.losses import HardNegativeMining, RemoveAccidentalHits, SamplingProbabilityCorrection
from twotower.metrics import FactorizedTopK


def _top_k_by_hand(queries: np.ndarray, corpus: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
def test_float_identifiers_as_in_tfrs_tests(kind: str) -> None:
    rng = np.random.default_rng(0)
    corpus, queries = rng.normal(size=(100, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    identifiers = np.arange(100).astype(np.float32) + 1000
    if kind == "brute_force":
        index = BruteForce(k=7).index(torch.as_tensor(corpus), identifiers)
    else:
        batches = [(identifiers[i : i + 16], torch.as_tensor(corpus[i : i + 16])) for i in range(0, 100, 16)]
        index = Streaming(k=7).index_from_dataset(batches)
    _, ids = index(torch.as_tensor(queries))
    np.testing.assert_array_equal(ids.numpy(), _top_k_by_hand(queries, corpus, 7) + 1000)


def test_layers_take_numpy_and_lists() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5)).astype(np.float32)
    labels = np.eye(3, 5, dtype=np.float32)
    probability = rng.uniform(0.1, 1.0, size=5).astype(np.float32)
    corrected = SamplingProbabilityCorrection()(logits, probability)
    np.testing.assert_allclose(corrected.numpy(), logits - np.log(probability)[None, :], rtol=1e-6)
    corrected_list = SamplingProbabilityCorrection()(logits.tolist(), probability.tolist())
    np.testing.assert_allclose(corrected_list.numpy(), logits - np.log(probability)[None, :], rtol=1e-6)
    ids = np.array([4, 5, 4, 6, 5])
    removed = RemoveAccidentalHits()(labels, logits, ids).numpy()
    expected = logits.astype(np.float64).copy()
    for i in range(3):
        for j in range(5):
            if j != i and ids[j] == ids[i]:
                expected[i, j] += MIN_FLOAT
    np.testing.assert_allclose(removed, expected, rtol=1e-6)
    kept, kept_labels = HardNegativeMining(2)(logits, labels)
    for i in range(3):
        negatives = sorted((j for j in range(5) if j != i), key=lambda j: -logits[i, j])[:2]
        np.testing.assert_allclose(kept.numpy()[i], logits[i, [i, *negatives]], rtol=1e-7)
    np.testing.assert_array_equal(kept_labels.numpy()[:, 0], 1.0)


def test_remove_accidental_hits_takes_string_ids() -> None:
    labels, logits = torch.eye(3, 4), torch.zeros(3, 4)
    out = RemoveAccidentalHits()(labels, logits, ["x", "y", "x", "y"]).numpy()
    expected = np.zeros((3, 4))
    expected[0, 2] = expected[1, 3] = expected[2, 0] = MIN_FLOAT
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_sampling_probability_correction_broadcasts_as_tfrs() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4)).astype(np.float32)
    per_entry = rng.uniform(1e-3, 1.0, size=(3, 4)).astype(np.float32)
    out = SamplingProbabilityCorrection()(torch.as_tensor(logits), torch.as_tensor(per_entry))
    np.testing.assert_allclose(out.numpy(), logits - np.log(per_entry), rtol=1e-6)
    per_row = rng.uniform(1e-3, 1.0, size=(3, 1)).astype(np.float32)
    out = SamplingProbabilityCorrection()(torch.as_tensor(logits), torch.as_tensor(per_row))
    np.testing.assert_allclose(out.numpy(), logits - np.log(per_row), rtol=1e-6)
    with pytest.raises(ValueError, match="candidate_sampling_probability must broadcast"):
        SamplingProbabilityCorrection()(torch.as_tensor(logits), torch.ones(5))
    with pytest.raises(ValueError, match="candidate_sampling_probability must broadcast"):
        SamplingProbabilityCorrection()(torch.as_tensor(logits), torch.ones(2, 3, 4))


def test_factorized_top_k_update_takes_numpy() -> None:
    rng = np.random.default_rng(3)
    corpus = rng.normal(size=(50, 4)).astype(np.float32)
    queries = rng.normal(size=(6, 4)).astype(np.float32)
    true = rng.integers(0, 50, size=6)
    metric = FactorizedTopK(torch.as_tensor(corpus), ks=(1, 5))
    metric.update(queries, corpus[true], true)
    ranking = _top_k_by_hand(queries, corpus, 5)
    expected = {
        "factorized_top_k/top_1_categorical_accuracy": np.mean(ranking[:, 0] == true),
        "factorized_top_k/top_5_categorical_accuracy": np.mean(
            [t in row for t, row in zip(true, ranking, strict=False)]
        ),
    }
    assert metric.results() == pytest.approx(expected)


def test_faiss_defaults_work_on_any_corpus() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    small = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    index = Faiss(k=5).index(torch.as_tensor(small))
    assert index.built_factory == "Flat"
    np.testing.assert_array_equal(index(torch.as_tensor(queries))[1].numpy(), _top_k_by_hand(queries, small, 5))
    assert default_factory(40_000) == ("IVF800,Flat", 80)
    assert default_factory(19_999) == ("Flat", None)


def test_faiss_impossible_settings_are_refused_by_name() -> None:
    pytest.importorskip("faiss")
    corpus = torch.randn(500, 8)
    with pytest.raises(ValueError, match=r"'IVF1024,Flat' has 1024 IVF cells but only 500 candidates"):
        Faiss("IVF1024,Flat").index(corpus)
    with pytest.raises(ValueError, match="nprobe 64 exceeds the 16 IVF cells"):
        Faiss("IVF16,Flat", nprobe=64).index(corpus)
    with pytest.raises(ValueError, match="nprobe must be a positive int"):
        FaissSearchParameters(nprobe=0)
    with pytest.raises(ValueError, match="BruteForce is exact and takes no FaissSearchParameters"):
        BruteForce().index(corpus).search(corpus[:2], params=FaissSearchParameters(nprobe=2))


def test_per_call_parameters_are_values() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    corpus = rng.normal(size=(2000, 8)).astype(np.float32)
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    index = Faiss("IVF16,Flat", k=10, nprobe=1).index(torch.as_tensor(corpus))
    everything = index.search(torch.as_tensor(queries), params=FaissSearchParameters(nprobe=16))
    np.testing.assert_array_equal(everything.ids.numpy(), _top_k_by_hand(queries, corpus, 10))
    assert index.nprobe == 1  # the index's own setting is untouched


def test_streaming_takes_tfrs_flags_and_handles_batches_smaller_than_k() -> None:
    rng = np.random.default_rng(6)
    corpus = rng.normal(size=(23, 4)).astype(np.float32)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    batches = [torch.as_tensor(corpus[i : i + 3]) for i in range(0, 23, 3)]  # every batch smaller than k
    for flags in ({"handle_incomplete_batches": False}, {"sorted_order": False}, {}):
        index = Streaming(k=10, **flags).index_from_dataset(batches)
        np.testing.assert_array_equal(index(torch.as_tensor(queries))[1].numpy(), _top_k_by_hand(queries, corpus, 10))
    with pytest.raises(TypeError, match="sorted_order must be a bool"):
        Streaming(sorted_order="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["brute_force", "faiss"])
def test_a_saved_index_keeps_its_query_model(tmp_path: Path, kind: str) -> None:
    if kind == "faiss":
        pytest.importorskip("faiss")
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4))
    corpus = torch.randn(60, 4)
    index = BruteForce(k=5, query_model=tower) if kind == "brute_force" else Faiss("Flat", k=5, query_model=tower)
    index.index(corpus)
    path = tmp_path / "index.safetensors"
    index.save(path)
    loaded = (BruteForce if kind == "brute_force" else Faiss).load(path)
    users = torch.tensor([3, 17, 0])
    # numpy by hand from the saved weights: embedding row, linear, relu, linear.
    weights = {name: value.detach().numpy().astype(np.float64) for name, value in tower.state_dict().items()}
    hidden = np.maximum(weights["0.weight"][users.numpy()] @ weights["1.weight"].T + weights["1.bias"], 0.0)
    embeddings = hidden @ weights["3.weight"].T + weights["3.bias"]
    expected = np.argsort(-(embeddings @ corpus.numpy().astype(np.float64).T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(loaded(users)[1].numpy(), expected)


def test_a_query_model_that_cannot_be_data_is_not_saved_silently(tmp_path: Path) -> None:
    index = BruteForce(query_model=lambda features: features * 2).index(torch.randn(10, 3))
    with pytest.warns(UserWarning, match="saved without its query model"):
        index.save(tmp_path / "a.safetensors")
    assert BruteForce.load(tmp_path / "a.safetensors").query_model is None
    with pytest.raises(TypeError, match="include_query_model=True, but the query model cannot be saved"):
        index.save(tmp_path / "b.safetensors", include_query_model=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.save(tmp_path / "c.safetensors", include_query_model=False)
