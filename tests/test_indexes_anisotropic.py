"""AnisotropicIVF (partitions, anisotropic 4-bit codes, exact reorder) against numpy and the exact index."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower import _native
from twotower.indexes import (
    AnisotropicIVF,
    AnisotropicSearchParameters,
    BruteForce,
    FaissSearchParameters,
    recall_at_k,
)
from twotower.indexes.files import load_index_file, save_index_file


@pytest.fixture(params=["native", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the native scan and on the torch fallback."""
    if request.param == "torch":
        monkeypatch.setattr(_native, "load", lambda: None)
    elif _native.load() is None:
        pytest.skip("no C compiler: the native scan is unavailable")
    return str(request.param)


def _clustered(n: int = 6000, d: int = 16, nq: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, d, generator=generator)
    corpus = centers[torch.randint(40, (n,), generator=generator)] + 0.4 * torch.randn(n, d, generator=generator)
    return corpus, torch.randn(nq, d, generator=generator)


def _exact_in_partitions(index: AnisotropicIVF, corpus: np.ndarray, queries: np.ndarray, leaves: int, k: int):
    """numpy: each query's exact top-k among the rows of its ``leaves`` best partitions (float64 scores)."""
    state = index.snapshot()
    d = corpus.shape[1]
    centroid_scores = queries.astype(np.float64) @ state.centroids[:, :d].T.astype(np.float64)
    expected = []
    for query, scores in zip(queries.astype(np.float64), centroid_scores, strict=True):
        kept = np.argsort(-scores, kind="stable")[:leaves]
        positions = np.concatenate([np.arange(state.leaf_offsets[l], state.leaf_offsets[l + 1]) for l in kept])
        rows = state.rows[positions]
        exact = corpus[rows].astype(np.float64) @ query
        expected.append(rows[np.lexsort((rows, -exact))[:k]])
    return np.array(expected)


def test_full_reorder_is_the_exact_top_k_of_the_scanned_partitions(backend: str) -> None:
    corpus, queries = _clustered()
    index = AnisotropicIVF(k=10, leaves=30).index(corpus)
    for leaves in (1, 4, 30):
        found = index.search(queries, params=AnisotropicSearchParameters(leaves, corpus.shape[0]))
        expected = _exact_in_partitions(index, corpus.numpy(), queries.numpy(), leaves, 10)
        assert np.mean(found.rows.numpy() == expected) > 0.995  # float32 rounding may swap near-ties
        exact = (queries.double() @ corpus.double().T).gather(1, found.rows).float()
        torch.testing.assert_close(found.scores, exact, rtol=1e-5, atol=1e-5)
    # Every partition, everything reordered: exact search.
    truth = BruteForce(k=10).index(corpus).search(queries)
    found = index.search(queries, params=AnisotropicSearchParameters(30, corpus.shape[0]))
    assert recall_at_k(found.ids, truth.ids) > 0.995


def test_a_clustered_corpus_gets_one_partition_per_cluster() -> None:
    """40 tight clusters of 75 rows and 40 partitions: the index keeps the k-means++ partitions (each one cluster,
    so every partition holds 75 rows), which are more even than those of random starts."""
    generator = torch.Generator().manual_seed(4)
    means = 10.0 * torch.randn(40, 16, generator=generator)
    corpus = means[torch.arange(3000) % 40] + 0.01 * torch.randn(3000, 16, generator=generator)
    index = AnisotropicIVF(k=10, leaves=40).index(corpus)
    assert np.diff(index.snapshot().leaf_offsets).tolist() == [75] * 40
    rows = index.snapshot().rows
    for leaf in range(40):
        start, stop = index.snapshot().leaf_offsets[leaf : leaf + 2]
        assert len(set((rows[start:stop] % 40).tolist())) == 1


