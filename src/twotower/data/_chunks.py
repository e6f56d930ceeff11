"""Whole-log array passes split into chunks and run on a few threads.

numpy releases the GIL inside its loops, so a compute-bound pass over tens of millions of rows (a hash) runs
on every core when cut into chunks that threads take in turn; each chunk writes its own slice of the output, so
no two threads touch the same memory. On one core, or for short arrays, the chunks run in order on the caller's
thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: Rows per chunk, for every chunked pass over a log (read at each call, so a test can make chunks small): large
#: enough that the per-chunk Python overhead is noise, small enough that a chunk's temporaries stay in cache.
CHUNK = 1 << 20


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def chunk_bounds(count: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` chunks of :data:`CHUNK` rows covering ``range(count)``."""
    return [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]


def for_each_chunk(count: int, work: Callable[[int, int], None]) -> None:
    """Call ``work(start, end)`` for the :func:`chunk_bounds` of ``count``, on a few threads.

    ``work`` must write only to its own rows' slice of any shared output. Exceptions propagate to the caller.
    """
    bounds = chunk_bounds(count)
    workers = _workers()
    if len(bounds) < 2 or workers == 1:
        for start, end in bounds:
            work(start, end)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda bound: work(*bound), bounds):
            pass
