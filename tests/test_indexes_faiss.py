"""The FAISS index behind the common top-K interface, against the exact index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[test]')")

from twotower import BruteForce, FactorizedTopK
from twotower.indexes import Faiss, FaissSearchParameters, recall_against_exact, recall_at_k


def _data(n: int = 4000, nq: int = 200, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(nq, d, generator=generator)


def test_flat_equals_exact_with_ids_and_exclusions() -> None:
    corpus, queries = _data()
    ids = np.array([f"item{i}" for i in range(corpus.shape[0])])
    approximate = Faiss("Flat", k=10).index(corpus, ids)
    exact = BruteForce(k=10).index(corpus, ids)
    assert not approximate.is_exact()
    scores, found = approximate(queries)
    exact_scores, exact_found = exact(queries)
    assert np.mean(found == exact_found) > 0.999  # only float-rounding swaps of near-ties
    torch.testing.assert_close(scores, exact_scores, rtol=1e-4, atol=1e-4)
    exclusions = [list(row[:3]) for row in exact_found]  # exclude each query's 3 best
    _, kept = approximate.query_with_exclusions(queries, exclusions, k=5)
    _, expected = exact.query_with_exclusions(queries, exclusions, k=5)
    assert np.mean(kept == expected) > 0.999
    assert not any(set(row) & set(excluded) for row, excluded in zip(kept.tolist(), exclusions, strict=True))


def test_ivf_recall_grows_with_nprobe_and_is_exact_when_probing_all() -> None:
    corpus, queries = _data()
    approximate = Faiss("IVF32,Flat", k=20, train_size=4000).index(corpus)
    exact = BruteForce(k=20).index(corpus)
    approximate.nprobe = 1
    low, _, _ = recall_against_exact(approximate, exact, queries, k=20)
    approximate.nprobe = 32
    full, _, _ = recall_against_exact(approximate, exact, queries, k=20)
    assert full > 0.999
    assert 0.1 < low < full
    _, per_call = approximate.search(queries, k=20, params=FaissSearchParameters(nprobe=32))[:2]
    _, truth = exact(queries, k=20)
    assert np.mean(per_call.numpy() == truth.numpy()) > 0.999


@pytest.mark.parametrize("default_nprobe", [None, 1, 2])
def test_per_call_nprobe_applies_to_that_call_only(default_nprobe: int | None) -> None:
    corpus, queries = _data()
    approximate = Faiss("IVF32,Flat", k=20, train_size=4000, nprobe=default_nprobe).index(corpus)
    _, truth = BruteForce(k=20).index(corpus)(queries, k=20)
    _, before = approximate(queries)
    _, probing_all = approximate.search(queries, params=FaissSearchParameters(nprobe=32))[:2]
    _, after = approximate(queries)
    # Probing every cell is exact; a smaller default probes fewer cells and misses some of the true top 20.
    assert np.mean(probing_all.numpy() == truth.numpy()) > 0.999
    assert np.mean(before.numpy() == truth.numpy()) < 0.9
    assert torch.equal(after, before)


def test_hnsw_recall() -> None:
    corpus, queries = _data(n=3000)
    approximate = Faiss("HNSW32", k=10, ef_search=256).index(corpus)
    recall, _, _ = recall_against_exact(approximate, BruteForce(k=10).index(corpus), queries, k=10)
    assert recall > 0.95


def test_factorized_metric_needs_ids_with_an_approximate_index() -> None:
    corpus, queries = _data(n=500)
    metric = FactorizedTopK(Faiss("Flat", k=10).index(corpus), ks=(1, 10))
    with pytest.raises(ValueError, match="needs an exact index"):
        metric.update(queries[:4], corpus[:4])
    metric.update(queries[:4], corpus[:4], torch.arange(4))
    exact = FactorizedTopK(BruteForce(k=10).index(corpus), ks=(1, 10))
    exact.update(queries[:4], corpus[:4], torch.arange(4))
    assert metric.results() == exact.results()


def test_bad_input() -> None:
    corpus, queries = _data(n=300)
    with pytest.raises(ValueError, match="FAISS cannot build"):
        Faiss("NotAnIndex").index(corpus)
    with pytest.raises(ValueError, match="nprobe must be a positive int"):
        Faiss("IVF4,Flat", nprobe=0)
    with pytest.raises(ValueError, match="nprobe does not apply"):
        Faiss("HNSW16", nprobe=4).index(corpus)(queries)
    with pytest.raises(RuntimeError, match="has not been built"):
        Faiss("Flat")(queries)
    index = Faiss("Flat").index(corpus)
    with pytest.raises(ValueError, match="dimension 8 but the index holds 16-d"):
        index(torch.randn(2, 8))


def test_save_load_round_trip_and_refusals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    corpus, queries = _data(n=2000)
    ids = np.arange(2000) * 7
    index = Faiss("IVF16,Flat", k=10, nprobe=4, train_size=2000).index(corpus, ids)
    path = tmp_path / "faiss.safetensors"
    index.save(path)
    loaded = Faiss.load(path)
    assert (loaded.factory, loaded.nprobe, loaded.k) == ("IVF16,Flat", 4, 10)
    before, after = index(queries), loaded(queries)
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    assert torch.equal(before[1], after[1])
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        Faiss.load(tmp_path / "bad.safetensors")
    BruteForce().index(corpus).save(tmp_path / "exact.safetensors")
    with pytest.raises(ValueError, match="not a twotower Faiss index"):
        Faiss.load(tmp_path / "exact.safetensors")


def test_recall_at_k_by_hand() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = torch.tensor([[4, 9, 1, 0], [8, 7, 6, 5]])  # row 0 holds 2 of 4, row 1 all 4 in another order
    assert recall_at_k(found, truth) == pytest.approx((2 / 4 + 4 / 4) / 2)
    names = np.array([["a", "b"], ["c", "d"]])
    assert recall_at_k(np.array([["b", "x"], ["y", "z"]]), names) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same nq"):
        recall_at_k(found[:1], truth)
    with pytest.raises(ValueError, match="same nq"):
        recall_at_k(found[0], truth[0])  # 1-D rows
    with pytest.raises(ValueError, match="truth must hold at least one id per row"):
        recall_at_k(found, truth[:, :0])


def _numpy_top(corpus: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.double().numpy() @ corpus.double().numpy().T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, 1), rows


@pytest.mark.parametrize("default_k_factor", [None, 2])
def test_refined_fast_scan_reranks_exactly(default_k_factor: int | None, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """IVF with 4-bit fast-scan PQ and exact refinement: probing every cell and reranking every candidate
    (k_factor * k = corpus size) gives numpy's exact ranking and scores; k_factor set for one call applies to
    that call only, raises recall over the index's own setting, and survives save/load."""
    corpus, queries = _data(n=2000, nq=100)
    index = Faiss("IVF16,PQ16x4fs,RFlat", k=10, train_size=2000, nprobe=16, k_factor=default_k_factor).index(corpus)
    expected_scores, expected_rows = _numpy_top(corpus, queries, 10)
    _, before = index(queries)
    scores, everything = index.search(queries, params=FaissSearchParameters(k_factor=200))[:2]
    _, after = index(queries)
    assert np.mean(everything.numpy() == expected_rows) > 0.999  # only float-rounding swaps of near-ties
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(before, after)
    own = recall_at_k(before, torch.from_numpy(expected_rows))
    assert 0.3 < own < 0.99  # 4-bit codes misrank some of the top 10 among only 10 or 20 proposals
    index.save(tmp_path / "refined.safetensors")
    loaded = Faiss.load(tmp_path / "refined.safetensors")
    assert loaded.k_factor == default_k_factor
    assert torch.equal(loaded(queries)[1], before)
    assert torch.equal(loaded.search(queries, params=FaissSearchParameters(k_factor=200)).ids, everything)


