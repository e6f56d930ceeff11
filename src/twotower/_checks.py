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


def require_tensor_like(value: Any, name: str) -> torch.Tensor:
    """:func:`require_tensor`, also accepting a (nested) list or tuple of numbers, as TensorFlow's layers do."""
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError as error:  # ragged
            raise ValueError(f"{name} must be a rectangular array of numbers: {error}") from error
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold numbers, got {array.dtype}")
        return torch.from_numpy(array.astype(np.float32) if array.dtype == np.float64 else array)
    return require_tensor(value, name)


def require_positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool, float or string), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def optional_positive_int(value: Any, name: str) -> int | None:
    """:func:`require_positive_int`, letting ``None`` (a setting left to its default) through."""
    return None if value is None else require_positive_int(value, name)


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
