"""prepare_interactions: vocabulary rows, counts and seen items, checked against plain Python on small logs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from twotower.data import Interactions, split_interactions
from twotower.pipeline import prepare_interactions


def _fnv1a_64(text: str) -> int:
    value = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        value = ((value ^ byte) * 0x100000001B3) % (1 << 64)
    return value


@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("ids", ["strings", "dense integers", "sparse integers"])
def test_rows_counts_and_seen_items_match_python(ids: str, buckets: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from twotower.data import _chunks

    monkeypatch.setattr(_chunks, "CHUNK", 97)  # seen pairs deduplicated across chunk boundaries
    rng = np.random.default_rng(7)
    n = 3_000
    users, items = rng.integers(0, 300, n), rng.integers(0, 80, n)
    if ids == "sparse integers":
        users, items = users * 10**12 - 5 * 10**14, items * 987_654_321_123
    user_column = pa.array([f"u{u}" for u in users]) if ids == "strings" else pa.array(users)
    item_column = pa.array([f"i{i}" for i in items]) if ids == "strings" else pa.array(items)
    times = rng.integers(1_600_000_000, 1_700_000_000, n)
    log = Interactions.from_arrow(pa.table({"u": user_column, "i": item_column, "t": times}), "u", "i", time_col="t")
    split = split_interactions(log, "time", test_fraction=0.2, validation_fraction=0.1)
    prepared = prepare_interactions(log, split, user_oov_buckets=buckets)

    texts_u = user_column.cast(pa.string()).to_pylist()
    texts_i = item_column.cast(pa.string()).to_pylist()
    train = split.train.tolist()
    known_users = sorted({texts_u[r] for r in train})
    known_items = sorted({texts_i[r] for r in train})
    user_row = {u: buckets + j for j, u in enumerate(known_users)}
    item_row = {i: 1 + j for j, i in enumerate(known_items)}

    def expected_user(text: str) -> int:
        return user_row.get(text, 0 if buckets == 1 else _fnv1a_64(text) % buckets)

    assert prepared.users.to_list() == ["[UNK]"] * buckets + known_users
    assert prepared.items.to_list() == ["[UNK]", *known_items]
    for name, rows in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        part = getattr(prepared, name)
        assert part.users.tolist() == [expected_user(texts_u[r]) for r in rows.tolist()], name
        assert part.items.tolist() == [item_row.get(texts_i[r], 0) for r in rows.tolist()], name
        assert [log.user_ids[c].as_py() for c in part.user_codes.tolist()] == [texts_u[r] for r in rows.tolist()]
    assert not (prepared.test.users.numpy() < buckets).all()  # some warm test users: the check above meant it
    counts = Counter(item_row[texts_i[r]] for r in train)
    assert prepared.item_counts.tolist() == [float(counts.get(row, 0)) for row in range(len(prepared.items))]
    seen: dict[int, set[int]] = {}
    for r in train:
        seen.setdefault(user_row[texts_u[r]], set()).add(item_row[texts_i[r]])
    for row in range(len(prepared.users)):
        got = prepared.seen_items[prepared.seen_indptr[row] : prepared.seen_indptr[row + 1]].tolist()
        assert got == sorted(seen.get(row, set())), row
