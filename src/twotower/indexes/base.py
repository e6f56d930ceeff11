"""The index protocol: what every top-K index offers, and what an index implementation supplies.

After TFRS's ``layers.factorized_top_k.TopK`` and FAISS's plain index interface.

**Using an index** (what the task, the metrics, serving and the distributed code call):

* ``index(candidates, identifiers=None)`` / ``index_from_dataset(batches)`` build it;
* ``index(queries, k=None) -> (scores, ids)``: ``[nq, k]`` scores sorted by descending score and the matching
  ids (an ``int64`` tensor for integer ids, a numpy ``str`` array for string ids);
* ``query_with_exclusions(queries, exclusions, k=None)`` leaves out given ids per query (e.g. already seen items);
* :meth:`TopK.embed_queries` turns raw queries into checked :class:`QueryEmbeddings` (query model, shape, dtype,
  finiteness) once; :meth:`TopK.search` takes them (or raw queries) with a per-call ``k``, exclusions and
  :class:`SearchParameters`, and returns a :class:`SearchResult` ``(scores, ids, rows)``;
* :meth:`TopK.top_scores` returns the best scores alone, :meth:`TopK.score_pairs` scores given pairs with the
  search's arithmetic; ``is_exact()``, ``num_candidates``, ``dimension`` and ``ids`` describe the corpus.

**Implementing an index** means supplying ``index()``, ``is_exact()``, ``dimension``, ``num_candidates``,
:meth:`TopK.snapshot` (the built state, one immutable object) and :meth:`TopK.search_snapshot` (the search
against one such state, on checked embeddings). Everything above is built on those.

``k`` larger than the corpus is clamped to the corpus size. Duplicate ids are allowed: each row is its own
candidate (the same id can appear twice in a result), and excluding an id excludes every row that carries it.
Ties are broken by row position, lower first.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from twotower import _topk
from twotower._checks import require_embeddings, require_finite, require_floating
from twotower.ids import Ids, IdTable, encode_ids

#: A query model: maps raw query features to ``[nq, d]`` embeddings.
QueryModel = nn.Module | Callable[[Any], torch.Tensor]


class BuiltState(Protocol):
    """What every index's built state holds."""

    @property
    def ids(self) -> IdTable: ...

    @property
    def count(self) -> int: ...


class ShiftedState(BuiltState, Protocol):
    """An exact index's built state: its scan runs on inputs multiplied by ``2**shift``."""

    @property
    def shift(self) -> int: ...


_Corpus = TypeVar("_Corpus", bound=BuiltState)
_ExactState = TypeVar("_ExactState", bound=ShiftedState)


