"""Atomic files and directories, and manifest-verified directories, shared by checkpoints, indexes, runs and bundles.

Writers never leave a reader with half a file or half a directory:

* :func:`atomic_write` writes a temporary file beside the target, syncs it and renames it over the target;
* :func:`replace_directory` swaps a fully written directory with the old one in one step (Linux's
  ``renameat2(RENAME_EXCHANGE)``), so a reader, or a process killed at any instant, sees the old directory or the
  new one, never neither.

Temporary files and folders carry the writer's process id: whatever a killed writer left behind is removed by the
next writer in the same place (:func:`remove_stale_temporaries`), and a live writer's work is never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?:tmp|build|old)$")


def _temporary_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(directory: Path, name: str) -> int:
    """Delete the temporary files and folders that writers of ``directory/name`` left when they were killed.

    Only entries named by this module (``.NAME.PID.*.tmp|build|old``) whose process no longer runs are removed.

    Returns:
        how many entries were removed.
    """
    removed = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match.group("name") != name or _alive(int(match.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
    return removed


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def new_directory_beside(target: Path) -> Path:
    """An empty private folder next to ``target``, to be filled and then put in place by :func:`replace_directory`
    (stale ones of killed writers are removed first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, target.name)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=_temporary_prefix(target.name), suffix=".build"))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unavailable."""
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    try:
        libc = ctypes.CDLL(library, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: the kernel or file system cannot exchange
        return False
    raise OSError(error, os.strerror(error), str(second))


def replace_directory(building: Path, target: Path) -> None:
    """Put the finished folder ``building`` at ``target`` in one step, replacing what was there.

    With an existing ``target`` the two are exchanged atomically and the old one, now at ``building``, is
    deleted; a process killed in between leaves the new directory in place and the old one as a stale temporary,
    removed by the next writer. Where the exchange is not available the old directory is renamed aside first,
    and :func:`recover_directory` puts it back if the process dies before the new one is in place.
    """
    if not target.exists():
        os.rename(building, target)
        return
    if _exchange(building, target):
        shutil.rmtree(building, ignore_errors=True)
        return
    aside = target.with_name(f"{_temporary_prefix(target.name)}{os.urandom(4).hex()}.old")
    os.rename(target, aside)
    os.rename(building, target)
    shutil.rmtree(aside, ignore_errors=True)


def write_manifest_directory(target: Path, format_name: str, fill: Callable[[Path], None]) -> Path:
    """Write a verified directory at ``target`` in one step: ``fill(building)`` writes its files into a new folder
    beside it, then ``manifest.json`` (``format`` and the SHA-256 of every top-level file; sub-folders carry
    manifests of their own) is written last and the folder swapped into place (:func:`replace_directory`). On any
    failure, a kill included, ``target`` keeps what it held and the partial folder is removed (by the next writer,
    after a kill)."""
    building = new_directory_beside(target)
    try:
        fill(building)
        files = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(building.iterdir())
            if path.is_file() and path.name != "manifest.json"
        }
        atomic_write(building / "manifest.json", json.dumps({"format": format_name, "files": files}, indent=2).encode())
        replace_directory(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def recover_directory(target: Path) -> None:
    """If ``target`` is missing because a :func:`replace_directory` without atomic exchange was killed between its
    two renames, put the old directory back."""
    if target.exists() or not target.parent.is_dir():
        return
    asides = sorted(
        (entry for entry in target.parent.iterdir() if entry.name.endswith(".old") and entry.is_dir()),
        key=lambda entry: entry.stat().st_mtime,
    )
    for entry in reversed(asides):
        match = _TEMPORARY.match(entry.name)
        if match is not None and match.group("name") == target.name and not _alive(int(match.group("pid"))):
            with contextlib.suppress(OSError):
                os.rename(entry, target)
                return


def is_plain_name(name: Any) -> bool:
    """Whether ``name`` names a file directly inside a directory: no separator, no ``..``, not absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and Path(name).name == name
    )


def read_verified_directory(
    directory: Path,
    expected_format: str,
    error: type[Exception],
    kind: str,
    exclusive: bool,
    expected_manifest_sha256: str | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read a directory described by its ``manifest.json`` and check every listed file's SHA-256.

    A checksum only shows that the files are those the manifest lists (nothing was damaged, truncated or changed
    alone); whoever can write the directory can write a matching manifest too. ``expected_manifest_sha256``,
    the SHA-256 of ``manifest.json`` itself, pins the whole directory to one known version.

    Args:
        directory: the directory.
        expected_format: the manifest's required ``format`` value.
        error: the exception class raised for any problem.
        kind: what the directory is, for messages ("run", "bundle").
        exclusive: also refuse files the manifest does not list.
        expected_manifest_sha256: if given, the manifest's own SHA-256 must equal it.

    Returns:
        ``(manifest, contents)``: the parsed manifest and every listed file's bytes. Every listed name is a plain
        file name inside ``directory`` (a name that would leave it is refused).
    """
    recover_directory(directory)
    if not directory.is_dir():
        raise error(f"no {kind} directory at {directory}")
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise error(f"{directory} has no manifest.json: not a twotower {kind}, or an incomplete one")
    raw = manifest_path.read_bytes()
    if expected_manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_manifest_sha256.lower():
        raise error(f"{manifest_path} is not the expected one: its SHA-256 differs from the pinned value")
    manifest = parse_json(raw, f"{manifest_path}", error)
    if not isinstance(manifest, dict) or manifest.get("format") != expected_format:
        raise error(f"{manifest_path} is not a {expected_format} manifest")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise error(f"{manifest_path} is corrupt: it has no 'files' mapping of names to SHA-256 values")
    contents: dict[str, bytes] = {}
    for name, digest in files.items():
        if not is_plain_name(name) or name == "manifest.json":
            raise error(f"{manifest_path} lists {name!r}, which is not a file name inside the {kind}")
        if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
            raise error(f"{manifest_path} is corrupt: the SHA-256 of {name!r} is not 64 hexadecimal digits")
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise error(f"{directory} is incomplete: {name} is missing")
        contents[name] = path.read_bytes()
        if hashlib.sha256(contents[name]).hexdigest() != digest:
            raise error(f"{path} is corrupt or was modified: its SHA-256 does not match the manifest")
    if exclusive:
        extra = {path.name for path in directory.iterdir()} - set(files) - {"manifest.json"}
        if extra:
            raise error(f"{directory} holds files the manifest does not list: {sorted(extra)}")
    manifest["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
    return manifest, contents


def parse_json(data: bytes, what: str, error: type[Exception]) -> Any:
    """``data`` as strict JSON (UTF-8, no NaN or Infinity), or ``error`` naming ``what``."""

    def refuse_constant(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError as problem:
        raise error(f"{what} is not UTF-8 text: {problem}") from problem
    except (json.JSONDecodeError, ValueError, RecursionError) as problem:
        raise error(f"{what} is not valid JSON: {problem}") from problem
