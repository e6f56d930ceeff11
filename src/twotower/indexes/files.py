"""The index file format: one safetensors file of tensors and string metadata, checksummed over both.

Written atomically (:func:`twotower._files.atomic_write`); read back only after the format, version and SHA-256
are verified. Nothing in a file is executed: tensors are safetensors, the ids a UTF-8 blob, the query model (when
saved) a layer list rebuilt by :mod:`twotower.towers`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower._files import atomic_write
from twotower.ids import IdTable
from twotower.towers import TowerFormatError, build_tower, describe_tower, tower_tensors

_INDEX_FILE_VERSION = "2"


def save_index_file(path: Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and metadata as one safetensors file, atomically, with the SHA-256 of both."""
    from safetensors.torch import save

    header = {"format": kind, "version": _INDEX_FILE_VERSION, **metadata}
    header["sha256"] = _digest(tensors, header)
    atomic_write(path, save(tensors, metadata=header))


def load_index_file(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`save_index_file`, refusing a foreign, malformed or corrupt one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        metadata = _read_metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as error:
        raise ValueError(f"{path} is not a valid twotower index file: {error}") from error
    if metadata.get("format") != kind:
        name = kind.split(".")[-1]
        raise ValueError(f"{path} is not a twotower {name} index (format {metadata.get('format')!r})")
    if metadata.get("version") != _INDEX_FILE_VERSION:
        raise ValueError(
            f"{path} is a version {metadata.get('version')!r} index file; this twotower reads version "
            f"{_INDEX_FILE_VERSION} (whose checksum covers its settings too): build and save the index again"
        )
    if _digest(tensors, metadata) != metadata.get("sha256"):
        raise ValueError(f"{path} is corrupt: its contents do not match the checksum written with it")
    return tensors, metadata


def metadata_ints(path: str | os.PathLike[str], metadata: dict[str, str], names: Sequence[str]) -> dict[str, int]:
    """The named metadata entries as non-negative ints, refusing a missing or malformed one by name."""
    values = {}
    for name in names:
        text = metadata.get(name)
        if text is None or not text.isdigit() or len(text) > 18:
            raise ValueError(f"{path} is not a valid twotower index file: {name} is {text!r}, not a whole number")
        values[name] = int(text)
    return values


def ids_to_tensors(table: IdTable) -> dict[str, torch.Tensor]:
    if not table.is_string:
        return {"ids": torch.as_tensor(table.values.astype(np.int64))}
    encoded = [value.encode("utf-8", "surrogatepass") for value in table.values.tolist()]
    lengths = np.array([len(value) for value in encoded], dtype=np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {"string_ids_utf8": torch.as_tensor(blob), "string_ids_lengths": torch.as_tensor(lengths)}


def ids_from_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> np.ndarray:
    """The ids stored by :func:`ids_to_tensors`, refusing tensors of the wrong kind or inconsistent lengths."""
    problem = f"{path} is not a valid twotower index file"
    if "ids" in tensors:
        ids = tensors["ids"]
        if ids.dtype != torch.int64 or ids.ndim != 1:
            raise ValueError(f"{problem}: ids must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
        return ids.numpy()
    blob, lengths = tensors.get("string_ids_utf8"), tensors.get("string_ids_lengths")
    if blob is None or lengths is None:
        raise ValueError(f"{problem}: it holds no ids")
    if blob.dtype != torch.uint8 or lengths.dtype != torch.int64 or blob.ndim != 1 or lengths.ndim != 1:
        raise ValueError(f"{problem}: string ids must be a uint8 blob and int64 lengths")
    sizes = lengths.numpy()
    if bool((sizes < 0).any()) or int(sizes.sum()) != blob.shape[0]:
        raise ValueError(f"{problem}: the string id lengths do not add up to the blob")
    data = blob.numpy().tobytes()
    ends = np.cumsum(sizes)
    starts = ends - sizes
    try:
        values = [
            data[s:e].decode("utf-8", "surrogatepass") for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        ]
    except UnicodeDecodeError as error:
        raise ValueError(f"{problem}: a string id is not UTF-8 ({error})") from error
    return np.array(values, dtype=str)


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and every metadata entry but the digest itself."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        hasher.update(name.encode())
        hasher.update(str(tensor.dtype).encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    settings = {key: value for key, value in metadata.items() if key != "sha256"}
    hasher.update(json.dumps(settings, sort_keys=True).encode())
    return hasher.hexdigest()


def _read_metadata(data: bytes) -> dict[str, str]:
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise ValueError("metadata is not a mapping of strings")
    return metadata


_QUERY_MODEL_PREFIX = "query_model."


def query_model_entries(
    query_model: nn.Module | Callable[[Any], torch.Tensor] | None, include: bool | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata that save ``query_model`` with an index (empty when it is not saved).

    Args:
        query_model: the index's query model.
        include: ``True`` saves it or raises a ``TypeError`` when it cannot be saved as data (only chains of
            ``nn.Embedding``/``nn.Linear``/``nn.ReLU`` can); ``False`` never saves it; ``None`` saves it when it
            can and otherwise warns that the file holds no query model.
    """
    if query_model is None or include is False:
        return {}, {}
    try:
        if not isinstance(query_model, nn.Module):
            raise TypeError(f"query_model is a {type(query_model).__name__}, not an nn.Module")
        description = describe_tower(query_model)
    except TypeError as error:
        if include:
            raise TypeError(
                f"include_query_model=True, but the query model cannot be saved as data: {error}"
            ) from error
        warnings.warn(
            f"the index is saved without its query model ({error}); pass it to load(query_model=...), or "
            "include_query_model=False to silence this",
            stacklevel=3,
        )
        return {}, {}
    tensors = {_QUERY_MODEL_PREFIX + name: value for name, value in tower_tensors(query_model).items()}
    return tensors, {"query_model": json.dumps(description)}


def query_model_from(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> nn.Module | None:
    """The query model saved by :func:`query_model_entries`, rebuilt from data, or ``None`` if none was saved."""
    text = metadata.get("query_model")
    if text is None:
        return None
    weights = {name[len(_QUERY_MODEL_PREFIX) :]: value for name, value in tensors.items()
               if name.startswith(_QUERY_MODEL_PREFIX)}  # fmt: skip
    try:
        return build_tower(json.loads(text), weights)
    except (TowerFormatError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is not a valid twotower index file: its query model is malformed: {error}") from error


def index_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` without the query model's."""
    return {name: value for name, value in tensors.items() if not name.startswith(_QUERY_MODEL_PREFIX)}
