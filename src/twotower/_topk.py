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

import numpy as np
import torch

from twotower import _native

# Excluded candidates are given -inf during the scan: a candidate enters a running top-k only by scoring strictly
# above the k-th kept value, which starts at -inf, so an excluded one never does, whatever the dtype's range (a
# finite marker such as float32's lowest value would outrank real float64 scores below it). Every real score is
# finite, because the scan runs on power-of-two rescaled inputs (see magnitude_shifts), so -inf is free to mean
# "excluded" and position -1 "no candidate".
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
        if width % _GROUPS_PER_ROW or width <= 2 * _GROUPS_PER_ROW:
            self._merge_dense(scores, offset)
            return
        members = width // _GROUPS_PER_ROW
        # Fold columns into strided groups (j, j + G, j + 2G, ...); one vectorised vertical max per group tells
        # which groups need a look.
        group_max = scores.view(num_rows, members, _GROUPS_PER_ROW).amax(dim=1)
        rows, groups = torch.nonzero(group_max > threshold, as_tuple=True)
        if rows.numel() == 0:
            return
        if rows.numel() * members > scores.numel() // 4:
            self._merge_dense(scores, offset)
            return
        # Flat offsets of every member of every passing group: one index_select instead of 2-D indexing.
        strides = _GROUPS_PER_ROW * torch.arange(members, device=scores.device)
        flat = ((rows * width + groups)[:, None] + strides).reshape(-1)
        values = scores.reshape(-1).index_select(0, flat)
        keep = (values.view(rows.shape[0], -1) > threshold[rows]).reshape(-1)
        flat, values = flat[keep], values[keep]
        self._pending.append((flat // width, flat % width + offset, values))
        self._pending_count += flat.numel()
        if self._pending_count > self._pending_limit:
            self.flush()

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


# |exact float32 dot - bfloat16 screen score| <= SCREEN_EPSILON * |q| * |c|: bfloat16 rounding of both inputs
# (2u + u^2 with u = 2^-8), of the output (u (1 + u)^2), and float32 accumulation on both sides
# (2 D 2^-24 (1 + u)^2, below 0.002 for D <= SCREEN_MAX_DIMENSION) add up to less than 0.0138 < 2^-6.
SCREEN_EPSILON = 2.0**-6
SCREEN_MAX_DIMENSION = 16384
# The relative bound above assumes no underflow. Matrix units flush float32 subnormals to zero (inputs converted
# to bfloat16, and products), so each of the D products may lose up to 2^-126 (input flush of one factor, |other
# factor| <= 1 after rescaling) plus 2^-126 (product flush): an absolute term of D * 2^-125 per score. The scan's
# inputs are rescaled so that the largest magnitude of each query and of the corpus is at least 2^-40 (see
# magnitude_shifts), which makes this term at most 2^-46 of the relative one: it is added, never dominant.
SCREEN_UNDERFLOW_PER_DIMENSION = 2.0**-125
#: Largest |exponent| of the largest magnitude (per query row, or over the corpus) that the scan takes as it is;
#: outside it the inputs are multiplied by a power of two (exact) so that products can neither overflow nor fall
#: into the subnormal range, where float32 keeps fewer bits and matrix units keep none.
_SAFE_EXPONENT = {torch.float32: 40, torch.float64: 400}
#: (query block, candidate chunk) per path: the native scan wants a block of scores that fits in L2.
_BLOCKS = {"screen": (512, 2048), "native": (512, 1024), "torch": (QUERY_BLOCK, _CANDIDATE_CHUNK)}
#: The widest candidate piece, reached by batches of few queries (see search_plain).
_MAX_PIECE = 1 << 18
#: Converted copies of a fixed corpus kept between calls: ``(mode, chunk offset, chunk rows)`` to the chunk in the
#: multiply's dtype and, for the screen, each row's norm.
PieceCache = dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor | None]]


def search_mode(queries: torch.Tensor) -> str:
    """Which path :func:`search_chunks` takes for these queries.

    * ``"screen"``: float32 on a CPU with bfloat16 matrix units and the native kernel: bfloat16 screen, exact
      float32 rescoring of the few candidates that pass;
    * ``"native"``: float32 on a CPU with the native kernel: float32 multiply, native selection;
    * ``"torch"``: everything else (float64, CUDA, no C compiler): float32/64 multiply, torch selection.
    """
    if queries.dtype != torch.float32 or queries.device.type != "cpu" or _native.load() is None:
        return "torch"
    if _native.bf16_matrix_units() and queries.shape[-1] <= SCREEN_MAX_DIMENSION:
        return "screen"
    return "native"


