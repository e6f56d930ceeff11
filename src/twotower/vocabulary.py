"""Vocabularies: ids to embedding rows, with out-of-vocabulary rows, as Keras's ``StringLookup`` and ``Hashing``.

A :class:`Vocabulary` maps ids (strings; integers are looked up by their decimal text) to the rows of an
embedding table. Its first ``num_oov_buckets`` rows are out-of-vocabulary buckets: an unknown id goes to bucket
``fnv1a_64(id) % num_oov_buckets`` (row 0 when there is one bucket, as ``StringLookup(num_oov_indices=1)``), the
known values, sorted, get the rows after them. With no known values and many buckets it is pure feature hashing
(Keras's ``Hashing``), for id spaces too large or too open to enumerate.

The values are kept as one Arrow string array, so a vocabulary of millions of ids holds no Python object per id;
large lookups are one Arrow hash join, small ones (a serving request) a binary search.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twotower._checks import ends_in_nul, has_trailing_nul

OOV_TOKEN = "[UNK]"
# Below this many ids a lookup is a binary search in the sorted values; above, one Arrow hash join (building
# the hash set of a large vocabulary costs more than searching a few ids).
_SEARCH_BELOW = 4096
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def as_id_strings(ids: Any, name: str) -> pa.Array:
    """``ids`` (an Arrow array or chunked array, numpy array, list, or tensor) as an Arrow ``large_string`` array.

    Integer ids become their decimal text, so that ``42`` and ``"42"`` are the same id. Nulls, floats and other
    types are refused with an error naming ``name``.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if not isinstance(ids, pa.Array):
        if hasattr(ids, "detach"):  # a torch tensor
            ids = ids.detach().cpu().numpy()
        try:
            empty = isinstance(ids, (list, tuple)) and not ids  # no element to infer a type from
            ids = pa.array([], type=pa.large_string()) if empty else pa.array(ids)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as error:
            raise TypeError(f"{name} must hold strings or integers: {error}") from error
    if ids.null_count:
        raise ValueError(f"{name} must not hold nulls, got {ids.null_count}")
    if pa.types.is_integer(ids.type):
        return pc.cast(ids, pa.large_string())
    if pa.types.is_null(ids.type) and len(ids) == 0:
        return pa.array([], type=pa.large_string())
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        return pc.cast(ids, pa.large_string())
    if pa.types.is_dictionary(ids.type):
        return as_id_strings(ids.dictionary_decode(), name)
    raise TypeError(f"{name} must hold strings or integers, got Arrow type {ids.type}")


def fnv1a_64(strings: pa.Array) -> np.ndarray:
    """The 64-bit FNV-1a hash of each string's UTF-8 bytes, ``[n]`` ``uint64`` (stable across runs and machines).

    Vectorised over the Arrow buffers: one pass per byte position, each over the strings that long.
    """
    strings = as_id_strings(strings, "strings")
    count = len(strings)
    hashes = np.full(count, _FNV_OFFSET, dtype=np.uint64)
    if count == 0:
        return hashes
    _, offsets_buffer, data_buffer = strings.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[strings.offset : strings.offset + count + 1]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    live = np.arange(count)
    for position in range(int(lengths.max(initial=0))):
        live = live[lengths[live] > position]
        mixed = hashes[live] ^ data[starts[live] + position].astype(np.uint64)
        hashes[live] = mixed * _FNV_PRIME  # wraps modulo 2**64, as FNV-1a's arithmetic does
    return hashes


def _strictly_increasing(strings: pa.Array) -> bool:
    """Whether each string sorts after the one before it (bytewise, as :func:`pyarrow.compute.sort_indices`)."""
    if len(strings) < 2:
        return True
    ordered = pc.less(strings.slice(0, len(strings) - 1), strings.slice(1))
    return bool(pc.all(ordered).as_py())