def test_k_factor_refusals() -> None:
    corpus, _ = _data(n=500)
    with pytest.raises(ValueError, match="k_factor must be a positive int"):
        Faiss("IVF4,PQ16x4fs,RFlat", k_factor=0)
    flat = Faiss("IVF4,Flat", k=5, train_size=500).index(corpus)
    with pytest.raises(ValueError, match="k_factor applies to refined indexes"):
        flat.search(corpus[:2], params=FaissSearchParameters(k_factor=4))[:2]
    with pytest.raises(ValueError, match="k_factor applies to refined indexes"):
        Faiss("IVF4,Flat", k=5, train_size=500, k_factor=4).index(corpus)(corpus[:2])


@pytest.mark.parametrize("string_ids", [False, True])
def test_missing_results_are_empty_slots(string_ids: bool) -> None:
    """One probed cell of 16 holds fewer than k = 300 of 2,000 rows: FAISS pads with -1, which must come back as
    score -inf and the empty id (-1, or "" for string ids), after every found row in descending score order."""
    corpus, queries = _data(n=2000, nq=20)
    ids = np.array([f"item{i}" for i in range(2000)]) if string_ids else np.arange(2000) * 7
    index = Faiss("IVF16,Flat", k=300, train_size=2000, nprobe=1).index(corpus, ids)
    scores, found = index(queries)
    found_np = np.asarray(found)
    empty = found_np == ("" if string_ids else -1)
    assert empty.any()
    assert (empty == np.isneginf(scores.numpy())).all()
    for row in range(20):
        count = int((~empty[row]).sum())
        assert not empty[row, :count].any()  # the found rows come first
        kept = found_np[row, :count]
        positions = np.array([int(str(v)[4:]) for v in kept]) if string_ids else kept.astype(np.int64) // 7
        expected = (queries[row].double() @ corpus[positions].double().T).numpy()
        np.testing.assert_allclose(scores[row, :count].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert (np.diff(scores[row, :count].numpy()) <= 0).all()


def test_zero_dimensional_corpus_is_refused_not_a_crash() -> None:
    """FAISS's k-means divides by the dimension: zero-dimensional embeddings killed the process with SIGFPE."""
    with pytest.raises(ValueError, match="candidates must have at least one embedding dimension"):
        Faiss("IVF4,Flat").index(torch.zeros(300, 0))


def test_more_cells_than_training_rows_is_a_clear_error() -> None:
    corpus, _ = _data(n=300)
    with pytest.raises(ValueError, match="1024 IVF cells but only 300 candidates train it"):
        Faiss("IVF1024,Flat").index(corpus)
    with pytest.raises(ValueError, match="FAISS cannot build 'NotAnIndex'"):
        Faiss("NotAnIndex").index(corpus)


def test_exclusions_cost_k_plus_e_per_query() -> None:
    """64 queries, 10,000 exclusions each (ids repeated, some unknown), on 1,664 items: the old [nq, k + E, E]
    comparison took about 1 GiB."""
    import tracemalloc

    corpus, queries = _data(n=1664, nq=64, d=16)
    index = Faiss("Flat", k=10).index(corpus)
    exact = BruteForce(k=10).index(corpus)
    rng = np.random.default_rng(0)
    exclusions = [np.concatenate([rng.choice(1664, 9000), 5000 + np.arange(1000)]) for _ in range(64)]
    tracemalloc.start()
    try:
        _, found = index.query_with_exclusions(queries, exclusions, k=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB"
    _, expected = exact.query_with_exclusions(queries, exclusions, k=10)
    assert np.mean(found.numpy() == expected.numpy()) > 0.999
    assert not any(set(row) & set(excluded.tolist()) for row, excluded in zip(found.tolist(), exclusions, strict=True))


def test_concurrent_searches_with_different_settings_do_not_interfere() -> None:
    """Settings go to FAISS per call (SearchParameters): a thread probing every cell and one probing a single cell
    each get their own answer while they run at the same time."""
    import threading

    corpus, queries = _data()
    index = Faiss("IVF32,Flat", k=20, train_size=4000).index(corpus)
    full = index.search(queries, params=FaissSearchParameters(nprobe=32)).ids.numpy()
    single = index.search(queries, params=FaissSearchParameters(nprobe=1)).ids.numpy()
    assert not np.array_equal(full, single)
    wrong: list[int] = []

    def run(nprobe: int, expected: np.ndarray) -> None:
        for _ in range(40):
            if not np.array_equal(
                index.search(queries, params=FaissSearchParameters(nprobe=nprobe)).ids.numpy(), expected
            ):
                wrong.append(nprobe)

    threads = [threading.Thread(target=run, args=(n, e)) for n, e in ((32, full), (1, single)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def _clustered(n: int = 30_000, d: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(50, d, generator=generator)
    return centers.repeat(n // 50, 1) + 0.3 * torch.randn(n, d, generator=generator)


def _numpy_recall(corpus: torch.Tensor, queries: torch.Tensor, found: np.ndarray, k: int) -> float:
    """recall@k of ``found`` rows against numpy's exact top-k by inner product (float64)."""
    scores = queries.double().numpy() @ corpus.double().numpy().T
    truth = np.argsort(-scores, axis=1)[:, :k]
    return sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)) / truth.size


# HNSW by inner product tops out near 0.9 on these unnormalised clusters: its target is lower.
@pytest.mark.parametrize(("factory", "name", "target"), [("IVF256,Flat", "nprobe", 0.9), ("HNSW16", "ef_search", 0.8)])
def test_target_recall_takes_the_narrowest_breadth_that_reaches_it(factory: str, name: str, target: float) -> None:
    """The tuned breadth reaches the target on the tuning queries and one less does not, both measured here
    against numpy's exact top-k; reached_recall is that measurement, and searches use the tuned breadth."""
    corpus = _clustered()
    # Queries near the corpus (a query tower's users are): HNSW's graph serves far-off queries poorly.
    generator = torch.Generator().manual_seed(5)
    queries = corpus[torch.randint(0, corpus.shape[0], (300,), generator=generator)]
    queries = queries + 0.3 * torch.randn(queries.shape, generator=generator)
    index = Faiss(factory, k=20, target_recall=target, tuning_queries=queries).index(corpus)
    snapshot = index.snapshot()
    breadth = snapshot.default_nprobe if name == "nprobe" else snapshot.default_ef_search
    assert breadth is not None
    assert breadth > 1

    def found(value: int) -> np.ndarray:
        params = FaissSearchParameters(**{name: value})
        return index.search(queries, k=20, params=params).rows.numpy()

    at_breadth = _numpy_recall(corpus, queries, found(breadth), 20)
    assert at_breadth >= target
    assert _numpy_recall(corpus, queries, found(breadth - 1), 20) < target
    assert index.reached_recall == pytest.approx(at_breadth, abs=1e-9)
    assert np.array_equal(index.search(queries, k=20).rows.numpy(), found(breadth))


def test_target_recall_of_a_flat_index_is_exact_and_an_unreachable_target_warns() -> None:
    corpus = _clustered(n=2_000)
    assert Faiss(k=10, target_recall=0.99).index(corpus).reached_recall == 1.0  # under 20,000 rows: Flat
    with pytest.warns(UserWarning, match=r"target_recall 0.99 is out of reach of 'IVF64,PQ4x4fs'.*nprobe 64"):
        index = Faiss("IVF64,PQ4x4fs", k=10, target_recall=0.99).index(_clustered())
    assert index.snapshot().default_nprobe == 64
    assert index.reached_recall is not None
    assert index.reached_recall < 0.99


def test_tuned_breadth_survives_save_and_load(tmp_path: Path) -> None:
    corpus = _clustered()
    queries = torch.randn(50, 16, generator=torch.Generator().manual_seed(6))
    index = Faiss("IVF256,Flat", k=20, target_recall=0.9).index(corpus)
    index.save(tmp_path / "tuned.safetensors")
    loaded = Faiss.load(tmp_path / "tuned.safetensors")
    assert loaded.nprobe == index.snapshot().default_nprobe
    assert np.array_equal(loaded.search(queries).rows.numpy(), index.search(queries).rows.numpy())


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"target_recall": 0.0}, ValueError, r"target_recall must lie in \(0.0, 1.0\]"),
    ({"target_recall": 1.5}, ValueError, "target_recall must lie in"),
    ({"target_recall": float("nan")}, ValueError, "target_recall must lie in"),
    ({"target_recall": "0.9"}, TypeError, "target_recall must be a number"),
    ({"target_recall": 0.9, "nprobe": 8}, ValueError, "give either those or target_recall"),
    ({"tuning_queries": torch.zeros(3, 16)}, ValueError, "tuning_queries are for target_recall"),
    ({"target_recall": 0.9, "tuning_queries": torch.zeros(3)}, ValueError, "tuning_queries"),
    ({"target_recall": 0.9, "tuning_queries": torch.full((2, 16), float("nan"))}, ValueError, "tuning_queries"),
    ({"target_recall": 0.9, "tuning_queries": torch.zeros(0, 16)}, ValueError, "tuning_queries must hold at least one"),
])  # fmt: skip
def test_bad_tuning_arguments_are_named(arguments: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        Faiss("IVF64,Flat", **arguments)  # type: ignore[arg-type]


def test_tuning_queries_of_another_dimension_are_refused_at_build() -> None:
    index = Faiss("IVF64,Flat", target_recall=0.9, tuning_queries=torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"tuning_queries must have the corpus's dimension 16, got shape \(3, 8\)"):
        index.index(_clustered(n=5_000))


def test_target_recall_refuses_an_index_without_a_breadth() -> None:
    with pytest.raises(ValueError, match="target_recall tunes IVF and HNSW indexes, not 'PQ4x4fs'"):
        Faiss("PQ4x4fs", target_recall=0.9).index(_clustered(n=5_000))
