"""A log's columns read batch by batch and encoded as they stream by.

A source (:class:`TableSource` for an Arrow table in memory, :class:`ParquetSource` for Parquet files) yields the
named columns one batch of rows at a time (a Parquet row group, decoded on Arrow's threads while the previous one
is encoded); each column's encoder writes its rows into one preallocated numpy array. So a Parquet log is never
held as Arrow columns: its memory is the encoded arrays (4 bytes per id, 8 per time) plus a batch or two.

* :class:`IdColumn`: ``int32`` codes into the distinct ids sorted as text. Integers whose range is known before
  reading (Parquet statistics, or the table's minimum and maximum) and not much wider than the log are encoded by
  direct addressing: each batch's ``value - min`` is stored and marked in a table of the range; at the end the
  marked values are ranked and the stored offsets replaced by their codes. Other ids are kept as Arrow chunks and
  dictionary-encoded once at the end.
* :class:`SecondsColumn`: ``int64`` Unix seconds from integers (unit told by the largest magnitude), floats,
  timestamps, dates or ISO-8601 text.
* :class:`WeightColumn`: ``float32`` non-negative finite weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.data import _chunks
from twotower.data._chunks import for_each_chunk
from twotower.data.movielens import DataError


class InteractionsError(DataError):
    """An interaction log or catalogue cannot be read as asked (a missing column, no rows, a bad type)."""


#: Below this many seconds an integer time is read as seconds (1e11 s is the year 5138; 1e11 ms is 1973), and so
#: on for milliseconds and microseconds; above, nanoseconds.
_UNIT_LIMITS = ((1e11, "seconds", 1), (1e14, "milliseconds", 1_000), (1e17, "microseconds", 1_000_000))
_TIMESTAMP_DIVISORS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Powers of ten as uint64: 10**0 .. 10**19 (10**19 < 2**64).
_POWERS_OF_TEN = np.array([10**power for power in range(20)], dtype=np.uint64)
#: An integer id column whose values span at most this many times its length (or 2**16) is encoded by direct
#: addressing (a table indexed by value - min), not hashed: no hash table, one pass to mark and one to look up.
_DIRECT_SPAN_PER_ROW = 2


# --- sources ----------------------------------------------------------------------------------------------


class TableSource:
    """An in-memory Arrow table, read in batches of :data:`~twotower.data._chunks.CHUNK` rows (zero-copy
    slices)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)

    def column_type(self, name: str) -> pa.DataType:
        kind: pa.DataType = self.table.schema.field(name).type
        return kind

    def integer_range(self, name: str) -> tuple[int, int] | None:
        """``(min, max)`` of an integer column, ``None`` when every value is null."""
        return _integer_range(self.table.column(name))

    def batches(self, names: Sequence[str]) -> Iterator[list[pa.Array]]:
        for batch in self.table.select(list(names)).to_batches(max_chunksize=_chunks.CHUNK):
            yield [batch.column(number) for number in range(len(names))]


