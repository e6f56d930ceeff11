"""Exact indexes against a brute-force numpy reference (full score matrix, stable argsort)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower import BruteForce, Streaming, _topk
from twotower.indexes import TopK

pytestmark = pytest.mark.usefixtures("selection_backend")


def _integer_data(n: int, nq: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small-integer embeddings: every dot product is exact in float32, and ties are frequent."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(-3, 4, size=(n, d)).astype(np.float32),
        rng.integers(-3, 4, size=(nq, d)).astype(np.float32),
    )


def _reference(
    corpus: np.ndarray, queries: np.ndarray, k: int, excluded_rows: list[set[int]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.int64) @ corpus.T.astype(np.int64)
    top_scores, top_rows = [], []
    for i in range(queries.shape[0]):
        rows = [j for j in range(corpus.shape[0]) if excluded_rows is None or j not in excluded_rows[i]]
        # Descending score, then ascending row: np.lexsort sorts by the last key first.
        order = np.lexsort((np.array(rows), -scores[i, rows]))[:k]
        top_rows.append(np.array(rows)[order])
        top_scores.append(scores[i, np.array(rows)[order]])
    return np.array(top_scores, dtype=np.float64), np.array(top_rows)


class Batches:
    """A re-iterable dataset of (ids, embeddings) batches."""

    def __init__(self, ids: np.ndarray, embeddings: np.ndarray, batch: int) -> None:
        self.ids, self.embeddings, self.batch = ids, embeddings, batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for start in range(0, len(self.ids), self.batch):
            yield self.ids[start : start + self.batch], torch.as_tensor(self.embeddings[start : start + self.batch])


def _build(kind: str, corpus: np.ndarray, ids: np.ndarray) -> TopK:
    if kind == "brute_force":
        return BruteForce().index(torch.as_tensor(corpus), ids)
    return Streaming().index_from_dataset(Batches(ids, corpus, batch=997))


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
@pytest.mark.parametrize("k", [1, 7, 100, 1000])
@pytest.mark.parametrize("ids_kind", ["int", "str"])
def test_top_k_matches_reference_with_ties(kind: str, k: int, ids_kind: str) -> None:
    corpus, queries = _integer_data(n=9000, nq=600, d=5, seed=k)
    ids = np.arange(9000) * 3 + 11 if ids_kind == "int" else np.array([f"item-{i}" for i in range(9000)])
    index = _build(kind, corpus, ids)
    scores, got = index(torch.as_tensor(queries), k=k)
    expected_scores, expected_rows = _reference(corpus, queries, k)
    np.testing.assert_array_equal(scores.numpy(), expected_scores)
    got_np = got.numpy() if isinstance(got, torch.Tensor) else got
    np.testing.assert_array_equal(got_np, ids[expected_rows])


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
def test_random_float_data_matches_float64_ranking(kind: str) -> None:
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(20000, 16)).astype(np.float32)
    queries = rng.normal(size=(300, 16)).astype(np.float32)
    index = _build(kind, corpus, np.arange(20000))
    scores, rows = index(torch.as_tensor(queries), k=50)
    reference = queries.astype(np.float64) @ corpus.T.astype(np.float64)
    expected = np.argsort(-reference, axis=1, kind="stable")[:, :50]
    # Float32 rounding may swap near-equal neighbours only.
    assert np.mean(rows.numpy() == expected) > 0.999
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(reference, expected, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
def test_exclusions_match_reference(kind: str) -> None:
    corpus, queries = _integer_data(n=3000, nq=50, d=4, seed=5)
    ids = np.arange(3000) + 100
    rng = np.random.default_rng(1)
    excluded = [rng.choice(3000, size=rng.integers(0, 40), replace=False) for _ in range(50)]
    # Ragged list of ids, with unknown ids (ignored) mixed in.
    exclusions = [np.concatenate([ids[rows], [-5, 99999]]) for rows in excluded]
    index = _build(kind, corpus, ids)
    scores, got = index.query_with_exclusions(torch.as_tensor(queries), exclusions, k=20)
    expected_scores, expected_rows = _reference(corpus, queries, 20, [set(rows.tolist()) for rows in excluded])
    np.testing.assert_array_equal(scores.numpy(), expected_scores)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), ids[expected_rows])


def test_exclusions_as_padded_tensor_and_string_ids() -> None:
    corpus = torch.tensor([[3.0], [2.0], [1.0], [0.0]])
    index = BruteForce(k=2).index(corpus, ["a", "b", "c", "d"])
    scores, got = index.query_with_exclusions(torch.tensor([[1.0], [1.0]]), np.array([["a", ""], ["b", "c"]]))
    np.testing.assert_array_equal(got, [["b", "c"], ["a", "d"]])
    np.testing.assert_array_equal(scores.numpy(), [[2.0, 1.0], [3.0, 0.0]])


def test_excluding_more_than_the_corpus_leaves_empty_slots() -> None:
    index = BruteForce().index(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([10, 11, 12]))
    scores, got, rows = index.query_rows(torch.tensor([[1.0]]), k=3, exclusions=torch.tensor([[12, 10]]))
    assert scores[0, 0] == 2.0
    assert got[0, 0] == 11
    # Excluded candidates never come back: the slots past the remaining candidate are empty (row -1, -inf).
    assert rows[0].tolist() == [1, -1, -1]
    assert torch.isneginf(scores[0, 1:]).all()


def test_duplicate_ids_are_separate_rows_and_excluded_together() -> None:
    index = BruteForce().index(torch.tensor([[3.0], [2.0], [1.0]]), torch.tensor([7, 8, 7]))
    _, got = index(torch.tensor([[1.0]]), k=3)
    assert got.tolist() == [[7, 8, 7]]
    _, got = index.query_with_exclusions(torch.tensor([[1.0]]), [[7]], k=1)
    assert got.tolist() == [[8]]


def test_k_larger_than_corpus_is_clamped_and_default_k() -> None:
    index = BruteForce(k=2).index(torch.eye(3))
    scores, _ = index(torch.ones(1, 3))
    assert scores.shape == (1, 2)
    scores, _ = index(torch.ones(1, 3), k=50)
    assert scores.shape == (1, 3)


def test_query_model_is_applied() -> None:
    tower = torch.nn.Embedding(5, 2)
    with torch.no_grad():
        tower.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    index = BruteForce(query_model=tower).index(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), ["x", "y"])
    _, got = index(torch.tensor([0, 1, 4]), k=1)
    np.testing.assert_array_equal(got, [["x"], ["y"], ["x"]])


def test_index_from_dataset_plain_batches_get_positions() -> None:
    corpus, queries = _integer_data(50, 3, 3, seed=2)
    index = BruteForce().index_from_dataset([torch.as_tensor(corpus[:20]), torch.as_tensor(corpus[20:])])
    _, got = index(torch.as_tensor(queries), k=5)
    np.testing.assert_array_equal(got.numpy(), _reference(corpus, queries, 5)[1])


@pytest.mark.parametrize("ids", [None, np.array([f"id{i}" for i in range(6)]), np.arange(6) * 1000])
def test_save_load_round_trip(tmp_path: Path, ids: np.ndarray | None) -> None:
    corpus = torch.randn(6, 4)
    index = BruteForce(k=3).index(corpus, ids)
    path = tmp_path / "sub" / "index.safetensors"
    index.save(path)
    loaded = BruteForce.load(path)
    assert loaded.k == 3
    torch.testing.assert_close(loaded.candidates, corpus, rtol=0, atol=0)
    queries = torch.randn(2, 4)
    before, after = index(queries), loaded(queries)
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(before[1]), np.asarray(after[1]))
    assert [p.name for p in path.parent.iterdir()] == ["index.safetensors"]


def test_load_refuses_corrupt_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "index.safetensors"
    BruteForce().index(torch.randn(100, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        BruteForce.load(corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a valid twotower index"):
        BruteForce.load(truncated)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a twotower BruteForce index"):
        BruteForce.load(foreign)
    with pytest.raises(FileNotFoundError, match="no index file"):
        BruteForce.load(tmp_path / "missing.safetensors")


def test_a_changed_setting_in_the_header_is_refused(tmp_path: Path) -> None:
    """The header's settings (k here) are inside the checksum: a bit flip there used to change k silently."""
    path = tmp_path / "index.safetensors"
    BruteForce(k=100).index(torch.randn(50, 4)).save(path)
    data = path.read_bytes()
    assert data.count(b'"k":"100"') == 1
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data.replace(b'"k":"100"', b'"k":"108"'))
    with pytest.raises(ValueError, match="corrupt"):
        BruteForce.load(flipped)
    # A file whose checksum holds but whose settings are malformed (written by another tool) is refused by name.
    from twotower.indexes.files import save_index_file

    malformed = tmp_path / "malformed.safetensors"
    save_index_file(malformed, "twotower.BruteForce", {"candidates": torch.zeros(2, 2)}, {"k": "1e9"})
    with pytest.raises(ValueError, match="k is '1e9', not a whole number"):
        BruteForce.load(malformed)


