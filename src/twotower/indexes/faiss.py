"""Approximate top-K with FAISS, behind the index protocol of :mod:`twotower.indexes.base`.

Settings reach FAISS as per-call ``SearchParameters`` (:class:`FaissSearchParameters` here), never by changing
the FAISS index, so concurrent searches with different settings do not interfere.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower._checks import optional_positive_int, require_number
from twotower.ids import IdTable
from twotower.indexes.base import (
    QueryModel,
    SearchParameters,
    SearchResult,
    SnapshotIndex,
    check_corpus,
    on_device,
)
from twotower.indexes.evaluation import checked_tuning_queries, require_tuning_dimension
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

#: Below this many candidates the default index is ``"Flat"``: an exact scan of a corpus this small costs about
#: what probing an IVF index does, and needs no training.
FLAT_BELOW = 20_000


def default_factory(num_candidates: int) -> tuple[str, int | None]:
    """The FAISS factory and ``nprobe`` chosen for a corpus of ``num_candidates`` when none is given.

    ``"Flat"`` below :data:`FLAT_BELOW` rows; above, ``IVF{c},Flat`` with ``c = round(4 sqrt(n))`` cells (FAISS's
    guideline of 4-16 sqrt(n)) and ``nprobe = ceil(c / 10)``, the fraction of cells TFRS's ``ScaNN()`` defaults
    search (10 leaves of 100).
    """
    if num_candidates < FLAT_BELOW:
        return "Flat", None
    cells = round(4 * math.sqrt(num_candidates))
    return f"IVF{cells},Flat", math.ceil(cells / 10)


@dataclass(frozen=True)
class FaissSearchParameters(SearchParameters):
    """Per-call settings of a :class:`Faiss` search; ``None`` keeps the index's own.

    Attributes:
        nprobe: IVF cells visited per query.
        ef_search: HNSW search breadth.
        k_factor: for a refined index (factory ending in ``",RFlat"``), how many times ``k`` candidates the base
            index proposes for exact reranking.
    """

    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: int | None = None

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search", "k_factor"):
            optional_positive_int(getattr(self, name), name)


_Settings = tuple[int | None, int | None, int | None]


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
    #: the factory string the index was built from (the chosen default when the constructor's was ``None``).
    factory: str
    #: ``nprobe`` chosen with a default factory or tuned for ``target_recall`` (``None`` otherwise).
    default_nprobe: int | None
    #: ``SearchParameters`` by ``(nprobe, ef_search, k_factor)``, each with the nested parameter objects that FAISS
    #: holds by raw pointer (kept alive here).
    parameters: dict[_Settings, tuple[Any, list[tuple[str, Any]]]]
    #: ``ef_search`` tuned for ``target_recall`` (``None`` otherwise).
    default_ef_search: int | None = None
    #: recall@k the tuning measured on its queries (``None`` without ``target_recall``).
    reached_recall: float | None = None


class Faiss(SnapshotIndex[_FaissCorpus]):
    """Approximate top-K with FAISS, by inner product, behind the same interface as the exact indexes.

    Args:
        factory: a FAISS index factory string, e.g. ``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF1024,PQ16"``
            (see FAISS's ``index_factory``); the metric is always the inner product. ``None`` (default) picks one
            from the corpus size when it is indexed (:func:`default_factory`), as TFRS's ``ScaNN()`` defaults work
            on any corpus.
        k: default number of results.
        query_model: optional module applied to raw query features.
        train_size: how many candidates (a seeded random sample) train the index, for index types that train.
        nprobe: IVF cells visited per query.
        ef_search: HNSW search breadth.
        k_factor: for a refined index (factory ending in ``",RFlat"``, e.g. ``"IVF1024,PQ32x4fs,RFlat"``): the
            base index proposes ``k_factor * k`` candidates by its approximate scores, and they are reranked by
            their exact inner products.
        seed: seed of the training sample.
        target_recall: tune the index's search breadth (``nprobe`` of an IVF index, refined or not;
            ``ef_search`` of HNSW) when it is built: the smallest setting whose recall@k (``k`` the index's) on
            the tuning queries against exact search reaches it. :attr:`reached_recall` reports what was measured;
            a target no setting reaches takes the widest setting, with a warning. A flat index is exact (1.0).
        tuning_queries: ``[q, d]`` queries the tuning measures recall on; by default 500 corpus rows drawn with
            ``seed``. Queries from the query tower measure what serving will see: pass a held-out sample of them.

    ``nprobe`` / ``ef_search`` / ``k_factor`` are the index's own settings; one search can use others by passing
    :class:`FaissSearchParameters` to :meth:`search`. Exclusions are applied by retrieving ``k`` plus the number
    of excluded rows of each query and removing them, as TFRS does for approximate indexes: with an approximate
    index an excluded item cannot be skipped inside the search. The removal costs ``O(k + E)`` per query.
    """

    def __init__(
        self,
        factory: str | None = None,
        k: int = 10,
        query_model: QueryModel | None = None,
        train_size: int = 100_000,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
        seed: int = 0,
        target_recall: float | None = None,
        tuning_queries: torch.Tensor | None = None,
    ) -> None:
        super().__init__(k, query_model)
        if factory is not None and (not isinstance(factory, str) or not factory):
            raise ValueError(f"factory must be a FAISS index factory string or None, got {factory!r}")
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise ValueError(f"train_size must be a positive int, got {train_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.factory, self.train_size, self.seed = factory, train_size, seed
        self.nprobe = optional_positive_int(nprobe, "nprobe")
        self.ef_search = optional_positive_int(ef_search, "ef_search")
        self.k_factor = optional_positive_int(k_factor, "k_factor")
        self.target_recall = None
        if target_recall is not None:
            self.target_recall = require_number(target_recall, "target_recall", 0.0, 1.0, low_open=True)
            if nprobe is not None or ef_search is not None:
                raise ValueError("target_recall tunes nprobe / ef_search: give either those or target_recall")
        self.tuning_queries = checked_tuning_queries(tuning_queries, self.target_recall)

    def is_exact(self) -> bool:
        return False

    @property
    def dimension(self) -> int:
        return self.snapshot().dimension

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (read it; changing it while queries run is not safe)."""
        return self.snapshot().index

    @property
    def reached_recall(self) -> float | None:
        """recall@k measured when the index was tuned for ``target_recall`` (``None`` without it)."""
        return self.snapshot().reached_recall

    @property
    def built_factory(self) -> str:
        """The factory string the index was built from (the default chosen for the corpus if none was given)."""
        return self.snapshot().factory

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> Faiss:
        import faiss

        candidates, values = check_corpus(candidates, identifiers)
        matrix = np.ascontiguousarray(candidates.detach().cpu().to(torch.float32).numpy())
        if not np.isfinite(matrix).all():
            raise ValueError("candidates overflow float32, the precision FAISS indexes in")
        factory, default_nprobe = (self.factory, None) if self.factory else default_factory(matrix.shape[0])
        try:
            index = faiss.index_factory(matrix.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(f"FAISS cannot build {factory!r}: {_faiss_message(error)}") from error
        cells = _ivf_cells(index)
        if cells is not None and self.nprobe is not None and self.nprobe > cells:
            raise ValueError(f"nprobe {self.nprobe} exceeds the {cells} IVF cells of {factory!r}")
        if not index.is_trained:
            rng = np.random.default_rng(self.seed)
            sample = matrix[rng.permutation(matrix.shape[0])[: self.train_size]]
            if cells is not None and sample.shape[0] < cells:
                raise ValueError(
                    f"factory {factory!r} has {cells} IVF cells but only {sample.shape[0]} candidates train it "
                    f"(corpus of {matrix.shape[0]}, train_size {self.train_size}): use at most {sample.shape[0]} "
                    "cells, a flat index for a corpus this small, or factory=None to choose from the corpus size"
                )
            try:
                index.train(sample)
            except RuntimeError as error:
                raise ValueError(
                    f"FAISS cannot train {factory!r} on {sample.shape[0]} candidates: {_faiss_message(error)}"
                ) from error
        index.add(matrix)
        corpus = _FaissCorpus(IdTable(values), index, int(index.ntotal), int(index.d), factory, default_nprobe, {})
        self._settings(corpus, None)  # refuse settings that do not apply to this index now, not at the first query
        if self.target_recall is not None:
            corpus = self._tuned(corpus, matrix, self.target_recall)
        # One assignment: a query running meanwhile keeps the snapshot it took.
        self._corpus = corpus
        return self

    def _tuned(self, corpus: _FaissCorpus, matrix: np.ndarray, target: float) -> _FaissCorpus:
        """``corpus`` with the narrowest search breadth whose recall@k reaches ``target`` on the tuning queries."""
        from twotower.indexes.evaluation import recall_at_k
        from twotower.indexes.exact import BruteForce

        # Which breadth the index takes, found as the search settings find it (refined and pre-transformed
        # indexes unwrapped), before any exact search is paid for.
        keep: list[tuple[str, Any]] = []
        _search_parameters(corpus.index, None, None, None, keep)
        kinds = {kind for kind, _ in keep}
        if "ivf" not in kinds and "hnsw" not in kinds:
            if corpus.factory != "Flat":
                raise ValueError(f"target_recall tunes IVF and HNSW indexes, not {corpus.factory!r}")
            return replace(corpus, reached_recall=1.0)
        if self.tuning_queries is not None:
            queries = require_tuning_dimension(self.tuning_queries, corpus.dimension)
        else:
            rng = np.random.default_rng(self.seed)
            queries = matrix[np.sort(rng.permutation(matrix.shape[0])[:_TUNING_QUERIES])]
        k = min(self.k, corpus.count)
        exact = BruteForce(k=k).index(torch.from_numpy(matrix)).search(torch.from_numpy(queries), k=k)
        truth = exact.rows.numpy()
        cells = _ivf_cells(corpus.index)
        name, widest = ("nprobe", cells) if cells is not None else ("ef_search", max(_WIDEST_EF_SEARCH, k))
        assert widest is not None

        def recall(breadth: int) -> float:
            params = FaissSearchParameters(**{name: breadth})
            return recall_at_k(self._search_numpy(corpus, queries, k, None, params)[1], truth)

        # Doubling to the first breadth that reaches the target, then bisection below it.
        low, high = 0, 1
        measured: dict[int, float] = {}
        while True:
            high = min(high, widest)
            measured[high] = recall(high)
            if measured[high] >= target or high == widest:
                break
            low, high = high, 2 * high
        if measured[high] < target:
            warnings.warn(
                f"target_recall {target} is out of reach of {corpus.factory!r}: its widest search ({name} "
                f"{widest}) reaches {measured[high]:.4f}",
                stacklevel=3,
            )
        while high - low > 1:
            middle = (low + high) // 2
            measured[middle] = recall(middle)
            low, high = (low, middle) if measured[middle] >= target else (middle, high)
        if name == "nprobe":
            return replace(corpus, default_nprobe=high, reached_recall=measured[high], parameters={})
        return replace(corpus, default_ef_search=high, reached_recall=measured[high], parameters={})

    def check_params(self, params: SearchParameters | None) -> SearchParameters | None:
        if params is not None and not isinstance(params, FaissSearchParameters):
            raise TypeError(f"params must be FaissSearchParameters for a Faiss index, got {type(params).__name__}")
        return params

    def save(self, path: str | os.PathLike[str], include_query_model: bool | None = None) -> None:
        """Write the FAISS index, ids and settings to ``path`` (safetensors) atomically, with a checksum.

        ``include_query_model`` as for :meth:`twotower.indexes.BruteForce.save`.
        """
        import faiss

        corpus = self.snapshot()
        model_tensors, model_metadata = query_model_entries(self.query_model, include_query_model)
        tensors = {
            "faiss_index": torch.as_tensor(faiss.serialize_index(corpus.index).copy()),
            **ids_to_tensors(corpus.ids),
            **model_tensors,
        }
        metadata = {
            "factory": corpus.factory,
            "k": str(self.k),
            "nprobe": str(self.nprobe or corpus.default_nprobe or 0),
            "ef_search": str(self.ef_search or corpus.default_ef_search or 0),
            "k_factor": str(self.k_factor or 0),
            "train_size": str(self.train_size),
            **model_metadata,
        }
        save_index_file(Path(path), "twotower.Faiss", tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], query_model: QueryModel | None = None) -> Faiss:
        """Read an index written by :meth:`save`, verifying its format and checksum.

        ``query_model`` replaces the saved query model, if any; without it the saved one is rebuilt.
        """
        import faiss

        tensors, metadata = load_index_file(Path(path), "twotower.Faiss")
        settings = metadata_ints(path, metadata, ("k", "nprobe", "ef_search", "k_factor", "train_size"))
        saved_model = query_model_from(path, tensors, metadata)
        tensors = index_tensors(tensors)
        if "faiss_index" not in tensors or tensors["faiss_index"].dtype != torch.uint8:
            raise ValueError(f"{path} is not a valid twotower index file: it has no uint8 faiss_index tensor")
        try:
            index = cls(
                metadata.get("factory", ""),
                k=settings["k"],
                query_model=query_model if query_model is not None else saved_model,
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
        ids = IdTable(ids_from_tensors(tensors, path))
        if len(ids) != int(faiss_index.ntotal):
            raise ValueError(f"{path} is inconsistent: {len(ids)} ids for {int(faiss_index.ntotal)} vectors")
        assert index.factory is not None
        corpus = _FaissCorpus(ids, faiss_index, int(faiss_index.ntotal), int(faiss_index.d), index.factory, None, {})
        try:
            index._settings(corpus, None)
        except ValueError as error:
            raise ValueError(f"{path} is not a valid twotower index file: {error}") from error
        index._corpus = corpus
        return index

    def search(
        self,
        queries: Any,
        k: int | None = None,
        exclusions: Any = None,
        params: SearchParameters | None = None,
    ) -> SearchResult:
        # Right after a FAISS search each torch operation costs tens of microseconds (a trivial one adds about a
        # tenth to a single-query search): the path stays in numpy.
        def run(
            corpus: _FaissCorpus, matrix: np.ndarray, k: int, excluded: np.ndarray | None
        ) -> tuple[np.ndarray, np.ndarray]:
            return self._search_numpy(corpus, matrix, k, excluded, self.check_params(params))

        return self._search_in_numpy(queries, k, exclusions, run, "FAISS")

    def search_snapshot(
        self,
        snapshot: Any,
        embeddings: torch.Tensor,
        k: int,
        excluded_rows: torch.Tensor | None,
        params: SearchParameters | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = np.ascontiguousarray(embeddings.detach().to("cpu", torch.float32).numpy())
        excluded = None if excluded_rows is None else excluded_rows.cpu().numpy()
        scores, rows = self._search_numpy(snapshot, matrix, k, excluded, params)
        device = embeddings.device
        return on_device(torch.from_numpy(scores), device), on_device(torch.from_numpy(rows), device)

    def _settings(self, corpus: _FaissCorpus, params: SearchParameters | None) -> tuple[Any, _Settings]:
        """The FAISS ``SearchParameters`` for ``params`` over the index's own settings (made once per distinct
        settings), refusing a setting that does not apply to the index."""
        given = params if isinstance(params, FaissSearchParameters) else FaissSearchParameters()
        settings: _Settings = (
            given.nprobe or self.nprobe or corpus.default_nprobe,
            given.ef_search or self.ef_search or corpus.default_ef_search,
            given.k_factor or self.k_factor,
        )
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
                        raise ValueError(f"k_factor applies to {refined}, not to {corpus.factory!r}")
                    raise ValueError(f"{name} does not apply to a {corpus.factory!r} index")
            cached = (parameters, keep)
            corpus.parameters[settings] = cached
        return cached[0], settings

    def _search_numpy(
        self,
        corpus: _FaissCorpus,
        matrix: np.ndarray,
        k: int,
        exclusions: np.ndarray | None,
        params: SearchParameters | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [nq, k] float32, rows [nq, k] int64)`` of float32 ``matrix`` ``[nq, d]``; ``exclusions`` holds
        rows to leave out per query, ``-1`` padded. Empty slots have row ``-1`` and score ``-inf``."""
        parameters, _ = self._settings(corpus, params)
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


def _faiss_message(error: Exception) -> str:
    """FAISS's error without its C++ source location ("Error in ... at faiss/x.cpp:66: Error: 'cond'")."""
    return str(error).split("Error: ", 1)[-1].strip()[:300]


#: Corpus rows that measure recall for ``target_recall`` when no tuning queries are given.
_TUNING_QUERIES = 500
#: The widest ``ef_search`` the tuning tries for an HNSW index.
_WIDEST_EF_SEARCH = 4096


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