def test_small_reorder_keeps_exact_scores_and_high_recall(backend: str) -> None:
    corpus, queries = _clustered(n=20000, d=32)
    index = AnisotropicIVF(k=20, leaves=100, leaves_to_search=20, reorder=200).index(corpus)
    found = index.search(queries)
    rows = found.rows.numpy()
    assert (rows >= 0).all()
    assert all(len(set(row)) == 20 for row in rows)
    exact = np.take_along_axis(queries.double().numpy() @ corpus.double().numpy().T, rows, 1)
    np.testing.assert_allclose(found.scores.numpy(), exact, rtol=1e-5, atol=1e-5)
    assert (np.diff(found.scores.numpy(), axis=1) <= 0).all()
    truth = BruteForce(k=20).index(corpus).search(queries)
    assert recall_at_k(found.ids, truth.ids) > 0.9
    # More reordering or more partitions never loses much recall.
    wider = index.search(queries, params=AnisotropicSearchParameters(40, 800))
    assert recall_at_k(wider.ids, truth.ids) >= recall_at_k(found.ids, truth.ids) - 0.01


def test_native_candidates_are_the_best_by_the_integer_lookup_tables() -> None:
    """One partition: every candidate's approximate score is the sum of its codes' uint8 table entries, computed
    here in numpy float32 as the kernel does; the reorder then takes the exact top k of the best ``R`` of them."""
    if _native.load() is None:
        pytest.skip("no C compiler: the native scan is unavailable")
    generator = torch.Generator().manual_seed(5)
    corpus = torch.randn(3000, 32, generator=generator)
    queries = torch.randn(30, 32, generator=generator)
    index = AnisotropicIVF(k=10, leaves=1).index(corpus)
    state = index.snapshot()
    codes = state.unpacked_codes.astype(np.int64)  # [n, M] in partition order
    subspaces, _, sub_dim = state.codebooks.shape
    checked = 0
    for query in queries.numpy():
        parts = query.reshape(subspaces, sub_dim)
        tables = np.zeros((subspaces, 16), dtype=np.float32)
        for t in range(sub_dim):
            tables = (tables + parts[:, None, t] * state.codebooks[:, :, t]).astype(np.float32)
        tables = (tables - tables.min(1, keepdims=True)).astype(np.float32)
        scale = np.float32(tables.max() / np.float32(255.0))
        quantized = np.clip(np.rint((tables / scale).astype(np.float32)), 0, 255).astype(np.int64)
        totals = quantized[np.arange(subspaces), codes].sum(1)
        ranked = np.sort(totals)[::-1]
        for depth in (50, 200, 700):
            if ranked[depth - 1] == ranked[depth]:
                continue  # a tie at the cut: either candidate may be kept
            best = np.argsort(-totals, kind="stable")[:depth]
            rows = state.rows[best]
            exact = corpus.numpy()[rows].astype(np.float64) @ query.astype(np.float64)
            expected = rows[np.argsort(-exact, kind="stable")[:10]]
            found = index.search(torch.from_numpy(query[None]), params=AnisotropicSearchParameters(1, depth))
            assert set(found.rows.numpy()[0].tolist()) == set(expected.tolist())
            checked += 1
    assert checked >= 30


def _cpu_flags() -> set[str]:
    return set(_native._cpu_signature().split())


