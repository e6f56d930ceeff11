"""Top-K indexes: given query embeddings, return the best-scoring candidates of a corpus by dot product.

All indexes share one interface, after TFRS's ``layers.factorized_top_k.TopK`` and FAISS's plain indexes:

* ``index(candidates, identifiers=None)`` / ``index_from_dataset(batches)`` build it;
* ``index(queries, k=None) -> (scores, ids)``: ``[nq, k]`` scores sorted by descending score and the matching
  ids (an ``int64`` tensor for integer ids, a numpy ``str`` array for string ids);
* ``query_with_exclusions(queries, exclusions, k=None)`` leaves out given ids per query (e.g. already seen items);
* ``is_exact()`` tells whether the results are exact.

:class:`BruteForce` keeps the candidates in memory; :class:`Streaming` reads them batch by batch from an iterable
on every query, so the corpus never has to fit in memory.

``k`` larger than the corpus is clamped to the corpus size. Duplicate ids are allowed: each row is its own
candidate (the same id can appear twice in a result), and excluding an id excludes every row that carries it.
Ties are broken by row position, lower first.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import numpy as np
import torch
from torch import nn

from twotower import _topk
from twotower._checks import encode_ids, per_query_ids, require_embeddings, require_finite, require_floating
from twotower._files import atomic_write


class _BuiltState(Protocol):
    """What every index's built state holds."""

    @property
    def ids(self) -> IdTable: ...

    @property
    def count(self) -> int: ...


class _ShiftedState(_BuiltState, Protocol):
    """An exact index's built state: its scan runs on inputs multiplied by ``2**shift``."""

    @property
    def shift(self) -> int: ...


_Corpus = TypeVar("_Corpus", bound=_BuiltState)
_ExactState = TypeVar("_ExactState", bound=_ShiftedState)

#: Ids returned by an index: an ``int64`` tensor ``[nq, k]`` or, for string ids, a numpy array ``[nq, k]``.
Ids: TypeAlias = "torch.Tensor | np.ndarray"


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
        return _on_device(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), device)

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


def _normalize_exclusions(exclusions: Any, num_queries: int, is_string: bool) -> list[np.ndarray]:
    """Per-query 1-D arrays of excluded ids, from a ``[nq, E]`` tensor/array or a list of sequences."""
    rows = per_query_ids(exclusions, num_queries, "exclusions")
    for row in rows:
        if row.size and (row.dtype.kind in "USO") != is_string:
            kind = "strings" if is_string else "integers"
            raise TypeError(f"exclusions must hold {kind}, like the index's identifiers, got dtype {row.dtype}")
    return [np.asarray(row) for row in rows]


