"""Exact indexes: :class:`BruteForce` (the corpus in memory) and :class:`Streaming` (read batch by batch).

Both scan the corpus with the chunked top-K kernel of :mod:`twotower._topk` (a bfloat16 screen on the CPU's
matrix units, then an exact float32 rescoring of the survivors), so their answers are exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower import _topk
from twotower._checks import require_finite
from twotower.ids import IdTable
from twotower.indexes.base import (
    ExactSnapshotIndex,
    QueryModel,
    SearchParameters,
    check_corpus,
    compute_dtype,
    iterate_batches,
)
from twotower.indexes.files import (
    ids_from_tensors,
    ids_to_tensors,
    index_tensors,
    load_index_file,
    metadata_ints,
    query_model_entries,
    query_model_from,
    save_index_file,
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


class BruteForce(ExactSnapshotIndex[_ExactCorpus]):
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
        return int(self.snapshot().candidates.shape[1])

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> BruteForce:
        candidates, values = check_corpus(candidates, identifiers)
        candidates = candidates.detach().to(compute_dtype(candidates.dtype)).contiguous()
        shift = _topk.corpus_shift(candidates)
        scan = _topk.shift_rows(candidates, shift).contiguous()
        # One assignment: a query running meanwhile keeps the snapshot it took.
        self._corpus = _ExactCorpus(IdTable(values), candidates, shift, scan, {})
        return self

    def search_snapshot(
        self,
        snapshot: Any,
        embeddings: torch.Tensor,
        k: int,
        excluded_rows: torch.Tensor | None,
        params: SearchParameters | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        corpus: _ExactCorpus = snapshot
        queries = embeddings.to(device=corpus.scan.device, dtype=corpus.scan.dtype)
        if excluded_rows is not None:
            excluded_rows = excluded_rows.to(corpus.scan.device)
        scan = corpus.scan
        return _topk.search_chunks(
            queries, lambda: [(0, scan)], k, excluded_rows, corpus.piece_cache, candidate_shift=corpus.shift
        )

    def save(self, path: str | os.PathLike[str], include_query_model: bool | None = None) -> None:
        """Write the index to ``path`` (safetensors) atomically, with a checksum of its contents.

        Args:
            path: the file to write.
            include_query_model: save the query model with the index (it must be a chain of ``nn.Embedding``,
                ``nn.Linear`` and ``nn.ReLU``: a saved file holds no code). ``None`` saves it when it can and warns
                otherwise; ``True`` raises when it cannot; ``False`` never saves it.
        """
        corpus = self._corpus
        if corpus is None:
            raise RuntimeError("BruteForce has not been built: nothing to save")
        model_tensors, model_metadata = query_model_entries(self.query_model, include_query_model)
        tensors = {
            "candidates": corpus.candidates.detach().cpu().contiguous(),
            **ids_to_tensors(corpus.ids),
            **model_tensors,
        }
        save_index_file(Path(path), "twotower.BruteForce", tensors, {"k": str(self.k), **model_metadata})

    @classmethod
    def load(cls, path: str | os.PathLike[str], query_model: QueryModel | None = None) -> BruteForce:
        """Read an index written by :meth:`save`, verifying its format and checksum.

        ``query_model`` replaces the saved query model, if any; without it the saved one is rebuilt.
        """
        tensors, metadata = load_index_file(Path(path), "twotower.BruteForce")
        settings = metadata_ints(path, metadata, ("k",))
        saved_model = query_model_from(path, tensors, metadata)
        tensors = index_tensors(tensors)
        candidates = tensors.get("candidates")
        if candidates is None or candidates.dtype not in (torch.float32, torch.float64) or candidates.ndim != 2:
            raise ValueError(f"{path} is not a valid twotower index file: no float32/float64 [n, d] candidates")
        try:
            index = cls(k=settings["k"], query_model=query_model if query_model is not None else saved_model)
            return index.index(candidates, ids_from_tensors(tensors, path))
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


class Streaming(ExactSnapshotIndex[_StreamingCorpus]):
    """Exact search over candidates read batch by batch from an iterable on every query.

    Only a running top-k per query is kept, so the corpus can be larger than memory: pass an iterable that can be
    iterated several times (a list, a ``DataLoader``, a generator factory wrapped in a class with ``__iter__``).

    Args:
        k: default number of results.
        query_model: optional module applied to raw query features.
        handle_incomplete_batches: TFRS's flag (there, ``False`` fails on a candidate batch smaller than ``k``,
            in exchange for speed). Here batches of any size, smaller than ``k`` included, are handled exactly at
            no extra cost, so both values give the same results; it is accepted so that TFRS code runs as is.
        sorted_order: TFRS's flag (there, ``False`` may return each query's top ``k`` unsorted, faster). The
            kernel keeps its running top ``k`` sorted anyway, so results are always sorted by descending score,
            which is one of the orders ``False`` allows.
    """

    def __init__(
        self,
        k: int = 10,
        query_model: QueryModel | None = None,
        handle_incomplete_batches: bool = True,
        sorted_order: bool = True,
    ) -> None:
        super().__init__(k, query_model)
        for name, value in (("handle_incomplete_batches", handle_incomplete_batches), ("sorted_order", sorted_order)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.handle_incomplete_batches, self.sorted_order = handle_incomplete_batches, sorted_order

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
        candidates, values = check_corpus(candidates, identifiers)
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
        for ids, embeddings in iterate_batches(dataset):
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

    def search_snapshot(
        self,
        snapshot: Any,
        embeddings: torch.Tensor,
        k: int,
        excluded_rows: torch.Tensor | None,
        params: SearchParameters | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        corpus: _StreamingCorpus = snapshot
        queries = embeddings.to(compute_dtype(embeddings.dtype))
        return _topk.search_chunks(
            queries, lambda: self._chunks(corpus, queries), k, excluded_rows, candidate_shift=corpus.shift
        )

    @staticmethod
    def _chunks(corpus: _StreamingCorpus, queries: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        offset = 0
        for _, embeddings in iterate_batches(corpus.dataset):
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
