"""Interaction logs from files and data frames: CSV, Parquet, pandas, polars and Arrow, read with pyarrow.

:class:`Interactions` is one log, columnar and encoded once: each id column becomes ``int32`` codes into an Arrow
array of its distinct ids, sorted as text (integer ids spanning a range not much wider than the log by a table
indexed by value, others by one hash pass, :func:`pyarrow.compute.dictionary_encode`), times become ``int64``
seconds, weights ``float32``. Every column is encoded as its batches stream by (a Parquet log one row group at a
time, see :mod:`twotower.data._columns`), so the log is never held as Arrow columns, and nothing is held per row as
a Python object: a log of tens of millions of rows costs 16 bytes per row or so (see ``benchmarks/ingest.py``).
What reading dropped or found is counted in :class:`ReadReport`: rows with a null id or time, duplicate rows,
interactions with items missing from the catalogue.
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
from twotower.data._columns import (
    IdColumn,
    InteractionsError,
    ParquetSource,
    SecondsColumn,
    Source,
    TableSource,
    WeightColumn,
    encode_ids,
    id_column,
)

__all__ = ["Interactions", "InteractionsError", "Policy", "ReadReport", "read_table"]

Policy = Literal["keep", "drop"]


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
        context: further columns of the log asked for by ``context_cols`` (features such as a device or a
            price), each an Arrow array aligned with the kept rows.
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
    context: dict[str, pa.Array] = field(default_factory=dict)

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
        table: pa.Table | pa.RecordBatch | Source,
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
        context_cols: Sequence[str] = (),
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
            context_cols: further columns to keep, aligned with the kept rows, as :attr:`context` (features).

        Raises:
            InteractionsError: a column is missing (the columns found are listed) or has the wrong type, the log
                has no rows, every id is null, or the time column is not a time.
        """
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if isinstance(table, pa.Table):
            table = TableSource(table)
        if not isinstance(table, (TableSource, ParquetSource)):
            raise TypeError(f"table must be a pyarrow Table, got {type(table).__name__}")
        for name, value in (("duplicates", duplicates), ("unknown_items", unknown_items)):
            if value not in ("keep", "drop"):
                raise ValueError(f"{name} must be 'keep' or 'drop', got {value!r}")
        wanted = {"user_col": user_col, "item_col": item_col, "time_col": time_col, "weight_col": weight_col}
        _require_columns(table.column_names, wanted, source)
        _require_columns(table.column_names, {f"context_cols ({name!r})": name for name in context_cols}, source)
        taken = {user_col, item_col, time_col, weight_col}
        if set(context_cols) & taken or len(set(context_cols)) < len(context_cols):
            raise ValueError(
                f"context_cols must be distinct and name none of the id, time and weight columns, got "
                f"{list(context_cols)}"
            )
        rows_read = table.num_rows
        if rows_read == 0:
            raise InteractionsError(f"{source} holds no rows")
        # Every column is encoded as its batches stream by (a Parquet row group at a time): the log is never held
        # as Arrow columns, only as the encoded arrays.
        users, items_read = (id_column(table, name, rows_read, source) for name in (user_col, item_col))
        encoders: dict[str, IdColumn | SecondsColumn | WeightColumn] = {"user": users, "item": items_read}
        if time_col is not None:
            encoders["time"] = SecondsColumn(time_col, table.column_type(time_col), rows_read, source)
        if weight_col is not None:
            encoders["weight"] = WeightColumn(weight_col, table.column_type(weight_col), rows_read, source)
        start = 0
        carried: dict[str, list[pa.Array]] = {name: [] for name in context_cols}
        names = [encoder.name for encoder in encoders.values()]
        for batch in table.batches(names + list(carried)):
            for encoder, chunk in zip(encoders.values(), batch, strict=False):
                encoder.add(start, chunk)
            for pieces, chunk in zip(carried.values(), batch[len(names) :], strict=True):
                pieces.append(chunk)
            start += len(batch[0])
        context = {
            name: pa.chunked_array(pieces, type=table.column_type(name)).combine_chunks()
            for name, pieces in carried.items()
        }
        del table
        _release_arrow_memory()
        user_codes, user_ids = users.finish()
        item_codes, item_ids = items_read.finish()
        null_id = (user_codes < 0) | (item_codes < 0)
        if bool(null_id.all()):
            raise InteractionsError(f"{source}: every row has a null {user_col!r} or {item_col!r}")
        keep = ~null_id
        timestamps, time_unit = (None, None)
        null_times = 0
        if isinstance(times := encoders.get("time"), SecondsColumn):
            timestamps, time_valid, time_unit = times.finish()
            if time_valid is not None:
                null_times = int((keep & ~time_valid).sum())
                keep &= time_valid
                if not keep.any():
                    raise InteractionsError(f"{source}: every row has a null id or a null {time_col!r}")
        weights = weighting.finish() if isinstance(weighting := encoders.get("weight"), WeightColumn) else None
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
            context = {name: column.filter(pa.array(keep)) for name, column in context.items()}
            user_codes, item_codes = user_codes[keep], item_codes[keep]
            timestamps = None if timestamps is None else timestamps[keep]
            weights = None if weights is None else weights[keep]
        first = _first_occurrences(user_codes, item_codes, timestamps, weights)
        duplicate_count = int(first.shape[0] - int(first.sum()))
        if duplicates == "drop" and duplicate_count:
            context = {name: column.filter(pa.array(first)) for name, column in context.items()}
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
            context=context,
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
            **{f"context_cols ({name!r})": name for name in options.get("context_cols", ())},
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


