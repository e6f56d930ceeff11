"""Candidate identifiers: encoding, the id table of an index, and per-query membership.

Every module that handles ids goes through here, so that integers, strings and integral floats mean the same
everywhere:

* :func:`encode_ids` / :class:`EncodedIds` -- ids (a tensor, a numpy array, a list of ints or strings) checked
  once and turned into integer codes that compare equal exactly when the ids do;
* :func:`per_query_ids` -- ragged per-query ids (known positives, relevant items, exclusions);
* :func:`per_query_membership` -- "which of these ids does each query own": the ``[nq, w]`` boolean matrix of
  whether id ``[i, j]`` is one of query ``i``'s ids, used by the task (known positives) and the metrics
  (relevant items);
* :class:`IdTable` -- the ids of an index's rows and the reverse map from id to rows (exclusions).

Integral floats (``np.arange(n).astype(np.float32)``, which TFRS accepts as identifiers) are integer ids; a
float id with a fractional part, or beyond 2**53 where floats skip integers, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from twotower._checks import refuse_trailing_nul

#: Ids returned by an index: an ``int64`` tensor ``[nq, k]`` or, for string ids, a numpy array ``[nq, k]``.
Ids: TypeAlias = "torch.Tensor | np.ndarray"

# Beyond 2**53 a float64 cannot tell consecutive integers apart, so a float id there is not an exact integer.
_EXACT_FLOAT_INTEGERS = float(2**53)


@dataclass(frozen=True)
class EncodedIds:
    """Ids checked and encoded once.

    Attributes:
        codes: ``[n]`` ``int64`` tensor; ``codes[i] == codes[j]`` exactly when the ids are equal (for integer ids,
            the ids themselves; for strings, their rank among the distinct strings). On the CPU unless the ids
            came as a tensor, whose device it keeps.
        values: ``[n]`` numpy array of the ids: ``int64`` for integer (and integral float) ids, ``str`` for strings.
    """

    codes: torch.Tensor
    values: np.ndarray

    @property
    def is_string(self) -> bool:
        return bool(self.values.dtype.kind in "USO")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def head(self, count: int) -> EncodedIds:
        """The first ``count`` ids (codes stay comparable with the full set's)."""
        return EncodedIds(self.codes[:count], self.values[:count])

    def to(self, device: torch.device | str) -> EncodedIds:
        return EncodedIds(self.codes.to(device), self.values)

    @staticmethod
    def concatenate(parts: Sequence[EncodedIds | np.ndarray]) -> EncodedIds:
        """One set of ids from several (encoded, or raw id arrays); codes are recomputed over the union."""
        arrays = [part.values if isinstance(part, EncodedIds) else np.asarray(part) for part in parts]
        kinds = {array.dtype.kind in "USO" for array in arrays if array.size}
        if len(kinds) > 1:
            raise TypeError("ids must all be integers or all strings, not a mix of both")
        return encode_ids(np.concatenate(arrays), "ids")


def _integral_floats(values: np.ndarray, name: str) -> np.ndarray:
    """Float ids as ``int64`` when each is a whole number that a float represents exactly, else a TypeError."""
    as_float = values.astype(np.float64)
    if values.size and not (
        np.isfinite(as_float).all()
        and (np.abs(as_float) <= _EXACT_FLOAT_INTEGERS).all()
        and (np.floor(as_float) == as_float).all()
    ):
        raise TypeError(
            f"{name} must hold integers or strings (floats only with whole values below 2**53), got floats with "
            "a fraction, NaN or inf"
        )
    return as_float.astype(np.int64)


def encode_ids(ids: Any, name: str, length: int | None = None) -> EncodedIds:
    """Check ids and encode them (see :class:`EncodedIds`).

    Args:
        ids: a 1-D tensor or numpy array of integers, integral floats or strings, an already :class:`EncodedIds`
            (returned as it is), or a sequence of ``int``/``float``/``str``/``bytes``. ``[n, 1]`` is squeezed.
        name: the argument's name, for error messages.
        length: the required number of ids, if any.

    Raises:
        TypeError: booleans, complex numbers, non-integral floats, or a mix of integers and strings.
        ValueError: the wrong shape or length, or a string ending in a NUL character.
    """
    if isinstance(ids, EncodedIds):
        if length is not None and len(ids) != length:
            raise ValueError(f"{name} must have {length} entries, got {len(ids)}")
        return ids
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{name} must hold integers or strings, got a tensor of dtype {ids.dtype}")
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        if length is not None and ids.shape[0] != length:
            raise ValueError(f"{name} must have {length} entries, got {ids.shape[0]}")
        if ids.dtype.is_floating_point:
            values = _integral_floats(ids.detach().cpu().numpy(), name)
            return EncodedIds(torch.as_tensor(values, device=ids.device), values)
        return EncodedIds(ids.to(torch.int64), ids.detach().cpu().numpy().astype(np.int64, copy=False))
    refuse_trailing_nul(ids, name)
    if isinstance(ids, (list, tuple)) and ids:
        kinds = {isinstance(value, (str, bytes, np.str_, np.bytes_)) for value in ids}
        if len(kinds) > 1:
            # numpy would turn every integer into its string ("1"), silently a different id.
            raise TypeError(f"{name} must hold integers or strings, not a mix of both")
    try:
        values = np.asarray(ids)
    except ValueError as error:  # ragged nested sequences
        raise ValueError(f"{name} must be a 1-D sequence of ids: {error}") from error
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if length is not None and values.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {values.shape[0]}")
    if values.shape[0] == 0:
        return EncodedIds(torch.zeros(0, dtype=torch.int64), np.zeros(0, dtype=np.int64))
    if values.dtype.kind in "iu":
        integers = values.astype(np.int64)
        return EncodedIds(torch.as_tensor(integers), integers)
    if values.dtype.kind == "f":
        integers = _integral_floats(values, name)
        return EncodedIds(torch.as_tensor(integers), integers)
    if values.dtype.kind == "O" and not all(isinstance(v, (str, bytes)) for v in values.tolist()):
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values.tolist()):
            integers = values.astype(np.int64)
            return EncodedIds(torch.as_tensor(integers), integers)
        raise TypeError(f"{name} must hold integers or strings")
    if values.dtype.kind in "USO":
        strings = values.astype(str)
        _, codes = np.unique(strings, return_inverse=True)
        return EncodedIds(torch.as_tensor(codes.reshape(-1).astype(np.int64)), strings)
    raise TypeError(f"{name} must hold integers or strings, got numpy dtype {values.dtype}")


