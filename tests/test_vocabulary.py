"""Vocabulary: rows, OOV buckets, hashing and the saved form, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from twotower.vocabulary import Vocabulary, fnv1a_64


def fnv1a_64_by_hand(text: str) -> int:
    """FNV-1a, 64 bits, over the UTF-8 bytes (the published constants)."""
    value = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        value ^= byte
        value = (value * 0x100000001B3) % (1 << 64)
    return value


def test_len_and_to_list_agree_and_name_every_row() -> None:
    vocabulary = Vocabulary(["b", "a", "b"])
    assert len(vocabulary) == 3
    assert vocabulary.to_list() == ["[UNK]", "a", "b"]
    assert len(vocabulary.to_list()) == len(vocabulary)
    assert vocabulary.known_values() == ["a", "b"]
    assert vocabulary.num_values == 2
    # Each listed token looks up to its own row.
    assert vocabulary.lookup(["a", "b", "zzz"]).tolist() == [1, 2, 0]


def test_integer_ids_are_their_decimal_text() -> None:
    vocabulary = Vocabulary(np.array([30, 4, 200], dtype=np.int64))
    assert vocabulary.known_values() == ["200", "30", "4"]  # sorted as text
    assert vocabulary.lookup(np.array([4, 200, 7], dtype=np.int16)).tolist() == [3, 1, 0]
    assert vocabulary.lookup(["4", "30"]).tolist() == [3, 2]


@pytest.mark.parametrize("count", [5, 20_000])  # the binary search and the Arrow hash lookup
def test_lookup_matches_a_python_dictionary(count: int) -> None:
    rng = np.random.default_rng(0)
    values = [f"id{number}" for number in rng.choice(10 * count, size=count, replace=False)]
    vocabulary = Vocabulary(values)
    row_of = {value: row + 1 for row, value in enumerate(sorted(values))}
    queries = values[: count // 2] + [f"missing{number}" for number in range(count // 2)]
    rng.shuffle(queries)
    expected = [row_of.get(query, 0) for query in queries]
    assert vocabulary.lookup(queries).tolist() == expected
    assert vocabulary.lookup(pa.array(queries)).tolist() == expected


def test_fnv1a_matches_the_definition() -> None:
    texts = ["", "a", "foobar", "C123", "ünïcode", "x" * 300]
    assert fnv1a_64(pa.array(texts)).tolist() == [fnv1a_64_by_hand(text) for text in texts]
    # The published test vectors.
    assert fnv1a_64_by_hand("") == 0xCBF29CE484222325
    assert fnv1a_64_by_hand("a") == 0xAF63DC4C8601EC8C


@pytest.mark.parametrize("count", [3, 5_000])
def test_unknown_ids_spread_over_buckets_by_hash(count: int) -> None:
    vocabulary = Vocabulary(["known"], num_oov_buckets=7)
    unknown = [f"user-{number}" for number in range(count)]
    rows = vocabulary.lookup([*unknown, "known"])
    assert rows.tolist() == [fnv1a_64_by_hand(text) % 7 for text in unknown] + [7]
    assert len(vocabulary) == 8
    assert vocabulary.to_list() == ["[UNK]"] * 7 + ["known"]


def test_hashing_vocabulary_is_every_id_by_hash() -> None:
    vocabulary = Vocabulary.hashing(1000)
    ids = [str(number) for number in range(50)] + ["x", "y"]
    assert vocabulary.lookup(ids).tolist() == [fnv1a_64_by_hand(text) % 1000 for text in ids]
    assert len(vocabulary) == 1000
    assert vocabulary.num_values == 0
    with pytest.raises(ValueError, match="num_buckets must be an int >= 2"):
        Vocabulary.hashing(1)


def test_json_round_trip_and_the_old_plain_list() -> None:
    vocabulary = Vocabulary(["x", "y", "z"], num_oov_buckets=3)
    again = Vocabulary.from_json(vocabulary.to_json())
    assert again == vocabulary
    assert again.lookup(["z", "nope"]).tolist() == [5, fnv1a_64_by_hand("nope") % 3]
    # Runs saved before the buckets stored the known values as a plain list: one OOV row.
    old = Vocabulary.from_json(["b", "a"])
    assert old.to_list() == ["[UNK]", "a", "b"]


@pytest.mark.parametrize(
    ("values", "buckets", "error", "message"),
    [
        ([], 1, ValueError, "values must hold at least one value"),
        (["a\x00"], 1, ValueError, "values must not hold an id ending in a NUL character"),
        (["a"], 0, ValueError, "num_oov_buckets must be >= 1"),
        (["a"], True, TypeError, "num_oov_buckets must be an int"),
    ],
)
def test_bad_vocabularies_are_refused_by_name(values: list[str], buckets: int, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        Vocabulary(values, num_oov_buckets=buckets)