class Vocabulary:
    """Id-to-row lookup with ``num_oov_buckets`` out-of-vocabulary rows first, as Keras's ``StringLookup``.

    Rows ``0 .. num_oov_buckets - 1`` are the OOV buckets; the known values, sorted, get rows
    ``num_oov_buckets .. num_oov_buckets + n - 1``. ``len(vocabulary)`` is the number of rows an embedding table
    needs, and :meth:`to_list` has exactly that many entries: row ``i``'s token (``"[UNK]"`` for a bucket), as
    Keras's ``get_vocabulary()``.

    Args:
        values: the known ids (strings, or integers, kept as their decimal text); duplicates are merged. May be
            empty only with several buckets (pure hashing).
        num_oov_buckets: OOV rows; unknown ids are spread over them by ``fnv1a_64(id) % num_oov_buckets``.
    """

    def __init__(self, values: Any, num_oov_buckets: int = 1) -> None:
        if isinstance(num_oov_buckets, bool) or not isinstance(num_oov_buckets, (int, np.integer)):
            raise TypeError(f"num_oov_buckets must be an int, got {type(num_oov_buckets).__name__}")
        if num_oov_buckets < 1:
            raise ValueError(f"num_oov_buckets must be >= 1, got {num_oov_buckets}")
        strings = as_id_strings(values, "values")
        if len(strings) and pc.any(pc.ends_with(strings, "\x00")).as_py():
            # numpy's strings, which ids pass through elsewhere, drop trailing NULs: such an id is ambiguous.
            raise ValueError("values must not hold an id ending in a NUL character")
        if _strictly_increasing(strings):
            self._arrow: pa.Array = strings  # already distinct and sorted (e.g. a log's ids): no hash, no sort
        else:
            unique = pc.unique(strings)
            self._arrow = unique.take(pc.sort_indices(unique))
        self.num_oov_buckets = int(num_oov_buckets)
        if len(self._arrow) == 0 and self.num_oov_buckets == 1:
            raise ValueError("values must hold at least one value: a vocabulary cannot be empty (or hash: use buckets)")
        self._numpy: np.ndarray | None = None

    @classmethod
    def hashing(cls, num_buckets: int) -> Vocabulary:
        """Pure feature hashing: every id goes to row ``fnv1a_64(id) % num_buckets`` (Keras's ``Hashing``)."""
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 2:
            raise ValueError(f"num_buckets must be an int >= 2, got {num_buckets!r}")
        return cls(pa.array([], type=pa.large_string()), num_oov_buckets=int(num_buckets))

    @property
    def values(self) -> np.ndarray:
        """The known values, sorted, as a numpy ``str`` array (built on first use)."""
        if self._numpy is None:
            self._numpy = np.asarray(self._arrow.to_numpy(zero_copy_only=False), dtype=str)
        return self._numpy

    @property
    def arrow_values(self) -> pa.Array:
        """The known values, sorted, as an Arrow ``large_string`` array."""
        return self._arrow

    @property
    def num_values(self) -> int:
        """The number of known values (``len(self) - num_oov_buckets``)."""
        return len(self._arrow)

    def __len__(self) -> int:
        return self.num_oov_buckets + len(self._arrow)

    def __repr__(self) -> str:
        return f"Vocabulary({self.num_values} values, {self.num_oov_buckets} OOV bucket(s))"

    def lookup(self, ids: Any) -> np.ndarray:
        """``[n]`` ``int64`` rows of ``ids``; unknown ids go to their OOV bucket.

        Ids are compared as given: one ending in a NUL character is unknown, since no value can end in one.
        """
        small = isinstance(ids, (list, tuple)) or (isinstance(ids, np.ndarray) and ids.ndim == 1)
        if small and len(ids) < _SEARCH_BELOW:
            return self._search(ids)
        strings = as_id_strings(ids, "ids")
        if len(self._arrow) == 0:
            return self._buckets(strings)
        positions = pc.fill_null(pc.index_in(strings, value_set=self._arrow), -1)
        rows: np.ndarray = positions.to_numpy(zero_copy_only=False).astype(np.int64)
        found = rows >= 0
        rows[found] += self.num_oov_buckets
        if not found.all():
            rows[~found] = self._buckets(strings.filter(pa.array(~found)))
        return rows

    def _search(self, ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        array = np.asarray(ids)
        if array.dtype.kind in "iuS":
            array = array.astype(str)
        elif array.size and array.dtype.kind not in "US":
            if not all(isinstance(value, (str, int, np.integer)) and not isinstance(value, bool) for value in ids):
                raise TypeError("ids must hold strings or integers")
            array = np.asarray([str(value) for value in ids], dtype=str)
        elif not array.size:
            return np.zeros(0, dtype=np.int64)
        unknown = np.array([ends_in_nul(value) for value in ids]) if has_trailing_nul(ids) else None
        if len(self._arrow) == 0:
            return self._buckets(pa.array(np.asarray(ids, dtype=object).astype(str)))
        values = self.values
        positions = np.searchsorted(values, array)
        clipped = np.minimum(positions, values.shape[0] - 1)
        found = values[clipped] == array
        if unknown is not None:
            found &= ~unknown
        rows: np.ndarray = clipped.astype(np.int64) + self.num_oov_buckets
        if not found.all():
            if self.num_oov_buckets == 1:
                rows[~found] = 0
            else:
                missing = [str(value) for value, known in zip(ids, found, strict=True) if not known]
                rows[~found] = self._buckets(pa.array(missing, type=pa.large_string()))
        return rows

    def _buckets(self, strings: pa.Array) -> np.ndarray:
        if self.num_oov_buckets == 1:
            return np.zeros(len(strings), dtype=np.int64)
        return (fnv1a_64(strings) % np.uint64(self.num_oov_buckets)).astype(np.int64)

    def to_list(self) -> list[str]:
        """Row ``i``'s token for every row (``len(self)`` entries): ``"[UNK]"`` per OOV bucket, then the values."""
        return [OOV_TOKEN] * self.num_oov_buckets + self.known_values()

    def known_values(self) -> list[str]:
        """The known values, sorted (``len(self) - num_oov_buckets`` entries)."""
        return [str(value) for value in self._arrow.to_pylist()]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description that :meth:`from_json` turns back into an equal vocabulary."""
        return {"values": self.known_values(), "num_oov_buckets": self.num_oov_buckets}

    @classmethod
    def from_json(cls, payload: Any, name: str = "vocabulary") -> Vocabulary:
        """The vocabulary :meth:`to_json` described; a plain list of values (older runs and bundles) is accepted.

        Raises:
            ValueError: ``payload`` is neither form, naming ``name``.
        """
        if isinstance(payload, list):
            payload = {"values": payload, "num_oov_buckets": 1}
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("values"), list)
            or not all(isinstance(value, str) for value in payload["values"])
        ):
            raise ValueError(f"{name} must be a list of strings or {{'values': [...], 'num_oov_buckets': n}}")
        buckets = payload.get("num_oov_buckets", 1)
        if isinstance(buckets, bool) or not isinstance(buckets, int):
            raise ValueError(f"{name}'s num_oov_buckets must be an int, got {buckets!r}")
        return cls(pa.array(payload["values"], type=pa.large_string()), num_oov_buckets=buckets)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.num_oov_buckets == other.num_oov_buckets
            and self._arrow.equals(other._arrow)
        )

    __hash__ = None  # type: ignore[assignment]
