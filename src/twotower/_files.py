"""Atomic file writes and manifest-verified directories, shared by checkpoints, indexes, runs and bundles."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_verified_directory(
    directory: Path, expected_format: str, error: type[Exception], kind: str, exclusive: bool
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read a directory described by its ``manifest.json`` and check every listed file's SHA-256.

    Args:
        directory: the directory.
        expected_format: the manifest's required ``format`` value.
        error: the exception class raised for any problem.
        kind: what the directory is, for messages ("run", "bundle").
        exclusive: also refuse files the manifest does not list.

    Returns:
        ``(manifest, contents)``: the parsed manifest and every listed file's bytes.
    """
    if not directory.is_dir():
        raise error(f"no {kind} directory at {directory}")
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise error(f"{directory} has no manifest.json: not a twotower {kind}, or an incomplete one")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as problem:
        raise error(f"{manifest_path} is corrupt: {problem}") from problem
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise error(f"{manifest_path} is not a {expected_format} manifest")
    contents: dict[str, bytes] = {}
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise error(f"{directory} is incomplete: {name} is missing")
        contents[name] = path.read_bytes()
        if hashlib.sha256(contents[name]).hexdigest() != digest:
            raise error(f"{path} is corrupt or was modified: its SHA-256 does not match the manifest")
    if exclusive:
        extra = {path.name for path in directory.iterdir()} - set(manifest["files"]) - {"manifest.json"}
        if extra:
            raise error(f"{directory} holds files the manifest does not list: {sorted(extra)}")
    return manifest, contents
