"""Interaction logs from files and data frames: CSV, Parquet, pandas, polars and Arrow, read with pyarrow.

:class:`Interactions` is one log, columnar and encoded once: each id column becomes ``int32`` codes into an Arrow
array of its distinct ids, sorted as text (integer ids spanning a range not much wider than the log by a table
indexed by value, others by one hash pass, :func:`pyarrow.compute.dictionary_encode`), times become ``int64``
seconds, weights ``float32``. A Parquet log is read one column at a time, each encoded before the next is read.
Nothing is held per row as a Python object, so a log of tens of millions of rows costs a few bytes per row and
column (see ``benchmarks/ingest.py``). What reading dropped or found is counted in :class:`ReadReport`: rows with
a null id or time, duplicate rows, interactions with items missing from the catalogue.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower.data._chunks import for_each_chunk
from twotower.data.movielens import DataError

Policy = Literal["keep", "drop"]
#: Below this many seconds an integer time is read as seconds (1e11 s is the year 5138; 1e11 ms is 1973), and so
#: on for milliseconds and microseconds; above, nanoseconds.
_UNIT_LIMITS = ((1e11, "seconds", 1), (1e14, "milliseconds", 1_000), (1e17, "microseconds", 1_000_000))
_TIMESTAMP_DIVISORS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Powers of ten as uint64: 10**0 .. 10**19 (10**19 < 2**64).
_POWERS_OF_TEN = np.array([10**power for power in range(20)], dtype=np.uint64)
#: An integer id column whose values span at most this many times its length (or 2**16) is encoded by direct
#: addressing (a table indexed by value - min), not hashed: no hash table, one pass to mark and one to look up.
_DIRECT_SPAN_PER_ROW = 2


class InteractionsError(DataError):
    """An interaction log or catalogue cannot be read as asked (a missing column, no rows, a bad type)."""


@dataclass(frozen=True)
class ReadReport:
    """What reading a log found and did.

    Attributes:
        source: the file, directory or ``"<pandas>"``-like name of what was read.
        rows_read: rows in the source.
        null_ids: rows dropped for a null user or item id.
        null_times: rows dropped for a null time.
        duplicates: rows equal to an earlier row in user, item and time (and weight).
        duplicates_dropped: whether they were dropped (else kept, each an interaction).
        unknown_items: rows whose item is not in the catalogue (0 without a catalogue).
        unknown_items_dropped: whether they were dropped (else their items joined the catalogue).
        time_unit: how the time column was read (e.g. ``"integer seconds"``, ``"integer milliseconds"``,
            ``"timestamp[us]"``), or ``None`` without one.
        rows: rows kept.
        catalogue_items: items in the catalogue, or ``None`` without one.
    """

    source: str
    rows_read: int
    null_ids: int
    null_times: int
    duplicates: int
    duplicates_dropped: bool
    unknown_items: int
    unknown_items_dropped: bool
    time_unit: str | None
    rows: int
    catalogue_items: int | None = None

    def lines(self) -> list[str]:
        """The report as printable lines."""
        lines = [f"read {self.rows_read:,} rows from {self.source}"]
        if self.time_unit is not None:
            lines.append(f"time column read as {self.time_unit}")
        if self.null_ids:
            lines.append(f"dropped {self.null_ids:,} rows with a null user or item id")
        if self.null_times:
            lines.append(f"dropped {self.null_times:,} rows with a null time")
        action = "dropped" if self.duplicates_dropped else "kept (--duplicates drop to drop them)"
        lines.append(f"{self.duplicates:,} duplicate rows (same user, item and time): {action}")
        if self.catalogue_items is not None:
            lines.append(f"catalogue: {self.catalogue_items:,} items")
            action = "dropped" if self.unknown_items_dropped else "kept, their items added to the catalogue"
            lines.append(f"{self.unknown_items:,} rows with items missing from the catalogue: {action}")
        lines.append(f"{self.rows:,} interactions kept")
        return lines


@dataclass(frozen=True)
class Interactions:
    """An interaction log, encoded: row ``r`` is user ``user_ids[user_codes[r]]`` with item
    ``item_ids[item_codes[r]]`` at ``timestamps[r]`` with weight ``weights[r]``.

    Attributes:
        user_codes: ``[n]`` ``int32`` codes into :attr:`user_ids`.
        user_ids: the distinct user ids (Arrow ``large_string``; integer ids as their decimal text), sorted as
            text, so that the ids of any set of codes, in code order, are sorted too (ids seen only on dropped rows
            included: vocabularies are fitted on a split's rows).
        item_codes: ``[n]`` ``int32`` codes into :attr:`item_ids`.
        item_ids: the distinct item ids: the catalogue's (sorted as text, then unknown items that were kept), or
            those of the log, sorted as text.
        timestamps: ``[n]`` ``int64`` Unix seconds, or ``None``.
        weights: ``[n]`` ``float32`` non-negative weights, or ``None``.
        item_titles: display title per item id, from the catalogue's title column (may be empty).
        in_catalogue: whether :attr:`item_ids` is a catalogue (every item a candidate), not just the log's items.
        report: what reading found (see :class:`ReadReport`).
    """

    user_codes: np.ndarray
    user_ids: pa.Array
    item_codes: np.ndarray
    item_ids: pa.Array
    timestamps: np.ndarray | None
    weights: np.ndarray | None
    report: ReadReport
    item_titles: dict[str, str] = field(default_factory=dict)
    in_catalogue: bool = False

    def __len__(self) -> int:
        return int(self.user_codes.shape[0])

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    # --- constructors -------------------------------------------------------------------------------------

    @classmethod
    def from_arrow(
        cls,
        table: pa.Table | pa.RecordBatch | _TableColumns | _ParquetColumns,
        user_col: str,
        item_col: str,
        time_col: str | None = None,
        weight_col: str | None = None,
        items: pa.Table | None = None,
        item_id_col: str | None = None,
        item_title_col: str | None = None,
        duplicates: Policy = "keep",
        unknown_items: Policy = "drop",
        source: str = "an Arrow table",
    ) -> Interactions:
        """Read a log from an Arrow table (see the class for the columns' meaning).

        Args:
            table: the log.
            user_col, item_col: the id columns (strings or integers of any width).
            time_col: the event time: integers (seconds, milliseconds, microseconds or nanoseconds since the
                epoch, told apart by magnitude and stated in the report), floats (seconds), an Arrow timestamp or
                date, or ISO-8601 strings.
            weight_col: non-negative finite numbers weighting each interaction in the loss.
            items: the item catalogue: every item a candidate, even those nobody interacted with.
            item_id_col: the catalogue's id column (default: ``item_col``).
            item_title_col: the catalogue's display-title column, if any.
            duplicates: ``"keep"`` (default: a repeated event is a repeated signal) or ``"drop"`` rows equal to
                an earlier one.
            unknown_items: ``"drop"`` (default) or ``"keep"`` interactions with items the catalogue lacks.
            source: how reports and errors name the log.

        Raises:
            InteractionsError: a column is missing (the columns found are listed) or has the wrong type, the log
                has no rows, every id is null, or the time column is not a time.
        """
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if isinstance(table, pa.Table):
            table = _TableColumns(table)
        # A Parquet source (from_parquet) is read one column at a time: each column is encoded and let go
        # before the next is read, so the log never has more than one raw column in memory.
        if not isinstance(table, (_TableColumns, _ParquetColumns)):
            raise TypeError(f"table must be a pyarrow Table, got {type(table).__name__}")
        for name, value in (("duplicates", duplicates), ("unknown_items", unknown_items)):
            if value not in ("keep", "drop"):
                raise ValueError(f"{name} must be 'keep' or 'drop', got {value!r}")
        wanted = {"user_col": user_col, "item_col": item_col, "time_col": time_col, "weight_col": weight_col}
        _require_columns(table.column_names, wanted, source)
        rows_read = table.num_rows
        if rows_read == 0:
            raise InteractionsError(f"{source} holds no rows")
        user_codes, user_ids = _encode_ids(table.column(user_col), user_col, source)
        _release_arrow_memory()
        item_codes, item_ids = _encode_ids(table.column(item_col), item_col, source)
        _release_arrow_memory()
        null_id = (user_codes < 0) | (item_codes < 0)
        if bool(null_id.all()):
            raise InteractionsError(f"{source}: every row has a null {user_col!r} or {item_col!r}")
        keep = ~null_id
        timestamps, time_unit = (None, None)
        null_times = 0
        if time_col is not None:
            timestamps, time_valid, time_unit = _seconds(table.column(time_col), time_col, source)
            _release_arrow_memory()
            null_times = int((keep & ~time_valid).sum())
            keep &= time_valid
            if not keep.any():
                raise InteractionsError(f"{source}: every row has a null id or a null {time_col!r}")
        weights = None if weight_col is None else _weights(table.column(weight_col), weight_col, source)
        del table
        titles: dict[str, str] = {}
        unknown = 0
        catalogue_items = None
        if items is not None:
            item_codes, item_ids, in_catalogue, titles = _against_catalogue(
                item_codes, item_ids, items, item_id_col or item_col, item_title_col, source
            )
            catalogue_items = int(len(item_ids) - np.unique(item_codes[~in_catalogue]).shape[0])
            missing = keep & ~in_catalogue
            unknown = int(missing.sum())
            if unknown_items == "drop":
                item_ids = item_ids.slice(0, catalogue_items)  # the unknown items' ids went with their rows
                keep &= in_catalogue
                if not keep.any():
                    raise InteractionsError(f"{source}: no interaction's item is in the catalogue")
        if not keep.all():
            user_codes, item_codes = user_codes[keep], item_codes[keep]
            timestamps = None if timestamps is None else timestamps[keep]
            weights = None if weights is None else weights[keep]
        first = _first_occurrences(user_codes, item_codes, timestamps, weights)
        duplicate_count = int(first.shape[0] - int(first.sum()))
        if duplicates == "drop" and duplicate_count:
            user_codes, item_codes = user_codes[first], item_codes[first]
            timestamps = None if timestamps is None else timestamps[first]
            weights = None if weights is None else weights[first]
        report = ReadReport(
            source=source,
            rows_read=rows_read,
            null_ids=int(null_id.sum()),
            null_times=null_times,
            duplicates=duplicate_count,
            duplicates_dropped=duplicates == "drop",
            unknown_items=unknown,
            unknown_items_dropped=unknown_items == "drop",
            time_unit=time_unit,
            rows=int(user_codes.shape[0]),
            catalogue_items=catalogue_items,
        )
        return cls(
            user_codes=user_codes,
            user_ids=user_ids,
            item_codes=item_codes,
            item_ids=item_ids,
            timestamps=timestamps,
            weights=weights,
            report=report,
            item_titles=titles,
            in_catalogue=items is not None,
        )

    @classmethod
    def from_parquet(
        cls, path: str | os.PathLike[str], user_col: str, item_col: str, *, items: Any = None, **options: Any
    ) -> Interactions:
        """Read a Parquet file, or a directory of Parquet parts, reading only the named columns.

        ``items`` may be a path (CSV or Parquet), a data frame or an Arrow table; the other options are those of
        :meth:`from_arrow`.
        """
        return cls._from_path(path, user_col, item_col, items, "parquet", options)

    @classmethod
    def _from_path(
        cls, path: Any, user_col: str, item_col: str, items: Any, file_format: str | None, options: dict[str, Any]
    ) -> Interactions:
        wanted = {
            "user_col": user_col,
            "item_col": item_col,
            "time_col": options.get("time_col"),
            "weight_col": options.get("weight_col"),
        }
        columns = _open_columns(path, wanted, id_columns=(user_col, item_col), file_format=file_format)
        catalogue = _catalogue(items, options.get("item_id_col") or item_col, options.get("item_title_col"))
        return cls.from_arrow(columns, user_col, item_col, items=catalogue, source=str(path), **options)

    @classmethod
    def from_csv(
        cls, path: str | os.PathLike[str], user_col: str, item_col: str, *, items: Any = None, **options: Any
    ) -> Interactions:
        """Read a CSV file (the first line names the columns; ids are read as text, exactly as written)."""
        return cls._from_path(path, user_col, item_col, items, "csv", options)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], user_col: str, item_col: str, *, items: Any = None, **options: Any
    ) -> Interactions:
        """Read a CSV or Parquet file or a directory of Parquet parts (by the name's ending; see
        :func:`read_table`)."""
        return cls._from_path(path, user_col, item_col, items, None, options)

    @classmethod
    def from_pandas(
        cls, frame: Any, user_col: str, item_col: str, *, items: Any = None, **options: Any
    ) -> Interactions:
        """Read a pandas DataFrame (converted to Arrow column by column; the index is ignored)."""
        table = pa.Table.from_pandas(frame, preserve_index=False)
        catalogue = _catalogue(items, options.get("item_id_col") or item_col, options.get("item_title_col"))
        return cls.from_arrow(table, user_col, item_col, items=catalogue, source="a pandas DataFrame", **options)

    @classmethod
    def from_polars(
        cls, frame: Any, user_col: str, item_col: str, *, items: Any = None, **options: Any
    ) -> Interactions:
        """Read a polars DataFrame (through its Arrow export, without copying the columns)."""
        catalogue = _catalogue(items, options.get("item_id_col") or item_col, options.get("item_title_col"))
        return cls.from_arrow(
            frame.to_arrow(), user_col, item_col, items=catalogue, source="a polars DataFrame", **options
        )


def _release_arrow_memory() -> None:
    """Hand the pages of a column just let go back to the system: Arrow's allocator keeps freed memory for reuse,
    which numpy, allocating the next arrays, cannot use."""
    pa.default_memory_pool().release_unused()


def _require_columns(found: Sequence[str], wanted: dict[str, str | None], source: str) -> None:
    for argument, column in wanted.items():
        if column is not None and column not in found:
            raise InteractionsError(
                f"{source} has no column {column!r} (asked for by {argument}); its columns are {list(found)}"
            )


class _TableColumns:
    """An in-memory Arrow table, read as :class:`_ParquetColumns` is (``column_names``, ``num_rows``, ``column``)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    @property
    def column_names(self) -> list[str]:
        return list(self.table.column_names)

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)


class _ParquetColumns:
    """The named columns of a Parquet dataset, each decoded only when asked for (row group by row group)."""

    def __init__(self, dataset: Any, names: list[str], path: Path) -> None:
        self.dataset, self.names, self.path = dataset, names, path

    @property
    def column_names(self) -> list[str]:
        return list(self.names)

    @property
    def num_rows(self) -> int:
        return int(self.dataset.count_rows())  # from the files' metadata

    def column(self, name: str) -> pa.ChunkedArray:
        """The column, read file by file and row group by row group: the dataset scanner's read-ahead holds
        about twice the column's size in decoded pages at its peak, one row group at a time a few MB."""
        import pyarrow.parquet as pq

        kind = self.dataset.schema.field(name).type
        chunks: list[pa.Array] = []
        try:
            for file in self.dataset.files:
                reader = pq.ParquetFile(file)
                for group in range(reader.metadata.num_row_groups):
                    if name not in reader.schema_arrow.names:  # a part without the column: nulls, as the scanner
                        chunks.append(pa.nulls(reader.metadata.row_group(group).num_rows, kind))
                        continue
                    read = reader.read_row_group(group, columns=[name]).column(0)
                    chunks.extend(chunk if chunk.type == kind else chunk.cast(kind) for chunk in read.chunks)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
            raise InteractionsError(f"{self.path} cannot be read as parquet: {error}") from None
        return pa.chunked_array(chunks, type=kind)


def read_table(
    path: str | os.PathLike[str],
    columns: Sequence[str] | dict[str, str | None],
    id_columns: Sequence[str] = (),
    file_format: str | None = None,
) -> pa.Table:
    """The named columns of a CSV file, a Parquet file or a directory of Parquet files, as an Arrow table.

    ``columns`` is a list of names, or ``{argument: name or None}`` so that a missing column's error names the
    argument that asked for it.

    Parquet is read column by column in row groups (only the named columns are decoded); a CSV file is parsed in
    blocks on several threads, its ``id_columns`` read as text so that ids such as ``"007"`` stay as written.
    ``file_format`` (``"csv"`` or ``"parquet"``) overrides the guess from the name (a directory is Parquet, a
    name ending in ``.tsv`` tab-separated CSV).

    Raises:
        InteractionsError: no such file, an unknown format, or a named column is missing (listing those found).
    """
    opened = _open_columns(path, columns, id_columns, file_format)
    if isinstance(opened, _TableColumns):
        return opened.table
    try:
        table: pa.Table = opened.dataset.to_table(columns=opened.names)
    except pa.ArrowInvalid as error:
        raise InteractionsError(f"{opened.path} cannot be read as parquet: {error}") from None
    return table


def _open_columns(
    path: str | os.PathLike[str],
    columns: Sequence[str] | dict[str, str | None],
    id_columns: Sequence[str] = (),
    file_format: str | None = None,
) -> _TableColumns | _ParquetColumns:
    """:func:`read_table`'s checks; a CSV file is read whole, a Parquet dataset opened for reading by column."""
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    wanted: dict[str, str | None] = (
        dict(columns) if isinstance(columns, dict) else {f"column {name!r}": name for name in columns}
    )
    names = list(dict.fromkeys(name for name in wanted.values() if name is not None))
    path = Path(path)
    if not path.exists():
        raise InteractionsError(f"no such file or directory: {path}")
    suffix = path.suffix.lower()
    if file_format is None:
        file_format = "parquet" if path.is_dir() or suffix in (".parquet", ".pq") else None
        if suffix in (".csv", ".tsv", ".txt", ".gz", ".bz2", ".zst"):
            file_format = "csv"
    if file_format not in ("csv", "parquet"):
        raise InteractionsError(f"{path}: unknown format {suffix!r} (expected .csv, .tsv, .parquet, or a directory)")
    if path.stat().st_size == 0 and path.is_file():
        raise InteractionsError(f"{path} is empty")
    try:
        if file_format == "parquet":
            dataset = ds.dataset(path, format="parquet")
            _require_columns(dataset.schema.names, wanted, str(path))
            return _ParquetColumns(dataset, names, path)
        else:
            delimiter = "\t" if ".tsv" in path.name.lower() else ","
            parse = pacsv.ParseOptions(delimiter=delimiter)
            header = pacsv.open_csv(path, parse_options=parse).schema.names
            _require_columns(header, wanted, str(path))
            # An empty field is a missing value (a null id is counted and dropped), not the id "".
            convert = pacsv.ConvertOptions(
                include_columns=names,
                column_types={name: pa.string() for name in id_columns},
                strings_can_be_null=True,
            )
            return _TableColumns(pacsv.read_csv(path, parse_options=parse, convert_options=convert))
    except pa.ArrowInvalid as error:
        if "Empty CSV file" in str(error):
            raise InteractionsError(f"{path} is empty") from None
        raise InteractionsError(f"{path} cannot be read as {file_format}: {error}") from None


def _catalogue(items: Any, id_col: str, title_col: str | None) -> pa.Table | None:
    if items is None:
        return None
    if isinstance(items, (str, os.PathLike)):
        wanted = {"item_id_col": id_col, "item_title_col": title_col}
        return read_table(items, wanted, id_columns=(id_col,))
    if isinstance(items, pa.Table):
        return items
    if hasattr(items, "to_arrow"):  # polars
        return items.to_arrow()
    return pa.Table.from_pandas(items, preserve_index=False)


def _as_id_type(column: pa.ChunkedArray, name: str, source: str) -> pa.ChunkedArray:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = pc.cast(column, kind.value_type)  # decoded; re-encoded below against the whole column
        kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return column
    if pa.types.is_null(kind):
        raise InteractionsError(f"{source}: every value of {name!r} is null")
    raise InteractionsError(f"{source}: column {name!r} must hold ids (strings or integers), got {kind}")


def _encode_ids(column: pa.ChunkedArray, name: str, source: str) -> tuple[np.ndarray, pa.Array]:
    """``(codes [n] int32, distinct ids)``: the distinct ids as ``large_string``, sorted as text (so that the ids
    of any subset of codes, taken in code order, are sorted too and a vocabulary of them needs no sort); null ids
    get code -1."""
    column = _as_id_type(column, name, source)
    if column.null_count == len(column):
        raise InteractionsError(f"{source}: every value of {name!r} is null")
    if pa.types.is_integer(column.type):
        extremes = pc.min_max(column)
        low, high = int(extremes["min"].as_py()), int(extremes["max"].as_py())
        if high - low < max(1 << 16, _DIRECT_SPAN_PER_ROW * len(column)):
            return _encode_dense_integers(column, low, high)
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


def _chunk_offsets(chunk: pa.Array, low: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(value - low [m] int64, valid [m] bool or None when no value is null)``; nulls read as ``low``."""
    valid = None
    if chunk.null_count:
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        chunk = pc.fill_null(chunk, low)
    values = chunk.to_numpy()
    # Wrapping arithmetic in 64 bits is exact here: every difference lies in [0, span), far below 2**63.
    wrapped_low = np.array(low).astype(np.uint64).astype(np.int64) if low >= 2**63 else np.int64(low)
    offsets: np.ndarray = values.astype(np.int64, copy=False) - wrapped_low
    return offsets, valid


def _encode_dense_integers(column: pa.ChunkedArray, low: int, high: int) -> tuple[np.ndarray, pa.Array]:
    """:func:`_encode_ids` for integers spanning ``[low, high]``, few enough to index a table by value."""
    present = np.zeros(high - low + 1, dtype=bool)
    for chunk in column.chunks:
        offsets, valid = _chunk_offsets(chunk, low)
        present[offsets if valid is None else offsets[valid]] = True
    where = np.flatnonzero(present)
    del present
    unsigned = pa.types.is_unsigned_integer(column.type)
    values = where.astype(np.uint64) + np.uint64(low) if unsigned else where + np.int64(low)
    order = _decimal_text_order(values)
    code_of_offset = np.empty(high - low + 1, dtype=np.int32)
    code_of_offset[where[order]] = np.arange(where.shape[0], dtype=np.int32)
    codes = np.empty(len(column), dtype=np.int32)
    start = 0
    for chunk in column.chunks:
        offsets, valid = _chunk_offsets(chunk, low)
        part = codes[start : start + len(chunk)]
        np.take(code_of_offset, offsets, out=part)
        if valid is not None:
            part[~valid] = -1
        start += len(chunk)
    return codes, pc.cast(pa.array(values[order]), pa.large_string())


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


def _seconds(column: pa.ChunkedArray, name: str, source: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(int64 seconds [n], valid [n] bool, how the column was read)``."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            column = pc.cast(column, pa.timestamp("s"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise InteractionsError(
                f"{source}: time column {name!r} is not a time: its strings are not ISO-8601 times ({error})"
            ) from None
        kind, unit_text = column.type, "ISO-8601 text"
    else:
        unit_text = ""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False) if column.null_count else np.ones(len(column), bool)
    if pa.types.is_timestamp(kind):
        divisor = _TIMESTAMP_DIVISORS[kind.unit]
        values = pc.fill_null(pc.cast(column, pa.int64()), 0).to_numpy()
        return np.floor_divide(values, divisor), valid, unit_text or f"timestamp[{kind.unit}]"
    if pa.types.is_date(kind):
        days = pc.fill_null(pc.cast(pc.cast(column, pa.date32()), pa.int32()), 0).to_numpy()
        return days.astype(np.int64) * 86_400, valid, "dates"
    if pa.types.is_integer(kind):
        extremes = pc.min_max(column)
        largest = max(abs(int(extremes["min"].as_py() or 0)), abs(int(extremes["max"].as_py() or 0)))
        if column.null_count:
            column = pc.fill_null(column, 0)
        values = _int64_array(column)
        unit, divisor = next(((unit, divisor) for limit, unit, divisor in _UNIT_LIMITS if largest < limit),
                             ("nanoseconds", 1_000_000_000))  # fmt: skip
        if divisor != 1:
            np.floor_divide(values, divisor, out=values)
        return values, valid, f"integer {unit} since 1970"
    if pa.types.is_floating(kind):
        values = pc.fill_null(column, 0.0).to_numpy().astype(np.float64)
        finite = np.isfinite(values)
        if not finite[valid].all():
            raise InteractionsError(f"{source}: time column {name!r} holds NaN or infinite values")
        return np.floor(values).astype(np.int64), valid, "seconds since 1970 (floats)"
    raise InteractionsError(
        f"{source}: time column {name!r} is not a time: expected integers, floats, timestamps, dates or ISO-8601 "
        f"strings, got {kind}"
    )


def _int64_array(column: pa.ChunkedArray) -> np.ndarray:
    """A null-free integer column as one writable ``int64`` numpy array, copied chunk by chunk (no Arrow
    intermediate: concatenating the chunks first would hold the column twice)."""
    values = np.empty(len(column), dtype=np.int64)
    start = 0
    for chunk in column.chunks:
        values[start : start + len(chunk)] = chunk.to_numpy()
        start += len(chunk)
    return values


def _weights(column: pa.ChunkedArray, name: str, source: str) -> np.ndarray:
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise InteractionsError(f"{source}: weight column {name!r} must hold numbers, got {column.type}")
    if column.null_count:
        raise InteractionsError(f"{source}: weight column {name!r} holds {column.null_count} nulls")
    values: np.ndarray = column.to_numpy().astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise InteractionsError(f"{source}: weight column {name!r} must hold finite numbers >= 0")
    return values.astype(np.float32)


def _against_catalogue(
    item_codes: np.ndarray,
    item_ids: pa.Array,
    items: pa.Table,
    id_col: str,
    title_col: str | None,
    source: str,
) -> tuple[np.ndarray, pa.Array, np.ndarray, dict[str, str]]:
    """Re-code the log's items as catalogue rows; returns the codes, the catalogue's ids (unknown items after
    them), whether each row's item is in the catalogue, and the titles."""
    catalogue_source = "the item catalogue"
    wanted = {"item_id_col": id_col, "item_title_col": title_col}
    _require_columns(items.column_names, wanted, catalogue_source)
    if items.num_rows == 0:
        raise InteractionsError(f"{catalogue_source} holds no rows")
    codes, catalogue_ids = _encode_ids(items.column(id_col), id_col, catalogue_source)
    titles: dict[str, str] = {}
    if title_col is not None:
        title_values = pc.cast(items.column(title_col), pa.large_string()).to_pylist()
        ids = catalogue_ids.to_pylist()
        for code, title in zip(codes.tolist(), title_values, strict=True):
            if code >= 0 and title is not None:
                titles.setdefault(ids[code], title)
    found = pc.fill_null(pc.index_in(item_ids, value_set=catalogue_ids), -1)
    positions = np.array(found.to_numpy(zero_copy_only=False), dtype=np.int64)
    unknown = np.flatnonzero(positions < 0)
    # Unknown items keep codes after the catalogue's, so that "keep" only has to append their ids.
    positions[unknown] = len(catalogue_ids) + np.arange(unknown.shape[0])
    all_ids = pa.concat_arrays([catalogue_ids, item_ids.take(pa.array(unknown))]) if unknown.size else catalogue_ids
    mapped = positions.astype(np.int32)[np.maximum(item_codes, 0)]
    in_catalogue = mapped < len(catalogue_ids)
    return mapped, all_ids, in_catalogue, titles


#: The second hashing pass of the duplicate search goes in chunks of this many rows.
_CANDIDATE_CHUNK = 1 << 23
_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))