def per_query_ids(values: Any, num_queries: int, name: str) -> list[np.ndarray]:
    """Ragged per-query ids, from a ``[nq, R]`` tensor/array or a list of ``nq`` sequences, as 1-D arrays.

    Integral floats become ``int64``, as in :func:`encode_ids`.
    """
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{name} must hold ids (integers or strings), got dtype {values.dtype}")
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 2:
            raise ValueError(f"{name} must be [num_queries, R], got shape {values.shape}")
        refuse_trailing_nul(values, name)
        rows = [_row_ids(row, name) for row in values]
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        rows = []
        for row in values:
            if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray, torch.Tensor)):
                raise TypeError(f"{name} must hold one sequence of ids per query, got {type(row).__name__}")
            if isinstance(row, torch.Tensor):
                if row.dtype == torch.bool or row.is_complex():
                    raise TypeError(f"{name} must hold ids (integers or strings), got dtype {row.dtype}")
                row = row.detach().cpu().numpy()
            refuse_trailing_nul(row, name)
            rows.append(_row_ids(np.asarray(row).reshape(-1), name))
    else:
        raise TypeError(f"{name} must be a [num_queries, R] tensor/array or a list of id sequences")
    if len(rows) != num_queries:
        raise ValueError(f"{name} must have one row per query ({num_queries}), got {len(rows)}")
    return rows


def _row_ids(row: np.ndarray, name: str) -> np.ndarray:
    if not row.size:
        return row
    if row.dtype.kind == "f":
        return _integral_floats(row, name)
    if row.dtype.kind not in "iuUSO":
        raise TypeError(f"{name} must hold ids (integers or strings), got dtype {row.dtype}")
    return row


def same_kind(rows: Sequence[np.ndarray], is_string: bool, name: str, other: str) -> None:
    """Raise a TypeError naming ``name`` unless every non-empty row holds strings exactly when ``is_string``."""
    for row in rows:
        if row.size and (row.dtype.kind in "USO") != is_string:
            kind = "strings" if is_string else "integers"
            raise TypeError(f"{name} must hold {kind}, like {other}, got dtype {row.dtype}")