class TopK(nn.Module, abc.ABC):
    """Interface of top-K indexes.

    Args:
        k: default number of results per query (a per-call ``k`` overrides it).
        query_model: optional module mapping raw query features to embeddings before the search.
    """

    def __init__(self, k: int = 10, query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.k = _check_k(k)
        self.query_model = query_model
        self._ids: IdTable | None = None

    @abc.abstractmethod
    def is_exact(self) -> bool:
        """Whether the index returns exact results."""

    @abc.abstractmethod
    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> TopK:
        """Build the index from candidate embeddings ``[n, d]`` and optional ids (``n`` of them). Returns self."""

    @abc.abstractmethod
    def _search(
        self, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scores [nq, k], row positions [nq, k])``, position ``-1`` for an empty slot."""

    def _search_snapshot(
        self, snapshot: Any, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_search` against one snapshot of the built index (see :meth:`_snapshot`); by default the
        index's current state, for indexes whose state is one immutable object replaced whole by ``index()``."""
        return self._search(queries, k, exclusions)

    def _snapshot(self) -> Any:
        """The built state a query reads, taken once per query so that a concurrent ``index()`` cannot mix the
        ids of one corpus with the scores of another; ``None`` for indexes that keep no separate state."""
        return None

    @property
    @abc.abstractmethod
    def num_candidates(self) -> int:
        """Number of rows in the corpus."""

    @property
    @abc.abstractmethod
    def dimension(self) -> int:
        """Embedding dimension of the corpus."""

    @property
    def ids(self) -> IdTable:
        if self._ids is None:
            raise RuntimeError(f"{type(self).__name__} has not been built: call index(...) or index_from_dataset(...)")
        return self._ids

    def score_pairs(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rowwise ``q_i . c_i`` ``[n]`` computed with the arithmetic of this index's search.

        A candidate scored this way ties exactly with its own copy in the corpus, which score-based metrics need.
        """
        dtype = _compute_dtype(queries.dtype)
        return _topk.pair_scores(queries.detach().to(dtype), candidates.detach().to(device=queries.device, dtype=dtype))

    def index_from_dataset(self, dataset: Iterable[Any]) -> TopK:
        """Build from an iterable of embedding batches ``[b, d]`` or of ``(ids, embeddings)`` batches."""
        ids_parts: list[np.ndarray] = []
        embedding_parts: list[torch.Tensor] = []
        for ids, embeddings in _iterate_batches(dataset):
            embedding_parts.append(embeddings)
            if ids is not None:
                ids_parts.append(ids)
        if not embedding_parts:
            raise ValueError("dataset yielded no candidates: the corpus must not be empty")
        if ids_parts and len(ids_parts) != len(embedding_parts):
            raise ValueError("dataset must yield ids with every batch or with none")
        identifiers = np.concatenate(ids_parts) if ids_parts else None
        return self.index(torch.cat(embedding_parts), identifiers)

    def forward(self, queries: Any, k: int | None = None) -> tuple[torch.Tensor, Ids]:
        """Top ``k`` candidates of each query.

        Args:
            queries: ``[nq, d]`` query embeddings, or raw features when the index has a ``query_model``.
            k: results per query; defaults to the constructor's ``k``; clamped to the corpus size.

        Returns:
            ``(scores [nq, k], ids [nq, k])`` sorted by descending score.
        """
        return self._query(queries, k, None)

    def query_with_exclusions(self, queries: Any, exclusions: Any, k: int | None = None) -> tuple[torch.Tensor, Ids]:
        """Top ``k`` candidates of each query, leaving out the ids in ``exclusions``.

        Args:
            queries: as for ``__call__``.
            exclusions: ``[nq, E]`` ids (tensor or array), or a list of ``nq`` id sequences of any lengths. Ids that
                are not in the index are ignored, so any such value can pad.
            k: as for ``__call__``.

        Returns:
            ``(scores [nq, k], ids [nq, k])``. If fewer than ``k`` candidates remain, the tail holds excluded ones
            with score ``-inf``.
        """
        return self._query(queries, k, exclusions)

    def query_rows(
        self, queries: Any, k: int | None = None, exclusions: Any = None
    ) -> tuple[torch.Tensor, Ids, torch.Tensor]:
        """Like :meth:`query_with_exclusions` (``exclusions`` may be ``None``), also returning the row positions.

        Returns:
            ``(scores [nq, k], ids [nq, k], rows [nq, k])``: ``rows`` is ``-1`` exactly where a slot holds no
            candidate (fewer than ``k`` left after the exclusions, or an approximate index that found fewer), so
            callers can drop empty slots without guessing from the score (a real score may be ``-inf`` when it
            lies beyond the dtype's range) or the id (``-1`` may be a real integer id).
        """
        snapshot = self._snapshot()
        table = self._ids_of(snapshot)
        embeddings = self._embed_queries(queries)
        k = min(_check_k(self.k if k is None else k), self._count_of(snapshot))
        positions = None
        if exclusions is not None:
            positions = self._exclusion_positions(exclusions, embeddings.shape[0], table)
        with torch.no_grad():
            scores, rows = self._search_snapshot(snapshot, embeddings, k, positions)
        return scores, table.take(rows), rows

    def _query(self, queries: Any, k: int | None, exclusions: Any) -> tuple[torch.Tensor, Ids]:
        scores, ids, _ = self.query_rows(queries, k, exclusions)
        return scores, ids

    def _ids_of(self, snapshot: Any) -> IdTable:
        return self.ids if snapshot is None else snapshot.ids

    def _count_of(self, snapshot: Any) -> int:
        return self.num_candidates if snapshot is None else int(snapshot.count)

    def _top_scores(self, queries: Any, k: int) -> torch.Tensor:
        """``[nq, min(k, n)]`` best scores, without their ids: score-based metrics need none, and looking up
        string ids (``[nq, k]`` strings) costs more than the exact search of a small corpus."""
        snapshot = self._snapshot()
        self._ids_of(snapshot)  # raises while the index is not built
        embeddings = self._embed_queries(queries)
        with torch.no_grad():
            scores, _ = self._search_snapshot(snapshot, embeddings, min(_check_k(k), self._count_of(snapshot)), None)
        return scores

    def _embed_queries(self, queries: Any) -> torch.Tensor:
        embeddings = self._query_embeddings(queries)
        require_finite(embeddings, "queries")
        return embeddings

    def _query_embeddings(self, queries: Any) -> torch.Tensor:
        """The query model's output (or ``queries`` without one), checked to be ``[nq, dimension]`` floating
        point (not yet checked to be finite), detached."""
        if self.query_model is not None:
            with torch.no_grad():
                queries = self.query_model(queries)
        embeddings = require_floating(queries, "queries", (2,))
        if embeddings.shape[1] != self.dimension:
            raise ValueError(
                f"queries have dimension {embeddings.shape[1]} but the index holds {self.dimension}-d candidates"
            )
        return embeddings.detach()

    @staticmethod
    def _exclusion_positions(exclusions: Any, num_queries: int, table: IdTable) -> torch.Tensor:
        per_query = _normalize_exclusions(exclusions, num_queries, table.is_string)
        lengths = np.array([row.shape[0] for row in per_query], dtype=np.int64)
        flat = np.concatenate(per_query) if per_query else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(num_queries), lengths)
        which, rows = table.positions_of(flat) if flat.size else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        query_of = owner[which]
        if query_of.size:
            # Each excluded row once per query: a request repeating one id 10,000 times excludes one row, and
            # costs one (an approximate index retrieves k plus this many).
            keys = np.unique(query_of * len(table) + rows)
            query_of, rows = keys // len(table), keys % len(table)
        counts = np.bincount(query_of, minlength=num_queries)
        width = int(counts.max()) if counts.size else 0
        positions = np.full((num_queries, max(width, 1)), -1, dtype=np.int64)
        if query_of.size:
            order = np.argsort(query_of, kind="stable")
            query_sorted = query_of[order]
            slot = np.arange(query_sorted.shape[0]) - (np.cumsum(counts) - counts)[query_sorted]
            positions[query_sorted, slot] = rows[order]
        return torch.as_tensor(positions)


def _check_corpus(candidates: Any, identifiers: Any) -> tuple[torch.Tensor, np.ndarray]:
    """A non-empty, finite ``[n, d]`` corpus and its ``n`` ids (row positions when ``identifiers`` is None)."""
    candidates = require_embeddings(candidates, "candidates", (2,))
    if candidates.shape[0] == 0:
        raise ValueError("candidates must hold at least one row: the corpus must not be empty")
    require_finite(candidates, "candidates")
    if identifiers is None:
        return candidates, np.arange(candidates.shape[0], dtype=np.int64)
    return candidates, encode_ids(identifiers, "identifiers", candidates.shape[0])[1]


def _on_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the CPU) moved to ``device``; without a dispatch when it is the CPU already."""
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _iterate_batches(dataset: Iterable[Any]) -> Iterator[tuple[np.ndarray | None, torch.Tensor]]:
    """Yield ``(ids or None, embeddings [b, d])`` from batches of embeddings or of ``(ids, embeddings)``."""
    for batch in dataset:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            ids, embeddings = batch
            embeddings = require_embeddings(embeddings, "dataset embeddings", (2,))
            _, values = encode_ids(ids, "dataset ids", embeddings.shape[0])
            yield values, embeddings
        else:
            yield None, require_embeddings(batch, "dataset batch", (2,))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision is widened: the kernel's thresholds and sentinels need float32's range.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SnapshotIndex(TopK, Generic[_Corpus]):
    """An index whose built state is one immutable object (``_corpus``), replaced whole by ``index()``: a query
    takes it once (:meth:`_snapshot`), so a concurrent ``index()`` cannot mix the ids of one corpus with the
    scores of another."""

    def __init__(self, k: int = 10, query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None) -> None:
        super().__init__(k, query_model)
        self._corpus: _Corpus | None = None

    def _built(self) -> _Corpus:
        corpus = self._corpus
        if corpus is None:
            raise RuntimeError(f"{type(self).__name__} has not been built: call index(...) or index_from_dataset(...)")
        return corpus

    def _snapshot(self) -> _Corpus:
        return self._built()

    @property
    def ids(self) -> IdTable:
        return self._built().ids

    @property
    def num_candidates(self) -> int:
        corpus = self._corpus
        return 0 if corpus is None else corpus.count

    def _search(
        self, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._search_snapshot(self._built(), queries, k, exclusions)


class _ExactSnapshotIndex(_SnapshotIndex[_ExactState]):
    """The exact indexes: the corpus scan runs on inputs shifted by ``_corpus.shift`` (a power of two)."""

    def is_exact(self) -> bool:
        return True

    def score_pairs(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(queries.dtype)
        corpus = self._corpus
        shift = 0 if corpus is None else int(corpus.shift)
        return _topk.pair_scores(
            queries.detach().to(dtype), candidates.detach().to(device=queries.device, dtype=dtype), shift
        )


@dataclass(frozen=True)
class _ExactCorpus:
    """The built state of a :class:`BruteForce` index, replaced whole by ``index()`` (never modified)."""

    ids: IdTable
    #: ``[n, d]`` the corpus as indexed (float32 or float64).
    candidates: torch.Tensor
    #: the power-of-two exponent the scan multiplies the corpus by (0 for ordinary magnitudes).
    shift: int
    #: ``candidates * 2**shift``: what the scan reads (the same tensor when ``shift`` is 0).
    scan: torch.Tensor
    #: converted pieces of ``scan`` (the bfloat16 screen copy: half the corpus's memory), kept between calls.
    piece_cache: _topk.PieceCache

    @property
    def count(self) -> int:
        return int(self.candidates.shape[0])


class BruteForce(_ExactSnapshotIndex[_ExactCorpus]):
    """Exact search over candidates held in memory, with the chunked top-K kernel.

    Safe to query from several threads while another calls :meth:`index`: each query reads one snapshot of the
    built index, so it answers from the old corpus or the new one, never from a mixture.

    Args:
        k: default number of results.
        query_model: optional module applied to raw query features.
    """

    @property
    def candidates(self) -> torch.Tensor | None:
        """``[n, d]`` the indexed corpus, or ``None`` before :meth:`index`."""
        corpus = self._corpus
        return None if corpus is None else corpus.candidates

    @property
    def dimension(self) -> int:
        return int(self._built().candidates.shape[1])

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> BruteForce:
        candidates, values = _check_corpus(candidates, identifiers)
        candidates = candidates.detach().to(_compute_dtype(candidates.dtype)).contiguous()
        shift = _topk.corpus_shift(candidates)
        scan = _topk.shift_rows(candidates, shift).contiguous()
        # One assignment: a query running meanwhile keeps the snapshot it took.
        self._corpus = _ExactCorpus(IdTable(values), candidates, shift, scan, {})
        return self

    def _search_snapshot(
        self, snapshot: Any, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        corpus: _ExactCorpus = snapshot
        queries = queries.to(device=corpus.scan.device, dtype=corpus.scan.dtype)
        if exclusions is not None:
            exclusions = exclusions.to(corpus.scan.device)
        scan = corpus.scan
        return _topk.search_chunks(
            queries, lambda: [(0, scan)], k, exclusions, corpus.piece_cache, candidate_shift=corpus.shift
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` (safetensors) atomically, with a checksum of its contents."""
        corpus = self._corpus
        if corpus is None:
            raise RuntimeError("BruteForce has not been built: nothing to save")
        tensors = {"candidates": corpus.candidates.detach().cpu().contiguous(), **_ids_to_tensors(corpus.ids)}
        _save_index_file(Path(path), "twotower.BruteForce", tensors, {"k": str(self.k)})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None,
    ) -> BruteForce:
        """Read an index written by :meth:`save`, verifying its format and checksum."""
        tensors, metadata = _load_index_file(Path(path), "twotower.BruteForce")
        settings = _metadata_ints(path, metadata, ("k",))
        candidates = tensors.get("candidates")
        if candidates is None or candidates.dtype not in (torch.float32, torch.float64) or candidates.ndim != 2:
            raise ValueError(f"{path} is not a valid twotower index file: no float32/float64 [n, d] candidates")
        try:
            index = cls(k=settings["k"], query_model=query_model)
            return index.index(candidates, _ids_from_tensors(tensors, path))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a valid twotower index file: {error}") from error


@dataclass(frozen=True)
class _StreamingCorpus:
    """The built state of a :class:`Streaming` index, replaced whole by ``index_from_dataset()``."""

    ids: IdTable
    dataset: Iterable[Any]
    count: int
    dimension: int
    #: the power-of-two exponent each chunk is multiplied by during the scan (0 for ordinary magnitudes).
    shift: int


class Streaming(_ExactSnapshotIndex[_StreamingCorpus]):
    """Exact search over candidates read batch by batch from an iterable on every query.

    Only a running top-k per query is kept, so the corpus can be larger than memory: pass an iterable that can be
    iterated several times (a list, a ``DataLoader``, a generator factory wrapped in a class with ``__iter__``).

    Args:
        k: default number of results.
        query_model: optional module applied to raw query features.
    """

    @property
    def dataset(self) -> Iterable[Any] | None:
        """The iterable of candidate batches, or ``None`` before it is indexed."""
        corpus = self._corpus
        return None if corpus is None else corpus.dataset

    @property
    def dimension(self) -> int:
        corpus = self._corpus
        return 0 if corpus is None else corpus.dimension

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> Streaming:
        candidates, values = _check_corpus(candidates, identifiers)
        if identifiers is None:
            return self.index_from_dataset([candidates])
        return self.index_from_dataset([(values, candidates)])

    def index_from_dataset(self, dataset: Iterable[Any]) -> Streaming:
        """Remember ``dataset`` (batches of embeddings or of ``(ids, embeddings)``); read it once to learn its ids.

        Only the ids are kept in memory (8 bytes per integer id); embeddings are read again on every query.
        """
        ids_parts: list[np.ndarray] = []
        count = 0
        dimension = 0
        largest = 0.0
        with_ids = None
        for ids, embeddings in _iterate_batches(dataset):
            if with_ids is None:
                with_ids = ids is not None
            elif with_ids != (ids is not None):
                raise ValueError("dataset must yield ids with every batch or with none")
            if dimension and embeddings.shape[1] != dimension:
                raise ValueError(f"dataset batches must share one dimension, got {dimension} and {embeddings.shape[1]}")
            dimension = int(embeddings.shape[1])
            require_finite(embeddings, "candidates from the dataset")
            if embeddings.numel():
                largest = max(largest, float(embeddings.detach().abs().amax()))
            if ids is not None:
                ids_parts.append(ids)
            count += int(embeddings.shape[0])
        if count == 0:
            raise ValueError("dataset yielded no candidates: the corpus must not be empty")
        values = np.concatenate(ids_parts) if ids_parts else np.arange(count, dtype=np.int64)
        shift = _topk.corpus_shift(torch.tensor([[largest]], dtype=torch.float64).to(torch.float32))
        self._corpus = _StreamingCorpus(IdTable(values), dataset, count, dimension, shift)
        return self

    def _search_snapshot(
        self, snapshot: Any, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        corpus: _StreamingCorpus = snapshot
        queries = queries.to(_compute_dtype(queries.dtype))
        return _topk.search_chunks(
            queries, lambda: self._chunks(corpus, queries), k, exclusions, candidate_shift=corpus.shift
        )

    @staticmethod
    def _chunks(corpus: _StreamingCorpus, queries: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        offset = 0
        for _, embeddings in _iterate_batches(corpus.dataset):
            if embeddings.shape[1] != corpus.dimension:
                raise ValueError("the dataset changed between index_from_dataset and this query (dimension)")
            require_finite(embeddings, "candidates from the dataset")
            chunk = embeddings.detach().to(device=queries.device, dtype=queries.dtype)
            yield offset, _topk.shift_rows(chunk, corpus.shift)
            offset += int(embeddings.shape[0])
        if offset != corpus.count:
            raise ValueError(
                f"the dataset changed between index_from_dataset and this query: it yielded {offset} candidates, "
                f"{corpus.count} expected"
            )


#: Version 2 files checksum their metadata too (version 1 checked only the tensors, so a changed ``k`` or
#: ``nprobe`` in the header went unnoticed); version 1 files are refused with the advice to save them again.
_INDEX_FILE_VERSION = "2"


def _save_index_file(path: Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and metadata as one safetensors file, atomically, with the SHA-256 of both."""
    from safetensors.torch import save

    header = {"format": kind, "version": _INDEX_FILE_VERSION, **metadata}
    header["sha256"] = _digest(tensors, header)
    atomic_write(path, save(tensors, metadata=header))


def _load_index_file(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`_save_index_file`, refusing a foreign, malformed or corrupt one."""
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


def _metadata_ints(path: str | os.PathLike[str], metadata: dict[str, str], names: Sequence[str]) -> dict[str, int]:
    """The named metadata entries as non-negative ints, refusing a missing or malformed one by name."""
    values = {}
    for name in names:
        text = metadata.get(name)
        if text is None or not text.isdigit() or len(text) > 18:
            raise ValueError(f"{path} is not a valid twotower index file: {name} is {text!r}, not a whole number")
        values[name] = int(text)
    return values


def _ids_to_tensors(table: IdTable) -> dict[str, torch.Tensor]:
    if not table.is_string:
        return {"ids": torch.as_tensor(table.values.astype(np.int64))}
    encoded = [value.encode("utf-8", "surrogatepass") for value in table.values.tolist()]
    lengths = np.array([len(value) for value in encoded], dtype=np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {"string_ids_utf8": torch.as_tensor(blob), "string_ids_lengths": torch.as_tensor(lengths)}


def _ids_from_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> np.ndarray:
    """The ids stored by :func:`_ids_to_tensors`, refusing tensors of the wrong kind or inconsistent lengths."""
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


@dataclass(frozen=True)
class _FaissCorpus:
    """The built state of a :class:`Faiss` index, replaced whole by ``index()``.

    FAISS's ``search`` only reads the index when the search settings come as per-call ``SearchParameters``, so
    one state serves any number of threads at once, with different settings.
    """

    ids: IdTable
    index: Any
    count: int
    dimension: int
    #: ``SearchParameters`` by ``(nprobe, ef_search, k_factor)``, each with the nested parameter objects that FAISS
    #: holds by raw pointer (kept alive here).
    parameters: dict[tuple[int | None, int | None, int | None], tuple[Any, list[tuple[str, Any]]]]


class Faiss(_SnapshotIndex[_FaissCorpus]):
    """Approximate top-K with FAISS, by inner product, behind the same interface as the exact indexes.

    Args:
        factory: a FAISS index factory string, e.g. ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ16"``
            (see FAISS's ``index_factory``); the metric is always the inner product.
        k: default number of results.
        query_model: optional module applied to raw query features.
        train_size: how many candidates (a seeded random sample) train the index, for index types that train.
        nprobe: IVF cells visited per query (per-call override in :meth:`search`).
        ef_search: HNSW search breadth (per-call override in :meth:`search`).
        k_factor: for a refined index (factory ending in ``",RFlat"``, e.g. ``"IVF1024,PQ32x4fs,RFlat"``): the
            base index proposes ``k_factor * k`` candidates by its approximate scores, and they are reranked by
            their exact inner products (per-call override in :meth:`search`).
        seed: seed of the training sample.

    Settings reach FAISS as per-call ``SearchParameters``, never by changing the FAISS index, so concurrent
    searches with different settings do not interfere. Exclusions are applied by retrieving ``k`` plus the number
    of excluded rows of each query and removing them, as TFRS does for approximate indexes: with an approximate
    index an excluded item cannot be skipped inside the search. The removal costs ``O(k + E)`` per query.
    """

    def __init__(
        self,
        factory: str = "IVF1024,Flat",
        k: int = 10,
        query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None,
        train_size: int = 100_000,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(k, query_model)
        if not isinstance(factory, str) or not factory:
            raise ValueError(f"factory must be a FAISS index factory string, got {factory!r}")
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size must be a positive int, got {train_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.factory, self.train_size, self.seed = factory, train_size, seed
        self.nprobe, self.ef_search = (
            _check_optional_positive(nprobe, "nprobe"),
            _check_optional_positive(ef_search, "ef_search"),
        )
        self.k_factor = _check_optional_positive(k_factor, "k_factor")

    def is_exact(self) -> bool:
        return False

    @property
    def dimension(self) -> int:
        return self._built().dimension

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (read it; changing it while queries run is not safe)."""
        return self._built().index

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> Faiss:
        import faiss

        candidates, values = _check_corpus(candidates, identifiers)
        matrix = np.ascontiguousarray(candidates.detach().cpu().to(torch.float32).numpy())
        if not np.isfinite(matrix).all():
            raise ValueError("candidates overflow float32, the precision FAISS indexes in")
        try:
            index = faiss.index_factory(matrix.shape[1], self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"FAISS cannot build {self.factory!r}: {_faiss_message(error)}") from error
        if not index.is_trained:
            rng = np.random.default_rng(self.seed)
            sample = matrix[rng.permutation(matrix.shape[0])[: self.train_size]]
            cells = _ivf_cells(index)
            if cells is not None and sample.shape[0] < cells:
                raise ValueError(
                    f"factory {self.factory!r} has {cells} IVF cells but only {sample.shape[0]} candidates train it "
                    f"(corpus of {matrix.shape[0]}, train_size {self.train_size}): use at most {sample.shape[0]} "
                    "cells, or a flat index for a corpus this small"
                )
            try:
                index.train(sample)
            except RuntimeError as error:
                raise ValueError(
                    f"FAISS cannot train {self.factory!r} on {sample.shape[0]} candidates: {_faiss_message(error)}"
                ) from error
        index.add(matrix)
        # One assignment: a query running meanwhile keeps the snapshot it took.
        self._corpus = _faiss_corpus(index, IdTable(values))
        return self

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the FAISS index, ids and settings to ``path`` (safetensors) atomically, with a checksum."""
        _faiss_save(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None
    ) -> Faiss:
        """Read an index written by :meth:`save`, verifying its format and checksum."""
        return _faiss_load(path, query_model)

    def search(
        self,
        queries: Any,
        k: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
    ) -> tuple[torch.Tensor, Ids]:
        """Like calling the index, with ``nprobe`` / ``ef_search`` / ``k_factor`` for this call only (later
        calls use the index's own settings again)."""
        settings = (
            _check_optional_positive(nprobe, "nprobe") or self.nprobe,
            _check_optional_positive(ef_search, "ef_search") or self.ef_search,
            _check_optional_positive(k_factor, "k_factor") or self.k_factor,
        )
        scores, ids, _ = self._query_numpy(queries, k, None, settings)
        return scores, ids

    def query_rows(
        self, queries: Any, k: int | None = None, exclusions: Any = None
    ) -> tuple[torch.Tensor, Ids, torch.Tensor]:
        return self._query_numpy(queries, k, exclusions, self._settings())

    def _settings(self) -> tuple[int | None, int | None, int | None]:
        return (
            _check_optional_positive(self.nprobe, "nprobe"),
            _check_optional_positive(self.ef_search, "ef_search"),
            _check_optional_positive(self.k_factor, "k_factor"),
        )

    def _query_numpy(
        self,
        queries: Any,
        k: int | None,
        exclusions: Any,
        settings: tuple[int | None, int | None, int | None],
    ) -> tuple[torch.Tensor, Ids, torch.Tensor]:
        # A server sends one query per call. Right after a FAISS search each torch operation costs tens of
        # microseconds (measured: a trivial one adds 30 us to a 330 us search), so the whole path, from the query's
        # conversion to the ids, stays in numpy.
        corpus = self._built()
        embeddings = self._query_embeddings(queries)
        matrix = np.ascontiguousarray(embeddings.to("cpu", torch.float32).numpy())
        if not np.isfinite(matrix).all():
            require_finite(embeddings, "queries")  # raises, with the count of bad values
            raise ValueError("queries overflow float32, the precision FAISS searches in")
        k = min(_check_k(self.k if k is None else k), corpus.count)
        positions = None
        if exclusions is not None:
            positions = self._exclusion_positions(exclusions, matrix.shape[0], corpus.ids).numpy()
        scores, rows = self._search_numpy(corpus, matrix, k, positions, settings)
        device = embeddings.device
        return (
            _on_device(torch.from_numpy(scores), device),
            corpus.ids.take_numpy(rows, device),
            _on_device(torch.from_numpy(rows), device),
        )

    def _search_snapshot(
        self, snapshot: Any, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        excluded = None if exclusions is None else exclusions.cpu().numpy()
        scores, rows = self._search_numpy(snapshot, matrix, k, excluded, self._settings())
        return _on_device(torch.from_numpy(scores), queries.device), _on_device(torch.from_numpy(rows), queries.device)

    def _search_numpy(
        self,
        corpus: _FaissCorpus,
        matrix: np.ndarray,
        k: int,
        exclusions: np.ndarray | None,
        settings: tuple[int | None, int | None, int | None],
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [nq, k] float32, rows [nq, k] int64)`` of float32 ``matrix`` ``[nq, d]``; ``exclusions`` holds
        rows to leave out per query, ``-1`` padded. Empty slots have row ``-1`` and score ``-inf``."""
        parameters = self._faiss_parameters(corpus, settings)
        extra = 0 if exclusions is None else int((exclusions >= 0).sum(axis=1).max(initial=0))
        wanted = min(k + extra, corpus.count)
        scores, rows = corpus.index.search(matrix, wanted, params=parameters)
        # FAISS marks missing results with -1 (few cells probed): they rank last.
        empty = rows < 0
        if exclusions is not None and extra:
            empty |= _excluded_mask(rows, exclusions, corpus.count)
        if empty.any():
            rows = np.where(empty, -1, rows)
            scores = np.where(empty, -np.inf, scores).astype(np.float32)
            if exclusions is not None:
                # FAISS returns each row sorted: moving the removed entries to the end keeps the order of the rest.
                order = np.argsort(empty, axis=1, kind="stable")
                scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        scores, rows = scores[:, :k], rows[:, :k]
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64)

    def _faiss_parameters(self, corpus: _FaissCorpus, settings: tuple[int | None, int | None, int | None]) -> Any:
        """The ``SearchParameters`` of ``settings`` for this index (made once per distinct settings)."""
        cached = corpus.parameters.get(settings)
        if cached is None:
            keep: list[tuple[str, Any]] = []
            parameters = _search_parameters(corpus.index, *settings, keep=keep)
            kinds = {kind for kind, _ in keep}
            for name, value, kind in zip(
                ("nprobe", "ef_search", "k_factor"), settings, ("ivf", "hnsw", "refine"), strict=True
            ):
                if value is not None and kind not in kinds:
                    if kind == "refine":
                        refined = "refined indexes (a factory ending in ',RFlat')"
                        raise ValueError(f"k_factor applies to {refined}, not to {self.factory!r}")
                    raise ValueError(f"{name} does not apply to a {self.factory!r} index")
            cached = (parameters, keep)
            corpus.parameters[settings] = cached
        return cached[0]


def _faiss_corpus(index: Any, ids: IdTable) -> _FaissCorpus:
    return _FaissCorpus(ids, index, int(index.ntotal), int(index.d), {})


def _faiss_message(error: Exception) -> str:
    """FAISS's error without its C++ source location ("Error in ... at faiss/x.cpp:66: Error: 'cond'")."""
    return str(error).split("Error: ", 1)[-1].strip()[:300]


def _ivf_cells(index: Any) -> int | None:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:  # not an IVF index
        return None


def _search_parameters(
    index: Any, nprobe: int | None, ef_search: int | None, k_factor: int | None, keep: list[tuple[str, Any]]
) -> Any:
    """FAISS ``SearchParameters`` for ``index`` (``None`` where it takes none), nested as the index is nested
    (a refined or pre-transformed index wraps another). ``keep`` collects ``(kind, object)`` for every object
    made: FAISS holds nested parameters by raw pointer, so Python must keep them alive."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexRefine):
        refine = faiss.IndexRefineSearchParameters()
        refine.k_factor = float(k_factor if k_factor is not None else index.k_factor)
        base = _search_parameters(index.base_index, nprobe, ef_search, None, keep)
        if base is not None:
            refine.base_index_params = base
        keep.append(("refine", refine))
        return refine
    if isinstance(index, faiss.IndexPreTransform):
        inner = _search_parameters(index.index, nprobe, ef_search, k_factor, keep)
        if inner is None:
            return None
        transform = faiss.SearchParametersPreTransform()
        transform.index_params = inner
        keep.append(("pretransform", transform))
        return transform
    if isinstance(index, faiss.IndexIVF):
        ivf = faiss.SearchParametersIVF()
        ivf.nprobe = int(nprobe if nprobe is not None else index.nprobe)
        keep.append(("ivf", ivf))
        return ivf
    if isinstance(index, faiss.IndexHNSW):
        hnsw = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        hnsw.efSearch = int(ef_search if ef_search is not None else index.hnsw.efSearch)
        keep.append(("hnsw", hnsw))
        return hnsw
    return None


def _excluded_mask(rows: np.ndarray, exclusions: np.ndarray, count: int) -> np.ndarray:
    """``[nq, w]`` bool: is ``rows[i, j]`` one of query ``i``'s excluded rows (``exclusions`` ``[nq, E]``, -1 pads)?

    Each ``(query, row)`` pair becomes one integer key, and membership is one sorted lookup over all keys: memory
    and time ``O(nq (w + E))``, not the ``O(nq w E)`` of comparing every result with every exclusion.
    """
    queries = np.arange(rows.shape[0], dtype=np.int64)[:, None]
    excluded_keys = np.unique((queries * count + exclusions)[exclusions >= 0])
    found = rows >= 0
    keys = queries * count + np.where(found, rows, 0)
    return np.isin(keys, excluded_keys) & found


def _faiss_save(index: Faiss, path: str | os.PathLike[str]) -> None:
    import faiss

    corpus = index._built()
    tensors = {
        "faiss_index": torch.as_tensor(faiss.serialize_index(corpus.index).copy()),
        **_ids_to_tensors(corpus.ids),
    }
    metadata = {
        "factory": index.factory,
        "k": str(index.k),
        "nprobe": str(index.nprobe or 0),
        "ef_search": str(index.ef_search or 0),
        "k_factor": str(index.k_factor or 0),
        "train_size": str(index.train_size),
    }
    _save_index_file(Path(path), "twotower.Faiss", tensors, metadata)


def _faiss_load(path: str | os.PathLike[str], query_model: nn.Module | Callable[[Any], torch.Tensor] | None) -> Faiss:
    import faiss

    tensors, metadata = _load_index_file(Path(path), "twotower.Faiss")
    settings = _metadata_ints(path, metadata, ("k", "nprobe", "ef_search", "k_factor", "train_size"))
    if "faiss_index" not in tensors or tensors["faiss_index"].dtype != torch.uint8:
        raise ValueError(f"{path} is not a valid twotower index file: it has no uint8 faiss_index tensor")
    try:
        index = Faiss(
            metadata.get("factory", ""),
            k=settings["k"],
            query_model=query_model,
            train_size=settings["train_size"],
            nprobe=settings["nprobe"] or None,
            ef_search=settings["ef_search"] or None,
            k_factor=settings["k_factor"] or None,
        )
    except ValueError as error:
        raise ValueError(f"{path} is not a valid twotower index file: {error}") from error
    try:
        # FAISS's own binary format, parsed by FAISS's reader: vectors, codes and structure, no code.
        faiss_index = faiss.deserialize_index(tensors["faiss_index"].numpy())
    except RuntimeError as error:
        raise ValueError(f"{path} holds a FAISS index that FAISS cannot read: {_faiss_message(error)}") from error
    ids = IdTable(_ids_from_tensors(tensors, path))
    if len(ids) != int(faiss_index.ntotal):
        raise ValueError(f"{path} is inconsistent: {len(ids)} ids for {int(faiss_index.ntotal)} vectors")
    index._corpus = _faiss_corpus(faiss_index, ids)
    return index


def _check_optional_positive(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def recall_against_exact(approximate: TopK, exact: TopK, queries: torch.Tensor, k: int) -> tuple[float, float, float]:
    """Recall@k of ``approximate`` against ``exact`` on ``queries``, and both indexes' queries/s.

    Returns:
        ``(recall, approximate queries/s, exact queries/s)``: recall is the mean fraction of each query's exact
        top-``k`` ids that the approximate index also returns in its top ``k``.
    """
    import time

    started = time.perf_counter()
    _, truth = exact(queries, k=k)
    exact_rate = queries.shape[0] / (time.perf_counter() - started)
    started = time.perf_counter()
    _, found = approximate(queries, k=k)
    approximate_rate = queries.shape[0] / (time.perf_counter() - started)
    return recall_at_k(found, truth), approximate_rate, exact_rate


def recall_at_k(found: Ids, truth: Ids) -> float:
    """Mean over rows of the fraction of ``truth``'s ids (``[nq, k]``) that the same row of ``found`` also holds.

    ``found`` may be wider or narrower than ``truth``; ids are compared as values (int or str)."""
    truth_np = truth.cpu().numpy() if isinstance(truth, torch.Tensor) else np.asarray(truth)
    found_np = found.cpu().numpy() if isinstance(found, torch.Tensor) else np.asarray(found)
    if truth_np.ndim != 2 or found_np.ndim != 2 or truth_np.shape[0] != found_np.shape[0]:
        raise ValueError(f"found and truth must be [nq, k] with the same nq, got {found_np.shape} and {truth_np.shape}")
    if truth_np.shape[1] == 0:
        raise ValueError("truth must hold at least one id per row")
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(truth_np, found_np, strict=True)]
    return float(np.mean(hits)) / int(truth_np.shape[1])
