"""Argument checks shared by the public API.

Every public entry point validates its inputs here so that bad input fails early with an error that names the
argument and what was expected, instead of a shape error deep inside torch or, worse, a silent wrong answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_tensor(value: Any, name: str) -> torch.Tensor:
    """Return ``value`` as a tensor: a tensor as it is, a numpy array of numbers or booleans as a tensor sharing
    its memory (TFRS's layers take numpy arrays); anything else raises a ``TypeError`` naming ``name``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor (or a numpy array), got {type(value).__name__}")


def require_positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool, float or string), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def require_number(value: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a float if it is a real number in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Raises:
        TypeError: not a number (a bool or string counts as none).
        ValueError: NaN, or outside the range (infinity is outside any finite bound).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    below = number <= low if low_open else number < low
    if math.isnan(number) or below or number > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return number


def require_floating(value: Any, name: str, ndims: Sequence[int]) -> torch.Tensor:
    """Check that ``value`` is a floating-point tensor with one of the allowed numbers of dimensions."""
    tensor = require_tensor(value, name)
    if tensor.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.ndim not in ndims:
        allowed = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {allowed} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def require_embeddings(value: Any, name: str, ndims: Sequence[int]) -> torch.Tensor:
    """:func:`require_floating`, and at least one column: zero-dimensional embeddings score 0 against everything,
    and some libraries (FAISS's k-means) divide by the dimension."""
    tensor = require_floating(value, name, ndims)
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one embedding dimension, got shape {tuple(tensor.shape)}")
    return tensor


_FINITE_CHECK_ELEMENTS = 1 << 22


def require_finite(tensor: torch.Tensor, name: str) -> None:
    """Raise a ``ValueError`` if ``tensor`` holds NaN or infinity.

    Large tensors are checked in slices: ``torch.isfinite`` builds temporaries as large as its input, which
    would double the memory of a million-row corpus.
    """
    if tensor.numel() == 0:
        return
    if tensor.numel() <= _FINITE_CHECK_ELEMENTS and math.isfinite(float(tensor.detach().sum())):
        # Any NaN or infinity makes the sum non-finite, so a finite sum proves every value finite, in one pass
        # and without temporaries; only a non-finite sum (which overflow can also cause) needs the count below.
        return
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.flatten()
    bad = 0
    for start in range(0, flat.numel(), _FINITE_CHECK_ELEMENTS):
        part = flat[start : start + _FINITE_CHECK_ELEMENTS]
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def require_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    """Raise a ``ValueError`` unless ``tensor.shape == shape``."""
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def as_float_vector(value: Any, name: str, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Convert a per-row vector (tensor, array or sequence) to a finite 1-D tensor of ``length`` entries.

    A trailing singleton dimension (``[length, 1]``, as Keras accepts for sample weights) is squeezed.
    """
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers: {error}") from error
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if tensor.ndim == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 1 or tensor.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(tensor.shape)}")
    tensor = tensor.to(device=device, dtype=dtype)
    require_finite(tensor, name)
    return tensor


def has_trailing_nul(values: Any) -> bool:
    """Whether a sequence or object array of ids holds a ``str``/``bytes`` ending in a NUL character.

    numpy's fixed-width strings cannot hold trailing NULs: ``np.asarray(["42\\x00"])`` is ``["42"]``, so such an
    id would silently compare equal to another. Only Python sequences and object arrays can carry one (a numpy
    ``str`` array has already lost it), so only they are scanned.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind != "O":
            return False
        values = values.reshape(-1).tolist()
    elif not isinstance(values, (list, tuple)):
        return False
    return any(ends_in_nul(value) for value in values)


def ends_in_nul(value: Any) -> bool:
    """Whether one id is a ``str``/``bytes`` ending in a NUL character (see :func:`has_trailing_nul`)."""
    return isinstance(value, (str, bytes)) and value[-1:] in ("\x00", b"\x00")


def refuse_trailing_nul(values: Any, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` if an id ends in a NUL character (see :func:`has_trailing_nul`)."""
    if has_trailing_nul(values):
        raise ValueError(
            f"{name} holds a string ending in a NUL character ('\\x00'): numpy strings cannot keep it, so it would "
            "be confused with the same id without it"
        )


def encode_ids(ids: Any, name: str, length: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Turn candidate identifiers into integer codes that compare equal exactly when the ids do.

    Args:
        ids: a 1-D integer tensor, a numpy array of integers or strings, or a sequence of ``int``/``str``/``bytes``.
        name: the argument's name, for error messages.
        length: the required number of ids, if any.

    Returns:
        ``(codes, values)``: ``codes`` is an ``int64`` tensor of shape ``[n]`` (on the CPU unless ``ids`` was a
        tensor, whose device it keeps); ``values`` is a 1-D numpy array of the original ids (integers keep an
        integer dtype, strings become a ``str``/``bytes`` array).
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{name} must hold integers or strings, got a tensor of dtype {ids.dtype}")
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        if length is not None and ids.shape[0] != length:
            raise ValueError(f"{name} must have {length} entries, got {ids.shape[0]}")
        return ids.to(torch.int64), ids.detach().cpu().numpy()
    refuse_trailing_nul(ids, name)
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
    if values.dtype.kind in "iu":
        return torch.as_tensor(values.astype(np.int64)), values
    if isinstance(ids, (list, tuple)) and ids:
        kinds = {isinstance(value, (str, bytes)) for value in ids}
        if len(kinds) > 1:
            # numpy would turn every integer into its string ("1"), silently a different id.
            raise TypeError(f"{name} must hold integers or strings, not a mix of both")
    if values.dtype.kind in "USO":
        if values.dtype.kind == "O" and not all(isinstance(v, (str, bytes, int, np.integer)) for v in values):
            raise TypeError(f"{name} must hold integers or strings")
        _, codes = np.unique(values.astype(str), return_inverse=True)
        return torch.as_tensor(codes.astype(np.int64)), values
    if values.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64), values.astype(np.int64)
    raise TypeError(f"{name} must hold integers or strings, got numpy dtype {values.dtype}")


def per_query_ids(values: Any, num_queries: int, name: str) -> list[np.ndarray]:
    """Ragged per-query ids, from a ``[nq, R]`` tensor/array or a list of ``nq`` sequences, as 1-D arrays."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold ids (integers or strings), got dtype {values.dtype}")
        values = values.detach().cpu().numpy()
    if isinstance(values, np.ndarray):
        if values.ndim != 2:
            raise ValueError(f"{name} must be [num_queries, R], got shape {values.shape}")
        if values.size and values.dtype.kind not in "iuUSO":
            raise TypeError(f"{name} must hold ids (integers or strings), got dtype {values.dtype}")
        refuse_trailing_nul(values, name)
        rows = list(values)
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        rows = []
        for row in values:
            if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray, torch.Tensor)):
                raise TypeError(f"{name} must hold one sequence of ids per query, got {type(row).__name__}")
            if isinstance(row, torch.Tensor):
                row = row.detach().cpu().numpy()
            refuse_trailing_nul(row, name)
            array = np.asarray(row).reshape(-1)
            if array.size and array.dtype.kind not in "iuUSO":
                raise TypeError(f"{name} must hold ids (integers or strings), got dtype {array.dtype}")
            rows.append(array)
    else:
        raise TypeError(f"{name} must be a [num_queries, R] tensor/array or a list of id sequences")
    if len(rows) != num_queries:
        raise ValueError(f"{name} must have one row per query ({num_queries}), got {len(rows)}")
    return rows