class TestBadInput:
    def test_query_before_index(self) -> None:
        with pytest.raises(RuntimeError, match="has not been built"):
            BruteForce()(torch.randn(2, 3))
        with pytest.raises(RuntimeError, match="has not been built"):
            Streaming()(torch.randn(2, 3))

    def test_dimension_mismatch(self) -> None:
        index = BruteForce().index(torch.randn(5, 3))
        with pytest.raises(ValueError, match="dimension 4 but the index holds 3-d"):
            index(torch.randn(2, 4))

    @pytest.mark.parametrize("k", [0, -1, 2.5, True])
    def test_bad_k(self, k: object) -> None:
        index = BruteForce().index(torch.randn(5, 3))
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index(torch.randn(2, 3), k=k)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="k must be a positive integer"):
            BruteForce(k=k)  # type: ignore[arg-type]

    def test_empty_corpus(self) -> None:
        with pytest.raises(ValueError, match="must not be empty"):
            BruteForce().index(torch.zeros(0, 3))
        with pytest.raises(ValueError, match="must not be empty"):
            Streaming().index_from_dataset([])

    def test_non_finite(self) -> None:
        with pytest.raises(ValueError, match="candidates contains 1 non-finite"):
            BruteForce().index(torch.tensor([[1.0, float("nan")]]))
        index = BruteForce().index(torch.randn(5, 2))
        with pytest.raises(ValueError, match="queries contains"):
            index(torch.tensor([[float("inf"), 0.0]]))

    def test_ids_length_and_kind(self) -> None:
        with pytest.raises(ValueError, match="identifiers must have 5 entries"):
            BruteForce().index(torch.randn(5, 2), torch.arange(4))
        with pytest.raises(TypeError, match="identifiers must hold integers or strings"):
            BruteForce().index(torch.randn(2, 2), torch.tensor([0.5, 1.5]))
        index = BruteForce().index(torch.randn(3, 2), ["a", "b", "c"])
        with pytest.raises(TypeError, match="exclusions must hold strings"):
            index.query_with_exclusions(torch.randn(1, 2), [[1, 2]])
        with pytest.raises(ValueError, match="one row per query"):
            index.query_with_exclusions(torch.randn(2, 2), [["a"]])

    def test_streaming_dataset_that_changes_is_refused(self) -> None:
        batches = [torch.randn(4, 2), torch.randn(3, 2)]
        index = Streaming().index_from_dataset(batches)
        batches.append(torch.randn(2, 2))
        with pytest.raises(ValueError, match="dataset changed"):
            index(torch.randn(1, 2))


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
def test_few_queries_use_wide_pieces_with_the_same_results(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of few queries scans the corpus in wider pieces (capped by _MAX_PIECE, made small here so that
    several pieces, one partial, cover the corpus). The cached converted corpus of a BruteForce serves batches
    of any size; results equal the reference for 1, 3 and 600 queries in turn, with exclusions."""
    monkeypatch.setattr(_topk, "_MAX_PIECE", 2500)
    corpus, queries = _integer_data(n=9000, nq=600, d=5, seed=21)
    ids = np.arange(9000)
    index = _build(kind, corpus, ids)
    rng = np.random.default_rng(2)
    for count in (1, 3, 600, 1):
        block = queries[:count]
        excluded = [rng.choice(9000, size=30, replace=False) for _ in range(count)]
        scores, got = index.query_with_exclusions(torch.as_tensor(block), excluded, k=40)
        expected_scores, expected_rows = _reference(corpus, block, 40, [set(rows.tolist()) for rows in excluded])
        np.testing.assert_array_equal(scores.numpy(), expected_scores)
        np.testing.assert_array_equal(np.asarray(got), ids[expected_rows])


def _check_against_float64(
    corpus: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray, rows: np.ndarray
) -> None:
    """The returned rows are a true top-k up to float32 rounding, and their scores are the float64 scores rounded.

    Float32 dot products carry a relative error of at most ``d * 2^-24`` of ``|q| |c|``; anything inside that
    tolerance may swap, anything outside it may not. Scores beyond float32's range are reported as +-inf.
    """
    truth = queries.astype(np.float64) @ corpus.astype(np.float64).T
    tolerance = 4 * queries.shape[1] * 2.0**-24 * np.linalg.norm(queries.astype(np.float64), axis=1)
    tolerance *= np.linalg.norm(corpus.astype(np.float64), axis=1).max()
    assert (rows >= 0).all(), "every slot holds a real candidate when k <= n"
    for i in range(queries.shape[0]):
        assert len(set(rows[i].tolist())) == k
        kth_true = np.sort(truth[i])[::-1][k - 1]
        returned = truth[i, rows[i]]
        assert returned.min() >= kth_true - tolerance[i], f"row {i}: a candidate outside the true top {k}"
        assert (np.diff(returned) <= tolerance[i]).all(), f"row {i}: not in descending true order"
        with np.errstate(over="ignore"):
            expected = returned.astype(np.float32)
        finite = np.isfinite(expected)
        np.testing.assert_array_equal(np.isinf(scores[i]), ~finite)
        np.testing.assert_array_equal(np.sign(scores[i][~finite]), np.sign(expected[~finite]))
        # Rounding to float32 once more (and subnormal spacing 2^-149) on top of the ranking tolerance.
        error = np.abs(scores[i][finite].astype(np.float64) - returned[finite])
        assert (error <= tolerance[i] + 2.0**-149 + 2.0**-23 * np.abs(returned[finite])).all()


def test_tiny_embeddings_are_ranked_exactly() -> None:
    """AMX flushes float32 subnormal products to zero: at 1e-20 the bfloat16 screen used to miss the true top-k."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 32, generator=generator) * 1e-20
    corpus = torch.randn(5000, 32, generator=generator) * 1e-20
    scores, rows = BruteForce(k=3).index(corpus)(queries)
    truth = queries.double() @ corpus.double().T
    np.testing.assert_array_equal(rows.numpy(), torch.topk(truth, 3).indices.numpy())
    _check_against_float64(corpus.numpy(), queries.numpy(), 3, scores.numpy(), rows.numpy())


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query_exponent=st.floats(min_value=-30, max_value=30),
    corpus_exponent=st.floats(min_value=-30, max_value=30),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_exact_for_every_magnitude(kind: str, query_exponent: float, corpus_exponent: float, seed: int) -> None:
    """Magnitudes 1e-30..1e30 for queries and corpus independently: products from 1e-60 (below float32's
    subnormals) to 1e60 (above its largest value), ranked as float64 ranks them."""
    rng = np.random.default_rng(seed)
    queries = (rng.normal(size=(7, 24)) * 10.0**query_exponent).astype(np.float32)
    corpus = (rng.normal(size=(4500, 24)) * 10.0**corpus_exponent).astype(np.float32)
    index = _build(kind, corpus, np.arange(4500))
    scores, rows = index(torch.as_tensor(queries), k=10)
    _check_against_float64(corpus, queries, 10, scores.numpy(), rows.numpy())


def test_overflowing_scores_keep_their_ids() -> None:
    """Float32 dot products that overflow used to come back as -inf with id -1 although k <= n."""
    corpus = torch.tensor([[1e30, 1e30], [-1e30, -1e30], [2e30, 0.0]])
    scores, ids, rows = BruteForce(k=3).index(corpus, torch.tensor([5, 6, 7])).query_rows(torch.tensor([[1e30, 1e30]]))
    assert rows.tolist() == [[0, 2, 1]]
    assert ids.tolist() == [[5, 7, 6]]
    assert scores[0].tolist() == [float("inf"), float("inf"), float("-inf")]


def test_float64_scores_below_float32_range_never_bring_back_an_excluded_id() -> None:
    """The old exclusion marker was float32's lowest value: float64 scores below it ranked under an excluded id."""
    corpus = torch.tensor([[1e300], [2e300], [3e300]], dtype=torch.float64)
    index = BruteForce(k=2).index(corpus, ["a", "b", "c"])
    scores, ids = index.query_with_exclusions(torch.tensor([[-1.0]], dtype=torch.float64), [["a"]], k=2)
    assert ids.tolist() == [["b", "c"]]
    np.testing.assert_array_equal(scores.numpy(), [[-2e300, -3e300]])


@pytest.mark.parametrize("kind", ["brute_force", "streaming"])
def test_zero_dimensional_embeddings_are_refused(kind: str) -> None:
    index = BruteForce() if kind == "brute_force" else Streaming()
    with pytest.raises(ValueError, match="candidates must have at least one embedding dimension"):
        index.index(torch.zeros(300, 0))


def test_reindexing_while_querying_is_atomic() -> None:
    """Eight threads query while another re-indexes between two corpora of different sizes and ids: every answer
    is one corpus's exact answer, whole (ids of one corpus never come with the scores of the other)."""
    rng = np.random.default_rng(3)
    corpora = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3000, 1700)]
    id_sets = [np.arange(n) + offset for n, offset in ((3000, 0), (1700, 10_000))]
    queries = rng.normal(size=(4, 8)).astype(np.float32)
    expected = []
    for corpus, ids in zip(corpora, id_sets, strict=True):
        scores, rows = BruteForce(k=5).index(torch.as_tensor(corpus))(torch.as_tensor(queries))
        expected.append((ids[rows.numpy()], scores.numpy()))
    index = BruteForce(k=5).index(torch.as_tensor(corpora[0]), id_sets[0])
    stop = threading.Event()
    wrong: list[str] = []
    answers = [0]

    def query() -> None:
        while not stop.is_set():
            try:
                scores, ids = index(torch.as_tensor(queries))
            except Exception as error:  # any exception is a wrong answer here
                wrong.append(repr(error))
                continue
            if not any(
                np.array_equal(ids.numpy(), want_ids) and np.array_equal(scores.numpy(), want_scores)
                for want_ids, want_scores in expected
            ):
                wrong.append(f"mixed answer {ids.numpy()[0]}")
            answers[0] += 1

    threads = [threading.Thread(target=query) for _ in range(8)]
    for thread in threads:
        thread.start()
    swaps, deadline = 0, time.monotonic() + 30
    while (answers[0] < 400 or swaps < 50) and time.monotonic() < deadline:
        swaps += 1
        index.index(torch.as_tensor(corpora[swaps % 2]), id_sets[swaps % 2])
    stop.set()
    for thread in threads:
        thread.join()
    assert answers[0] >= 400
    assert swaps >= 50
    assert wrong == []
