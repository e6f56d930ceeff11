"""The native selection kernel: build, fallback, and exactness of the bfloat16 screen."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower import BruteForce, _native, _topk


def test_kernel_builds_where_a_compiler_exists() -> None:
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert _native.load() is not None


def test_disabled_kernel_falls_back_to_torch() -> None:
    code = (
        "import os, torch; os.environ['TWOTOWER_NATIVE'] = '0'\n"
        "from twotower import _native, _topk\n"
        "assert _native.load() is None\n"
        "assert _topk.search_mode(torch.zeros(2, 3)) == 'torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pair_scores_match_float64() -> None:
    kernel = _native.load()
    if kernel is None:
        pytest.skip("native kernel unavailable")
    generator = torch.Generator().manual_seed(0)
    for d in (1, 7, 16, 64, 100):
        queries, candidates = torch.randn(300, d, generator=generator), torch.randn(300, d, generator=generator)
        got = _native.pair_scores(kernel, queries, candidates)
        expected = (queries.double() * candidates.double()).sum(1)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_screen_is_exact_on_near_duplicates(seed: int) -> None:
    """Candidates that differ far below bfloat16's resolution: the screen cannot tell them apart, the exact
    rescoring must. The result must equal the ranking of the search's own float32 scores, bit for bit."""
    if _native.load() is None or not _native.bf16_matrix_units():
        pytest.skip("the screened path is not taken on this machine")
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(50, 32, generator=generator)
    candidates = (base.repeat(80, 1) + 1e-4 * torch.randn(4000, 32, generator=generator)) * 3.0
    queries = torch.randn(64, 32, generator=generator)
    assert _topk.search_mode(queries) == "screen"
    scores, got = BruteForce().index(candidates)(queries, k=60)
    # Every pair scored with the same arithmetic; reference order: score descending, position ascending.
    all_scores = (
        _topk.pair_scores(queries.repeat_interleave(4000, dim=0), candidates.repeat(64, 1)).view(64, 4000).numpy()
    )
    for row in range(64):
        order = np.lexsort((np.arange(4000), -all_scores[row]))[:60]
        np.testing.assert_array_equal(got[row].numpy(), order)
        np.testing.assert_array_equal(scores[row].numpy(), all_scores[row, order])


def _softmax_rows_or_skip(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    statistics = _native.softmax_rows(logits)
    if statistics is None:
        pytest.skip("the vectorised softmax kernel is not built on this machine")
    return statistics


@pytest.mark.parametrize("width", [1, 15, 16, 17, 64, 1000, 1027])
def test_softmax_rows_match_float64(width: int) -> None:
    """Row maxima exactly, exp(l - max) within a few ulp, sums within float32 summation error: against numpy
    in float64, over logits spanning the whole range where exp is normal and beyond (masked entries at the
    lowest float32, a row of them, and entries more than 87.34 below the row's maximum, which give 0)."""
    rng = np.random.default_rng(width)
    logits = rng.normal(scale=30.0, size=(9, width)).astype(np.float32)
    logits[1] = np.float32(np.finfo(np.float32).min)  # a fully masked row: every term is exp(0)
    logits[2, ::3] = np.finfo(np.float32).min
    logits[3, 0] = 200.0  # every other entry of the row falls below exp's normal range
    tensor = torch.from_numpy(logits.copy())
    maxima, sums = _softmax_rows_or_skip(tensor)
    expected_max = logits.max(axis=1)
    # The difference is rounded to float32 as in torch's sub; exp of it is then compared in float64.
    shifted = (logits - expected_max[:, None]).astype(np.float64)
    expected_exp = np.where(shifted < -87.33654475, 0.0, np.exp(shifted))
    np.testing.assert_array_equal(maxima.numpy(), expected_max)
    np.testing.assert_allclose(tensor.numpy(), expected_exp, rtol=4e-7, atol=0)
    np.testing.assert_allclose(sums.numpy(), expected_exp.sum(axis=1), rtol=2e-6)
    assert sums[1] == width
    assert sums[3] == 1.0


def test_softmax_rows_propagate_nan_and_respect_strides() -> None:
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(5))
    logits[2, 33] = float("nan")
    block = torch.full((4, 50), 7.0)
    block[:, :40] = logits
    view = block[:, :40]  # rows 50 apart: the last 10 columns of each row are not the block's
    maxima, sums = _softmax_rows_or_skip(view)
    assert torch.isnan(sums[2])
    assert torch.isfinite(sums[[0, 1, 3]]).all()
    assert torch.equal(block[:, 40:], torch.full((4, 10), 7.0))
    rows = [0, 1, 3]
    expected = torch.exp((logits[rows] - logits[rows].amax(1, keepdim=True)).double())
    torch.testing.assert_close(view[rows].double(), expected, rtol=4e-7, atol=0)
    torch.testing.assert_close(maxima[rows], logits[rows].amax(1))