class ParquetSource:
    """The named columns of a Parquet dataset (a file or a directory of parts), read one row group at a time.

    A part without one of the columns reads as nulls there, as Arrow's dataset scanner does; a part whose column
    has another type is cast to the dataset's.
    """

    def __init__(self, dataset: Any, names: list[str], path: Path) -> None:
        self.dataset, self.names, self.path = dataset, names, path

    @property
    def column_names(self) -> list[str]:
        return list(self.names)

    @property
    def num_rows(self) -> int:
        return int(self.dataset.count_rows())  # from the files' metadata

    def column_type(self, name: str) -> pa.DataType:
        kind: pa.DataType = self.dataset.schema.field(name).type
        return kind

    def integer_range(self, name: str) -> tuple[int, int] | None:
        """``(min, max)`` of an integer column from the row groups' statistics, without reading a value; ``None``
        when a row group with values has none (then the column is encoded without knowing its range)."""
        import pyarrow.parquet as pq

        low: int | None = None
        high: int | None = None
        try:
            for file in self.dataset.files:
                metadata = pq.ParquetFile(file).metadata
                leaves = {metadata.schema.column(leaf).path: leaf for leaf in range(metadata.num_columns)}
                if name not in leaves:
                    continue  # nulls in this part
                for group in range(metadata.num_row_groups):
                    row_group = metadata.row_group(group)
                    statistics = row_group.column(leaves[name]).statistics
                    if statistics is not None and statistics.null_count == row_group.num_rows:
                        continue
                    if statistics is None or not statistics.has_min_max:
                        return None
                    least, most = statistics.min, statistics.max
                    if not isinstance(least, int) or not isinstance(most, int):
                        return None
                    low = least if low is None else min(low, least)
                    high = most if high is None else max(high, most)
        except (pa.ArrowInvalid, OSError) as error:
            raise InteractionsError(f"{self.path} cannot be read as parquet: {error}") from None
        return None if low is None or high is None else (low, high)

    def _row_groups(self, names: Sequence[str]) -> Iterator[list[pa.Array]]:
        import pyarrow.parquet as pq

        kinds = [self.column_type(name) for name in names]
        for file in self.dataset.files:
            reader = pq.ParquetFile(file)
            present = [name for name in dict.fromkeys(names) if name in reader.schema_arrow.names]
            for group in range(reader.metadata.num_row_groups):
                table = reader.read_row_group(group, columns=present)
                columns = []
                for name, kind in zip(names, kinds, strict=True):
                    if name not in present:
                        columns.append(pa.nulls(table.num_rows, kind))
                        continue
                    column = table.column(name)
                    array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
                    columns.append(array if array.type == kind else array.cast(kind))
                yield columns

    def batches(self, names: Sequence[str]) -> Iterator[list[pa.Array]]:
        """Row group by row group, the next one decoded on another thread while the caller encodes this one."""
        groups = self._row_groups(names)
        try:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(next, groups, None)
                while (batch := pending.result()) is not None:
                    pending = pool.submit(next, groups, None)
                    yield batch
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise InteractionsError(f"{self.path} cannot be read as parquet: {error}") from None


Source = TableSource | ParquetSource


def _integer_range(column: pa.ChunkedArray | pa.Array) -> tuple[int, int] | None:
    if column.null_count == len(column):
        return None
    extremes = pc.min_max(column)
    return int(extremes["min"].as_py()), int(extremes["max"].as_py())


# --- ids --------------------------------------------------------------------------------------------------


def _as_id_type(kind: pa.DataType, name: str, source: str) -> None:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return
    if pa.types.is_null(kind):
        raise InteractionsError(f"{source}: every value of {name!r} is null")
    raise InteractionsError(f"{source}: column {name!r} must hold ids (strings or integers), got {kind}")


