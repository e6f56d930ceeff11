"""Reading interaction logs: every source gives the same interactions, and the report's counts equal hand counts."""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.data import Interactions, InteractionsError

# A small log with everything a real one has: string user ids with leading zeros, repeated rows, a null user,
# a null time, and an item the catalogue lacks.
ROWS: list[tuple[str | None, str, int | None, float]] = [
    ("007", "a", 1_600_000_000, 1.0),
    ("007", "b", 1_600_000_100, 2.0),
    ("007", "b", 1_600_000_100, 2.0),  # duplicate of the row before
    ("12", "a", 1_600_000_200, 1.0),
    ("12", "c", 1_600_000_300, 3.0),
    (None, "a", 1_600_000_400, 1.0),  # null user
    ("12", "zz", 1_600_000_500, 1.0),  # not in the catalogue
    ("3", "c", None, 1.0),  # null time
    ("3", "a", 1_600_000_700, 1.0),
    ("007", "a", 1_600_000_800, 1.0),  # same pair as row 0, another time: not a duplicate
]
CATALOGUE = {"item": ["a", "b", "c", "d"], "name": ["Apple", "Banana", "Cherry", "Date"]}


def _table(rows: list[tuple[Any, ...]] = ROWS) -> pa.Table:
    users, items, times, weights = zip(*rows, strict=True)
    return pa.table(
        {
            "customer": pa.array(users, pa.string()),
            "sku": pa.array(items, pa.string()),
            "ts": pa.array(times, pa.int64()),
            "qty": pa.array(weights, pa.float64()),
            "unused": pa.array(range(len(rows))),
        }
    )


def _decoded(log: Interactions) -> list[tuple[str, str, int | None, float | None]]:
    """The log's rows as (user, item, time, weight), decoded back through the id arrays."""
    users, items = log.user_ids.to_pylist(), log.item_ids.to_pylist()
    times = [None] * len(log) if log.timestamps is None else log.timestamps.tolist()
    weights = [None] * len(log) if log.weights is None else log.weights.tolist()
    return [
        (users[u], items[i], t, w)
        for u, i, t, w in zip(log.user_codes.tolist(), log.item_codes.tolist(), times, weights, strict=True)
    ]


def _expected(drop_duplicates: bool, drop_unknown: bool) -> list[tuple[str, str, int, float]]:
    kept: list[tuple[str, str, int, float]] = []
    for user, item, time, weight in ROWS:
        if user is None or time is None or (drop_unknown and item not in CATALOGUE["item"]):
            continue
        if drop_duplicates and (user, item, time, weight) in kept:
            continue
        kept.append((user, item, time, weight))
    return kept


OPTIONS = {"time_col": "ts", "weight_col": "qty"}


