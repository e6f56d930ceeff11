"""Training batches streamed from Parquet: memory bounded by the shuffle buffer, not by the log.

:class:`ParquetBatches` reads a Parquet dataset (a file or a directory of parts) one row group at a time, in a
seeded order that changes every epoch, through a shuffle buffer, encoding each column as it arrives (ids to
embedding rows with :class:`IntegerIdRows` or a :class:`~twotower.vocabulary.Vocabulary`). Its position, the
buffer included, is a ``state_dict`` that :meth:`twotower.models.Model.fit` saves in its checkpoints, so a run
killed mid-epoch resumes on the very batch it would have trained on next. Under ``torch.distributed`` each rank
reads its own share of the row groups (the ranks' shares balanced by their row counts) and yields its share of
every global batch.

How far it shuffles: rows are drawn uniformly from a buffer of ``shuffle_buffer`` rows, refilled by whole row
groups in a random order, as ``tf.data``'s ``shuffle`` does; two rows of one row group stay close in the stream
when the buffer is smaller than the row groups are. For a log written in time order that is the trade-off of
every streaming reader: a buffer of a few row groups mixes well.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from twotower import distributed
from twotower.vocabulary import Vocabulary

Encoder = Callable[[pa.Array], np.ndarray]
"""A column's encoding: an Arrow array of ``n`` values to a numpy array of ``n`` (e.g. ids to embedding rows)."""

_STATE_FORMAT = "twotower.parquet-batches/1"


class IntegerIdRows:
    """The embedding row of each integer id, by direct addressing (or bisection when the ids are too spread out):
    the lookup a stream needs for every row group, where re-hashing a vocabulary of millions per row group would
    cost more than training on it.

    Args:
        ids: ``[n]`` distinct integer ids.
        rows: ``[n]`` the row of each id.
        num_oov_buckets: rows below this are OOV buckets; an unknown id goes to bucket ``fnv1a_64(decimal
            text) % num_oov_buckets``, as :meth:`Vocabulary.lookup` puts it.
    """

    def __init__(self, ids: np.ndarray, rows: np.ndarray, num_oov_buckets: int = 1) -> None:
        ids, rows = np.asarray(ids), np.asarray(rows)
        if ids.ndim != 1 or rows.shape != ids.shape:
            raise ValueError(f"ids and rows must be 1-D of one length, got {ids.shape} and {rows.shape}")
        if ids.size and ids.dtype.kind not in "iu":
            raise TypeError(f"ids must be integers, got dtype {ids.dtype}")
        self.num_oov_buckets = int(num_oov_buckets)
        self._oov = Vocabulary.hashing(self.num_oov_buckets) if self.num_oov_buckets > 1 else None
        ids = ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        self._sorted, self._rows_sorted = ids[order], rows[order].astype(np.int64)
        if self._sorted.size and (np.diff(self._sorted) == 0).any():
            raise ValueError("ids must be distinct")
        self._low = int(self._sorted[0]) if ids.size else 0
        span = int(self._sorted[-1]) - self._low + 1 if ids.size else 0
        # A table of int32 rows over the id range: 4 bytes per possible id, so only when the range is not much
        # wider than the vocabulary (ids 0..n-1, or a few gaps); else bisection over the sorted ids.
        self._table: np.ndarray | None = None
        if ids.size and span <= 4 * ids.size + (1 << 20) and int(rows.max(initial=0)) < 2**31:
            self._table = np.full(span, -1, dtype=np.int32)
            self._table[self._sorted - self._low] = self._rows_sorted

    @classmethod
    def from_vocabulary(cls, vocabulary: Vocabulary) -> IntegerIdRows:
        """The rows ``vocabulary.lookup`` gives, for a vocabulary whose values are all decimal integers.

        Raises:
            ValueError: a value is not the canonical decimal text of an integer (``"007"``, ``"1.0"``, ``"x"``):
                such ids are told apart by their text, so look them up with the vocabulary itself.
        """
        text = vocabulary.arrow_values
        try:
            ids = pa.compute.cast(text, pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(f"{vocabulary!r} holds values that are not integers: look them up with it") from None
        canonical = pa.compute.cast(pa.array(ids), pa.large_string())
        if not pa.compute.all(pa.compute.equal(canonical, text.cast(pa.large_string()))).as_py() and len(text):
            raise ValueError(f"{vocabulary!r} holds integers written with leading zeros or signs: look them up with it")
        rows = np.arange(vocabulary.num_oov_buckets, len(vocabulary), dtype=np.int64)
        return cls(ids, rows, vocabulary.num_oov_buckets)

    def __call__(self, ids: pa.Array | np.ndarray) -> np.ndarray:
        """``[n]`` ``int64`` rows of ``ids`` (an integer Arrow or numpy array without nulls)."""
        if isinstance(ids, (pa.Array, pa.ChunkedArray)):
            if ids.null_count:
                raise ValueError(f"ids hold {ids.null_count} null(s): an id column must have no nulls")
            if not pa.types.is_integer(ids.type):
                raise TypeError(f"ids must be integers, got Arrow type {ids.type}")
            values = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=np.int64)
        else:
            values = np.asarray(ids)
            if values.size and values.dtype.kind not in "iu":
                raise TypeError(f"ids must be integers, got dtype {values.dtype}")
            values = values.astype(np.int64, copy=False)
        rows = np.full(values.shape[0], -1, dtype=np.int64)
        if self._table is not None:
            offset = values - self._low
            inside = (offset >= 0) & (offset < self._table.shape[0])
            rows[inside] = self._table[offset[inside]]
        elif self._sorted.size:
            at = np.minimum(np.searchsorted(self._sorted, values), self._sorted.shape[0] - 1)
            found = self._sorted[at] == values
            rows[found] = self._rows_sorted[at[found]]
        unknown = rows < 0
        if unknown.any():
            if self._oov is None:
                rows[unknown] = 0
            else:
                rows[unknown] = self._oov.lookup(pa.array(values[unknown]))
        return rows


