"""Interaction logs from files and data frames: CSV, Parquet, pandas, polars and Arrow, read with pyarrow.

:class:`Interactions` is one log, columnar and encoded once: each id column becomes ``int32`` codes into an Arrow
array of its distinct ids (one hash pass, :func:`pyarrow.compute.dictionary_encode`), times become ``int64``
seconds, weights ``float32``. Nothing is held per row as a Python object, so a log of tens of millions of rows
costs a few bytes per row and column (see ``benchmarks/ingest.py``). What reading dropped or found is counted in
:class:`ReadReport`: rows with a null id or time, duplicate rows, interactions with items missing from the
catalogue.
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

from twotower.data.movielens import DataError

Policy = Literal["keep", "drop"]
#: Below this many seconds an integer time is read as seconds (1e11 s is the year 5138; 1e11 ms is 1973), and so
#: on for milliseconds and microseconds; above, nanoseconds.
_UNIT_LIMITS = ((1e11, "seconds", 1), (1e14, "milliseconds", 1_000), (1e17, "microseconds", 1_000_000))
_TIMESTAMP_DIVISORS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


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
        user_ids: the distinct user ids (Arrow ``large_string``; integer ids as their decimal text), in order of
            first appearance (ids seen only on dropped rows included: vocabularies are fitted on a split's rows).
        item_codes: ``[n]`` ``int32`` codes into :attr:`item_ids`.
        item_ids: the distinct item ids: the catalogue's (in its order, then unknown items that were kept), or
            those of the log in order of first appearance.
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
        table: pa.Table | pa.RecordBatch,
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
        if not isinstance(table, pa.Table):
            raise TypeError(f"table must be a pyarrow Table, got {type(table).__name__}")
        for name, value in (("duplicates", duplicates), ("unknown_items", unknown_items)):
            if value not in ("keep", "drop"):
                raise ValueError(f"{name} must be 'keep' or 'drop', got {value!r}")
        wanted = {"user_col": user_col, "item_col": item_col, "time_col": time_col, "weight_col": weight_col}
        _require_columns(table.column_names, wanted, source)
        if table.num_rows == 0:
            raise InteractionsError(f"{source} holds no rows")
        rows_read = table.num_rows
        user_codes, user_ids = _encode_ids(table.column(user_col), user_col, source)
        item_codes, item_ids = _encode_ids(table.column(item_col), item_col, source)
        null_id = (user_codes < 0) | (item_codes < 0)
        if bool(null_id.all()):
            raise InteractionsError(f"{source}: every row has a null {user_col!r} or {item_col!r}")
        keep = ~null_id
        timestamps, time_unit = (None, None)
        null_times = 0
        if time_col is not None:
            timestamps, time_valid, time_unit = _seconds(table.column(time_col), time_col, source)
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
        table = read_table(path, wanted, id_columns=(user_col, item_col), file_format=file_format)
        catalogue = _catalogue(items, options.get("item_id_col") or item_col, options.get("item_title_col"))
        return cls.from_arrow(table, user_col, item_col, items=catalogue, source=str(path), **options)

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

    Parquet is read column by column in row groups (only the named columns are decoded); a CSV file is parsed in
    blocks on several threads, its ``id_columns`` read as text so that ids such as ``"007"`` stay as written.
    ``file_format`` (``"csv"`` or ``"parquet"``) overrides the guess from the name (a directory is Parquet, a
    name ending in ``.tsv`` tab-separated CSV).

    Raises:
        InteractionsError: no such file, an unknown format, or a named column is missing (listing those found).
    """
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
            return dataset.to_table(columns=names)
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
            return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
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
    """``(codes [n] int32, distinct ids)``: one hash pass; null ids get code -1."""
    column = _as_id_type(column, name, source)
    encoded = pc.dictionary_encode(column)
    # On a chunked array the hash table is shared by the chunks, so every chunk carries the same final dictionary.
    chunks = [chunk for chunk in encoded.chunks if len(chunk)]
    codes = np.empty(len(column), dtype=np.int32)
    start = 0
    for chunk in chunks:
        indices = pc.fill_null(chunk.indices, -1).to_numpy(zero_copy_only=False)
        codes[start : start + len(chunk)] = indices
        start += len(chunk)
    if not chunks or len(chunks[-1].dictionary) == 0:
        raise InteractionsError(f"{source}: every value of {name!r} is null")
    distinct = chunks[-1].dictionary
    if len(distinct) >= np.iinfo(np.int32).max:
        raise InteractionsError(f"{source}: {name!r} has more than 2**31 distinct ids")
    return codes, pc.cast(distinct, pa.large_string())


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
        values = pc.fill_null(pc.cast(column, pa.int64()), 0).to_numpy()
        largest = float(np.abs(values[valid]).max(initial=0))
        for limit, unit, divisor in _UNIT_LIMITS:
            if largest < limit:
                return np.floor_divide(values, divisor), valid, f"integer {unit} since 1970"
        return np.floor_divide(values, 1_000_000_000), valid, "integer nanoseconds since 1970"
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


def _first_occurrences(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None, weights: np.ndarray | None
) -> np.ndarray:
    """``[n]`` bool: whether each row is the first with its (user, item, time, weight).

    Exact, and one hash pass in Arrow's C++ group-by: each group's smallest row number is its first occurrence.
    """
    columns: dict[str, np.ndarray] = {"user": users, "item": items}
    if timestamps is not None:
        columns["time"] = timestamps
    if weights is not None:
        columns["weight"] = weights
    keys = list(columns)
    columns["row"] = np.arange(users.shape[0], dtype=np.int64)
    groups = pa.table(columns).group_by(keys).aggregate([("row", "min")])
    first = np.zeros(users.shape[0], dtype=bool)
    first[groups.column("row_min").to_numpy()] = True
    return first
