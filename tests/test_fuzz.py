"""The fuzzer of tests/fuzzing.py with a fixed budget: every case over every public entry point is either answered
exactly as numpy answers it, or refused with a ValueError/TypeError that names the bad argument.

benchmarks/fuzz.py runs the same cases at a larger budget, in child processes (so a crash is counted, not fatal),
and prints the table."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import ENTRIES, Entry, file_entries, run_case

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[test]')")

_FILES = file_entries(Path(__import__("tempfile").mkdtemp(prefix="twotower-fuzz-")))


def _check(entry: Entry, seed: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome, case, detail = run_case(entry, seed)
    assert outcome in ("correct", "clear error"), f"seed {seed}: {outcome}, {case.corrupted} ({case.how}): {detail}"


@pytest.mark.parametrize("entry", [*ENTRIES, *_FILES], ids=lambda entry: entry.name)
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_every_case_is_answered_exactly_or_refused_by_name(entry: Entry, seed: int) -> None:
    _check(entry, seed)


def test_the_fuzzer_sees_bad_answers() -> None:
    """The harness itself can fail: a check against numpy rejects a wrong answer, and a bad argument accepted
    silently is classified as such."""
    from fuzzing import IndexQuery, MismatchError

    entry = IndexQuery("BruteForce")
    for seed in range(50):
        case = entry.draw(__import__("numpy").random.default_rng(seed))
        if case.corrupted is None and case.arguments["queries"].shape[0] and case.arguments["k"] > 1:
            scores, ids, rows = entry.call(case)
            with pytest.raises(MismatchError):
                entry.check(case, (scores, ids, rows.flip(1)))  # right rows, wrong order
            return
    pytest.fail("no valid case with several results among the first 50 seeds")