def per_query_membership(ids: np.ndarray, owned: Sequence[np.ndarray]) -> np.ndarray:
    """Whether each id belongs to its query's set: ``[nq, w]`` bool.

    Args:
        ids: ``[nq, w]`` ids (row ``i`` tested against query ``i``'s set), or ``[w]`` ids tested against every
            query's set.
        owned: ``nq`` 1-D arrays, query ``i``'s ids (of the kind of ``ids``: integers or strings).

    Every ``(query, id)`` pair becomes one integer key over a vocabulary shared by both sides, and membership
    is one sorted lookup: time and memory ``O(nq w + sum |owned|)``, not ``O(nq w |owned|)``.
    """
    num_queries = len(owned)
    shared = ids.ndim == 1
    width = int(ids.shape[-1])
    lengths = np.array([row.shape[0] for row in owned], dtype=np.int64)
    flat_owned = np.concatenate(owned) if owned else np.zeros(0, dtype=ids.dtype)
    flat_ids = ids.reshape(-1)
    if (flat_ids.dtype.kind in "USO") or (flat_owned.dtype.kind in "USO"):
        flat_ids, flat_owned = flat_ids.astype(str), flat_owned.astype(str)
    vocabulary, codes = np.unique(np.concatenate([flat_ids, flat_owned]), return_inverse=True)
    codes = codes.reshape(-1)
    size = max(len(vocabulary), 1)
    id_codes = codes[: flat_ids.shape[0]]
    if shared:
        id_keys = np.arange(num_queries, dtype=np.int64)[:, None] * size + id_codes[None, :]
    else:
        id_keys = (np.repeat(np.arange(num_queries, dtype=np.int64), width) * size + id_codes).reshape(-1, width)
    owned_keys = np.repeat(np.arange(num_queries, dtype=np.int64), lengths) * size + codes[flat_ids.shape[0] :]
    result: np.ndarray = np.isin(id_keys, owned_keys).reshape(num_queries, width)
    return result


class IdTable:
    """The ids of an index's rows, integer or string, and the reverse map from id to rows.

    Args:
        values: 1-D numpy array of ids (integer or ``str``), one per row.
    """

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.is_string = values.dtype.kind in "USO"
        if self.is_string:
            self.values = values.astype(str)
            self._lookup = self.values
        else:
            self._lookup = values.astype(np.int64)
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def integer_ids(self) -> np.ndarray | None:
        """``[n]`` C-contiguous int64 ids by row (a native search reads them), or ``None`` for string ids."""
        return None if self.is_string else self._lookup

    def take(self, positions: torch.Tensor) -> Ids:
        """Ids at row ``positions`` (any shape); position ``-1`` (an empty slot) gives id ``-1`` or ``""``."""
        return self.take_numpy(positions.detach().cpu().numpy(), positions.device)

    def take_numpy(self, positions: np.ndarray, device: torch.device | str = "cpu") -> Ids:
        """:meth:`take` for numpy ``positions``: integer ids come back as a tensor on ``device``."""
        empty = positions < 0
        has_empty = bool(empty.any())
        ids: np.ndarray = self._lookup[np.where(empty, 0, positions) if has_empty else positions]
        if has_empty:
            ids = np.where(empty, "" if self.is_string else -1, ids)
        if self.is_string:
            return ids
        tensor = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)

    def positions_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows holding each of ``ids`` (1-D): returns ``(which_id, row)`` pairs; unknown ids give no pair."""
        if self._sorted is None:
            keys = self.values if self.is_string else self.values.astype(np.int64)
            order = np.argsort(keys, kind="stable")
            self._sorted = (keys[order], order)
        keys_sorted, order = self._sorted
        ids = ids.astype(str) if self.is_string else ids.astype(np.int64)
        low = np.searchsorted(keys_sorted, ids, side="left")
        high = np.searchsorted(keys_sorted, ids, side="right")
        counts = high - low
        which = np.repeat(np.arange(ids.shape[0]), counts)
        starts = np.repeat(low - np.cumsum(counts) + counts, counts)
        rows = order[np.arange(which.shape[0]) + starts]
        return which, rows

    def excluded_rows(self, exclusions: Any, num_queries: int) -> torch.Tensor:
        """``[nq, E]`` rows to leave out per query (``-1`` pads), from per-query ids (see :func:`per_query_ids`).

        Ids not in the table are ignored; each excluded row appears once per query (a request repeating one id
        10,000 times excludes one row, and costs one: an approximate index retrieves ``k`` plus this many).
        """
        per_query = per_query_ids(exclusions, num_queries, "exclusions")
        same_kind(per_query, self.is_string, "exclusions", "the index's identifiers")
        lengths = np.array([row.shape[0] for row in per_query], dtype=np.int64)
        flat = np.concatenate(per_query) if per_query else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(num_queries), lengths)
        which, rows = self.positions_of(flat) if flat.size else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        query_of = owner[which]
        if query_of.size:
            keys = np.unique(query_of * len(self) + rows)
            query_of, rows = keys // len(self), keys % len(self)
        counts = np.bincount(query_of, minlength=num_queries)
        width = int(counts.max()) if counts.size else 0
        positions = np.full((num_queries, max(width, 1)), -1, dtype=np.int64)
        if query_of.size:
            order = np.argsort(query_of, kind="stable")
            query_sorted = query_of[order]
            slot = np.arange(query_sorted.shape[0]) - (np.cumsum(counts) - counts)[query_sorted]
            positions[query_sorted, slot] = rows[order]
        return torch.as_tensor(positions)