def search_plain(
    queries: torch.Tensor,
    chunks: Iterable[tuple[int, torch.Tensor]],
    k: int,
    exclusions: torch.Tensor | None = None,
    mode: str | None = None,
    piece_cache: PieceCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ candidates.T`` by blocks; ``mode`` as :func:`search_mode` (its default).

    ``piece_cache``, when given, keeps each candidate piece's converted copy and norm bound between calls (for a
    corpus that does not change, such as a built :class:`~twotower.indexes.BruteForce`), so that a query batch
    of one row does not pay for converting the whole corpus.

    Same contract as :func:`search_chunks` on inputs already rescaled, with the chunks (an iterable, iterated
    once) given directly.
    """
    mode = mode or search_mode(queries)
    query_block, chunk_size = _BLOCKS[mode]
    num_queries = queries.shape[0]
    # Few queries: widen the candidate pieces so that a block of scores keeps about the same size. A single query
    # against 1M candidates then costs a few multiplies and kernel calls instead of ~500 tiny ones, whose
    # thread wake-ups cost more than the work (and far more from a thread other than the main one).
    chunk_size = min(max(chunk_size, chunk_size * query_block // max(min(num_queries, query_block), 1)), _MAX_PIECE)
    blocks = [(start, min(start + query_block, num_queries)) for start in range(0, num_queries, query_block)]
    kernel = _native.load() if mode != "torch" else None
    states: list[RunningTopK | _native.NativeTopK] = [
        _native.NativeTopK(kernel, end - start, k)
        if kernel is not None
        else RunningTopK(end - start, k, queries.device, queries.dtype)
        for start, end in blocks
    ]
    excluded = [exclusion_pairs(exclusions, start, end) for start, end in blocks]
    screen_dtype = torch.bfloat16 if mode == "screen" else queries.dtype
    block_queries = [queries[start:end].contiguous() for start, end in blocks]
    screen_queries = [block.to(screen_dtype) for block in block_queries]
    query_norms = [torch.linalg.vector_norm(block, dim=1) for block in block_queries] if mode == "screen" else []
    buffer = torch.empty(query_block * chunk_size, device=queries.device, dtype=screen_dtype)
    for offset, chunk in chunks:
        chunk = chunk.contiguous()
        key = (mode, offset, chunk.shape[0])
        if piece_cache is not None and key in piece_cache:
            converted, norms = piece_cache[key]
        else:
            converted = chunk.to(screen_dtype)
            norms = None
            if mode == "screen":
                # By slices: a norm over the whole chunk would hold float32 temporaries as large as the chunk.
                slices = range(0, chunk.shape[0], 1 << 16)
                norms = torch.cat([torch.linalg.vector_norm(chunk[at : at + (1 << 16)], dim=1) for at in slices])
            if piece_cache is not None:
                piece_cache[key] = (converted, norms)
        for piece_offset, piece in _split(offset, chunk, chunk_size):
            rows = slice(piece_offset - offset, piece_offset - offset + piece.shape[0])
            screen_piece = converted[rows]
            factor = SCREEN_EPSILON * float(norms[rows].max()) if norms is not None else 0.0
            underflow = SCREEN_UNDERFLOW_PER_DIMENSION * queries.shape[1]
            for number, ((start, end), state, (ex_rows, ex_positions)) in enumerate(
                zip(blocks, states, excluded, strict=True)
            ):
                shape = (end - start, piece.shape[0])
                scores = buffer[: shape[0] * shape[1]].view(shape)
                torch.mm(screen_queries[number], screen_piece.T, out=scores)
                if ex_positions.numel():
                    low = int(torch.searchsorted(ex_positions, piece_offset))
                    high = int(torch.searchsorted(ex_positions, piece_offset + piece.shape[0]))
                    if high > low:
                        scores[ex_rows[low:high], ex_positions[low:high] - piece_offset] = float("-inf")
                if mode == "screen":
                    assert isinstance(state, _native.NativeTopK)
                    margins = query_norms[number] * factor + underflow
                    state.screen(scores, piece_offset, block_queries[number], piece, margins)
                else:
                    state.update(scores, piece_offset)
    for state in states:
        state.flush()
    values = torch.cat([state.values for state in states]) if states else queries.new_zeros((0, k))
    positions = (
        torch.cat([state.positions for state in states])
        if states
        else torch.zeros((0, k), dtype=torch.int64, device=queries.device)
    )
    return values.to(queries.device), positions.to(queries.device)


def _split(offset: int, chunk: torch.Tensor, size: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, chunk.shape[0], size):
        yield offset + start, chunk[start : start + size]


def magnitude_shifts(values: torch.Tensor) -> torch.Tensor | None:
    """Per-row powers of two that bring each row of ``values`` ``[n, d]`` into the range the scan is exact in.

    Returns:
        ``None`` when every row's largest magnitude ``m`` is 0 or has ``|log2 m| <= 40`` (float32; 400 for float64),
        as for any ordinary embeddings; else ``[n]`` int32 exponents ``e``: 0 for such rows, ``-exponent(m)`` for
        the others, so that ``ldexp(row, e)`` has its largest magnitude in ``[0.5, 1)``. Multiplying by a power of
        two is exact (no rounding) for finite values in range, so the shifted scan ranks exactly as an infinitely
        wide exponent would.
    """
    limit = _SAFE_EXPONENT.get(values.dtype, _SAFE_EXPONENT[torch.float32])
    if values.shape[0] == 0 or values.shape[1] == 0:
        return None
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        # numpy for the check: a few microseconds, where the same torch operations cost tens (one query per call
        # against a small corpus is a search of about a hundred microseconds).
        largest_np = np.abs(values.detach().numpy()).max(axis=1)
        high, low = float(largest_np.max()), float(np.where(largest_np > 0, largest_np, 1.0).min())
        if high <= 2.0**limit and low >= 2.0**-limit:
            return None
        largest = torch.from_numpy(largest_np)
    else:
        largest = values.detach().abs().amax(dim=1)
    _, exponent = torch.frexp(largest)
    exponent = torch.where(largest > 0, exponent, torch.zeros_like(exponent))
    shifts = torch.where(exponent.abs() > limit, -exponent, torch.zeros_like(exponent))
    return shifts if bool(shifts.any()) else None


def corpus_shift(candidates: torch.Tensor) -> int:
    """One power-of-two exponent for a whole corpus ``[n, d]`` (ranking needs one scale across candidates)."""
    if candidates.numel() == 0:
        return 0
    largest = candidates.detach().abs().amax().reshape(1, 1)
    shifts = magnitude_shifts(largest.to(candidates.dtype))
    return 0 if shifts is None else int(shifts[0])


def shift_rows(values: torch.Tensor, shifts: torch.Tensor | int | None) -> torch.Tensor:
    """``values * 2**shifts`` (exact), per row for a tensor of shifts; ``values`` itself for ``None`` or 0."""
    if shifts is None or (isinstance(shifts, int) and shifts == 0):
        return values
    if isinstance(shifts, int):
        return torch.ldexp(values, torch.tensor(shifts, dtype=torch.int32)).to(values.dtype)
    return torch.ldexp(values, shifts.to(values.device)[:, None]).to(values.dtype)


def unshift_scores(scores: torch.Tensor, query_shifts: torch.Tensor | None, candidate_shift: int) -> torch.Tensor:
    """Scores of shifted inputs ``[nq, k]`` back to the scale of the caller's inputs, rounded once to their dtype
    (a true score beyond the dtype's range becomes +-inf or 0, as the unshifted arithmetic would give it)."""
    if query_shifts is None and candidate_shift == 0:
        return scores
    total = torch.full((scores.shape[0],), candidate_shift, dtype=torch.int64, device=scores.device)
    if query_shifts is not None:
        total = total + query_shifts.to(scores.device, torch.int64)
    wide = torch.ldexp(scores.to(torch.float64), -total.to(torch.float64)[:, None])
    return wide.to(scores.dtype)


def pair_scores(queries: torch.Tensor, candidates: torch.Tensor, candidate_shift: int = 0) -> torch.Tensor:
    """Rowwise ``q_i . c_i`` ``[n]`` with the arithmetic that :func:`search_chunks` uses for these queries
    (``candidate_shift``: the corpus's power-of-two shift, applied to ``candidates`` as the scan applies it).

    An elementwise product-sum rounds differently from the blocked matrix multiply that scores the corpus, so a
    true candidate present in the corpus would outrank its own copy about 4 times in 5 at D = 64. Using the
    search's own arithmetic (the diagonal of the same blocked ``mm``, or the native kernel's dot product when it
    rescores) makes the copy tie exactly.
    """
    shifts = magnitude_shifts(queries)
    queries, candidates = shift_rows(queries, shifts), shift_rows(candidates, candidate_shift)
    kernel = _native.load()
    if search_mode(queries) == "screen" and kernel is not None:
        scores = _native.pair_scores(kernel, queries, candidates)
    else:
        parts = []
        for start in range(0, queries.shape[0], QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            parts.append(torch.mm(queries[block], candidates[block].T).diagonal())
        scores = torch.cat(parts) if parts else queries.new_zeros(0)
    return unshift_scores(scores[:, None], shifts, candidate_shift)[:, 0]


def search_chunks(
    queries: torch.Tensor,
    chunks: Callable[[], Iterable[tuple[int, torch.Tensor]]],
    k: int,
    exclusions: torch.Tensor | None = None,
    piece_cache: PieceCache | None = None,
    candidate_shift: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ candidates.T`` where the candidates arrive as chunks.

    Args:
        queries: ``[nq, d]`` finite.
        chunks: returns a fresh iterable of ``(offset, candidates [n_i, d])`` pairs in increasing, contiguous
            offset order, already multiplied by ``2**candidate_shift``; it is iterated once.
        k: how many results per query.
        exclusions: optional ``[nq, E]`` int64 candidate positions to leave out (``-1`` pads).
        piece_cache: see :func:`search_plain`.
        candidate_shift: the corpus's power-of-two shift (:func:`corpus_shift`).

    Returns:
        ``(scores [nq, k], positions [nq, k])`` sorted by descending score, ties by ascending position. Excluded
        candidates never appear: a slot with no candidate left (fewer than ``k`` candidates not excluded) has
        position ``-1`` and score ``-inf``. A real candidate always has a position ``>= 0``, even where its score
        lies beyond the dtype's range and is reported as ``+-inf``: ranking runs on rescaled inputs.
    """
    shifts = magnitude_shifts(queries)
    values, positions = search_plain(shift_rows(queries, shifts), chunks(), k, exclusions, None, piece_cache)
    return unshift_scores(values, shifts, candidate_shift), positions