def id_rows(vocabulary: Vocabulary) -> Encoder:
    """The fastest exact encoder of ``vocabulary``'s rows: :class:`IntegerIdRows` when its values are integers,
    else the vocabulary's own lookup (which hashes the vocabulary on every call: fine for thousands of ids, slow
    per row group for millions)."""
    try:
        return IntegerIdRows.from_vocabulary(vocabulary)
    except ValueError:
        return vocabulary.lookup


class ParquetBatches:
    """Seeded, shuffled batches of encoded columns, streamed from Parquet; re-iterable, one epoch per iteration.

    Args:
        source: a Parquet file or a directory of Parquet files.
        columns: the batch's columns in order: each Parquet column name and its :data:`Encoder`; a batch is the
            tuple of ``torch.from_numpy`` of the encoded arrays.
        batch_size: rows per global batch (the last batch of an epoch may be smaller in one process; under
            ``torch.distributed`` an epoch ends when any rank cannot fill its share, so that every rank takes
            the same number of steps: up to about one row group per rank is left out of that epoch).
        shuffle: read row groups in a new seeded order every epoch and draw rows through the shuffle buffer;
            ``False``: the files' order.
        shuffle_buffer: rows the buffer holds before it starts yielding (at least ``2 * batch_size``); memory is
            this plus one row group, whatever the log's length.
        seed: the order's seed (every rank must pass the same).
        filter: keep the rows this ``pyarrow.compute`` expression selects (e.g. ``pc.field("ts") < cutoff``, the
            training part of a time split); row groups its statistics exclude are not read.

    Raises:
        ValueError: a bad argument (named), or a missing column.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        columns: Mapping[str, Encoder],
        *,
        batch_size: int,
        shuffle: bool = True,
        shuffle_buffer: int = 1 << 20,
        seed: int = 0,
        filter: Any = None,
    ) -> None:
        import pyarrow.dataset as ds

        for name, value in (("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} int, "
                                 f"got {value!r}")  # fmt: skip
        if shuffle and shuffle_buffer < 2 * batch_size:
            raise ValueError(f"shuffle_buffer must be at least 2 * batch_size = {2 * batch_size}, got {shuffle_buffer}")
        if not columns:
            raise ValueError("columns must name at least one column")
        path = Path(source)
        if not path.exists():
            raise ValueError(f"source {path} does not exist")
        try:
            dataset = ds.dataset(str(path), format="parquet")
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(f"source {path} cannot be read as parquet: {error}") from None
        missing = [name for name in columns if name not in dataset.schema.names]
        if missing:
            raise ValueError(f"source {path} has no column(s) {missing}; it has {dataset.schema.names}")
        self.path, self.columns = path, dict(columns)
        self.batch_size, self.shuffle, self.shuffle_buffer, self.seed = batch_size, shuffle, shuffle_buffer, seed
        self.filter = filter
        # One fragment per row group, in file order, with its row count from the metadata.
        self._groups = [
            group for fragment in dataset.get_fragments() for group in fragment.split_by_row_group()
        ]  # fmt: skip
        self._group_rows = np.array([group.row_groups[0].num_rows for group in self._groups], dtype=np.int64)
        self._epoch = 0  # epochs begun
        self._in_epoch = False
        self._resuming = False  # load_state_dict set a position that the next iteration continues from
        self._next_group = 0  # position in this rank's order of row groups
        self._buffer: list[np.ndarray] = []
        self._shuffled = False
        self._generator = torch.Generator().manual_seed(seed * 1_000_003 + distributed.rank())

    @property
    def num_rows(self) -> int:
        """Rows in the files (before ``filter``), from their metadata."""
        return int(self._group_rows.sum())

    def _my_groups(self, epoch: int) -> np.ndarray:
        """This rank's row groups for ``epoch``, in the order it reads them."""
        count = len(self._groups)
        order = np.random.default_rng([self.seed, epoch]).permutation(count) if self.shuffle else np.arange(count)
        size = distributed.world_size()
        if size == 1:
            return order
        # Greedy balance by rows, in the epoch's order: the ranks' shares differ by at most one row group.
        loads = np.zeros(size, dtype=np.int64)
        mine = []
        for group in order:
            owner = int(np.argmin(loads))
            loads[owner] += self._group_rows[group]
            if owner == distributed.rank():
                mine.append(group)
        return np.asarray(mine, dtype=np.int64)

    def _read(self, group: int) -> list[np.ndarray]:
        table = self._groups[group].to_table(columns=list(self.columns), filter=self.filter)
        encoded = []
        for name, encode in self.columns.items():
            column = table.column(name)
            array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
            values = np.asarray(encode(array))
            if not values.flags.writeable:  # Arrow's zero-copy buffers are read-only; torch wants its own
                values = values.copy()
            if values.shape[:1] != (table.num_rows,):
                raise ValueError(f"the encoder of column {name!r} returned shape {values.shape} for "
                                 f"{table.num_rows} values")  # fmt: skip
            encoded.append(values)
        return encoded

    def _pending(self) -> int:
        return int(self._buffer[0].shape[0]) if self._buffer else 0

    def _take(self, rows: int) -> tuple[torch.Tensor, ...]:
        taken = tuple(torch.from_numpy(np.ascontiguousarray(column[:rows])) for column in self._buffer)
        self._buffer = [column[rows:] for column in self._buffer]
        return taken

    def _permute(self) -> None:
        order = torch.randperm(self._pending(), generator=self._generator).numpy()
        self._buffer = [column[order] for column in self._buffer]
        self._shuffled = True

    def _next_local(self, share: int, groups: np.ndarray) -> tuple[torch.Tensor, ...] | None:
        """This rank's next ``share`` rows (fewer at the end in one process), or ``None`` when the epoch is done."""
        low_water = self.shuffle_buffer // 2 if self.shuffle else 0
        while True:
            pending, exhausted = self._pending(), self._next_group >= groups.shape[0]
            mixed = self._shuffled or not self.shuffle
            if mixed and pending >= share and (pending - share >= low_water or exhausted):
                return self._take(share)
            if not exhausted:
                arrays = self._read(int(groups[self._next_group]))
                self._next_group += 1
                self._buffer = arrays if not self._buffer else [
                    np.concatenate([old, new]) for old, new in zip(self._buffer, arrays, strict=True)
                ]  # fmt: skip
                self._shuffled = False
                if self.shuffle and self._pending() >= self.shuffle_buffer:
                    self._permute()
                continue
            if pending and self.shuffle and not self._shuffled:
                self._permute()
                continue
            if pending and not distributed.is_distributed():
                return self._take(pending)  # the epoch's last, smaller batch
            return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if not (self._in_epoch and self._resuming):
            self._in_epoch, self._next_group, self._buffer, self._shuffled = True, 0, [], False
            self._epoch += 1
        self._resuming = False
        groups = self._my_groups(self._epoch - 1)
        share = distributed.shard_rows(self.batch_size)
        share_rows = share.stop - share.start
        while True:
            batch = self._next_local(share_rows, groups)
            # Every rank steps together: the epoch ends for all when one rank's share runs out.
            if distributed.is_distributed() and float(distributed.all_reduce_sum(torch.tensor(float(batch is None)))):
                batch = None
            if batch is None:
                break
            yield batch
        self._in_epoch, self._buffer = False, []

    def state_dict(self) -> dict[str, Any]:
        """The position between two batches: epoch, row groups read, the buffer's rows, the generator (tensors
        and plain values only, for ``torch.load(weights_only=True)``)."""
        return {
            "format": _STATE_FORMAT,
            "row_groups": len(self._groups),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "columns": list(self.columns),
            "epoch": self._epoch,
            "in_epoch": self._in_epoch,
            "next_group": self._next_group,
            "shuffled": self._shuffled,
            "buffer": [torch.from_numpy(np.ascontiguousarray(column)) for column in self._buffer],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s position: the next iteration goes on with the interrupted epoch
        (without this, every iteration begins a new epoch, even after one left unfinished).

        Raises:
            ValueError: ``state`` is not a stream position or was taken on other files or settings (named).
        """
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not a ParquetBatches state_dict")
        for key, mine in (("row_groups", len(self._groups)), ("seed", self.seed), ("batch_size", self.batch_size),
                          ("columns", list(self.columns))):  # fmt: skip
            if state.get(key) != mine:
                raise ValueError(f"state was saved with {key}={state.get(key)!r}, this stream has {mine!r}")
        buffer = state["buffer"]
        if not isinstance(buffer, list) or len(buffer) not in (0, len(self.columns)):
            raise ValueError("state's buffer does not match the stream's columns")
        self._epoch, self._in_epoch = int(state["epoch"]), bool(state["in_epoch"])
        self._next_group, self._shuffled = int(state["next_group"]), bool(state["shuffled"])
        self._buffer = [column.numpy().copy() for column in buffer]
        self._generator.set_state(state["generator"])
        self._resuming = self._in_epoch
