"""The exact top-K kernel: chunked matrix multiply with pruned selection.

Scoring every query against every candidate is one large matrix multiply; selecting the top k of each row is the
part that, done naively (``torch.topk`` over each row of the score matrix), costs two to three times the multiply
itself on a CPU. This kernel keeps selection off the critical path:

* queries are processed in blocks and candidates in chunks, so each block of scores stays in cache;
* each query keeps a running top-k; a candidate can only enter it by scoring strictly above the current k-th
  best score (the threshold), which after the first chunks very few do;
* to find those few without an elementwise pass of Python-level operations over the scores, the block is folded
  into groups (columns ``j, j + G, j + 2G, ...``) whose maxima are taken with one vectorised reduction; only the
  groups whose maximum beats the row's threshold are unfolded and merged.

Ties are deterministic: among equal scores the candidate with the lower position comes first (a later candidate
must beat the threshold strictly, and merges are stable sorts with earlier positions first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

# Score given to excluded candidates during the scan. Finite, so that excluded candidates still rank above
# the sentinel (-inf) of empty slots, and below any real score; reported to users as -inf.
EXCLUDED_SCORE = float(torch.finfo(torch.float32).min)
QUERY_BLOCK = 1024
_CANDIDATE_CHUNK = 4096
_GROUPS_PER_ROW = 256


class RunningTopK:
    """Running top-k of a block of queries over candidate chunks that arrive in increasing position order.

    Args:
        num_queries: rows of the block.
        k: how many candidates to keep per row.
        device: where the state lives.
        dtype: dtype of the scores.
    """

    def __init__(self, num_queries: int, k: int, device: torch.device, dtype: torch.dtype) -> None:
        self.k = k
        self.values = torch.full((num_queries, k), float("-inf"), device=device, dtype=dtype)
        # Position -1 marks an empty slot; it can only survive if fewer than k candidates were seen.
        self.positions = torch.full((num_queries, k), -1, device=device, dtype=torch.int64)
        # Candidates that beat the threshold wait here and are merged in batches: a merge (a sort) costs far more
        # than the few extra candidates a slightly stale threshold lets through.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_count = 0
        self._pending_limit = max(16384, 64 * num_queries)

    @property
    def threshold(self) -> torch.Tensor:
        """``[num_queries, 1]``: the score a new candidate must strictly exceed to enter the top k."""
        return self.values[:, -1:]

    def update(self, scores: torch.Tensor, offset: int) -> None:
        """Merge a chunk of scores ``[num_queries, chunk]`` for candidates at positions ``offset + j``."""
        num_rows, width = scores.shape
        threshold = self.threshold
        if width > 2 * _GROUPS_PER_ROW and width % _GROUPS_PER_ROW == 0:
            # Fold columns into strided groups; one vertical max per group tells which groups need a look.
            group_max = scores.view(num_rows, width // _GROUPS_PER_ROW, _GROUPS_PER_ROW).amax(dim=1)
            rows, groups = torch.nonzero(group_max > threshold, as_tuple=True)
            if rows.numel() == 0:
                return
            if rows.numel() * (width // _GROUPS_PER_ROW) > scores.numel() // 4:
                self._merge_dense(scores, offset)
                return
            members = groups[:, None] + _GROUPS_PER_ROW * torch.arange(width // _GROUPS_PER_ROW, device=scores.device)
            rows = rows[:, None].expand_as(members)
            values = scores[rows, members]
            keep = values > threshold[rows[:, 0]]
            rows, columns, values = rows[keep], members[keep], values[keep]
            # Sort by (row, column) so that within a row candidates stay in position order for stable merging.
            self._pending.append((rows, columns + offset, values))
            self._pending_count += rows.numel()
            if self._pending_count > self._pending_limit:
                self.flush()
        else:
            self._merge_dense(scores, offset)

    def flush(self) -> None:
        """Merge the pending candidates into the running top-k (call before reading ``values``/``positions``)."""
        if not self._pending:
            return
        rows = torch.cat([part[0] for part in self._pending])
        positions = torch.cat([part[1] for part in self._pending])
        values = torch.cat([part[2] for part in self._pending])
        self._pending.clear()
        self._pending_count = 0
        # Sort by (row, position) so that within a row candidates are in position order for the stable merge.
        order = torch.argsort(rows * (int(positions.max()) + 1) + positions)
        self._merge_sparse(rows[order], positions[order], values[order])

    def _merge_dense(self, scores: torch.Tensor, offset: int) -> None:
        """Merge a whole chunk: its own top-k (with every tie at the k-th value) joins the running top-k."""
        self.flush()
        width = scores.shape[1]
        if width > self.k:
            kth = torch.topk(scores, self.k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            mask = (scores >= kth) & (scores > self.threshold)
        else:
            mask = scores > self.threshold
        rows, columns = torch.nonzero(mask, as_tuple=True)
        self._merge_sparse(rows, columns + offset, scores[rows, columns])

    def _merge_sparse(self, rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Merge candidates given as parallel 1-D tensors, sorted by row then by position."""
        if rows.numel() == 0:
            return
        num_rows = self.values.shape[0]
        counts = torch.bincount(rows, minlength=num_rows)
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.numel(), device=rows.device) - starts[rows]
        new_values = torch.full((num_rows, width), float("-inf"), device=values.device, dtype=values.dtype)
        new_positions = torch.full((num_rows, width), -1, device=values.device, dtype=torch.int64)
        new_values[rows, slot] = values
        new_positions[rows, slot] = positions
        all_values = torch.cat([self.values, new_values], dim=1)
        all_positions = torch.cat([self.positions, new_positions], dim=1)
        # Stable: among equal scores, the running entries (earlier positions) stay ahead of the new ones.
        order = torch.sort(all_values, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values = all_values.gather(1, order)
        self.positions = all_positions.gather(1, order)


def exclusion_pairs(exclusions: torch.Tensor | None, row_start: int, row_end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten the excluded positions of rows ``[row_start, row_end)`` into ``(rows, positions)`` sorted by position.

    ``exclusions`` is ``[num_queries, E]`` of candidate positions, ``-1`` for padding.
    """
    if exclusions is None:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty
    block = exclusions[row_start:row_end]
    rows, slots = torch.nonzero(block >= 0, as_tuple=True)
    positions = block[rows, slots]
    order = torch.argsort(positions)
    return rows[order], positions[order]


def search_plain(
    queries: torch.Tensor,
    chunks: Iterable[tuple[int, torch.Tensor]],
    k: int,
    exclusions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ candidates.T``, scored by blocked matrix multiplies in the queries' dtype.

    Same contract as :func:`search_chunks`, with the chunks (an iterable, iterated once) given directly.
    """
    num_queries = queries.shape[0]
    blocks = [(start, min(start + QUERY_BLOCK, num_queries)) for start in range(0, num_queries, QUERY_BLOCK)]
    states = [RunningTopK(end - start, k, queries.device, queries.dtype) for start, end in blocks]
    excluded = [exclusion_pairs(exclusions, start, end) for start, end in blocks]
    buffer: torch.Tensor | None = None
    for offset, chunk in chunks:
        for piece_offset, piece in _split(offset, chunk):
            for (start, end), state, (ex_rows, ex_positions) in zip(blocks, states, excluded, strict=True):
                shape = (end - start, piece.shape[0])
                if buffer is None or buffer.numel() < shape[0] * shape[1]:
                    buffer = torch.empty(QUERY_BLOCK * _CANDIDATE_CHUNK, device=queries.device, dtype=queries.dtype)
                scores = buffer[: shape[0] * shape[1]].view(shape)
                torch.mm(queries[start:end], piece.T, out=scores)
                if ex_positions.numel():
                    low = int(torch.searchsorted(ex_positions, piece_offset))
                    high = int(torch.searchsorted(ex_positions, piece_offset + piece.shape[0]))
                    if high > low:
                        scores[ex_rows[low:high], ex_positions[low:high] - piece_offset] = EXCLUDED_SCORE
                state.update(scores, piece_offset)
    for state in states:
        state.flush()
    values = torch.cat([state.values for state in states]) if states else queries.new_zeros((0, k))
    positions = (
        torch.cat([state.positions for state in states])
        if states
        else torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    )
    values = values.masked_fill(values <= EXCLUDED_SCORE, float("-inf"))
    return values, positions


def _split(offset: int, chunk: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, chunk.shape[0], _CANDIDATE_CHUNK):
        yield offset + start, chunk[start : start + _CANDIDATE_CHUNK]


def pair_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Rowwise ``q_i . c_i`` ``[n]`` with the arithmetic of :func:`search_chunks`.

    An elementwise product-sum rounds differently from the blocked matrix multiply that scores the corpus, so a
    true candidate present in the corpus would outrank its own copy about 4 times in 5 at D = 64. The diagonal of
    the same blocked ``mm`` reproduces the corpus scan's arithmetic bit for bit, so the copy ties exactly.
    """
    parts = []
    for start in range(0, queries.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        parts.append(torch.mm(queries[block], candidates[block].T).diagonal())
    return torch.cat(parts) if parts else queries.new_zeros(0)


def search_chunks(
    queries: torch.Tensor,
    chunks: Callable[[], Iterable[tuple[int, torch.Tensor]]],
    k: int,
    exclusions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ candidates.T`` where the candidates arrive as chunks.

    Args:
        queries: ``[nq, d]``.
        chunks: returns a fresh iterable of ``(offset, candidates [n_i, d])`` pairs in increasing, contiguous
            offset order; it is iterated once.
        k: how many results per query.
        exclusions: optional ``[nq, E]`` int64 candidate positions to leave out (``-1`` pads).

    Returns:
        ``(scores [nq, k], positions [nq, k])`` sorted by descending score, ties by ascending position. Excluded
        candidates only appear (with score ``-inf``) when fewer than ``k`` others exist; empty slots (fewer than
        ``k`` candidates in all) have position ``-1`` and score ``-inf``.
    """
    return search_plain(queries, chunks(), k, exclusions)