def _write_csv(path: Path, rows: list[tuple[Any, ...]] = ROWS) -> Path:
    lines = ["customer,sku,ts,qty,unused"]
    for number, (user, item, time, weight) in enumerate(rows):
        lines.append(",".join(["" if v is None else str(v) for v in (user, item, time, weight)] + [str(number)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_source_reads_the_same_interactions(tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    polars = pytest.importorskip("polars")
    table = _table()
    pq.write_table(table, tmp_path / "log.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 4), parts / "part-0.parquet")
    pq.write_table(table.slice(4), parts / "part-1.parquet")
    catalogue = pa.table(CATALOGUE)
    pq.write_table(catalogue, tmp_path / "catalogue.parquet")
    pairs = zip(CATALOGUE["item"], CATALOGUE["name"], strict=True)
    (tmp_path / "catalogue.csv").write_text("item,name\n" + "".join(f"{i},{n}\n" for i, n in pairs))
    frame = pandas.DataFrame(
        {
            "customer": [r[0] for r in ROWS],
            "sku": [r[1] for r in ROWS],
            "ts": pandas.array([r[2] for r in ROWS], dtype="Int64"),
            "qty": [r[3] for r in ROWS],
        }
    )
    sources = {
        "arrow": Interactions.from_arrow(table, "customer", "sku", items=catalogue, item_id_col="item", **OPTIONS),
        "csv": Interactions.from_csv(
            _write_csv(tmp_path / "log.csv"),
            "customer",
            "sku",
            items=tmp_path / "catalogue.csv",
            item_id_col="item",
            **OPTIONS,
        ),
        "parquet": Interactions.from_parquet(
            tmp_path / "log.parquet",
            "customer",
            "sku",
            items=tmp_path / "catalogue.parquet",
            item_id_col="item",
            **OPTIONS,
        ),
        "parts": Interactions.from_parquet(parts, "customer", "sku", items=catalogue, item_id_col="item", **OPTIONS),
        "pandas": Interactions.from_pandas(
            frame, "customer", "sku", items=pandas.DataFrame(CATALOGUE), item_id_col="item", **OPTIONS
        ),
        "polars": Interactions.from_polars(
            polars.from_pandas(frame),
            "customer",
            "sku",
            items=polars.DataFrame(CATALOGUE),
            item_id_col="item",
            **OPTIONS,
        ),
    }
    expected = _expected(drop_duplicates=False, drop_unknown=True)
    for name, log in sources.items():
        assert _decoded(log) == expected, name
        # The catalogue's items are the candidates, "d" too though nobody bought it.
        assert log.item_ids.to_pylist() == CATALOGUE["item"], name
        assert log.in_catalogue
        report = log.report
        assert (report.rows_read, report.null_ids, report.null_times, report.unknown_items) == (10, 1, 1, 1), name
        assert report.duplicates == 1, name
        assert not report.duplicates_dropped, name
        assert report.catalogue_items == 4, name
        assert report.rows == len(expected) == 7, name
        assert report.time_unit == "integer seconds since 1970", name
        # "007" stays as written: ids are text, never parsed as numbers.
        assert "007" in log.user_ids.to_pylist(), name


def test_reading_options_change_what_is_kept() -> None:
    catalogue = pa.table(CATALOGUE)
    for drop_duplicates in (False, True):
        for drop_unknown in (False, True):
            log = Interactions.from_arrow(
                _table(), "customer", "sku", items=catalogue, item_id_col="item", item_title_col="name",
                duplicates="drop" if drop_duplicates else "keep", unknown_items="drop" if drop_unknown else "keep",
                **OPTIONS,
            )  # fmt: skip
            assert _decoded(log) == _expected(drop_duplicates, drop_unknown)
            assert log.item_ids.to_pylist() == CATALOGUE["item"] + ([] if drop_unknown else ["zz"])
            assert log.item_titles == dict(zip(*CATALOGUE.values(), strict=True))
            lines = "\n".join(log.report.lines())
            assert "1 duplicate rows" in lines
            assert ("dropped" if drop_duplicates else "kept") in lines


def test_without_a_catalogue_the_items_are_the_logs() -> None:
    log = Interactions.from_arrow(_table(), "customer", "sku")
    first_seen = list(dict.fromkeys(item for user, item, _, _ in ROWS if user is not None))
    assert log.item_ids.to_pylist() == first_seen
    assert log.timestamps is None
    assert log.weights is None
    assert len(log) == 9  # only the null user's row goes: no time column, so the null time does not count
    assert log.report.unknown_items == 0
    assert log.report.catalogue_items is None


@pytest.mark.parametrize(
    ("values", "kind", "unit", "seconds"),
    [
        ([1_600_000_000, 1_600_000_001], pa.int64(), "integer seconds since 1970", [1_600_000_000, 1_600_000_001]),
        ([1_600_000_000_123, 1_600_000_001_999], pa.int64(), "integer milliseconds", [1_600_000_000, 1_600_000_001]),
        ([1_600_000_000_000_001], pa.int64(), "integer microseconds", [1_600_000_000]),
        ([1_600_000_000], pa.uint32(), "integer seconds", [1_600_000_000]),
        ([1_600_000_000.75], pa.float64(), "seconds since 1970 (floats)", [1_600_000_000]),
        (
            [datetime.datetime(2020, 9, 13, 12, 26, 40, 500_000)],
            pa.timestamp("ms"),
            "timestamp[ms]",
            [1_600_000_000],
        ),
        ([datetime.date(2020, 9, 13)], pa.date32(), "dates", [1_599_955_200]),
        (["2020-09-13T12:26:40"], pa.string(), "ISO-8601 text", [1_600_000_000]),
    ],
)
def test_time_units_are_detected_and_stated(
    values: list[Any], kind: pa.DataType, unit: str, seconds: list[int]
) -> None:
    n = len(values)
    table = pa.table({"u": [str(i) for i in range(n)], "i": ["x"] * n, "t": pa.array(values, kind)})
    log = Interactions.from_arrow(table, "u", "i", time_col="t")
    assert log.report.time_unit is not None
    assert unit in log.report.time_unit
    assert log.report.time_unit in "\n".join(log.report.lines())
    # By hand: 2020-09-13 12:26:40 UTC is 1,600,000,000 s; midnight of that day is 1,599,955,200.
    assert log.timestamps is not None
    assert log.timestamps.tolist() == seconds


@pytest.mark.parametrize("kind", [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint64(), pa.string()])
def test_ids_of_any_width_are_kept_as_their_text(kind: pa.DataType) -> None:
    users = [5, 7, 5, 100] if kind != pa.string() else ["5", "7", "5", "100"]
    table = pa.table({"u": pa.array(users, kind), "i": pa.array([1, 2, 1, 3], pa.int64())})
    log = Interactions.from_arrow(table, "u", "i")
    # The distinct ids are sorted as text ("100" < "5"), so the vocabulary of any subset needs no sort.
    assert log.user_ids.to_pylist() == ["100", "5", "7"]
    assert log.user_codes.tolist() == [1, 2, 1, 0]
    assert log.item_ids.to_pylist() == ["1", "2", "3"]


@pytest.mark.parametrize("spread", ["dense", "sparse"])
@pytest.mark.parametrize("kind", [pa.int8(), pa.int32(), pa.int64(), pa.uint64(), pa.string()])
def test_ids_are_encoded_in_the_text_order_python_sorts(kind: pa.DataType, spread: str) -> None:
    """Both integer encoders (a table indexed by value for a dense span, hashing for a sparse one) and the string
    encoder give the distinct ids in Python's ``sorted`` order of their text, and codes that point at each row's
    own id; nulls get -1."""
    rng = np.random.default_rng(3)
    info = np.iinfo(kind.to_pandas_dtype()) if kind != pa.string() else np.iinfo(np.int64)
    low, high = max(int(info.min), -(10**18)), min(int(info.max), 10**18)
    if spread == "dense":
        pool = [v for v in range(-120, 120) if low <= v <= high] + [0, 1, 9, 10, 11, 99, 100, 101]
    else:
        pool = [int(v) for v in rng.integers(low, high, 300, dtype=np.int64, endpoint=True)]
        pool += [v for v in (low, high, 0, 1, 10, 100, 7, 70, 700) if low <= v <= high]
    if kind == pa.uint64():
        pool = [v for v in pool if v >= 0] + ([2**64 - 1, 2**63, 10**19 - 1] if spread == "sparse" else [])
    values: list[object] = [pool[i] for i in rng.integers(0, len(pool), 2_000)]
    values[5] = values[17] = None
    if kind == pa.string():
        values = [None if v is None else str(v) for v in values]
    table = pa.table({"u": pa.array(values, kind), "i": pa.array(np.arange(2_000) % 7)})
    log = Interactions.from_arrow(table, "u", "i")
    texts = [None if v is None else str(v) for v in values]
    expected = sorted({t for t in texts if t is not None})  # Python compares str by code point: bytewise here
    assert log.user_ids.to_pylist() == expected
    assert log.report.null_ids == 2
    kept = [t for t in texts if t is not None]
    assert [expected[c] for c in log.user_codes.tolist()] == kept


@pytest.mark.parametrize("statistics", [True, False])
def test_parquet_is_encoded_row_group_by_row_group(
    statistics: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset of two parts, in row groups of 100 and batches of 50 rows, with a row group whose user ids are all
    null, read as Python reads it row by row. With the parts'
    statistics the integer ids are encoded by their range (never hashed), without them by Arrow's dictionary."""
    import twotower.data._columns as columns_module
    from twotower.data import _chunks

    monkeypatch.setattr(_chunks, "CHUNK", 50)
    hashed: list[str] = []
    dictionary = columns_module._encode_by_dictionary

    def recording(column: pa.ChunkedArray, name: str, source: str) -> Any:
        hashed.append(name)
        return dictionary(column, name, source)

    monkeypatch.setattr(columns_module, "_encode_by_dictionary", recording)
    rng = np.random.default_rng(5)
    n = 1_000
    users: list[int | None] = [int(v) for v in rng.integers(0, 120, n) * 3 + 10**10]
    users[7] = None
    users[500:600] = [None] * 100  # one whole row group
    items = [int(v) for v in rng.integers(-20, 20, n)]  # negatives: text order is not numeric order
    times = [int(v) for v in rng.integers(1_600_000_000_000, 1_700_000_000_000, n)]  # milliseconds
    table = pa.table({"u": pa.array(users, pa.int64()), "i": pa.array(items, pa.int32()), "t": times})
    (tmp_path / "log").mkdir()
    for part, (start, end) in enumerate([(0, 600), (600, n)]):
        pq.write_table(
            table.slice(start, end - start), tmp_path / "log" / f"part-{part}.parquet",
            row_group_size=100, write_statistics=statistics,
        )  # fmt: skip
    log = Interactions.from_parquet(tmp_path / "log", "u", "i", time_col="t")
    kept = [(str(u), str(i), t // 1000) for u, i, t in zip(users, items, times, strict=True) if u is not None]
    assert _decoded(log) == [(u, i, t, None) for u, i, t in kept]
    assert log.user_ids.to_pylist() == sorted({u for u, _, _ in kept})
    assert log.item_ids.to_pylist() == sorted({i for _, i, _ in kept})
    assert (log.report.null_ids, log.report.time_unit) == (101, "integer milliseconds since 1970")
    assert hashed == ([] if statistics else ["u", "i"])


def test_parquet_statistics_that_disagree_with_the_values_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twotower.data._columns import ParquetSource

    pq.write_table(pa.table({"u": [1, 2, 40], "i": [1, 1, 2]}), tmp_path / "log.parquet")
    monkeypatch.setattr(ParquetSource, "integer_range", lambda self, name: (1, 39) if name == "u" else (1, 2))
    with pytest.raises(InteractionsError, match=r"statistics of column 'u' say its values lie in \[1, 39\]"):
        Interactions.from_parquet(tmp_path / "log.parquet", "u", "i")


def test_a_dictionary_encoded_column_is_read_by_value() -> None:
    users = pa.array(["b", "a", "b"]).dictionary_encode()
    table = pa.table({"u": users, "i": ["x", "y", "x"]})
    log = Interactions.from_arrow(table, "u", "i")
    assert [log.user_ids[c].as_py() for c in log.user_codes.tolist()] == ["b", "a", "b"]


@pytest.mark.parametrize("hashes", ["real", "colliding"])
def test_duplicates_are_found_among_many_rows(hashes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact whatever the row hash does: with a hash that sends most distinct rows to the same few values, only
    rows equal in every column still count as duplicates."""
    import twotower.data.interactions as interactions_module

    if hashes == "colliding":
        monkeypatch.setattr(interactions_module, "_row_hashes", lambda columns: (columns[0] % 3).astype(np.uint32))
    rng = np.random.default_rng(0)
    n = 20_000
    users, items, times = rng.integers(0, 50, n), rng.integers(0, 40, n), rng.integers(0, 5, n) + 1_600_000_000
    weights = rng.integers(1, 3, n).astype(np.float32)
    table = pa.table({"u": users, "i": items, "t": times, "w": weights})
    log = Interactions.from_arrow(table, "u", "i", time_col="t", weight_col="w", duplicates="drop")
    seen: set[tuple[int, int, int, float]] = set()
    expected = []
    for row in zip(users.tolist(), items.tolist(), times.tolist(), weights.tolist(), strict=True):
        if row not in seen:
            seen.add(row)
            expected.append(row)
    assert log.report.duplicates == n - len(expected)
    got = [(int(u), int(i), t, w) for u, i, t, w in _decoded(log)]
    assert got == expected


# --- bad input: one clear error naming the problem ---------------------------------------------------------------


def test_a_missing_column_names_the_argument_and_lists_the_columns(tmp_path: Path) -> None:
    pq.write_table(_table(), tmp_path / "log.parquet")
    for reader, path in ((Interactions.from_parquet, tmp_path / "log.parquet"),
                         (Interactions.from_csv, _write_csv(tmp_path / "log.csv"))):  # fmt: skip
        with pytest.raises(InteractionsError) as caught:
            reader(path, "customer", "product")
        message = str(caught.value)
        assert "no column 'product' (asked for by item_col)" in message
        assert "['customer', 'sku', 'ts', 'qty', 'unused']" in message
        with pytest.raises(InteractionsError, match=r"no column 'when' .asked for by time_col"):
            reader(path, "customer", "sku", time_col="when")
    with pytest.raises(InteractionsError, match=r"no column 'id' .asked for by item_id_col.*\['item', 'name'\]"):
        Interactions.from_arrow(_table(), "customer", "sku", items=pa.table(CATALOGUE), item_id_col="id")


def test_empty_files_and_empty_tables_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InteractionsError, match=r"empty.csv is empty"):
        Interactions.from_csv(tmp_path / "empty.csv", "u", "i")
    (tmp_path / "header.csv").write_text("u,i\n")
    with pytest.raises(InteractionsError, match="holds no rows"):
        Interactions.from_csv(tmp_path / "header.csv", "u", "i")
    pq.write_table(_table().slice(0, 0), tmp_path / "none.parquet")
    with pytest.raises(InteractionsError, match="holds no rows"):
        Interactions.from_parquet(tmp_path / "none.parquet", "customer", "sku")
    with pytest.raises(InteractionsError, match="no such file or directory"):
        Interactions.from_parquet(tmp_path / "absent.parquet", "customer", "sku")
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(InteractionsError, match=r"unknown format '.json'"):
        Interactions.from_file(tmp_path / "log.json", "u", "i")


def test_null_ids_and_times_that_are_not_times_are_refused(tmp_path: Path) -> None:
    nulls = pa.table({"u": pa.array([None, None], pa.string()), "i": ["a", "b"]})
    with pytest.raises(InteractionsError, match="every value of 'u' is null"):
        Interactions.from_arrow(nulls, "u", "i")
    (tmp_path / "nulls.csv").write_text("u,i\n,a\n,b\n")
    with pytest.raises(InteractionsError, match="every value of 'u' is null"):
        Interactions.from_csv(tmp_path / "nulls.csv", "u", "i")
    crossed = pa.table({"u": pa.array(["x", None], pa.string()), "i": pa.array([None, "b"], pa.string())})
    with pytest.raises(InteractionsError, match="every row has a null 'u' or 'i'"):
        Interactions.from_arrow(crossed, "u", "i")
    words = pa.table({"u": ["x"], "i": ["a"], "t": ["yesterday"]})
    with pytest.raises(InteractionsError, match="time column 't' is not a time"):
        Interactions.from_arrow(words, "u", "i", time_col="t")
    flags = pa.table({"u": ["x"], "i": ["a"], "t": [True]})
    with pytest.raises(InteractionsError, match=r"time column 't' is not a time.*got bool"):
        Interactions.from_arrow(flags, "u", "i", time_col="t")
    infinite = pa.table({"u": ["x"], "i": ["a"], "t": [float("inf")]})
    with pytest.raises(InteractionsError, match="NaN or infinite"):
        Interactions.from_arrow(infinite, "u", "i", time_col="t")
    floats = pa.table({"u": [1.5], "i": ["a"]})
    with pytest.raises(InteractionsError, match=r"column 'u' must hold ids .strings or integers., got double"):
        Interactions.from_arrow(floats, "u", "i")
    negative = pa.table({"u": ["x"], "i": ["a"], "w": [-1.0]})
    with pytest.raises(InteractionsError, match="weight column 'w' must hold finite numbers >= 0"):
        Interactions.from_arrow(negative, "u", "i", weight_col="w")
    with pytest.raises(ValueError, match="duplicates must be 'keep' or 'drop', got 'merge'"):
        Interactions.from_arrow(words, "u", "i", duplicates="merge")  # type: ignore[arg-type]


def test_a_catalogue_that_holds_none_of_the_items_is_refused() -> None:
    with pytest.raises(InteractionsError, match="no interaction's item is in the catalogue"):
        Interactions.from_arrow(_table(), "customer", "sku", items=pa.table({"sku": ["q", "r"]}))


def test_report_counts_match_a_counter() -> None:
    log = Interactions.from_arrow(_table(), "customer", "sku", time_col="ts")
    kept = [(u, i) for u, i, t, _ in ROWS if u is not None and t is not None]
    assert Counter((u, i) for u, i, _, _ in _decoded(log)) == Counter(kept)
