"""Top-K indexes: given query embeddings, return the best-scoring candidates of a corpus by dot product.

* :mod:`twotower.indexes.base` -- the protocol every index offers (:class:`TopK`, :class:`QueryEmbeddings`,
  :class:`SearchParameters`, :class:`SearchResult`) and what an implementation supplies;
* :mod:`twotower.indexes.exact` -- :class:`BruteForce` (corpus in memory) and :class:`Streaming` (corpus read
  batch by batch on every query, larger than memory);
* :mod:`twotower.indexes.faiss` -- :class:`Faiss`, approximate search with per-call
  :class:`FaissSearchParameters`;
* :mod:`twotower.indexes.anisotropic` -- :class:`AnisotropicIVF`, ScaNN's scheme (partitions, anisotropic 4-bit
  codes, exact reorder) with a native scan, per-call :class:`AnisotropicSearchParameters` and ``target_recall``;
  :mod:`twotower.indexes.quantization` trains it;
* :mod:`twotower.indexes.sharded` -- :class:`ShardedIndex`, an exact index over a corpus sharded across ranks;
* :mod:`twotower.indexes.files` -- the checksummed safetensors file format of saved indexes;
* :mod:`twotower.indexes.evaluation` -- recall and speed of an approximate index against an exact one.
"""

from twotower.ids import Ids, IdTable
from twotower.indexes.anisotropic import AnisotropicIVF, AnisotropicSearchParameters
from twotower.indexes.base import QueryEmbeddings, SearchParameters, SearchResult, TopK
from twotower.indexes.evaluation import recall_against_exact, recall_at_k
from twotower.indexes.exact import BruteForce, Streaming
from twotower.indexes.faiss import Faiss, FaissSearchParameters, default_factory
from twotower.indexes.sharded import ShardedIndex

__all__ = [
    "AnisotropicIVF",
    "AnisotropicSearchParameters",
    "BruteForce",
    "Faiss",
    "FaissSearchParameters",
    "IdTable",
    "Ids",
    "QueryEmbeddings",
    "SearchParameters",
    "SearchResult",
    "ShardedIndex",
    "Streaming",
    "TopK",
    "default_factory",
    "recall_against_exact",
    "recall_at_k",
]