@dataclass(frozen=True)
class QueryEmbeddings:
    """Query embeddings checked once: ``[nq, d]`` floating point, finite, detached.

    Made by :meth:`TopK.embed_queries` (or :meth:`trusted` by a caller that has checked them itself, as
    :class:`twotower.tasks.Retrieval` does); an index searches them without checking again.
    """

    embeddings: torch.Tensor

    @classmethod
    def trusted(cls, embeddings: torch.Tensor) -> QueryEmbeddings:
        """Wrap embeddings the caller has already checked to be ``[nq, d]``, floating point and finite."""
        return cls(embeddings.detach())

    @property
    def num_queries(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class SearchParameters:
    """Per-call search settings, passed as a value (FAISS's ``SearchParameters``): exact indexes take none, an
    approximate index takes its own subclass (:class:`twotower.indexes.FaissSearchParameters`)."""


class SearchResult(NamedTuple):
    """``(scores, ids, rows)``, each ``[nq, k]``: scores in descending order, the ids, and the row positions
    (``-1`` exactly where a slot holds no candidate: fewer than ``k`` left after the exclusions, or an
    approximate index that found fewer)."""

    scores: torch.Tensor
    ids: Ids
    rows: torch.Tensor


class TopK(nn.Module, abc.ABC):
    """Interface of top-K indexes (see the module docstring for the protocol).

    Args:
        k: default number of results per query (a per-call ``k`` overrides it).
        query_model: optional module mapping raw query features to embeddings before the search.
    """

    def __init__(self, k: int = 10, query_model: QueryModel | None = None) -> None:
        super().__init__()
        self.k = check_k(k)
        self.query_model = query_model

    # -- implementer's side ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def is_exact(self) -> bool:
        """Whether the index returns exact results."""

    @abc.abstractmethod
    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> TopK:
        """Build the index from candidate embeddings ``[n, d]`` and optional ids (``n`` of them). Returns self."""

    @property
    @abc.abstractmethod
    def num_candidates(self) -> int:
        """Number of rows in the corpus (0 before it is built)."""

    @property
    @abc.abstractmethod
    def dimension(self) -> int:
        """Embedding dimension of the corpus."""

    @abc.abstractmethod
    def snapshot(self) -> BuiltState:
        """The built state a query reads, taken once per query so that a concurrent ``index()`` cannot mix the
        ids of one corpus with the scores of another. Raises a ``RuntimeError`` before the index is built."""

    @abc.abstractmethod
    def search_snapshot(
        self,
        snapshot: Any,
        embeddings: torch.Tensor,
        k: int,
        excluded_rows: torch.Tensor | None,
        params: SearchParameters | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Search one snapshot.

        Args:
            snapshot: what :meth:`snapshot` returned.
            embeddings: ``[nq, d]`` checked query embeddings.
            k: results per query, ``1 <= k <= snapshot.count``.
            excluded_rows: ``[nq, E]`` rows to leave out per query, ``-1`` padding, or ``None``.
            params: per-call settings, or ``None`` for the index's own.

        Returns:
            ``(scores [nq, k], rows [nq, k])``, row ``-1`` (score ``-inf``) for an empty slot.
        """

    # -- the protocol other modules use --------------------------------------------------------------------------

    @property
    def ids(self) -> IdTable:
        """The ids of the corpus's rows."""
        return self.snapshot().ids

    def embed_queries(self, queries: Any) -> QueryEmbeddings:
        """The query model's output (or ``queries`` without one), checked to be ``[nq, dimension]``, floating
        point and finite; :class:`QueryEmbeddings` pass through with their dimension checked."""
        if isinstance(queries, QueryEmbeddings):
            self._check_dimension(queries.embeddings)
            return queries
        embeddings = self._unchecked_embeddings(queries)
        require_finite(embeddings, "queries")
        return QueryEmbeddings(embeddings)

    def search(
        self,
        queries: Any,
        k: int | None = None,
        exclusions: Any = None,
        params: SearchParameters | None = None,
    ) -> SearchResult:
        """Top ``k`` candidates of each query.

        Args:
            queries: :class:`QueryEmbeddings`, ``[nq, d]`` embeddings, or raw features for the ``query_model``.
            k: results per query; defaults to the constructor's ``k``; clamped to the corpus size.
            exclusions: ``[nq, E]`` ids (tensor or array), or a list of ``nq`` id sequences of any lengths, to leave
                out per query. Ids that are not in the index are ignored, so any such value can pad.
            params: per-call :class:`SearchParameters` (approximate indexes), ``None`` for the index's own.

        Returns:
            A :class:`SearchResult`. If fewer than ``k`` candidates remain, the tail holds empty slots (row
            ``-1``, score ``-inf``).
        """
        snapshot = self.snapshot()
        embedded = self.embed_queries(queries)
        k = min(check_k(self.k if k is None else k), int(snapshot.count))
        excluded = None if exclusions is None else snapshot.ids.excluded_rows(exclusions, embedded.num_queries)
        with torch.no_grad():
            scores, rows = self.search_snapshot(snapshot, embedded.embeddings, k, excluded, self.check_params(params))
        return SearchResult(scores, snapshot.ids.take(rows), rows)

    def top_scores(self, queries: Any, k: int) -> torch.Tensor:
        """``[nq, min(k, n)]`` best scores, without their ids: score-based metrics need none, and looking up
        string ids (``[nq, k]`` strings) costs more than the exact search of a small corpus."""
        snapshot = self.snapshot()
        embedded = self.embed_queries(queries)
        with torch.no_grad():
            scores, _ = self.search_snapshot(
                snapshot, embedded.embeddings, min(check_k(k), int(snapshot.count)), None, None
            )
        return scores

    def score_pairs(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rowwise ``q_i . c_i`` ``[n]`` computed with the arithmetic of this index's search.

        A candidate scored this way ties exactly with its own copy in the corpus, which score-based metrics need.
        """
        dtype = compute_dtype(queries.dtype)
        return _topk.pair_scores(queries.detach().to(dtype), candidates.detach().to(device=queries.device, dtype=dtype))

    def check_params(self, params: SearchParameters | None) -> SearchParameters | None:
        """``params`` if this index takes them; an exact index takes none."""
        if params is not None and type(params) is not SearchParameters:
            raise ValueError(f"{type(self).__name__} is exact and takes no {type(params).__name__}")
        return params

    # -- conveniences, all through search() ----------------------------------------------------------------------

    def index_from_dataset(self, dataset: Iterable[Any]) -> TopK:
        """Build from an iterable of embedding batches ``[b, d]`` or of ``(ids, embeddings)`` batches."""
        ids_parts: list[np.ndarray] = []
        embedding_parts: list[torch.Tensor] = []
        for ids, embeddings in iterate_batches(dataset):
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
        """``(scores [nq, k], ids [nq, k])`` of the top ``k`` candidates of each query (see :meth:`search`)."""
        result = self.search(queries, k)
        return result.scores, result.ids

    def query_with_exclusions(self, queries: Any, exclusions: Any, k: int | None = None) -> tuple[torch.Tensor, Ids]:
        """``(scores, ids)`` of the top ``k`` candidates of each query, leaving out the ids in ``exclusions``
        (see :meth:`search`)."""
        result = self.search(queries, k, exclusions)
        return result.scores, result.ids

    def query_rows(self, queries: Any, k: int | None = None, exclusions: Any = None) -> SearchResult:
        """:meth:`search` with ``exclusions`` by position: ``(scores, ids, rows)``; callers drop empty slots by
        ``rows == -1`` without guessing from the score (a real score may be ``-inf`` when it lies beyond the
        dtype's range) or the id (``-1`` may be a real integer id)."""
        return self.search(queries, k, exclusions)

    def _unchecked_embeddings(self, queries: Any) -> torch.Tensor:
        """The query model's output (or ``queries``), checked to be ``[nq, dimension]`` floating point (not yet
        checked to be finite), detached."""
        if self.query_model is not None:
            with torch.no_grad():
                queries = self.query_model(queries)
        embeddings = require_floating(queries, "queries", (2,))
        self._check_dimension(embeddings)
        return embeddings.detach()

    def _check_dimension(self, embeddings: torch.Tensor) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"queries must be [nq, d], got shape {tuple(embeddings.shape)}")
        if embeddings.shape[1] != self.dimension:
            raise ValueError(
                f"queries have dimension {embeddings.shape[1]} but the index holds {self.dimension}-d candidates"
            )


class SnapshotIndex(TopK, Generic[_Corpus]):
    """An index whose built state is one immutable object (``_corpus``), replaced whole by ``index()``: a query
    takes it once (:meth:`snapshot`), so a concurrent ``index()`` cannot mix the ids of one corpus with the
    scores of another."""

    def __init__(self, k: int = 10, query_model: QueryModel | None = None) -> None:
        super().__init__(k, query_model)
        self._corpus: _Corpus | None = None

    def snapshot(self) -> _Corpus:
        corpus = self._corpus
        if corpus is None:
            raise RuntimeError(f"{type(self).__name__} has not been built: call index(...) or index_from_dataset(...)")
        return corpus

    @property
    def num_candidates(self) -> int:
        corpus = self._corpus
        return 0 if corpus is None else int(corpus.count)

    def _search_in_numpy(
        self,
        queries: Any,
        k: int | None,
        exclusions: Any,
        search: Callable[[_Corpus, np.ndarray, int, np.ndarray | None], tuple[np.ndarray, np.ndarray]],
        precision_of: str,
    ) -> SearchResult:
        """:meth:`search` for an index whose search runs in numpy (``Faiss``, ``AnisotropicIVF``): the whole path,
        from the query's conversion to the ids, stays there (a server sends one query per call, and a torch
        operation between native calls costs microseconds each).

        ``search(corpus, queries [nq, d] float32, k, excluded rows [nq, E] or None)`` returns ``(scores, rows)``
        numpy arrays ``[nq, k]``; ``precision_of`` names the index in the error for queries that overflow float32.
        """
        corpus = self.snapshot()
        checked = isinstance(queries, QueryEmbeddings)
        embeddings = self.embed_queries(queries).embeddings if checked else self._unchecked_embeddings(queries)
        matrix = np.ascontiguousarray(embeddings.to("cpu", torch.float32).numpy())
        if not np.isfinite(matrix).all():
            require_finite(embeddings, "queries")  # raises, with the count of bad values
            raise ValueError(f"queries overflow float32, the precision {precision_of} searches in")
        k = min(check_k(self.k if k is None else k), int(corpus.count))
        excluded = None if exclusions is None else corpus.ids.excluded_rows(exclusions, matrix.shape[0]).numpy()
        scores, rows = search(corpus, matrix, k, excluded)
        device = embeddings.device
        return SearchResult(
            on_device(torch.from_numpy(scores), device),
            corpus.ids.take_numpy(rows, device),
            on_device(torch.from_numpy(rows), device),
        )


class ExactSnapshotIndex(SnapshotIndex[_ExactState]):
    """The exact indexes: the corpus scan runs on inputs shifted by ``_corpus.shift`` (a power of two)."""

    def is_exact(self) -> bool:
        return True

    def score_pairs(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(queries.dtype)
        corpus = self._corpus
        shift = 0 if corpus is None else int(corpus.shift)
        return _topk.pair_scores(
            queries.detach().to(dtype), candidates.detach().to(device=queries.device, dtype=dtype), shift
        )


def check_corpus(candidates: Any, identifiers: Any) -> tuple[torch.Tensor, np.ndarray]:
    """A non-empty, finite ``[n, d]`` corpus and its ``n`` ids (row positions when ``identifiers`` is None)."""
    candidates = require_embeddings(candidates, "candidates", (2,))
    if candidates.shape[0] == 0:
        raise ValueError("candidates must hold at least one row: the corpus must not be empty")
    require_finite(candidates, "candidates")
    if identifiers is None:
        return candidates, np.arange(candidates.shape[0], dtype=np.int64)
    return candidates, encode_ids(identifiers, "identifiers", candidates.shape[0]).values


def on_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the CPU) moved to ``device``; without a dispatch when it is the CPU already."""
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)


def check_k(k: Any) -> int:
    """``k`` as an int if it is a positive integer, else a ``ValueError`` naming it."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def iterate_batches(dataset: Iterable[Any]) -> Iterator[tuple[np.ndarray | None, torch.Tensor]]:
    """Yield ``(ids or None, embeddings [b, d])`` from batches of embeddings or of ``(ids, embeddings)``."""
    for batch in dataset:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            ids, embeddings = batch
            embeddings = require_embeddings(embeddings, "dataset embeddings", (2,))
            yield encode_ids(ids, "dataset ids", embeddings.shape[0]).values, embeddings
        else:
            yield None, require_embeddings(batch, "dataset batch", (2,))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an exact search runs in: float64 stays, everything else is float32 (half precision cannot hold
    the kernel's thresholds and sentinels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
