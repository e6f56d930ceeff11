"""In-memory training batches: seeded, shuffled, re-iterable, optionally sharded across ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from twotower import distributed


class Batches:
    """Re-iterable, seeded, shuffled batches of aligned index tensors (a light DataLoader for in-memory data).

    ``generator`` is exposed as a DataLoader's is, so that checkpoints save and restore the shuffling state.
    Batches are views of one epoch-wide copy (of the tensors themselves when not shuffled): do not modify them.
    With ``shard=True`` under ``torch.distributed``, each rank yields its slice of every global batch.
    """

    def __init__(
        self, *tensors: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0, shard: bool = False
    ) -> None:
        if not tensors or any(tensor.shape[0] != tensors[0].shape[0] for tensor in tensors):
            raise ValueError("Batches needs tensors with the same number of rows")
        self.tensors, self.batch_size, self.shuffle, self.shard = tensors, batch_size, shuffle, shard
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.tensors[0].shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        rows = self.tensors[0].shape[0]
        order = torch.randperm(rows, generator=self.generator) if self.shuffle else torch.arange(rows)
        if not self.shard:
            # One gather per epoch, then every batch is a view: a gather per batch and tensor costs more than
            # the whole epoch's at small batches.
            shuffled = tuple(tensor[order] for tensor in self.tensors) if self.shuffle else self.tensors
            for start in range(0, rows, self.batch_size):
                yield tuple(tensor[start : start + self.batch_size] for tensor in shuffled)
            return
        for start in range(0, rows, self.batch_size):
            # Every rank draws the same global batch (same seed) and keeps its own slice of it.
            chosen = order[start : start + self.batch_size]
            chosen = chosen[distributed.shard_rows(chosen.shape[0])]
            yield tuple(tensor[chosen] for tensor in self.tensors)
