"""Ids: encoding (integers, integral floats, strings), per-query membership and the id table, against Python."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twotower.ids import IdTable, encode_ids, per_query_ids, per_query_membership


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_integral_floats_are_integer_ids(dtype: type) -> None:
    # TFRS's own index tests use np.arange(n).astype(np.float32) as identifiers.
    values = np.array([3.0, -1.0, 2**24, 0.0], dtype=dtype)
    encoded = encode_ids(values, "ids")
    assert encoded.values.dtype == np.int64
    assert encoded.values.tolist() == [3, -1, 2**24, 0]
    from_tensor = encode_ids(torch.as_tensor(values), "ids")
    assert from_tensor.values.tolist() == [3, -1, 2**24, 0]
    assert from_tensor.codes.tolist() == [3, -1, 2**24, 0]
    assert encode_ids([1.0, 2.0], "ids").values.tolist() == [1, 2]


@pytest.mark.parametrize("bad", [[0.5, 1.0], [float("nan")], [float("inf")], [2.0**60]])
def test_floats_that_are_not_exact_integers_are_refused_by_name(bad: list[float]) -> None:
    with pytest.raises(TypeError, match="candidate_ids must hold integers or strings"):
        encode_ids(np.array(bad), "candidate_ids")
    with pytest.raises(TypeError, match="candidate_ids must hold integers or strings"):
        encode_ids(torch.tensor(bad, dtype=torch.float64), "candidate_ids")


def test_string_codes_are_equal_exactly_when_the_strings_are() -> None:
    rng = np.random.default_rng(0)
    strings = [f"item-{value}" for value in rng.integers(0, 30, size=200)]
    codes = encode_ids(strings, "ids").codes.tolist()
    for i in range(0, 200, 7):
        for j in range(200):
            assert (codes[i] == codes[j]) == (strings[i] == strings[j])


def test_an_encoded_value_is_not_encoded_again() -> None:
    encoded = encode_ids(["a", "b", "a"], "ids")
    assert encode_ids(encoded, "ids") is encoded
    with pytest.raises(ValueError, match="ids must have 2 entries, got 3"):
        encode_ids(encoded, "ids", 2)


def _membership_by_hand(ids: np.ndarray, owned: list[np.ndarray]) -> np.ndarray:
    rows = [ids] * len(owned) if ids.ndim == 1 else list(ids)
    return np.array(
        [[value in set(own.tolist()) for value in row.tolist()] for row, own in zip(rows, owned, strict=False)]
    )


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("strings", [True, False])
def test_per_query_membership_matches_sets(shared: bool, strings: bool) -> None:
    rng = np.random.default_rng(1 + shared + 2 * strings)
    num_queries, width = 7, 11
    ids = rng.integers(0, 15, size=width if shared else (num_queries, width))
    owned = [rng.integers(0, 15, size=int(rng.integers(0, 6))) for _ in range(num_queries)]
    if strings:
        ids, owned = ids.astype(str), [row.astype(str) for row in owned]
    found = per_query_membership(ids, owned)
    assert found.shape == (num_queries, width)
    np.testing.assert_array_equal(found, _membership_by_hand(ids, owned))


def test_per_query_ids_accepts_integral_floats_and_refuses_booleans() -> None:
    rows = per_query_ids(np.array([[1.0, 2.0], [3.0, 4.0]]), 2, "positive_ids")
    assert [row.tolist() for row in rows] == [[1, 2], [3, 4]]
    with pytest.raises(TypeError, match="positive_ids must hold ids"):
        per_query_ids(torch.ones(2, 2, dtype=torch.bool), 2, "positive_ids")
    with pytest.raises(TypeError, match="positive_ids must hold integers or strings"):
        per_query_ids([[0.5], [1.0]], 2, "positive_ids")


def test_excluded_rows_are_each_row_once_per_query() -> None:
    table = IdTable(np.array([5, 6, 5, 7]))
    rows = table.excluded_rows([[5, 5, 5, 99], [7]], 2).numpy()
    assert sorted(rows[0][rows[0] >= 0].tolist()) == [0, 2]
    assert rows[1][rows[1] >= 0].tolist() == [3]