def read_table(
    path: str | os.PathLike[str],
    columns: Sequence[str] | dict[str, str | None],
    id_columns: Sequence[str] = (),
    file_format: str | None = None,
) -> pa.Table:
    """The named columns of a CSV file, a Parquet file or a directory of Parquet files, as an Arrow table.

    ``columns`` is a list of names, or ``{argument: name or None}`` so that a missing column's error names the
    argument that asked for it.

    Only the named columns of a Parquet dataset are decoded; a CSV file is parsed in
    blocks on several threads, its ``id_columns`` read as text so that ids such as ``"007"`` stay as written.
    ``file_format`` (``"csv"`` or ``"parquet"``) overrides the guess from the name (a directory is Parquet, a
    name ending in ``.tsv`` tab-separated CSV).

    Raises:
        InteractionsError: no such file, an unknown format, or a named column is missing (listing those found).
    """
    opened = _open_columns(path, columns, id_columns, file_format)
    if isinstance(opened, TableSource):
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
) -> Source:
    """:func:`read_table`'s checks; a CSV file is read whole, a Parquet dataset opened for reading by row group."""
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
            return ParquetSource(dataset, names, path)
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
            return TableSource(pacsv.read_csv(path, parse_options=parse, convert_options=convert))
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
    codes, catalogue_ids = encode_ids(items.column(id_col), id_col, catalogue_source)
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
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if repeated.shape[0] == 0:
        return first
    # A table of the hashes' top 24 bits sends only the few rows that may have a repeated hash to the exact
    # search among them (a bisection per row costs ten times the hash).
    screen = np.zeros(1 << 24, dtype=bool)
    screen[repeated >> np.uint32(8)] = True
    marked = np.zeros(count, dtype=bool)

    def mark(start: int, end: int) -> None:
        hashes = _row_hashes([column[start:end] for column in columns])
        maybe = np.flatnonzero(screen[hashes >> np.uint32(8)])
        candidates = hashes[maybe]
        position = np.minimum(np.searchsorted(repeated, candidates), repeated.shape[0] - 1)
        marked[start + maybe[repeated[position] == candidates]] = True

    for_each_chunk(count, mark)
    candidates = np.flatnonzero(marked)
    table = {f"key{number}": column[candidates] for number, column in enumerate(columns)}
    table["row"] = candidates
    groups = pa.table(table).group_by([name for name in table if name != "row"]).aggregate([("row", "min")])
    first[candidates] = False
    first[groups.column("row_min").to_numpy()] = True
    return first