def _row_hashes(columns: Sequence[np.ndarray]) -> np.ndarray:
    """``[n]`` ``uint32`` hashes of each row's values: the two ``int32`` id codes packed in one 64-bit word, each
    further column xor-ed in and multiplied by an odd constant, then a xor-shift and the product's top 32 bits.
    Chunked on threads (numpy releases the GIL), each chunk writing its own slice."""
    users, items, *others = columns
    hashes = np.empty(users.shape[0], dtype=np.uint32)

    def work(start: int, end: int) -> None:
        with np.errstate(over="ignore"):
            mixed = users[start:end].astype(np.uint64) << np.uint64(32)
            mixed |= items[start:end].view(np.uint32).astype(np.uint64)
            mixed *= _MIX[0]
            for number, column in enumerate(others):
                part = column[start:end]
                mixed ^= part.view(np.uint32 if part.dtype.itemsize == 4 else np.uint64).astype(np.uint64)
                mixed *= _MIX[1 + number % 2]
            mixed ^= mixed >> np.uint64(29)
            mixed *= _MIX[2]
            hashes[start:end] = mixed >> np.uint64(32)

    for_each_chunk(users.shape[0], work)
    return hashes


def _first_occurrences(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, weights: np.ndarray | None
) -> np.ndarray:
    """``[n]`` bool: whether each row is the first with its (user, item, time, weight).

    Exact, without a hash table of every row: rows are hashed to 32 bits and sorted, and only the rows whose hash
    occurs more than once (the duplicates and, at tens of millions of rows, a few hundred thousand collisions) go
    through Arrow's exact group-by, where each group's smallest row number is its first occurrence.
    """
    columns = [users, items] + [column for column in (timestamps, weights) if column is not None]
    count = users.shape[0]
    first = np.ones(count, dtype=bool)
    if count < 2:
        return first
    ordered = _row_hashes(columns)
    ordered.sort()  # in place: the rows' order is recovered by hashing again, cheaper than a second copy
    repeated = pa.array(np.unique(ordered[1:][ordered[1:] == ordered[:-1]]))
    del ordered
    if len(repeated) == 0:
        return first
    marked = np.zeros(count, dtype=bool)
    for start in range(0, count, _CANDIDATE_CHUNK):
        end = min(start + _CANDIDATE_CHUNK, count)
        hashes = _row_hashes([column[start:end] for column in columns])
        marked[start:end] = pc.is_in(hashes, value_set=repeated).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(marked)
    table = {f"key{number}": column[candidates] for number, column in enumerate(columns)}
    table["row"] = candidates
    groups = pa.table(table).group_by([name for name in table if name != "row"]).aggregate([("row", "min")])
    first[candidates] = False
    first[groups.column("row_min").to_numpy()] = True
    return first