@pytest.mark.parametrize(
    ("build", "flags", "needs"),
    [
        ("portable", ["-O2", "-mno-avx512f", "-mno-avx2"], set()),
        ("avx2", ["-O3", "-mavx2", "-mfma", "-mbmi2", "-mno-avx512f"], {"avx2", "fma", "bmi2"}),
    ],
)
def test_other_builds_of_the_kernel_match_this_one(
    tmp_path: Path, build: str, flags: list[str], needs: set[str]
) -> None:
    """The kernel compiled without AVX-512 (the AVX2 code) and without either (the portable loops) finds the same
    results as this machine's build, through the batch and the one-query entry points."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or _native.load() is None:
        pytest.skip("no C compiler")
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - _cpu_flags())}")
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("ivf.c", "heap.h"):
        (folder / name).write_text(resources.files("twotower").joinpath(f"native/{name}").read_text())
    library = tmp_path / f"lib{build}.so"
    subprocess.run(
        [compiler, *flags, "-fopenmp", "-shared", "-fPIC", "-std=c11", str(folder / "ivf.c"), "-o", str(library),
         "-lm"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    other = ctypes.CDLL(str(library))
    for name in ("twotower_ivf_search", "twotower_ivf_search_one"):
        getattr(other, name).restype = ctypes.c_int
        getattr(other, name).argtypes = _native._SIGNATURES[name]
    corpus, queries = _clustered(n=5000, d=12)
    index = AnisotropicIVF(k=10, leaves=40, leaves_to_search=8, reorder=60).index(corpus)
    this_batch = index.search(queries)
    this_one = [index.search(queries[i : i + 1]) for i in range(20)]

    original = _native.load
    try:
        _native.load = lambda: other  # type: ignore[assignment]
        other_batch = index.search(queries)
        other_one = [index.search(queries[i : i + 1]) for i in range(20)]
    finally:
        _native.load = original  # type: ignore[assignment]
    np.testing.assert_array_equal(other_batch.rows.numpy(), this_batch.rows.numpy())
    # The same exact scores, up to the order of the float32 additions (16, 8 or 1 lanes).
    np.testing.assert_allclose(other_batch.scores.numpy(), this_batch.scores.numpy(), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(this_one, other_one, strict=True):
        assert torch.equal(mine.rows, theirs.rows)
        assert torch.equal(mine.ids, theirs.ids)
        np.testing.assert_allclose(theirs.scores.numpy(), mine.scores.numpy(), rtol=1e-5, atol=1e-6)


def test_one_query_calls_match_numpy_and_the_batch(backend: str) -> None:
    """A server's call (one float32 query) takes its own native entry point: the same candidates, scores and
    ids as numpy's exact top k of the scanned partitions, and exactly what the batch call returns for that row;
    the dimension (13) is padded inside it."""
    corpus, queries = _clustered(n=4000, d=13, nq=60)
    ids = np.arange(4000, dtype=np.int64) * 3 + 11
    index = AnisotropicIVF(k=8, leaves=20).index(corpus, ids)
    full = AnisotropicSearchParameters(5, 4000)
    expected = _exact_in_partitions(index, corpus.numpy(), queries.numpy(), 5, 8)
    singles = [index.search(queries[i : i + 1], params=full) for i in range(queries.shape[0])]
    rows = np.concatenate([one.rows.numpy() for one in singles])
    assert rows.shape == (60, 8)
    assert np.mean(rows == expected) > 0.99  # float32 rounding may swap near-ties
    np.testing.assert_array_equal(np.concatenate([one.ids.numpy() for one in singles]), ids[rows])
    exact = np.take_along_axis(queries.double().numpy() @ corpus.double().numpy().T, rows, 1)
    np.testing.assert_allclose(np.concatenate([one.scores.numpy() for one in singles]), exact, rtol=1e-5, atol=1e-5)
    narrow = AnisotropicSearchParameters(3, 40)
    batch = index.search(queries, params=narrow)
    for i in range(queries.shape[0]):
        one = index.search(queries[i : i + 1], params=narrow)
        assert torch.equal(one.rows, batch.rows[i : i + 1])
        assert torch.equal(one.ids, batch.ids[i : i + 1])
        assert torch.equal(one.scores, batch.scores[i : i + 1])


def test_one_query_calls_refuse_and_clip_as_batches_do(backend: str) -> None:
    corpus, queries = _clustered(n=500)
    index = AnisotropicIVF(k=5, leaves=5).index(corpus)
    bad = queries[:1].clone()
    bad[0, 3] = float("inf")
    with pytest.raises(ValueError, match="queries"):
        index.search(bad)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(queries[:1], k=0)
    # k beyond the corpus is cut to it, as for a batch.
    tiny = AnisotropicIVF(k=10, leaves=1).index(corpus[:4], np.array([40, 30, 20, 10]))
    one = tiny.search(queries[:1])
    assert one.rows.shape == (1, 4)
    assert sorted(one.ids[0].tolist()) == [10, 20, 30, 40]
    truth = (queries[:1].double() @ corpus[:4].double().T).argsort(descending=True)
    assert one.rows[0].tolist() == truth[0].tolist()
    # String ids, a non-contiguous query and a float64 one take the general path, with the same answer.
    named = AnisotropicIVF(k=5, leaves=5).index(corpus, np.array([f"item{i}" for i in range(500)]))
    reference = index.search(queries[:1])
    strings = named.search(queries[:1])
    assert strings.ids.tolist() == [[f"item{row}" for row in reference.rows[0].tolist()]]
    strided = torch.stack([queries[:1], queries[:1]], dim=2)[:, :, 0]
    assert not strided.is_contiguous()
    assert torch.equal(index.search(strided).rows, reference.rows)
    assert torch.equal(index.search(queries[:1].double()).rows, reference.rows)


def test_score_pairs_ties_with_the_search(backend: str) -> None:
    corpus, queries = _clustered(n=3000, d=10)  # padded to 16: the pair scores must be padded the same way
    index = AnisotropicIVF(k=5, leaves=10, leaves_to_search=3, reorder=50).index(corpus)
    found = index.search(queries)
    pairs = index.score_pairs(queries.repeat_interleave(5, 0), corpus[found.rows.reshape(-1)])
    assert torch.equal(pairs.reshape(found.scores.shape), found.scores)
    exact = (queries.double().repeat_interleave(5, 0) * corpus[found.rows.reshape(-1)].double()).sum(1)
    torch.testing.assert_close(pairs.double(), exact, rtol=1e-5, atol=1e-5)


def test_exclusions_and_string_ids(backend: str) -> None:
    corpus, queries = _clustered(n=3000)
    ids = np.array([f"item{i}" for i in range(corpus.shape[0])])
    index = AnisotropicIVF(k=5, leaves=20).index(corpus, ids)
    exact = BruteForce(k=5).index(corpus, ids)
    full = AnisotropicSearchParameters(20, corpus.shape[0])
    best = exact.search(queries, k=3).ids
    exclusions = [list(row) for row in best]
    found = index.search(queries, exclusions=exclusions, params=full)
    expected = exact.search(queries, exclusions=exclusions)
    assert np.mean(found.ids == expected.ids) > 0.99
    assert not any(set(row) & set(excluded) for row, excluded in zip(found.ids.tolist(), exclusions, strict=True))
    # Excluding more than remain leaves empty slots marked -1 (k is clamped to the 4 rows).
    tiny = AnisotropicIVF(k=5, leaves=1).index(corpus[:4])
    result = tiny.search(queries[:2], exclusions=[[0, 1], [2]])
    assert result.rows[0].tolist()[2:] == [-1, -1]
    assert torch.isinf(result.scores[0, 2:]).all()
    assert sorted(result.rows[0, :2].tolist()) == [2, 3]


def test_queries_in_other_float_dtypes_are_searched_in_float32(backend: str) -> None:
    corpus, queries = _clustered(n=2000)
    index = AnisotropicIVF(k=5, leaves=10, leaves_to_search=4, reorder=100).index(corpus)
    for dtype in (torch.bfloat16, torch.float64):
        found = index.search(queries.to(dtype))
        expected = index.search(queries.to(dtype).to(torch.float32))
        assert torch.equal(found.rows, expected.rows)
        assert torch.equal(found.scores, expected.scores)


def test_odd_dimension_is_padded_and_exact_at_full_breadth(backend: str) -> None:
    corpus, queries = _clustered(n=2000, d=10)
    index = AnisotropicIVF(k=7, leaves=10).index(corpus)
    assert index.snapshot().centroids.shape[1] == 16
    found = index.search(queries, params=AnisotropicSearchParameters(10, 2000))
    truth = BruteForce(k=7).index(corpus).search(queries)
    assert recall_at_k(found.ids, truth.ids) > 0.995


def test_target_recall_tunes_the_cheapest_setting_that_reaches_it() -> None:
    corpus, queries = _clustered(n=8000, d=16, nq=200)
    index = AnisotropicIVF(k=10, leaves=80, target_recall=0.9, tuning_queries=queries).index(corpus)
    settings = index.search_settings
    truth = (queries.double() @ corpus.double().T).topk(10, dim=1).indices
    reached = recall_at_k(index.search(queries).rows, truth)
    assert reached >= 0.9
    assert index.reached_recall == pytest.approx(reached, abs=0.006)
    assert settings.leaves_to_search is not None
    assert settings.reorder is not None
    if settings.leaves_to_search > 1:  # one partition fewer at the same depth misses the target
        narrower = AnisotropicSearchParameters(settings.leaves_to_search - 1, settings.reorder)
        assert recall_at_k(index.search(queries, params=narrower).rows, truth) < 0.9
    with pytest.warns(UserWarning, match="out of reach"):
        coarse = AnisotropicIVF(k=10, leaves=4, sub_dim=4, reorder=10, target_recall=1.0).index(corpus)
    assert coarse.reached_recall is not None
    assert coarse.reached_recall < 1.0
    assert coarse.search_settings == AnisotropicSearchParameters(4, 10)


def test_save_and_load_give_identical_results(tmp_path: Path) -> None:
    corpus, queries = _clustered(n=3000)
    ids = np.arange(3000) * 7
    index = AnisotropicIVF(k=10, leaves=20, target_recall=0.9).index(corpus, ids)
    index.save(tmp_path / "index.safetensors")
    loaded = AnisotropicIVF.load(tmp_path / "index.safetensors")
    before, after = index.search(queries), loaded.search(queries)
    assert torch.equal(before.scores, after.scores)
    assert torch.equal(before.ids, after.ids)
    assert loaded.search_settings == index.search_settings
    assert loaded.reached_recall == index.reached_recall


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("leaf_offsets", lambda t: t.flip(0), "leaf_offsets"),
        ("leaf_blocks", lambda t: t + 1, "leaf_blocks"),
        ("rows", lambda t: torch.zeros_like(t), "permutation"),
        ("codes", lambda t: t[:-1], "codes"),
        ("vectors", lambda t: torch.full_like(t, float("nan")), "non-finite"),
    ],
)
def test_load_refuses_arrays_the_scan_cannot_trust(tmp_path: Path, name: str, change, message: str) -> None:
    """A file whose checksum is right (anyone can recompute it) but whose arrays would send the scan outside
    its memory is refused, naming what is wrong."""
    corpus, _ = _clustered(n=500)
    path = tmp_path / "index.safetensors"
    AnisotropicIVF(k=5, leaves=5).index(corpus).save(path)
    tensors, metadata = load_index_file(path, "twotower.AnisotropicIVF")
    tensors[name] = change(tensors[name]).contiguous()
    metadata = {key: value for key, value in metadata.items() if key not in ("format", "version", "sha256")}
    save_index_file(path, "twotower.AnisotropicIVF", tensors, metadata)
    with pytest.raises(ValueError, match=message):
        AnisotropicIVF.load(path)


def test_bad_arguments_are_refused_by_name() -> None:
    corpus, queries = _clustered(n=500)
    with pytest.raises(ValueError, match="leaves 600 exceeds the 500 candidates"):
        AnisotropicIVF(leaves=600).index(corpus)
    with pytest.raises(ValueError, match="leaves_to_search 9 exceeds the 8 partitions"):
        AnisotropicIVF(leaves=8, leaves_to_search=9).index(corpus)
    with pytest.raises(ValueError, match="reorder must be a positive int"):
        AnisotropicSearchParameters(reorder=0)
    with pytest.raises(ValueError, match="parallel_weight"):
        AnisotropicIVF(parallel_weight=0.0)
    with pytest.raises(ValueError, match="tuning_queries are for target_recall"):
        AnisotropicIVF(tuning_queries=queries)
    index = AnisotropicIVF(k=5, leaves=8).index(corpus)
    with pytest.raises(TypeError, match="AnisotropicSearchParameters"):
        index.search(queries, params=FaissSearchParameters(nprobe=2))
    with pytest.raises(ValueError, match="exceeds the index's 8 partitions"):
        index.search(queries, params=AnisotropicSearchParameters(leaves_to_search=9))
    bad = queries.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="queries"):
        index.search(bad)
    with pytest.raises(ValueError, match="dimension 8 but the index holds 16"):
        index.search(queries[:, :8])
    with pytest.raises(RuntimeError, match="has not been built"):
        AnisotropicIVF().search(queries)
    with pytest.raises(ValueError, match="corpus must not be empty"):
        AnisotropicIVF().index(torch.zeros(0, 16))
    nan_corpus = corpus.clone()
    nan_corpus[7, 1] = float("nan")
    with pytest.raises(ValueError, match="candidates"):
        AnisotropicIVF(leaves=8).index(nan_corpus)
    with pytest.raises(ValueError, match=r"tuning_queries must have the corpus's dimension 16, got shape \(3, 8\)"):
        AnisotropicIVF(leaves=8, target_recall=0.9, tuning_queries=queries[:3, :8]).index(corpus)
    with pytest.raises(FileNotFoundError, match="no index file"):
        AnisotropicIVF.load("/nonexistent/index.safetensors")
