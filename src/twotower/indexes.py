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
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn

from twotower import _topk
from twotower._checks import encode_ids, per_query_ids, require_finite, require_floating
from twotower._files import atomic_write

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
        """Return ``(scores [nq, k], row positions [nq, k])``."""

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

    def _query(self, queries: Any, k: int | None, exclusions: Any) -> tuple[torch.Tensor, Ids]:
        table = self.ids
        embeddings = self._embed_queries(queries)
        k = min(_check_k(self.k if k is None else k), self.num_candidates)
        positions = None
        if exclusions is not None:
            positions = self._exclusion_positions(exclusions, embeddings.shape[0], table)
        with torch.no_grad():
            scores, rows = self._search(embeddings, k, positions)
        return scores, table.take(rows)

    def _top_scores(self, queries: Any, k: int) -> torch.Tensor:
        """``[nq, min(k, n)]`` best scores, without their ids: score-based metrics need none, and looking up
        string ids (``[nq, k]`` strings) costs more than the exact search of a small corpus."""
        embeddings = self._embed_queries(queries)
        with torch.no_grad():
            scores, _ = self._search(embeddings, min(_check_k(k), self.num_candidates), None)
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
        lengths = np.array([row.shape[0] for row in per_query])
        flat = np.concatenate(per_query) if per_query else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(num_queries), lengths)
        which, rows = table.positions_of(flat) if flat.size else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        query_of = owner[which]
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
    candidates = require_floating(candidates, "candidates", (2,))
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
            embeddings = require_floating(embeddings, "dataset embeddings", (2,))
            _, values = encode_ids(ids, "dataset ids", embeddings.shape[0])
            yield values, embeddings
        else:
            yield None, require_floating(batch, "dataset batch", (2,))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision is widened: the kernel's thresholds and sentinels need float32's range.
    return torch.float64 if dtype == torch.float64 else torch.float32


