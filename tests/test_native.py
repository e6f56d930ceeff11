"""The native selection kernel: build, fallback, and exactness of the bfloat16 screen."""

from __future__ import annotations

import subprocess
import sys

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
