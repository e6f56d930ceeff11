"""The optional native kernels (``native/*.c``), compiled on first use with the system C compiler.

The exact top-K search spends its time in two places: the matrix multiply (torch's BLAS) and the selection of
the best candidates from each block of scores. Selection with torch operations costs several passes over the
scores and dozens of small operations per block; the C kernel does it in one pass while the block is in cache.
It is compiled once per machine into the user's cache directory (``$TWOTOWER_CACHE`` or
``~/.cache/twotower``), keyed by the source, the compiler flags and the CPU's features. Without a C compiler,
or with ``TWOTOWER_NATIVE=0``, the pure torch path is used. Results are the same exact top-k on every path, up
to the last-bit rounding of float32 dot products.

``native/softmax.c`` holds the other kernel: the row maximum, exponentials and row sums of the single-block
in-batch softmax in one pass over each row (see :func:`softmax_rows`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

#: The C files compiled into the library, and the headers they include.
_SOURCES = ("topk.c", "softmax.c", "ivf.c")
_HEADERS = ("heap.h",)
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine if hasattr(os, "uname") else "unknown"


def _cache_dir() -> Path:
    root = os.environ.get("TWOTOWER_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "twotower"


class IvfIndex(ctypes.Structure):
    """The built index as ``native/ivf.c``'s ``ivf_index`` reads it: the arrays' addresses and sizes."""

    _fields_ = [
        *[(name, ctypes.c_void_p) for name in ("centroid_blocks", "leaf_offsets", "leaf_blocks", "codes",
                                              "codebooks", "vectors", "rows", "ids")],
        *[(name, ctypes.c_int64) for name in ("leaves", "subspaces", "sub_dim", "d", "query_d")],
    ]  # fmt: skip


class UnsafeCacheError(OSError):
    """A cache directory or library that another user could have written: never loaded."""


def _private_directory(path: Path) -> None:
    """Create ``path`` (and its missing parents) with mode 0700, and refuse it unless it is a directory owned by
    this user that neither group nor others can write: whoever can write there can put code in the library."""
    missing = []
    walk = path
    while not walk.exists():
        missing.append(walk)
        walk = walk.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask; an explicit chmod is not
    _require_private(path, "directory")


def _require_private(path: Path, kind: str) -> None:
    info = os.stat(path)  # follows a symbolic link: the target is what gets written and read
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UnsafeCacheError(f"the cache {kind} {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(f"the cache {kind} {path} is writable by group or others (mode {info.st_mode:o})")
    if kind == "directory" and not stat.S_ISDIR(info.st_mode):
        raise UnsafeCacheError(f"the cache path {path} is not a directory")


def _verified_bytes(library: Path) -> bytes | None:
    """The bytes of ``library`` if it is private and matches the SHA-256 recorded beside it when it was built;
    ``None`` where it is missing or does not match (it is then rebuilt)."""
    digest_file = library.with_name(library.name + ".sha256")
    if not library.is_file() or not digest_file.is_file():
        return None
    _require_private(library, "library")
    _require_private(digest_file, "checksum file")
    data = library.read_bytes()
    return data if hashlib.sha256(data).hexdigest() == digest_file.read_text().strip() else None


def _open_bytes(data: bytes) -> ctypes.CDLL:
    """``dlopen`` a private copy of the verified bytes: what is loaded is exactly what was checked, whatever
    happens to the cache file afterwards (and a fresh path each time, which ``dlopen`` does not confuse with a
    library it already holds)."""
    with tempfile.TemporaryDirectory(prefix="twotower-kernel-") as private:  # mode 0700
        path = Path(private) / "libtwotower.so"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700), "wb") as file:
            file.write(data)
        return ctypes.CDLL(str(path))  # the mapping outlives the file


def _build(compiler: str, sources: dict[str, str], library: Path) -> None:
    """Compile ``sources`` in a private temporary folder, then move the library and its SHA-256 into place."""
    with tempfile.TemporaryDirectory(dir=library.parent) as build:
        paths = []
        for name, text in sources.items():
            (Path(build) / name).write_text(text)
            if name.endswith(".c"):
                paths.append(Path(build) / name)
        output = Path(build) / library.name
        subprocess.run(
            [compiler, *_FLAGS, *map(str, paths), "-o", str(output), "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.chmod(output, 0o700)
        digest = Path(build) / (library.name + ".sha256")
        digest.write_text(hashlib.sha256(output.read_bytes()).hexdigest())
        os.chmod(digest, 0o600)
        # Atomic, the checksum first: a concurrent process sees no library, the old one (which then fails its
        # check and is rebuilt), or the new one with its checksum.
        os.replace(digest, library.with_name(digest.name))
        os.replace(output, library)


#: The kernel's functions and their argument types; a library missing one is not used.
_SIGNATURES: dict[str, list[Any]] = {
    "twotower_topk_update": [ctypes.c_void_p, *[ctypes.c_int64] * 4, *[ctypes.c_void_p] * 3, *[ctypes.c_int64] * 2],
    "twotower_topk_screen": [
        ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        *[ctypes.c_void_p] * 4, ctypes.c_int64, ctypes.c_int64,
    ],
    "twotower_topk_finish": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 3],
    "twotower_pair_scores": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                             ctypes.c_int64],
    "twotower_ivf_search": [
        ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64,
    ],
    "twotower_ivf_search_one": [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 3, *[ctypes.c_void_p] * 3],
    "twotower_softmax_rows": [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_int64],
    "twotower_softmax_rows_bf16": [ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64],
    "twotower_softmax_gradient_rows": [ctypes.c_void_p, *[ctypes.c_int64] * 3, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64],
}  # fmt: skip


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` where it is disabled, cannot be built, or its cache is not private to this
    user (a warning says why, once); every caller then takes the torch path, with the same results.

    The cache directory is created with mode 0700 and refused when it belongs to another user or others can
    write it. The library is loaded only after its SHA-256 matches the one recorded when it was built (a
    mismatch, from a changed or truncated file, rebuilds it), and from a private copy of the checked bytes.
    """
    if os.environ.get("TWOTOWER_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    sources = {
        name: resources.files("twotower").joinpath(f"native/{name}").read_text() for name in (*_SOURCES, *_HEADERS)
    }
    key = hashlib.sha256("\n".join([*sources.values(), compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    library = _cache_dir() / "native" / key / "libtwotower.so"
    try:
        # Every level from the cache root down: whoever can write a parent can swap the folder below it.
        for directory in (_cache_dir(), library.parent.parent, library.parent):
            _private_directory(directory)
        data = _verified_bytes(library)
        if data is None:
            _build(compiler, sources, library)
            data = _verified_bytes(library)
            if data is None:
                raise UnsafeCacheError(f"{library} changed while it was being built")
        kernel = _open_bytes(data)
    except UnsafeCacheError as error:
        warnings.warn(f"twotower: native kernels not loaded, using torch: {error}", stacklevel=2)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"twotower: native kernels unavailable, using torch ({detail.strip()[:300]})", stacklevel=2)
        return None
    try:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(kernel, name)
            function.restype = None
            function.argtypes = argtypes
        kernel.twotower_ivf_search.restype = ctypes.c_int  # 1: out of memory
        kernel.twotower_ivf_search_one.restype = ctypes.c_int  # 1: out of memory, 2: a non-finite query
        kernel.twotower_softmax_rows_vectorized.restype = ctypes.c_int
        kernel.twotower_softmax_rows_vectorized.argtypes = []
    except AttributeError as error:
        warnings.warn(f"twotower: {library} lacks a kernel function ({error}), using torch", stacklevel=2)
        return None
    return kernel


def softmax_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row maxima and sums of exponentials of float32 CPU ``logits`` ``[rows, cols]`` (unit column stride), with
    ``exp(logits - max)`` written over ``logits``; ``None`` (and ``logits`` untouched) where the kernel is not
    built with AVX-512 or AVX2 (with FMA), since torch's own vectorised passes are then as fast.

    Returns:
        ``(maxima [rows], sums [rows])``, as ``logits.amax(1)`` and ``exp(logits - maxima).sum(1)``.
    """
    kernel = _vectorized_rows(logits)
    if kernel is None:
        return None
    rows = logits.shape[0]
    maxima, sums = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
    kernel.twotower_softmax_rows(
        logits.data_ptr(), rows, logits.shape[1], logits.stride(0), maxima.data_ptr(), sums.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return maxima, sums


def _vectorized_rows(logits: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> ctypes.CDLL | None:
    """The kernel, where it is built with AVX-512 or AVX2 and ``logits`` is a 2-D CPU block of one of ``dtypes``
    with unit column stride; ``None`` otherwise."""
    kernel = load()
    if (
        kernel is None
        or not kernel.twotower_softmax_rows_vectorized()
        or logits.dtype not in dtypes
        or logits.device.type != "cpu"
        or logits.ndim != 2
        or logits.stride(1) != 1
    ):
        return None
    return kernel


def softmax_gradient_rows(logits: torch.Tensor, log_normalisers: torch.Tensor, scales: torch.Tensor) -> bool:
    """Write ``exp(logits - log_normalisers[:, None]) * scales[:, None]`` over float32 CPU ``logits`` ``[rows,
    cols]`` (unit column stride) in one pass; ``log_normalisers`` and ``scales`` are ``[rows]``. Returns ``False``
    (``logits`` untouched) where the AVX-512 kernel is not built: the caller then runs torch's passes."""
    kernel = _vectorized_rows(logits)
    if kernel is None:
        return False
    rows = logits.shape[0]
    log_normalisers = log_normalisers.to(torch.float32).contiguous()
    scales = scales.to(torch.float32).contiguous()
    if log_normalisers.shape != (rows,) or scales.shape != (rows,):
        raise ValueError(f"log_normalisers and scales must have shape ({rows},)")
    kernel.twotower_softmax_gradient_rows(
        logits.data_ptr(), rows, logits.shape[1], logits.stride(0), log_normalisers.data_ptr(), scales.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return True


def softmax_rows_bf16(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`softmax_rows` for a block whose exponentials are kept in bfloat16: ``logits`` ``[rows, cols]``
    (bfloat16, overwritten by the exponentials, or float32, left as it is; unit column stride, CPU).

    Returns:
        ``(maxima [rows], sums [rows], exponentials [rows, cols] bfloat16)``: the maxima and sums in float32 (of
        the unrounded exponentials), ``exponentials`` being ``logits`` itself when it is bfloat16. ``None``
        where the AVX-512 kernel is not built (``logits`` untouched).
    """
    kernel = _vectorized_rows(logits, (torch.float32, torch.bfloat16))
    if kernel is None:
        return None
    rows, cols = logits.shape
    is_bf16 = logits.dtype == torch.bfloat16
    output = logits if is_bf16 else torch.empty(rows, cols, dtype=torch.bfloat16)
    maxima, sums = torch.empty(rows, dtype=torch.float32), torch.empty(rows, dtype=torch.float32)
    kernel.twotower_softmax_rows_bf16(
        logits.data_ptr(), int(is_bf16), rows, cols, logits.stride(0), output.data_ptr(), output.stride(0),
        maxima.data_ptr(), sums.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return maxima, sums, output


@functools.cache
def bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX512-BF16): then a bfloat16 screen is
    two to three times faster than a float32 multiply. ``TWOTOWER_BF16_SCREEN=0`` turns the screen off."""
    if os.environ.get("TWOTOWER_BF16_SCREEN", "1") == "0":
        return False
    signature = _cpu_signature()
    return ("amx_bf16" in signature or "avx512_bf16" in signature) and bool(
        torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    )


def pair_scores(kernel: ctypes.CDLL, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[n]`` rowwise dot products of float32 CPU ``[n, d]`` tensors, with the screened search's arithmetic."""
    queries, candidates = queries.contiguous(), candidates.contiguous()
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    kernel.twotower_pair_scores(
        queries.data_ptr(), candidates.data_ptr(), queries.shape[0], queries.shape[1], out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


class NativeTopK:
    """Running top-k of a block of float32 CPU queries, updated by the C kernel.

    Same contract as ``RunningTopK``, except that ``values``/``positions`` are heap-ordered until :meth:`flush`.
    """

    def __init__(self, kernel: ctypes.CDLL, num_queries: int, k: int) -> None:
        self._update = kernel.twotower_topk_update
        self._screen = kernel.twotower_topk_screen
        self._finish = kernel.twotower_topk_finish
        self._finished = False
        self.k = k
        self.values = torch.full((num_queries, k), float("-inf"), dtype=torch.float32)
        self.positions = torch.full((num_queries, k), -1, dtype=torch.int64)
        self.filled = torch.zeros(num_queries, dtype=torch.int64)
        self.threads = torch.get_num_threads()

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """Merge ``scores`` ``[num_queries, chunk]`` (float32, CPU, unit column stride) at positions ``offset + j``."""
        if self._finished:
            raise RuntimeError("NativeTopK was already flushed")
        if scores.dtype != torch.float32 or scores.device.type != "cpu" or scores.stride(1) != 1:
            raise ValueError("NativeTopK needs float32 CPU scores with contiguous rows")
        self._update(
            scores.data_ptr(),
            scores.shape[0],
            scores.shape[1],
            scores.stride(0),
            offset,
            self.values.data_ptr(),
            self.positions.data_ptr(),
            self.filled.data_ptr(),
            self.k,
            self.threads,
        )

    def screen(
        self,
        screen_scores: torch.Tensor,
        offset: int,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        margins: torch.Tensor,
    ) -> None:
        """Merge a chunk screened in bfloat16: ``screen_scores`` ``[num_queries, chunk]`` (unit column stride),
        ``queries`` ``[num_queries, d]`` and ``candidates`` ``[chunk, d]`` contiguous float32 for the exact
        rescoring, ``margins`` ``[num_queries]`` float32 bounds on ``|exact - screened|``."""
        if self._finished:
            raise RuntimeError("NativeTopK was already flushed")
        if screen_scores.dtype != torch.bfloat16 or screen_scores.stride(1) != 1:
            raise ValueError("screen_scores must be bfloat16 with contiguous rows")
        self._screen(
            screen_scores.data_ptr(), screen_scores.shape[0], screen_scores.shape[1], screen_scores.stride(0), offset,
            queries.data_ptr(), candidates.data_ptr(), queries.shape[1], margins.data_ptr(),
            self.values.data_ptr(), self.positions.data_ptr(), self.filled.data_ptr(), self.k, self.threads,
        )  # fmt: skip

    def flush(self) -> None:
        """Sort each row's heap into the final order (descending value, ascending position); ends the updates."""
        if self._finished:
            return
        self._finish(
            self.values.data_ptr(),
            self.positions.data_ptr(),
            self.filled.data_ptr(),
            self.values.shape[0],
            self.k,
            self.threads,
        )
        self._finished = True