def test_softmax_rows_decline_what_they_cannot_take() -> None:
    for logits in (torch.randn(3, 20, dtype=torch.float64), torch.randn(20, 3).T):
        before = logits.clone()
        assert _native.softmax_rows(logits) is None
        assert torch.equal(logits, before)


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache for one test; the suite's own cached kernel is reloaded afterwards."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    root = tmp_path / "cache"
    monkeypatch.setenv("TWOTOWER_CACHE", str(root))
    _native.load.cache_clear()
    yield root
    _native.load.cache_clear()


def _library(root: Path) -> Path:
    (found,) = (root / "native").glob("*/libtwotower.so")
    return found


def _search_matches_torch() -> None:
    corpus, queries = torch.randn(3000, 16), torch.randn(5, 16)
    _, rows = BruteForce(k=7).index(corpus)(queries)
    expected = torch.topk(queries.double() @ corpus.double().T, 7)
    np.testing.assert_array_equal(rows.numpy(), expected.indices.numpy())


def test_cache_folders_are_private_whatever_the_umask(fresh_cache: Path) -> None:
    previous = os.umask(0)
    try:
        assert _native.load() is not None
    finally:
        os.umask(previous)
    library = _library(fresh_cache)
    for folder in (fresh_cache, fresh_cache / "native", library.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE(library.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("level", ["root", "native", "key"])
def test_a_folder_others_can_write_is_refused_with_the_torch_fallback(fresh_cache: Path, level: str) -> None:
    assert _native.load() is not None
    library = _library(fresh_cache)
    folder = {"root": fresh_cache, "native": fresh_cache / "native", "key": library.parent}[level]
    folder.chmod(0o777)
    _native.load.cache_clear()
    with pytest.warns(UserWarning, match="writable by group or others"):
        assert _native.load() is None
    _search_matches_torch()


def test_a_folder_of_another_user_is_refused(fresh_cache: Path) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    fresh_cache.mkdir(mode=0o700)
    os.chown(fresh_cache, 65534, 65534)
    with pytest.warns(UserWarning, match="belongs to another user"):
        assert _native.load() is None
    assert not (fresh_cache / "native").exists()


def test_a_changed_library_is_rebuilt_not_loaded(fresh_cache: Path) -> None:
    assert _native.load() is not None
    library = _library(fresh_cache)
    original = library.read_bytes()
    library.write_bytes(original[: len(original) // 2])  # what a planted or truncated library looks like
    _native.load.cache_clear()
    assert _native.load() is not None
    assert library.read_bytes() == original
    _search_matches_torch()


def test_a_library_without_the_kernels_falls_back_to_torch(fresh_cache: Path, tmp_path: Path) -> None:
    assert _native.load() is not None
    library = _library(fresh_cache)
    source = tmp_path / "empty.c"
    source.write_text("int twotower_unrelated(void) { return 1; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    library.chmod(0o700)
    digest = library.with_name(library.name + ".sha256")
    digest.write_text(hashlib.sha256(library.read_bytes()).hexdigest())  # it passes the checksum ...
    _native.load.cache_clear()
    with pytest.warns(UserWarning, match="lacks a kernel function"):
        assert _native.load() is None  # ... but not the symbol check
    _search_matches_torch()


@pytest.mark.parametrize("width", [1, 16, 17, 1027])
def test_softmax_gradient_rows_match_float64(width: int) -> None:
    """exp(l - n) * s in one pass, against numpy in float64: within a few ulp, 0 far below exp's normal range,
    NaN propagated, and only the view's columns written."""
    rng = np.random.default_rng(width)
    logits = rng.normal(scale=10.0, size=(6, width)).astype(np.float32)
    log_normalisers = (logits.max(axis=1) + rng.uniform(0, 3, size=6)).astype(np.float32)
    logits[1, 0] = np.finfo(np.float32).min  # far below the normaliser: exactly 0
    scales = rng.uniform(-2, 2, size=6).astype(np.float32)
    block = torch.full((6, width + 5), 7.0)
    block[:, :width] = torch.from_numpy(logits)
    view = block[:, :width]
    if not _native.softmax_gradient_rows(view, torch.from_numpy(log_normalisers), torch.from_numpy(scales)):
        pytest.skip("the vectorised softmax kernel is not built on this machine")
    shifted = (logits - log_normalisers[:, None]).astype(np.float64)
    expected = np.where(shifted < -87.33654475, 0.0, np.exp(shifted)) * scales[:, None]
    np.testing.assert_allclose(view.numpy(), expected, rtol=6e-7, atol=1e-30)
    assert view[1, 0] == 0.0
    assert torch.equal(block[:, width:], torch.full((6, 5), 7.0))
    nan_row = torch.full((1, width), float("nan"))
    assert _native.softmax_gradient_rows(nan_row, torch.zeros(1), torch.ones(1))
    assert torch.isnan(nan_row).all()


def test_softmax_kernel_exp_is_exact_up_to_overflow() -> None:
    """Arguments the losses never pass (they are at most 0) still get exp: up to float32's largest result
    (exp(88.7) is 3.3e38) within a few ulp of float64, inf beyond, in the vector lanes and the scalar tail."""
    arguments = np.array([-80.0, -1.0, 0.0, 1.5, 50.0, 87.9, 88.2, 88.5, 88.7, 88.8, 100.0, 1e30], dtype=np.float32)
    row = torch.from_numpy(np.tile(arguments, 3)[None, :].copy())  # 36 columns: full vectors and a tail
    if not _native.softmax_gradient_rows(row, torch.zeros(1), torch.ones(1)):
        pytest.skip("the vectorised softmax kernel is not built on this machine")
    with np.errstate(over="ignore"):
        expected = np.exp(np.tile(arguments, 3).astype(np.float64)).astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(row.numpy()[0][finite], expected[finite], rtol=6e-7)
    assert (~finite).sum() == 9
    assert np.isinf(row.numpy()[0][~finite]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1, 16, 37, 1027])
def test_softmax_rows_bf16_match_float64(dtype: torch.dtype, width: int) -> None:
    """Row maxima exactly, sums of the unrounded exponentials within float32 summation error, and the kept
    exponentials equal to float64's exp(l - max) rounded to nearest bfloat16 (one rounding step apart at most,
    for values the float32 exp puts on the other side of a rounding boundary); bf16 logits are overwritten."""
    rng = np.random.default_rng(width)
    values = rng.normal(scale=8.0, size=(5, width)).astype(np.float32)
    logits = torch.from_numpy(values).to(dtype)
    exact = logits.double().numpy()  # the values the kernel reads (bf16 widening is exact)
    result = _native.softmax_rows_bf16(logits)
    if result is None:
        pytest.skip("the vectorised softmax kernel is not built on this machine")
    maxima, sums, exponentials = result
    assert exponentials.dtype == torch.bfloat16
    assert (exponentials.data_ptr() == logits.data_ptr()) == (dtype == torch.bfloat16)
    expected = np.exp(exact - exact.max(axis=1, keepdims=True))
    np.testing.assert_array_equal(maxima.numpy(), exact.max(axis=1).astype(np.float32))
    np.testing.assert_allclose(sums.numpy(), expected.sum(axis=1), rtol=2e-6)
    rounded = torch.from_numpy(expected).to(torch.bfloat16).double().numpy()
    np.testing.assert_allclose(exponentials.double().numpy(), rounded, rtol=2**-7, atol=0)
    assert (exponentials.double().numpy() == rounded).mean() > 0.99