class IdColumn:
    """Encodes one id column, batch by batch, into ``int32`` codes into its distinct ids sorted as text (so
    that the ids of any subset of codes, taken in code order, are sorted too and a vocabulary of them needs no
    sort); null ids get code -1.

    Args:
        name, source: how errors name the column and the log.
        kind: the column's Arrow type.
        rows: the column's length.
        integer_range: ``(min, max)`` of an integer column when known before reading, else ``None``.
    """

    def __init__(
        self, name: str, kind: pa.DataType, rows: int, integer_range: tuple[int, int] | None, source: str
    ) -> None:
        _as_id_type(kind, name, source)
        self.name, self.kind, self.rows, self.source = name, kind, rows, source
        self.nulls = 0
        self.chunks: list[pa.Array] = []
        self.low = self.span = 0
        self.direct = (
            pa.types.is_integer(kind)
            and integer_range is not None
            and integer_range[1] - integer_range[0] < max(1 << 16, _DIRECT_SPAN_PER_ROW * rows)
            and integer_range[1] - integer_range[0] < np.iinfo(np.int32).max - 1
        )
        if self.direct:
            assert integer_range is not None
            self.low, self.span = integer_range[0], integer_range[1] - integer_range[0] + 1
            # Wrapping arithmetic in 64 bits is exact: every in-range difference lies in [0, span), far below 2**63.
            wrapped = np.array(self.low).astype(np.uint64).astype(np.int64) if self.low >= 2**63 else self.low
            self.wrapped_low = np.int64(wrapped)
            self.present = np.zeros(self.span, dtype=bool)
            self.codes = np.empty(rows, dtype=np.int32)  # offsets value - low until finish()

    def add(self, start: int, chunk: pa.Array) -> None:
        """Take rows ``[start, start + len(chunk))``."""
        self.nulls += chunk.null_count
        if not self.direct:
            self.chunks.append(chunk)
            return
        valid = None
        if chunk.null_count:
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            chunk = pc.fill_null(chunk, self.low)
        offsets = chunk.to_numpy().astype(np.int64, copy=False) - self.wrapped_low
        # The range came from metadata: a value outside it would index the wrong slot, so it is checked.
        if offsets.size and (int(offsets.min()) < 0 or int(offsets.max()) >= self.span):
            raise InteractionsError(
                f"{self.source}: the statistics of column {self.name!r} say its values lie in "
                f"[{self.low}, {self.low + self.span - 1}], but some do not (a damaged file?)"
            )
        self.present[offsets if valid is None else offsets[valid]] = True
        part = self.codes[start : start + offsets.shape[0]]
        part[:] = offsets
        if valid is not None:
            part[~valid] = -1

    def finish(self) -> tuple[np.ndarray, pa.Array]:
        """``(codes [rows] int32, the distinct ids as large_string, sorted as text)``."""
        if self.nulls == self.rows:
            raise InteractionsError(f"{self.source}: every value of {self.name!r} is null")
        if not self.direct:
            return _encode_by_dictionary(pa.chunked_array(self.chunks, type=self.kind), self.name, self.source)
        where = np.flatnonzero(self.present)
        del self.present
        unsigned = pa.types.is_unsigned_integer(self.kind)
        values = where.astype(np.uint64) + np.uint64(self.low) if unsigned else where + np.int64(self.low)
        order = _decimal_text_order(values)
        # One slot past the range holds -1, the code of a null (stored as offset -1).
        code_of_offset = np.empty(self.span + 1, dtype=np.int32)
        code_of_offset[where[order]] = np.arange(where.shape[0], dtype=np.int32)
        code_of_offset[-1] = -1
        codes = self.codes

        def look_up(begin: int, end: int) -> None:
            np.take(code_of_offset, codes[begin:end], out=codes[begin:end])  # buffered: safe in place

        for_each_chunk(self.rows, look_up)
        return codes, pc.cast(pa.array(values[order]), pa.large_string())


def id_column(table: Source, name: str, rows: int, source: str) -> IdColumn:
    """The :class:`IdColumn` of ``table``'s column ``name`` (``rows`` long: a dataset's count reads every file's
    footer, so the caller's is passed), told the range of an integer column where ``table`` knows it before
    reading."""
    kind = table.column_type(name)
    return IdColumn(name, kind, rows, table.integer_range(name) if pa.types.is_integer(kind) else None, source)


def encode_ids(column: pa.ChunkedArray, name: str, source: str) -> tuple[np.ndarray, pa.Array]:
    """A whole in-memory id column through :class:`IdColumn`."""
    table = TableSource(pa.table({name: column}))
    encoder = id_column(table, name, len(column), source)
    start = 0
    for (chunk,) in table.batches([name]):
        encoder.add(start, chunk)
        start += len(chunk)
    return encoder.finish()


