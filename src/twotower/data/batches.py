"""In-memory training batches: seeded, shuffled, re-iterable, optionally sharded across ranks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from twotower import distributed


class Batches:
    """Re-iterable, seeded, shuffled batches of aligned index tensors (a light DataLoader for in-memory data).

    ``generator`` is exposed as a DataLoader's is, so that checkpoints save and restore the shuffling state.
    Batches are views of one epoch-wide copy (of the tensors themselves when not shuffled): do not modify them.
    With ``shard=True`` under ``torch.distributed``, each rank yields its slice of every global batch.
    :meth:`state_dict` is the position between two batches, which :meth:`load_state_dict` makes the next
    iteration continue from (a checkpoint written mid-epoch).
    """

    def __init__(
        self, *tensors: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0, shard: bool = False
    ) -> None:
        if not tensors or any(tensor.shape[0] != tensors[0].shape[0] for tensor in tensors):
            raise ValueError("Batches needs tensors with the same number of rows")
        self.tensors, self.batch_size, self.shuffle, self.shard = tensors, batch_size, shuffle, shard
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start: torch.Tensor | None = None  # the generator before this epoch's order, while under way
        self._position = 0  # batches of the epoch yielded
        self._resuming = False

    def __len__(self) -> int:
        return -(-self.tensors[0].shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        rows = self.tensors[0].shape[0]
        skip = 0
        if self._resuming and self._epoch_start is not None:
            # The interrupted epoch again: the same order from the same generator state, less what was yielded.
            self.generator.set_state(self._epoch_start)
            skip = self._position
        self._resuming = False
        self._epoch_start, self._position = self.generator.get_state(), skip
        order = torch.randperm(rows, generator=self.generator) if self.shuffle else torch.arange(rows)
        starts = range(skip * self.batch_size, rows, self.batch_size)
        if not self.shard:
            # One gather per epoch, then every batch is a view: a gather per batch and tensor costs more than
            # the whole epoch's at small batches.
            shuffled = tuple(tensor[order] for tensor in self.tensors) if self.shuffle else self.tensors
            for start in starts:
                self._position += 1
                yield tuple(tensor[start : start + self.batch_size] for tensor in shuffled)
        else:
            for start in starts:
                # Every rank draws the same global batch (same seed) and keeps its own slice of it.
                chosen = order[start : start + self.batch_size]
                chosen = chosen[distributed.shard_rows(chosen.shape[0])]
                self._position += 1
                yield tuple(tensor[chosen] for tensor in self.tensors)
        self._epoch_start, self._position = None, 0

    def state_dict(self) -> dict[str, Any]:
        """The position: the generator (at the start of the epoch under way, if one is) and the batches yielded."""
        return {
            "format": "twotower.batches/1",
            "rows": int(self.tensors[0].shape[0]),
            "batch_size": self.batch_size,
            "generator": self._epoch_start if self._epoch_start is not None else self.generator.get_state(),
            "in_epoch": self._epoch_start is not None,
            "position": self._position,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s position (the next iteration finishes the interrupted epoch).

        Raises:
            ValueError: ``state`` is not a position of batches over as many rows in batches of this size.
        """
        if not isinstance(state, Mapping) or state.get("format") != "twotower.batches/1":
            raise ValueError("state is not a Batches state_dict")
        rows = int(self.tensors[0].shape[0])
        if state.get("rows") != rows or state.get("batch_size") != self.batch_size:
            raise ValueError(f"state was saved for {state.get('rows')} rows in batches of {state.get('batch_size')}, "
                             f"these batches have {rows} in batches of {self.batch_size}")  # fmt: skip
        self.generator.set_state(state["generator"])
        self._epoch_start = state["generator"] if state["in_epoch"] else None
        self._position = int(state["position"]) if state["in_epoch"] else 0
        self._resuming = bool(state["in_epoch"])