class BruteForce(TopK):
    """Exact search over candidates held in memory, with the chunked top-K kernel.

    Args:
        k: default number of results.
        query_model: optional module applied to raw query features.
    """

    def __init__(self, k: int = 10, query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None) -> None:
        super().__init__(k, query_model)
        self.candidates: torch.Tensor | None = None
        # Converted pieces of the corpus (the bfloat16 screen copy: half the corpus's memory), kept between calls.
        self._piece_cache: _topk.PieceCache = {}

    def is_exact(self) -> bool:
        return True

    @property
    def num_candidates(self) -> int:
        return 0 if self.candidates is None else int(self.candidates.shape[0])

    @property
    def dimension(self) -> int:
        if self.candidates is None:
            raise RuntimeError("BruteForce has not been built: call index(...) or index_from_dataset(...)")
        return int(self.candidates.shape[1])

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> BruteForce:
        candidates, values = _check_corpus(candidates, identifiers)
        self.candidates = candidates.detach().to(_compute_dtype(candidates.dtype)).contiguous()
        self._piece_cache = {}
        self._ids = IdTable(values)
        return self

    def _search(
        self, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.candidates is not None
        queries = queries.to(device=self.candidates.device, dtype=self.candidates.dtype)
        if exclusions is not None:
            exclusions = exclusions.to(self.candidates.device)
        candidates = self.candidates
        return _topk.search_chunks(queries, lambda: [(0, candidates)], k, exclusions, self._piece_cache)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` (safetensors) atomically, with a checksum of its contents."""
        if self.candidates is None:
            raise RuntimeError("BruteForce has not been built: nothing to save")
        tensors = {"candidates": self.candidates.detach().cpu().contiguous(), **_ids_to_tensors(self.ids)}
        _save_index_file(Path(path), "twotower.BruteForce", tensors, {"k": str(self.k)})

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None,
    ) -> BruteForce:
        """Read an index written by :meth:`save`, verifying its format and checksum."""
        tensors, metadata = _load_index_file(Path(path), "twotower.BruteForce")
        index = cls(k=int(metadata["k"]), query_model=query_model)
        index.index(tensors["candidates"], _ids_from_tensors(tensors))
        return index


class Streaming(TopK):
    """Exact search over candidates read batch by batch from an iterable on every query.

    Only a running top-k per query is kept, so the corpus can be larger than memory: pass an iterable that can be
    iterated several times (a list, a ``DataLoader``, a generator factory wrapped in a class with ``__iter__``).

    Args:
        k: default number of results.
        query_model: optional module applied to raw query features.
    """

    def __init__(self, k: int = 10, query_model: nn.Module | Callable[[Any], torch.Tensor] | None = None) -> None:
        super().__init__(k, query_model)
        self.dataset: Iterable[Any] | None = None
        self._num_candidates = 0
        self._dimension = 0

    def is_exact(self) -> bool:
        return True

    @property
    def num_candidates(self) -> int:
        return self._num_candidates

    @property
    def dimension(self) -> int:
        return self._dimension

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> Streaming:
        candidates = require_floating(candidates, "candidates", (2,))
        if identifiers is None:
            return self.index_from_dataset([candidates])
        return self.index_from_dataset([(identifiers, candidates)])

    def index_from_dataset(self, dataset: Iterable[Any]) -> Streaming:
        """Remember ``dataset`` (batches of embeddings or of ``(ids, embeddings)``); read it once to learn its ids.

        Only the ids are kept in memory (8 bytes per integer id); embeddings are read again on every query.
        """
        ids_parts: list[np.ndarray] = []
        count = 0
        dimension = 0
        with_ids = None
        for ids, embeddings in _iterate_batches(dataset):
            if with_ids is None:
                with_ids = ids is not None
            elif with_ids != (ids is not None):
                raise ValueError("dataset must yield ids with every batch or with none")
            if dimension and embeddings.shape[1] != dimension:
                raise ValueError(f"dataset batches must share one dimension, got {dimension} and {embeddings.shape[1]}")
            dimension = int(embeddings.shape[1])
            if ids is not None:
                ids_parts.append(ids)
            count += int(embeddings.shape[0])
        if count == 0:
            raise ValueError("dataset yielded no candidates: the corpus must not be empty")
        values = np.concatenate(ids_parts) if ids_parts else np.arange(count, dtype=np.int64)
        self.dataset = dataset
        self._num_candidates = count
        self._dimension = dimension
        self._ids = IdTable(values)
        return self

    def _search(
        self, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.dataset is not None
        queries = queries.to(_compute_dtype(queries.dtype))
        return _topk.search_chunks(queries, lambda: self._chunks(queries), k, exclusions)

    def _chunks(self, queries: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        assert self.dataset is not None
        offset = 0
        for _, embeddings in _iterate_batches(self.dataset):
            if embeddings.shape[1] != self._dimension:
                raise ValueError("the dataset changed between index_from_dataset and this query (dimension)")
            require_finite(embeddings, "candidates from the dataset")
            yield offset, embeddings.detach().to(device=queries.device, dtype=queries.dtype)
            offset += int(embeddings.shape[0])
        if offset != self._num_candidates:
            raise ValueError(
                f"the dataset changed between index_from_dataset and this query: it yielded {offset} candidates, "
                f"{self._num_candidates} expected"
            )


def _save_index_file(path: Path, kind: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors and metadata as one safetensors file, atomically, with the SHA-256 of the tensors."""
    from safetensors.torch import save

    header = {"format": kind, "version": "1", **metadata, "sha256": _digest(tensors)}
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
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a valid twotower index file: {error}") from error
    if metadata.get("format") != kind:
        name = kind.split(".")[-1]
        raise ValueError(f"{path} is not a twotower {name} index (format {metadata.get('format')!r})")
    if _digest(tensors) != metadata.get("sha256"):
        raise ValueError(f"{path} is corrupt: its contents do not match the checksum written with it")
    return tensors, metadata


def _ids_to_tensors(table: IdTable) -> dict[str, torch.Tensor]:
    if not table.is_string:
        return {"ids": torch.as_tensor(table.values.astype(np.int64))}
    encoded = [value.encode("utf-8") for value in table.values.tolist()]
    lengths = np.array([len(value) for value in encoded], dtype=np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {"string_ids_utf8": torch.as_tensor(blob), "string_ids_lengths": torch.as_tensor(lengths)}


def _ids_from_tensors(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    if "ids" in tensors:
        return tensors["ids"].numpy()
    blob = tensors["string_ids_utf8"].numpy().tobytes()
    ends = np.cumsum(tensors["string_ids_lengths"].numpy())
    starts = ends - tensors["string_ids_lengths"].numpy()
    return np.array([blob[s:e].decode("utf-8") for s, e in zip(starts.tolist(), ends.tolist(), strict=True)])


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        hasher.update(name.encode())
        hasher.update(str(tensor.dtype).encode())
        hasher.update(str(tuple(tensor.shape)).encode())
        hasher.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return hasher.hexdigest()


def _read_metadata(data: bytes) -> dict[str, str]:
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError("metadata is not a mapping")
    return metadata


class Faiss(TopK):
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

    Exclusions are applied by retrieving ``k`` plus the number of excluded ids of each query and removing them,
    as TFRS does for approximate indexes: with an approximate index an excluded item cannot be skipped inside
    the search.
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
        self.factory, self.train_size, self.seed = factory, train_size, seed
        self.nprobe, self.ef_search = (
            _check_optional_positive(nprobe, "nprobe"),
            _check_optional_positive(ef_search, "ef_search"),
        )
        self.k_factor = _check_optional_positive(k_factor, "k_factor")
        self._index: Any = None
        self._count = 0
        self._dimension = 0
        # FAISS's own values of the search parameters, restored when neither the call nor the index sets one.
        self._faiss_defaults: dict[str, int] = {}
        self._call_parameters: tuple[int | None, int | None, int | None] | None = None
        # The values last set on the FAISS index (None: not known), so that a search sets only what changed.
        self._applied: tuple[int | None, int | None, int | None] | None = None

    def is_exact(self) -> bool:
        return False

    @property
    def num_candidates(self) -> int:
        return self._count

    @property
    def dimension(self) -> int:
        if self._index is None:
            raise RuntimeError("Faiss has not been built: call index(...) or index_from_dataset(...)")
        return self._dimension

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> Faiss:
        import faiss

        candidates, values = _check_corpus(candidates, identifiers)
        matrix = np.ascontiguousarray(candidates.detach().cpu().to(torch.float32).numpy())
        try:
            index = faiss.index_factory(matrix.shape[1], self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"FAISS cannot build {self.factory!r}: {error}") from error
        if not index.is_trained:
            rng = np.random.default_rng(self.seed)
            sample = matrix[rng.permutation(matrix.shape[0])[: self.train_size]]
            index.train(sample)
        index.add(matrix)
        self._index, self._count, self._dimension = index, int(matrix.shape[0]), int(matrix.shape[1])
        self._faiss_defaults = _faiss_search_defaults(index)
        self._applied = None
        self._ids = IdTable(values)
        return self

    def _set_parameters(self, nprobe: int | None, ef_search: int | None, k_factor: int | None) -> None:
        import faiss

        wanted = (
            nprobe if nprobe is not None else self._faiss_defaults.get("nprobe"),
            ef_search if ef_search is not None else self._faiss_defaults.get("efSearch"),
            k_factor if k_factor is not None else self._faiss_defaults.get("k_factor"),
        )
        if wanted == self._applied:
            return  # setting them costs about 8% of a one-query search
        self._applied = None  # unknown until every value below is set
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", wanted[0]), ("efSearch", wanted[1])):
            if value is not None:
                try:
                    space.set_index_parameter(self._index, name, value)
                except RuntimeError as error:
                    raise ValueError(f"{name} does not apply to a {self.factory!r} index: {error}") from error
        refined = faiss.downcast_index(self._index)
        if isinstance(refined, faiss.IndexRefine):
            refined.k_factor = float(wanted[2] if wanted[2] is not None else refined.k_factor)
        elif k_factor is not None:
            raise ValueError(
                f"k_factor applies to refined indexes (a factory ending in ',RFlat'), not to {self.factory!r}"
            )
        self._applied = wanted

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
        self._call_parameters = (
            _check_optional_positive(nprobe, "nprobe") or self.nprobe,
            _check_optional_positive(ef_search, "ef_search") or self.ef_search,
            _check_optional_positive(k_factor, "k_factor") or self.k_factor,
        )
        try:
            return self._query(queries, k, None)
        finally:
            self._call_parameters = None

    def _query(self, queries: Any, k: int | None, exclusions: Any) -> tuple[torch.Tensor, Ids]:
        # A server sends one query per call. Right after a FAISS search each torch operation costs tens of
        # microseconds (measured: a trivial one adds 30 us to a 330 us search), so the whole path, from the query's
        # conversion to the ids, stays in numpy.
        table = self.ids  # raises while the index is not built
        embeddings = self._query_embeddings(queries)
        matrix = np.ascontiguousarray(embeddings.to("cpu", torch.float32).numpy())
        if not np.isfinite(matrix).all():
            require_finite(embeddings, "queries")  # raises, with the count of bad values
        k = min(_check_k(self.k if k is None else k), self.num_candidates)
        positions = None
        if exclusions is not None:
            positions = self._exclusion_positions(exclusions, matrix.shape[0], table).numpy()
        scores, rows = self._search_numpy(matrix, k, positions)
        return _on_device(torch.from_numpy(scores), embeddings.device), table.take_numpy(rows, embeddings.device)

    def _search(
        self, queries: torch.Tensor, k: int, exclusions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        scores, rows = self._search_numpy(matrix, k, None if exclusions is None else exclusions.cpu().numpy())
        return _on_device(torch.from_numpy(scores), queries.device), _on_device(torch.from_numpy(rows), queries.device)

    def _search_numpy(self, matrix: np.ndarray, k: int, exclusions: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [nq, k] float32, rows [nq, k] int64)`` of float32 ``matrix`` ``[nq, d]``; ``exclusions`` holds
        rows to leave out per query, ``-1`` padded."""
        if self._index is None:
            raise RuntimeError("Faiss has not been built: call index(...) or index_from_dataset(...)")
        self._set_parameters(*(self._call_parameters or (self.nprobe, self.ef_search, self.k_factor)))
        extra = 0 if exclusions is None else int((exclusions >= 0).sum(axis=1).max())
        wanted = min(k + extra, self._count)
        scores, rows = self._index.search(matrix, wanted)
        # FAISS marks missing results with -1 (few cells probed): they rank last.
        empty = rows < 0
        if exclusions is not None:
            empty |= (rows[:, :, None] == exclusions[:, None, :]).any(axis=2)
        if empty.any():
            scores = np.where(empty, -np.inf, scores).astype(np.float32)
            rows = np.where(empty, -1, rows)
            if exclusions is not None:
                order = np.argsort(-scores, axis=1, kind="stable")
                scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        scores, rows = scores[:, :k], rows[:, :k]
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64)


def _faiss_save(index: Faiss, path: str | os.PathLike[str]) -> None:
    import faiss

    if index._index is None:
        raise RuntimeError("Faiss has not been built: nothing to save")
    tensors = {"faiss_index": torch.as_tensor(faiss.serialize_index(index._index).copy()), **_ids_to_tensors(index.ids)}
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
    index = Faiss(
        metadata["factory"],
        k=int(metadata["k"]),
        query_model=query_model,
        train_size=int(metadata["train_size"]),
        nprobe=int(metadata["nprobe"]) or None,
        ef_search=int(metadata["ef_search"]) or None,
        # Files written before k_factor existed have none.
        k_factor=int(metadata.get("k_factor", "0")) or None,
    )
    index._index = faiss.deserialize_index(tensors["faiss_index"].numpy())
    index._count, index._dimension = int(index._index.ntotal), int(index._index.d)
    index._faiss_defaults = _faiss_search_defaults(index._index)
    index._ids = IdTable(_ids_from_tensors(tensors))
    if len(index._ids) != index._count:
        raise ValueError(f"{path} is inconsistent: {len(index._ids)} ids for {index._count} vectors")
    return index


def _faiss_search_defaults(index: Any) -> dict[str, int]:
    """The ``nprobe`` / ``efSearch`` / ``k_factor`` values a freshly built or loaded FAISS index searches with."""
    import faiss

    defaults: dict[str, int] = {}
    with contextlib.suppress(RuntimeError):  # raised when the index is not an IVF index
        defaults["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        defaults["efSearch"] = int(hnsw.efSearch)
    refined = faiss.downcast_index(index)
    if isinstance(refined, faiss.IndexRefine):
        defaults["k_factor"] = int(refined.k_factor)
    return defaults


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