def _encode_by_dictionary(column: pa.ChunkedArray, name: str, source: str) -> tuple[np.ndarray, pa.Array]:
    """:class:`IdColumn`'s encoding of strings, dictionaries and integers of unknown or wide range: Arrow's
    hash-based ``dictionary_encode``, then the dictionary ranked in text order."""
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)  # decoded; re-encoded below against the whole column
    encoded = pc.dictionary_encode(column)
    # On a chunked array the hash table is shared by the chunks, so every chunk carries the same final dictionary.
    chunks = [chunk for chunk in encoded.chunks if len(chunk)]
    distinct = chunks[-1].dictionary
    if len(distinct) >= np.iinfo(np.int32).max:
        raise InteractionsError(f"{source}: {name!r} has more than 2**31 distinct ids")
    if pa.types.is_integer(distinct.type):
        order = _decimal_text_order(distinct.to_numpy())
    else:
        order = pc.sort_indices(distinct).to_numpy()
    # The code of dictionary entry d is its rank in text order; the null code -1 stays -1 (the last entry).
    rank = np.empty(len(distinct) + 1, dtype=np.int32)
    rank[order] = np.arange(len(distinct), dtype=np.int32)
    rank[-1] = -1
    codes = np.empty(len(column), dtype=np.int32)
    start = 0
    for chunk in chunks:
        indices = chunk.indices
        if indices.null_count:
            indices = pc.fill_null(indices, -1)
        codes[start : start + len(chunk)] = rank[indices.to_numpy()]
        start += len(chunk)
    return codes, pc.cast(distinct.take(pa.array(order)), pa.large_string())


def _decimal_text_order(values: np.ndarray) -> np.ndarray:
    """The permutation that sorts integers as their decimal text sorts (bytewise, as Arrow sorts strings).

    Without building the strings: ``"-"`` sorts before every digit, so negatives come first; within a sign, the
    text order is that of the magnitude's digits left-aligned (the magnitude times ``10**(19 - digits)``), a
    shorter text first when one is a prefix of the other. Integers of one sign and one digit count sort as
    numbers, which is the common case (fixed-width ids) and one ``argsort``, or none when already ascending.
    """
    count = values.shape[0]
    if count < 2:
        return np.arange(count)
    if values.dtype.kind == "u":
        negative = np.zeros(count, dtype=bool)
        magnitude = values.astype(np.uint64)
    else:
        values = values.astype(np.int64, copy=False)
        negative = values < 0
        magnitude = values.astype(np.uint64)
        magnitude[negative] = ~magnitude[negative] + np.uint64(1)  # two's complement: exact for -2**63 too
    if int(magnitude.max()) >= 10**19:  # 20-digit unsigned ids: too wide to left-align in 64 bits
        by_text: np.ndarray = pc.sort_indices(pc.cast(pa.array(values), pa.large_string())).to_numpy()
        return by_text
    digits = np.maximum(np.searchsorted(_POWERS_OF_TEN, magnitude, side="right"), 1)  # 1 .. 19 ("0": 1)
    if not negative.any() and digits.min() == digits.max():
        if bool((magnitude[1:] > magnitude[:-1]).all()):
            return np.arange(count)
        return np.argsort(magnitude, kind="stable")
    aligned = magnitude * _POWERS_OF_TEN[19 - digits]
    return np.lexsort((digits, aligned, ~negative))


# --- times and weights ------------------------------------------------------------------------------------


