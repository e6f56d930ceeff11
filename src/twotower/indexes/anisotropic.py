"""Approximate top-K as ScaNN does it: partitions, score-aware 4-bit codes, an exact reorder; a native scan.

:class:`AnisotropicIVF` partitions the corpus by k-means, quantizes each candidate's residual from its centroid
with 4-bit product codes trained on the anisotropic loss of Guo et al. (2020) (:mod:`twotower.indexes.quantization`),
and searches by (1) scoring the centroids, (2) scanning the codes of the best ``leaves_to_search`` partitions with
uint8 lookup tables, 32 candidates per instruction sequence, (3) rescoring the best ``reorder`` of them exactly
(float32, on the original vectors) and returning the top ``k`` (``native/ivf.c``). Settings come per call as
:class:`AnisotropicSearchParameters`; ``target_recall`` chooses them at build time from held-out queries.

Returned scores are exact dot products; only which candidates are found is approximate.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower import _native
from twotower._checks import optional_positive_int, require_number, require_positive_int
from twotower.ids import IdTable
from twotower.indexes import quantization
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

#: The most subspaces one code can have: the scan sums one uint8 table entry per subspace into uint16 totals.
MAX_SUBSPACES = 256
#: The most rows that train the codebooks (of the ``train_size`` sample).
CODEBOOK_SAMPLE = 100_000
#: Corpus rows that measure recall for ``target_recall`` when no tuning queries are given.
TUNING_QUERIES = 500
#: Partitions per group of the native scan's centroid table (``LEAF_GROUP`` of ``native/ivf.c``).
LEAF_GROUP = 32
#: The fewest candidates per partition :func:`default_leaves` plans for (two blocks of the scan).
MIN_PARTITION = 64
#: Reorder depths the tuning tries, as multiples of ``k``.
REORDER_FACTORS = (1, 2, 4, 8, 16, 32)
#: The tuning's cost of rescoring one candidate exactly, in units of scanning one candidate's codes: a rescore
#: reads a float32 row at a random place in memory (about 80 ns on the 2-core machine of ``benchmarks/ann.py``,
#: 1M x 32), a scan half a byte per subspace in order (about 0.65 ns there).
REORDER_COST = 120.0


def default_leaves(num_candidates: int) -> int:
    """Partitions for a corpus of ``num_candidates``: ``round(2 * sqrt(n))`` (2,000 for a million), at most one
    per ``MIN_PARTITION`` candidates, at least 1.

    ScaNN (and TFRS's efficient-serving tutorial) takes ``sqrt(n)``. Twice as many partitions score twice the
    centroids per query, but their residuals are smaller, so the same 4-bit codes rank candidates better: on
    ``benchmarks/ann.py``'s corpora (1M x 32) the same recall@100 comes with fewer candidates scanned and fewer
    reordered (the tutorial corpus: 0.951 scanning about 63,000 and reordering 400 with 2,000 partitions, against
    66,000 and 600 with 1,000); in one sweep there, the best one-query rate at recall@100 >= 0.95 was 9,691
    queries/s against 8,656.
    """
    return max(1, min(round(2 * math.sqrt(num_candidates)), num_candidates // MIN_PARTITION))


@dataclass(frozen=True)
class AnisotropicSearchParameters(SearchParameters):
    """Per-call settings of an :class:`AnisotropicIVF` search; ``None`` keeps the index's own.

    Attributes:
        leaves_to_search: partitions scanned per query (at most the index's partition count).
        reorder: candidates rescored exactly per query (raised to ``k`` when smaller; excluded rows are added
            to it).
    """

    leaves_to_search: int | None = None
    reorder: int | None = None

    def __post_init__(self) -> None:
        for name in ("leaves_to_search", "reorder"):
            optional_positive_int(getattr(self, name), name)


@dataclass(frozen=True)
class _AnisotropicCorpus:
    """The built state of an :class:`AnisotropicIVF` index, replaced whole by ``index()``; numpy arrays that
    the native scan reads and never writes."""

    ids: IdTable
    count: int
    dimension: int
    #: ``[leaves, D]`` float32 centroids, ``D`` the dimension padded with zeros to a multiple of ``4 * sub_dim``.
    centroids: np.ndarray
    #: ``[leaves + 1]`` int64: partition ``l`` holds positions ``leaf_offsets[l] : leaf_offsets[l + 1]``.
    leaf_offsets: np.ndarray
    #: ``[leaves]`` int64: the first block of each partition's codes.
    leaf_blocks: np.ndarray
    #: ``[blocks, M / 2, 32]`` uint8 packed 4-bit codes (:func:`twotower.indexes.quantization.pack_codes`).
    codes: np.ndarray
    #: ``[M, 16, sub_dim]`` float32 codebooks of the residuals.
    codebooks: np.ndarray
    #: ``[n, D]`` float32: the candidates in partition order, for the exact reorder.
    vectors: np.ndarray
    #: ``[n]`` int64: the corpus row of each position.
    rows: np.ndarray
    leaves_to_search: int
    reorder: int
    #: recall@k measured by the ``target_recall`` tuning (``None`` without it).
    reached_recall: float | None = None

    @property
    def leaves(self) -> int:
        return int(self.centroids.shape[0])

    @functools.cached_property
    def centroid_blocks(self) -> np.ndarray:
        """``[ceil(leaves / 32), D, 32]``: the centroids by groups of 32 partitions, each group by dimension (zeros
        past the last partition), as the native scan scores them: 8 or 16 partitions per instruction, the table
        read in order."""
        groups = -(-self.leaves // LEAF_GROUP)
        padded = np.zeros((groups * LEAF_GROUP, self.padded_dimension), dtype=np.float32)
        padded[: self.leaves] = self.centroids
        return np.ascontiguousarray(padded.reshape(groups, LEAF_GROUP, -1).transpose(0, 2, 1))

    @functools.cached_property
    def native(self) -> tuple[_native.IvfIndex, int]:
        """The arrays as the native search takes them, and that structure's address (made once: numpy's
        ``.ctypes`` and ctypes' argument conversion cost microseconds, a one-query search tens of them)."""
        ids = self.ids.integer_ids
        layout = _native.IvfIndex(
            *(getattr(self, name).ctypes.data for name in ("centroid_blocks", "leaf_offsets", "leaf_blocks",
                                                           "codes", "codebooks", "vectors", "rows")),
            None if ids is None else ids.ctypes.data,
            self.leaves, self.codebooks.shape[0], self.codebooks.shape[2], self.padded_dimension, self.dimension,
        )  # fmt: skip
        return layout, ctypes.addressof(layout)

    @functools.cached_property
    def unpacked_codes(self) -> np.ndarray:
        """``[n, M]`` codes in partition order, from the packed blocks (the torch path's view of them, made
        once per built state)."""
        blocks, pairs, width = self.codes.shape
        low = self.codes & 0x0F
        high = self.codes >> 4
        padded = np.stack([low, high], axis=2).reshape(blocks, pairs * 2, width).transpose(0, 2, 1)
        sizes = np.diff(self.leaf_offsets)
        slots = np.concatenate(
            [self.leaf_blocks[l] * quantization.BLOCK + np.arange(sizes[l]) for l in range(sizes.shape[0])]
        )
        codes: np.ndarray = padded.reshape(-1, pairs * 2)[slots]
        return codes

    @property
    def padded_dimension(self) -> int:
        return int(self.centroids.shape[1])


class AnisotropicIVF(SnapshotIndex[_AnisotropicCorpus]):
    """Approximate top-K by inner product: k-means partitions, anisotropic 4-bit codes, exact reorder.

    Args:
        k: default number of results.
        query_model: optional module applied to raw query features.
        leaves: partitions; ``None`` chooses :func:`default_leaves` from the corpus size.
        leaves_to_search: partitions scanned per query; ``None`` with ``target_recall`` tunes it, without it
            takes a tenth of the partitions (TFRS's ``ScaNN()`` searches 10 leaves of 100).
        reorder: candidates rescored exactly per query; ``None`` with ``target_recall`` tunes it, without it
            takes ``10 * k``.
        target_recall: choose ``leaves_to_search`` and ``reorder`` when the index is built: of the settings
            whose recall@k (``k`` the index's) against exact search on the tuning queries reaches the target,
            the one that scans and rescores least (``REORDER_COST``). :attr:`reached_recall` reports the recall
            measured; a target nothing reaches takes the widest setting, with a warning.
        tuning_queries: ``[q, d]`` queries the tuning measures recall on; by default 500 corpus rows drawn with
            ``seed``. A held-out sample of the query tower's output measures what serving will see.
        parallel_weight: ``eta``, the anisotropic loss's weight of the quantization error parallel to each
            candidate over the orthogonal error; 1 is ordinary product quantization.
        sub_dim: dimensions per 4-bit code (ScaNN's ``dimensions_per_block``); ``None``: 2, or more when the
            dimension needs more than 256 subspaces.
        train_size: candidates (a seeded random sample) that train the partitions; the codebooks train on at
            most ``CODEBOOK_SAMPLE`` of them.
        kmeans_iterations: Lloyd iterations of the partitioning.
        codebook_iterations: encode/update alternations of the codebook training.
        seed: seed of the samples and the k-means starts.

    Exclusions are applied inside the reorder (excluded rows are skipped; the reorder depth grows by the
    number excluded), so ``k`` results come back whenever enough candidates remain. Every returned score is
    the exact float32 dot product of the query and the candidate.
    """

    def __init__(
        self,
        k: int = 10,
        query_model: QueryModel | None = None,
        leaves: int | None = None,
        leaves_to_search: int | None = None,
        reorder: int | None = None,
        target_recall: float | None = None,
        tuning_queries: torch.Tensor | None = None,
        parallel_weight: float = 4.0,
        sub_dim: int | None = None,
        train_size: int = 250_000,
        kmeans_iterations: int = 10,
        codebook_iterations: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(k, query_model)
        self.leaves = optional_positive_int(leaves, "leaves")
        self.leaves_to_search = optional_positive_int(leaves_to_search, "leaves_to_search")
        self.reorder = optional_positive_int(reorder, "reorder")
        self.sub_dim = optional_positive_int(sub_dim, "sub_dim")
        self.train_size = require_positive_int(train_size, "train_size")
        self.kmeans_iterations = _non_negative_int(kmeans_iterations, "kmeans_iterations")
        self.codebook_iterations = _non_negative_int(codebook_iterations, "codebook_iterations")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.parallel_weight = require_number(parallel_weight, "parallel_weight", 0.0, 1e6, low_open=True)
        self.target_recall = None
        if target_recall is not None:
            self.target_recall = require_number(target_recall, "target_recall", 0.0, 1.0, low_open=True)
        self.tuning_queries = checked_tuning_queries(tuning_queries, self.target_recall)

    # -- the protocol ---------------------------------------------------------------------------------------------

    def is_exact(self) -> bool:
        return False

    @property
    def dimension(self) -> int:
        return self.snapshot().dimension

    @property
    def reached_recall(self) -> float | None:
        """recall@k measured when the index was tuned for ``target_recall`` (``None`` without it)."""
        return self.snapshot().reached_recall

    @property
    def search_settings(self) -> AnisotropicSearchParameters:
        """The settings a search without ``params`` uses (given, tuned or defaulted)."""
        corpus = self.snapshot()
        return AnisotropicSearchParameters(corpus.leaves_to_search, corpus.reorder)

    def check_params(self, params: SearchParameters | None) -> SearchParameters | None:
        if params is not None and not isinstance(params, AnisotropicSearchParameters):
            raise TypeError(
                f"params must be AnisotropicSearchParameters for an AnisotropicIVF index, got {type(params).__name__}"
            )
        return params

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> AnisotropicIVF:
        """Train partitions and codebooks on a sample of ``candidates`` ``[n, d]``, encode every row, and (with
        ``target_recall``) tune the search settings. Returns self."""
        candidates, values = check_corpus(candidates, identifiers)
        matrix = candidates.detach().cpu().to(torch.float32).contiguous()
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("candidates overflow float32, the precision AnisotropicIVF indexes in")
        n, d = matrix.shape
        if n >= 2**32:
            raise ValueError(f"AnisotropicIVF indexes fewer than 2**32 candidates, got {n}")
        leaves = self.leaves if self.leaves is not None else default_leaves(n)
        sample_size = min(n, self.train_size)
        if leaves > sample_size:
            raise ValueError(
                f"leaves {leaves} exceeds the {sample_size} candidates that train the partitions (corpus of {n}, "
                f"train_size {self.train_size}): use fewer leaves, or leaves=None to choose from the corpus size"
            )
        if self.leaves_to_search is not None and self.leaves_to_search > leaves:
            raise ValueError(f"leaves_to_search {self.leaves_to_search} exceeds the {leaves} partitions")
        sub_dim = self.sub_dim if self.sub_dim is not None else max(2, math.ceil(d / (2 * MAX_SUBSPACES)) * 2)
        padded_dimension = math.ceil(d / (4 * sub_dim)) * 4 * sub_dim
        if padded_dimension // sub_dim > MAX_SUBSPACES:
            raise ValueError(
                f"sub_dim {sub_dim} splits {d} dimensions into more than {MAX_SUBSPACES} subspaces: use at least "
                f"{math.ceil(d / MAX_SUBSPACES)}"
            )
        padded = torch.nn.functional.pad(matrix, (0, padded_dimension - d)) if padded_dimension != d else matrix
        generator = torch.Generator().manual_seed(self.seed)
        sample = padded[torch.randperm(n, generator=generator)[:sample_size]]
        # Both seedings, keeping the more even partitions (quantization.kmeans_plus_plus says why either can
        # lose): a clustered corpus (benchmarks/ann.py's gaussian one) gets k-means++, one with a dense core
        # (the tutorial one) random starts.
        centroids = min(
            (quantization.kmeans(sample, leaves, self.kmeans_iterations, generator, seeding)
             for seeding in ("random", "plus_plus")),
            key=lambda trained: quantization.partition_imbalance(sample, trained),
        )  # fmt: skip
        assignment = quantization.nearest_centroids(padded, centroids)
        order = torch.argsort(assignment, stable=True)
        counts = torch.bincount(assignment, minlength=leaves)
        leaf_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
        vectors = padded[order].contiguous()
        residuals = vectors - centroids[assignment[order]]
        directions = quantization.unit_directions(vectors)
        # The codebooks have 16 codewords per subspace: 100,000 rows train them as well as more would.
        trained = torch.randperm(n, generator=generator)[: min(sample_size, CODEBOOK_SAMPLE)]
        codebooks = quantization.train_codebooks(
            residuals[trained], directions[trained], self.parallel_weight, padded_dimension // sub_dim,
            self.codebook_iterations, generator,
        )  # fmt: skip
        codes = quantization.encode(residuals, directions, self.parallel_weight, codebooks)
        packed, leaf_blocks = quantization.pack_codes(codes, leaf_offsets)
        corpus = _AnisotropicCorpus(
            ids=IdTable(values),
            count=n,
            dimension=d,
            centroids=_owned(centroids),
            leaf_offsets=_owned(leaf_offsets),
            leaf_blocks=_owned(leaf_blocks),
            codes=_owned(packed),
            codebooks=_owned(codebooks),
            vectors=_owned(vectors),
            rows=_owned(order),
            leaves_to_search=self.leaves_to_search or max(1, math.ceil(leaves / 10)),
            reorder=self.reorder or 10 * self.k,
        )
        if self.target_recall is not None:
            corpus = self._tuned(corpus, matrix, self.target_recall)
        self._corpus = corpus  # one assignment: a query running meanwhile keeps the snapshot it took
        return self

    # -- tuning ---------------------------------------------------------------------------------------------------

    def _tuned(self, corpus: _AnisotropicCorpus, matrix: torch.Tensor, target: float) -> _AnisotropicCorpus:
        """``corpus`` with the cheapest ``(leaves_to_search, reorder)`` whose recall@k reaches ``target``."""
        from twotower.indexes.evaluation import recall_at_k
        from twotower.indexes.exact import BruteForce

        if self.tuning_queries is not None:
            queries = require_tuning_dimension(self.tuning_queries, corpus.dimension)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.sort(torch.randperm(corpus.count, generator=generator)[:TUNING_QUERIES]).values
            queries = matrix[chosen].numpy()
        k = min(self.k, corpus.count)
        truth = BruteForce(k=k).index(matrix).search(torch.from_numpy(queries), k=k).rows.numpy()
        scanned = _scanned_per_breadth(corpus, queries)
        fixed_leaves, fixed_reorder = self.leaves_to_search, self.reorder
        depths = [fixed_reorder] if fixed_reorder else sorted({min(corpus.count, f * k) for f in REORDER_FACTORS})
        measured: dict[tuple[int, int], float] = {}

        def recall(leaves: int, depth: int) -> float:
            if (leaves, depth) not in measured:
                rows = _search_arrays(corpus, queries, k, None, leaves, depth)[1]
                measured[leaves, depth] = recall_at_k(rows, truth)
            return measured[leaves, depth]

        best: tuple[float, int, int] | None = None
        for depth in depths:
            if fixed_leaves is not None:
                if recall(fixed_leaves, depth) >= target:
                    best = min(
                        best or (math.inf, 0, 0),
                        (scanned[fixed_leaves - 1] + REORDER_COST * depth, fixed_leaves, depth),
                    )
                continue
            if recall(corpus.leaves, depth) < target:
                continue  # this depth misses the target even scanning everything
            low, high = 0, 1  # doubling to the first breadth that reaches the target, then bisection below it
            while recall(min(high, corpus.leaves), depth) < target:
                low, high = high, 2 * high
            high = min(high, corpus.leaves)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if recall(middle, depth) >= target else (middle, high)
            best = min(best or (math.inf, 0, 0), (scanned[high - 1] + REORDER_COST * depth, high, depth))
        if best is None:
            leaves, depth = fixed_leaves or corpus.leaves, depths[-1]
            warnings.warn(
                f"target_recall {target} is out of reach: the widest search (leaves_to_search {leaves}, reorder "
                f"{depth}) reaches {recall(leaves, depth):.4f}",
                stacklevel=3,
            )
        else:
            _, leaves, depth = best
        return replace(corpus, leaves_to_search=leaves, reorder=depth, reached_recall=recall(leaves, depth))

    # -- searching ------------------------------------------------------------------------------------------------

    def search(
        self,
        queries: Any,
        k: int | None = None,
        exclusions: Any = None,
        params: SearchParameters | None = None,
    ) -> SearchResult:
        if exclusions is None and self.query_model is None and type(queries) is torch.Tensor:
            found = self._search_one(queries, k, params)
            if found is not None:
                return found

        def run(
            corpus: _AnisotropicCorpus, matrix: np.ndarray, k: int, excluded: np.ndarray | None
        ) -> tuple[np.ndarray, np.ndarray]:
            leaves, depth = _settings(corpus, self.check_params(params))
            return _search_arrays(corpus, matrix, k, excluded, leaves, depth)

        return self._search_in_numpy(queries, k, exclusions, run, "AnisotropicIVF")

    def _search_one(self, query: torch.Tensor, k: int | None, params: SearchParameters | None) -> SearchResult | None:
        """One float32 CPU query ``[1, d]`` of an index with integer ids, as a server sends it, in one native call
        (the general path's conversions and checks cost several times the scan at a server's settings); ``None``
        for anything else, and for what the general path must refuse (a non-finite query, a bad ``k``), which
        then raises there."""
        corpus = self._corpus
        kernel = _native.load()
        if (
            corpus is None
            or kernel is None
            or corpus.ids.is_string
            or query.dtype is not torch.float32
            or not query.is_cpu
            or query.shape != (1, corpus.dimension)
            or not query.is_contiguous()
        ):
            return None
        k = self.k if k is None else k
        if type(k) is not int or k <= 0:
            return None
        k = min(k, corpus.count)
        leaves, reorder = _settings(corpus, self.check_params(params))
        depth = _reorder_depth(corpus, reorder, k)
        scores = torch.from_numpy(np.empty((1, k), dtype=np.float32))
        ids = torch.from_numpy(np.empty((1, k), dtype=np.int64))
        rows = torch.from_numpy(np.empty((1, k), dtype=np.int64))
        failed = kernel.twotower_ivf_search_one(
            corpus.native[1], query.data_ptr(), leaves, depth, k, scores.data_ptr(), ids.data_ptr(), rows.data_ptr()
        )
        if failed == 1:
            raise MemoryError("AnisotropicIVF: the native search could not allocate its working memory")
        return None if failed else SearchResult(scores, ids, rows)

    def search_snapshot(
        self,
        snapshot: Any,
        embeddings: torch.Tensor,
        k: int,
        excluded_rows: torch.Tensor | None,
        params: SearchParameters | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        matrix = np.ascontiguousarray(embeddings.detach().to("cpu", torch.float32).numpy())
        if not np.isfinite(matrix).all():
            raise ValueError("queries overflow float32, the precision AnisotropicIVF searches in")
        excluded = None if excluded_rows is None else excluded_rows.cpu().numpy()
        leaves, depth = _settings(snapshot, params)
        scores, rows = _search_arrays(snapshot, matrix, k, excluded, leaves, depth)
        device = embeddings.device
        return on_device(torch.from_numpy(scores), device), on_device(torch.from_numpy(rows), device)

    def score_pairs(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Rowwise ``q_i . c_i`` ``[n]`` with the arithmetic of this index's exact reorder (the padded float32 dot
        product of the native kernel, or the torch path's sum): a candidate scored this way ties exactly with
        its own copy in the corpus."""
        corpus = self.snapshot()
        padded_queries = _padded(corpus, queries.detach().to("cpu", torch.float32).numpy())
        padded_candidates = _padded(corpus, candidates.detach().to("cpu", torch.float32).numpy())
        kernel = _native.load()
        if kernel is not None:
            scores = _native.pair_scores(kernel, torch.from_numpy(padded_queries), torch.from_numpy(padded_candidates))
        else:
            scores = torch.from_numpy(_exact_scores(padded_candidates, padded_queries))
        return scores.to(queries.device)

    # -- files ----------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], include_query_model: bool | None = None) -> None:
        """Write the index (partitions, codes, vectors, ids, settings) to ``path`` (safetensors) atomically, with
        a checksum. ``include_query_model`` as for :meth:`twotower.indexes.BruteForce.save`."""
        corpus = self.snapshot()
        model_tensors, model_metadata = query_model_entries(self.query_model, include_query_model)
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(getattr(corpus, name))) for name in _ARRAYS
        } | ids_to_tensors(corpus.ids) | model_tensors  # fmt: skip
        metadata = {
            "k": str(self.k),
            "dimension": str(corpus.dimension),
            "leaves_to_search": str(corpus.leaves_to_search),
            "reorder": str(corpus.reorder),
            "reached_recall": "" if corpus.reached_recall is None else repr(corpus.reached_recall),
            **model_metadata,
        }
        save_index_file(Path(path), "twotower.AnisotropicIVF", tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], query_model: QueryModel | None = None) -> AnisotropicIVF:
        """Read an index written by :meth:`save`, verifying its format, checksum and every array the native scan
        will index by (a file cannot make it read outside its arrays). ``query_model`` replaces the saved one."""
        tensors, metadata = load_index_file(Path(path), "twotower.AnisotropicIVF")
        settings = metadata_ints(path, metadata, ("k", "dimension", "leaves_to_search", "reorder"))
        saved_model = query_model_from(path, tensors, metadata)
        tensors = index_tensors(tensors)
        problem = f"{path} is not a valid twotower index file"
        arrays = {}
        for name, dtype in _ARRAYS.items():
            tensor = tensors.get(name)
            if tensor is None or tensor.dtype != dtype:
                raise ValueError(f"{problem}: it has no {dtype} tensor {name!r}")
            arrays[name] = _owned(tensor)
        reached = metadata.get("reached_recall", "")
        try:
            reached_recall = None if reached == "" else require_number(float(reached), "reached_recall", 0.0, 1.0)
            corpus = _AnisotropicCorpus(
                ids=IdTable(ids_from_tensors(tensors, path)),
                count=int(arrays["rows"].shape[0]),
                dimension=settings["dimension"],
                leaves_to_search=settings["leaves_to_search"],
                reorder=settings["reorder"],
                reached_recall=reached_recall,
                **arrays,
            )
            _check_structure(corpus)
            index = cls(k=settings["k"], query_model=query_model if query_model is not None else saved_model)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{problem}: {error}") from error
        index._corpus = corpus
        return index


_ARRAYS = {
    "centroids": torch.float32,
    "leaf_offsets": torch.int64,
    "leaf_blocks": torch.int64,
    "codes": torch.uint8,
    "codebooks": torch.float32,
    "vectors": torch.float32,
    "rows": torch.int64,
}


def _owned(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy copy of ``tensor``. numpy asks Linux for huge pages for large arrays (torch's
    allocator does not): the exact reorder reads vectors at random places, and with 4 KiB pages each read also
    misses the TLB."""
    return np.array(tensor.numpy(), order="C", copy=True)


def _check_structure(corpus: _AnisotropicCorpus) -> None:
    """Refuse arrays that do not describe one index: wrong shapes, offsets or blocks that do not add up, rows
    that are not a permutation, non-finite values (the scan trusts all of these)."""
    leaves, padded = corpus.centroids.shape if corpus.centroids.ndim == 2 else (0, 0)
    n = corpus.count
    if leaves < 1 or n < 1 or len(corpus.ids) != n:
        raise ValueError(f"{leaves} partitions, {n} rows and {len(corpus.ids)} ids do not make an index")
    if corpus.codebooks.ndim != 3 or corpus.codebooks.shape[1] != quantization.CODEWORDS:
        raise ValueError(f"codebooks must be [M, 16, sub_dim], got {corpus.codebooks.shape}")
    subspaces, _, sub_dim = corpus.codebooks.shape
    if subspaces % 4 or subspaces > MAX_SUBSPACES or subspaces * sub_dim != padded:
        raise ValueError(f"codebooks {corpus.codebooks.shape} do not fit {padded}-d centroids")
    if not 1 <= corpus.dimension <= padded:
        raise ValueError(f"dimension {corpus.dimension} does not fit {padded}-d centroids")
    offsets, blocks = corpus.leaf_offsets, corpus.leaf_blocks
    counts = np.diff(offsets) if offsets.shape == (leaves + 1,) else None
    if counts is None or offsets[0] != 0 or offsets[-1] != n or bool((counts < 0).any()):
        raise ValueError("leaf_offsets must rise from 0 to the row count, one more than the partitions")
    per_leaf = (counts + quantization.BLOCK - 1) // quantization.BLOCK
    if blocks.shape != (leaves,) or not np.array_equal(blocks, np.cumsum(per_leaf) - per_leaf):
        raise ValueError("leaf_blocks do not match the partitions' sizes")
    if corpus.codes.shape != (int(per_leaf.sum()), subspaces // 2, quantization.BLOCK):
        raise ValueError(f"codes have shape {corpus.codes.shape}, not one block of 32 per 32 rows of each partition")
    if corpus.vectors.shape != (n, padded) or corpus.rows.shape != (n,):
        raise ValueError(f"vectors {corpus.vectors.shape} and rows {corpus.rows.shape} do not hold {n} rows")
    if not np.array_equal(np.sort(corpus.rows), np.arange(n)):
        raise ValueError("rows are not a permutation of the corpus rows")
    for name in ("centroids", "codebooks", "vectors"):
        if not np.isfinite(getattr(corpus, name)).all():
            raise ValueError(f"{name} hold non-finite values")
    if corpus.leaves_to_search < 1 or corpus.leaves_to_search > leaves or corpus.reorder < 1:
        raise ValueError(f"leaves_to_search {corpus.leaves_to_search} / reorder {corpus.reorder} do not fit")


def _settings(corpus: _AnisotropicCorpus, params: SearchParameters | None) -> tuple[int, int]:
    """``(leaves_to_search, reorder)`` of ``params`` over the index's own."""
    if not isinstance(params, AnisotropicSearchParameters):
        return corpus.leaves_to_search, corpus.reorder
    leaves = params.leaves_to_search or corpus.leaves_to_search
    if leaves > corpus.leaves:
        raise ValueError(f"leaves_to_search {leaves} exceeds the index's {corpus.leaves} partitions")
    return leaves, params.reorder or corpus.reorder


def _reorder_depth(corpus: _AnisotropicCorpus, reorder: int, k: int) -> int:
    """The candidates rescored exactly: ``reorder`` raised to ``k`` and cut to the corpus (every search path's
    rule; the native entry points take it as given)."""
    return min(max(reorder, k), corpus.count)


def _scanned_per_breadth(corpus: _AnisotropicCorpus, queries: np.ndarray) -> np.ndarray:
    """``[leaves]``: the mean number of candidates scanned when the best ``1, 2, ...`` partitions are."""
    padded = _padded(corpus, queries)
    order = np.argsort(-(padded @ corpus.centroids.T), axis=1, kind="stable")
    sizes = np.diff(corpus.leaf_offsets)[order]
    scanned: np.ndarray = np.cumsum(sizes, axis=1).mean(axis=0)
    return scanned


def _padded(corpus: _AnisotropicCorpus, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with the zero columns the corpus was padded with, float32 and C-contiguous."""
    extra = corpus.padded_dimension - matrix.shape[1]
    if extra:
        matrix = np.pad(matrix, ((0, 0), (0, extra)))
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _search_arrays(
    corpus: _AnisotropicCorpus,
    matrix: np.ndarray,
    k: int,
    excluded: np.ndarray | None,
    leaves: int,
    reorder: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [nq, k] float32, rows [nq, k] int64)`` for float32 ``matrix`` ``[nq, d]``; ``excluded`` holds
    corpus rows to leave out per query (``-1`` pads). Empty slots: row ``-1``, score ``-inf``."""
    queries = _padded(corpus, matrix)
    nq = queries.shape[0]
    width = 0
    sorted_excluded = None
    if excluded is not None and excluded.size:
        width = excluded.shape[1]
        sorted_excluded = np.sort(np.where(excluded >= 0, excluded, np.iinfo(np.int64).max), axis=1)
        reorder += int((excluded >= 0).sum(axis=1).max())
    depth = _reorder_depth(corpus, reorder, k)
    kernel = _native.load()
    if kernel is None:
        return _search_torch(corpus, queries, k, sorted_excluded, leaves, depth)
    scores = np.empty((nq, k), dtype=np.float32)
    rows = np.empty((nq, k), dtype=np.int64)
    failed = kernel.twotower_ivf_search(
        corpus.native[1], queries.ctypes.data, nq, leaves, depth, k,
        None if sorted_excluded is None else sorted_excluded.ctypes.data, width,
        scores.ctypes.data, rows.ctypes.data, torch.get_num_threads() if nq > 1 else 1,
    )  # fmt: skip
    if failed:
        raise MemoryError("AnisotropicIVF: the native search could not allocate its working memory")
    return scores, rows


def _search_torch(
    corpus: _AnisotropicCorpus,
    queries: np.ndarray,
    k: int,
    excluded: np.ndarray | None,
    leaves: int,
    depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The search without the native kernel: the same partitions, codes and exact reorder, with float32 lookup
    tables instead of uint8 ones (so the candidates reordered can differ where approximate scores are close)."""
    subspaces, _, sub_dim = corpus.codebooks.shape
    codes = corpus.unpacked_codes
    sizes = np.diff(corpus.leaf_offsets)
    scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
    rows = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for i, query in enumerate(queries):
        centroid_scores = corpus.centroids @ query
        best = np.argsort(-centroid_scores, kind="stable")[:leaves]
        positions = np.concatenate([np.arange(corpus.leaf_offsets[l], corpus.leaf_offsets[l + 1]) for l in best])
        if positions.size == 0:
            continue
        tables = np.einsum("ms,mcs->mc", query.reshape(subspaces, sub_dim), corpus.codebooks)
        approximate = np.repeat(centroid_scores[best], sizes[best]) + tables[
            np.arange(subspaces), codes[positions]
        ].sum(1)
        kept = positions[np.argsort(-approximate, kind="stable")[:depth]]
        found = corpus.rows[kept]
        if excluded is not None:
            keep = ~np.isin(found, excluded[i])
            kept, found = kept[keep], found[keep]
        exact = _exact_scores(corpus.vectors[kept], query[None, :])
        order = np.lexsort((found, -exact))[:k]
        scores[i, : order.size], rows[i, : order.size] = exact[order], found[order]
    return scores, rows


def _exact_scores(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``[n]`` float32 rowwise dot products of ``vectors`` ``[n, D]`` with ``queries`` (``[n, D]`` or ``[1, D]``):
    the torch path's exact scores, one arithmetic for the reorder and :meth:`AnisotropicIVF.score_pairs`."""
    scores: np.ndarray = np.multiply(vectors, queries, dtype=np.float32).sum(axis=1, dtype=np.float32)
    return scores


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)
