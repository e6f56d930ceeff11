"""An exact index over a corpus sharded across ``torch.distributed`` ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from twotower.distributed import all_reduce_sum, gather, is_distributed, rank, world_size
from twotower.indexes.base import BuiltState, QueryEmbeddings, SearchParameters, SearchResult, TopK, check_k


class ShardedIndex(TopK):
    """Exact top-K over a corpus sharded across ranks.

    Each rank indexes its own shard (with global ids) in ``local``; a query is answered against every shard:
    the ranks' queries are gathered, each rank searches its shard for all of them, and each rank merges the
    shards' top-k for its own queries. Ties keep the lower rank first (shards in rank order = global order).
    All ranks must call it together. Outside a process group it is the local index.

    Args:
        local: the exact index that holds this rank's shard.
    """

    def __init__(self, local: TopK) -> None:
        if not isinstance(local, TopK):
            raise TypeError(f"local must be a twotower.indexes.TopK, got {type(local).__name__}")
        super().__init__(k=local.k, query_model=local.query_model)
        self.local = local

    def is_exact(self) -> bool:
        return self.local.is_exact()

    def index(self, candidates: torch.Tensor, identifiers: Any = None) -> ShardedIndex:
        self.local.index(candidates, identifiers)
        return self

    @property
    def ids(self) -> Any:
        return self.local.ids

    @property
    def num_candidates(self) -> int:
        return int(all_reduce_sum(torch.tensor(self.local.num_candidates)))

    @property
    def dimension(self) -> int:
        return self.local.dimension

    def score_pairs(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return self.local.score_pairs(queries, candidates)

    def snapshot(self) -> BuiltState:
        return self.local.snapshot()

    def search_snapshot(
        self,
        snapshot: Any,
        embeddings: torch.Tensor,
        k: int,
        excluded_rows: torch.Tensor | None,
        params: SearchParameters | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard alone (the merge across ranks is :meth:`search`)."""
        return self.local.search_snapshot(snapshot, embeddings, k, excluded_rows, params)

    def check_params(self, params: SearchParameters | None) -> SearchParameters | None:
        return self.local.check_params(params)

    def top_scores(self, queries: Any, k: int) -> torch.Tensor:
        # The merge across ranks goes through search().
        return self.search(queries, k).scores

    def search(
        self,
        queries: Any,
        k: int | None = None,
        exclusions: Any = None,
        params: SearchParameters | None = None,
    ) -> SearchResult:
        """The global top ``k`` of this rank's queries over every rank's shard (all ranks call it together).

        ``rows`` are global row positions: the shards in rank order, as if concatenated.
        """
        if not is_distributed():
            return self.local.search(queries, k, exclusions, params)
        embeddings = self.local.embed_queries(queries)
        k = min(check_k(self.k if k is None else k), self.num_candidates)
        parts, sizes = gather(embeddings.embeddings)
        all_queries = torch.cat(parts)
        all_exclusions = None
        if exclusions is not None:
            objects: list[Any] = [None] * world_size()
            dist.all_gather_object(objects, [np.asarray(row).reshape(-1) for row in _exclusion_rows(exclusions)])
            all_exclusions = [row for part in objects for row in part]
        local_k = min(k, self.local.num_candidates)
        # Every rank's queries have been through the query model and checked already.
        found = self.local.search(QueryEmbeddings.trusted(all_queries), local_k, all_exclusions, params)
        me = rank()
        start = sum(sizes[:me])
        mine = slice(start, start + sizes[me])
        counts, _ = gather(torch.tensor([self.local.num_candidates], device=found.rows.device))
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64, device=found.rows.device),
                                          torch.cat(counts)[:-1].to(torch.int64)]), 0)  # fmt: skip
        score_parts, _ = gather(found.scores[:, :local_k].contiguous())
        row_parts, _ = gather(found.rows[:, :local_k].contiguous())
        merged_scores = torch.cat([part[mine] for part in score_parts], dim=1)
        merged_rows = torch.cat(
            [torch.where(part[mine] >= 0, part[mine] + offsets[r], -1) for r, part in enumerate(row_parts)], dim=1
        )
        order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
        scores, rows = merged_scores.gather(1, order), merged_rows.gather(1, order)
        if isinstance(found.ids, torch.Tensor):
            id_parts, _ = gather(found.ids.contiguous())
            merged_ids = torch.cat([part[mine] for part in id_parts], dim=1)
            return SearchResult(scores, merged_ids.gather(1, order.to(merged_ids.device)), rows)
        strings: list[Any] = [None] * world_size()
        dist.all_gather_object(strings, np.asarray(found.ids))
        merged_strings = np.concatenate([np.asarray(part)[mine] for part in strings], axis=1)
        return SearchResult(scores, np.take_along_axis(merged_strings, order.cpu().numpy(), axis=1), rows)


def _exclusion_rows(exclusions: Any) -> list[Any]:
    if isinstance(exclusions, torch.Tensor):
        return list(exclusions.detach().cpu().numpy())
    return list(exclusions)