class SecondsColumn:
    """Encodes a time column, batch by batch, into ``int64`` Unix seconds.

    Integers are seconds, milliseconds, microseconds or nanoseconds since 1970, told apart by the largest
    magnitude once every batch is in; floats are seconds; timestamps and dates by their type; strings must be
    ISO-8601 times. Nulls read as 0 and are marked in :attr:`valid`.
    """

    def __init__(self, name: str, kind: pa.DataType, rows: int, source: str) -> None:
        self.name, self.kind, self.source = name, kind, source
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            self.form, self.unit_text = "text", "ISO-8601 text"
        elif pa.types.is_timestamp(kind):
            self.form, self.unit_text = "timestamp", f"timestamp[{kind.unit}]"
        elif pa.types.is_date(kind):
            self.form, self.unit_text = "date", "dates"
        elif pa.types.is_integer(kind):
            self.form, self.unit_text = "integer", ""
        elif pa.types.is_floating(kind):
            self.form, self.unit_text = "float", "seconds since 1970 (floats)"
        else:
            raise InteractionsError(
                f"{source}: time column {name!r} is not a time: expected integers, floats, timestamps, dates or "
                f"ISO-8601 strings, got {kind}"
            )
        self.values = np.empty(rows, dtype=np.int64)
        self.valid: np.ndarray | None = None  # None: no null so far
        self.largest = 0

    def add(self, start: int, chunk: pa.Array) -> None:
        """Take rows ``[start, start + len(chunk))``."""
        part = self.values[start : start + len(chunk)]
        if chunk.null_count:
            if self.valid is None:
                self.valid = np.ones(self.values.shape[0], dtype=bool)
            self.valid[start : start + len(chunk)] = chunk.is_valid().to_numpy(zero_copy_only=False)
        if self.form == "text":
            try:
                chunk = pc.cast(chunk, pa.timestamp("s"))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise InteractionsError(
                    f"{self.source}: time column {self.name!r} is not a time: its strings are not ISO-8601 times "
                    f"({error})"
                ) from None
        if self.form in ("text", "timestamp"):
            divisor = _TIMESTAMP_DIVISORS[chunk.type.unit]
            np.floor_divide(pc.fill_null(pc.cast(chunk, pa.int64()), 0).to_numpy(), divisor, out=part)
        elif self.form == "date":
            days = pc.fill_null(pc.cast(pc.cast(chunk, pa.date32()), pa.int32()), 0).to_numpy()
            np.multiply(days, 86_400, out=part, casting="unsafe")
        elif self.form == "integer":
            if chunk.null_count < len(chunk):
                extremes = pc.min_max(chunk)
                self.largest = max(self.largest, abs(int(extremes["min"].as_py())), abs(int(extremes["max"].as_py())))
            part[:] = (pc.fill_null(chunk, 0) if chunk.null_count else chunk).to_numpy()
        else:
            floats = pc.fill_null(chunk, 0.0).to_numpy().astype(np.float64)
            finite = np.isfinite(floats)
            if not finite[chunk.is_valid().to_numpy(zero_copy_only=False)].all():
                raise InteractionsError(f"{self.source}: time column {self.name!r} holds NaN or infinite values")
            part[:] = np.floor(floats)

    def finish(self) -> tuple[np.ndarray, np.ndarray | None, str]:
        """``(seconds [rows] int64, valid [rows] bool or None when no time is null, how the column was read)``."""
        if self.form != "integer":
            return self.values, self.valid, self.unit_text
        unit, divisor = next(((unit, divisor) for limit, unit, divisor in _UNIT_LIMITS if self.largest < limit),
                             ("nanoseconds", 1_000_000_000))  # fmt: skip
        values = self.values
        if divisor != 1:

            def divide(begin: int, end: int) -> None:
                np.floor_divide(values[begin:end], divisor, out=values[begin:end])

            for_each_chunk(values.shape[0], divide)
        return values, self.valid, f"integer {unit} since 1970"


class WeightColumn:
    """Encodes a weight column, batch by batch, into ``float32``; every weight must be a finite number >= 0."""

    def __init__(self, name: str, kind: pa.DataType, rows: int, source: str) -> None:
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise InteractionsError(f"{source}: weight column {name!r} must hold numbers, got {kind}")
        self.name, self.source = name, source
        self.values = np.empty(rows, dtype=np.float32)
        self.nulls = 0
        self.bad = False

    def add(self, start: int, chunk: pa.Array) -> None:
        """Take rows ``[start, start + len(chunk))``."""
        self.nulls += chunk.null_count
        if chunk.null_count:
            return  # refused in finish(), with the count
        numbers = chunk.to_numpy().astype(np.float64)
        self.bad = self.bad or not bool(np.isfinite(numbers).all()) or bool((numbers < 0).any())
        self.values[start : start + len(chunk)] = numbers

    def finish(self) -> np.ndarray:
        """``[rows] float32``."""
        if self.nulls:
            raise InteractionsError(f"{self.source}: weight column {self.name!r} holds {self.nulls} nulls")
        if self.bad:
            raise InteractionsError(f"{self.source}: weight column {self.name!r} must hold finite numbers >= 0")
        return self.values
