"""Streaming Parquet batches: every row once per epoch, bounded memory, exact resume, rank shares, id lookup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from twotower import distributed
from twotower.data.streaming import IntegerIdRows, ParquetBatches, id_rows
from twotower.models import Model
from twotower.optim import sparse_keras_adagrad
from twotower.pipeline.model import IdRetrievalModel
from twotower.vocabulary import Vocabulary


def _log(path: Path, rows: int = 5000, group_rows: int = 700, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    columns = {
        "user_id": rng.integers(0, 300, rows),
        "item_id": rng.integers(10, 200, rows),
        "ts": np.arange(rows, dtype=np.int64),  # in time order, as a log is written
    }
    pq.write_table(pa.table(columns), path, row_group_size=group_rows)
    return columns


def _identity(array: pa.Array) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def _stream(path: Path, **options: Any) -> ParquetBatches:
    defaults: dict[str, Any] = {"batch_size": 128, "shuffle_buffer": 1024, "seed": 1}
    return ParquetBatches(path, {"ts": _identity, "user_id": _identity}, **{**defaults, **options})


def test_an_epoch_yields_every_kept_row_once_in_a_new_order_each_time(tmp_path: Path) -> None:
    columns = _log(tmp_path / "log.parquet")
    stream = _stream(tmp_path / "log.parquet", filter=pc.field("ts") < 4200)
    epochs = [[batch for batch in stream] for _ in range(2)]
    for batches in epochs:
        assert [len(batch[0]) for batch in batches[:-1]] == [128] * (len(batches) - 1)
        times = torch.cat([batch[0] for batch in batches]).numpy()
        users = torch.cat([batch[1] for batch in batches]).numpy()
        np.testing.assert_array_equal(np.sort(times), np.arange(4200))  # each kept row once, the filter applied
        np.testing.assert_array_equal(users, columns["user_id"][times])  # the columns stay aligned
    first, second = (torch.cat([batch[0] for batch in batches]) for batches in epochs)
    assert not torch.equal(first, second)
    # Shuffled beyond the row groups: the first batch mixes rows of several groups of 700.
    assert len(set((epochs[0][0][0] // 700).tolist())) >= 2
    # The same seed gives the same stream; another seed another.
    again = _stream(tmp_path / "log.parquet", filter=pc.field("ts") < 4200)
    assert torch.equal(next(iter(again))[0], epochs[0][0][0])
    other = _stream(tmp_path / "log.parquet", filter=pc.field("ts") < 4200, seed=2)
    assert not torch.equal(next(iter(other))[0], epochs[0][0][0])


def test_memory_is_the_buffer_and_one_row_group_and_filtered_out_groups_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _log(tmp_path / "log.parquet", rows=20_000, group_rows=500)
    stream = _stream(tmp_path / "log.parquet", filter=pc.field("ts") >= 15_000)
    most, reads = 0, []
    original = ParquetBatches._read

    def watched(self: ParquetBatches, group: int) -> list[np.ndarray]:
        nonlocal most
        arrays = original(self, group)
        reads.append(int(arrays[0].shape[0]))
        most = max(most, self._pending() + int(arrays[0].shape[0]))
        return arrays

    monkeypatch.setattr(ParquetBatches, "_read", watched)
    total = sum(len(batch[0]) for batch in stream)
    assert total == 5000
    assert most <= 1024 + 500  # the buffer and the group being added, however long the log
    assert sum(reads) == 5000
    assert sum(1 for rows in reads if rows) == 10


def test_unshuffled_reads_the_files_in_order(tmp_path: Path) -> None:
    _log(tmp_path / "log.parquet")
    times = torch.cat([batch[0] for batch in _stream(tmp_path / "log.parquet", shuffle=False)])
    np.testing.assert_array_equal(times.numpy(), np.arange(5000))


def test_resuming_from_a_state_continues_exactly(tmp_path: Path) -> None:
    _log(tmp_path / "log.parquet")
    straight = _stream(tmp_path / "log.parquet")
    expected = [batch[0] for _ in range(2) for batch in straight]
    interrupted = _stream(tmp_path / "log.parquet")
    iterator = iter(interrupted)
    taken = [next(iterator)[0] for _ in range(11)]  # mid-epoch, with rows left in the buffer
    state = interrupted.state_dict()
    assert state["buffer"]
    assert state["in_epoch"]
    # Through a file and back, as a checkpoint does (weights_only: tensors and plain values only).
    torch.save(state, tmp_path / "state.pt")
    restored = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = _stream(tmp_path / "log.parquet")
    fresh.load_state_dict(restored)
    rest = [batch[0] for batch in fresh] + [batch[0] for batch in fresh]  # the rest of epoch 1, then epoch 2
    assert len(taken) + len(rest) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, expected, strict=True))
    with pytest.raises(ValueError, match="batch_size=128, this stream has 64"):
        _stream(tmp_path / "log.parquet", batch_size=64).load_state_dict(restored)
    with pytest.raises(ValueError, match="not a ParquetBatches state_dict"):
        fresh.load_state_dict({"epoch": 1})


def test_a_model_killed_mid_epoch_on_a_stream_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _log(tmp_path / "log.parquet", rows=3000, group_rows=400)
    encoders = {"user_id": _identity, "item_id": _identity}

    def setup() -> tuple[IdRetrievalModel, torch.optim.Optimizer, ParquetBatches]:
        torch.manual_seed(0)
        model = IdRetrievalModel(300, 200, embedding_dim=8, batch_size=128, sparse_embeddings=True)
        stream = ParquetBatches(tmp_path / "log.parquet", encoders, batch_size=128, shuffle_buffer=600, seed=4)
        return model, sparse_keras_adagrad(model.parameters(), 0.1), stream

    straight, optimizer, stream = setup()
    expected = straight.fit(stream, optimizer, epochs=2, progress=False)
    original, calls = Model.train_step, {"n": 0}

    def dies(self: Model, batch: Any, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        calls["n"] += 1
        if calls["n"] == 30:  # epoch 2 (24 steps each), after its step-4 checkpoint
            raise KeyboardInterrupt
        return original(self, batch, optimizer)

    killed, optimizer, stream = setup()
    monkeypatch.setattr(Model, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        killed.fit(stream, optimizer, epochs=2, checkpoint_dir=tmp_path / "run", checkpoint_every=4, progress=False)
    monkeypatch.setattr(Model, "train_step", original)
    resumed, optimizer, stream = setup()
    history = resumed.fit(stream, optimizer, epochs=2, checkpoint_dir=tmp_path / "run", checkpoint_every=4,
                          progress=False)  # fmt: skip
    assert history == pytest.approx(expected, rel=1e-6)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_each_rank_reads_its_own_balanced_share_of_the_row_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Row groups of different sizes, in two files of a directory.
    (tmp_path / "log").mkdir()
    pq.write_table(pa.table({"ts": np.arange(3000), "user_id": np.zeros(3000, dtype=np.int64)}),
                   tmp_path / "log" / "a.parquet", row_group_size=1000)  # fmt: skip
    pq.write_table(pa.table({"ts": np.arange(3000, 4600), "user_id": np.zeros(1600, dtype=np.int64)}),
                   tmp_path / "log" / "b.parquet", row_group_size=400)  # fmt: skip
    stream = _stream(tmp_path / "log")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = []
    for me in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda me=me: me)
        shares.append(stream._my_groups(0))
    assert sorted(np.concatenate(shares).tolist()) == list(range(7))  # every group, once
    loads = [int(stream._group_rows[share].sum()) for share in shares]
    assert abs(loads[0] - loads[1]) <= 1000  # at most one group apart
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert not np.array_equal(stream._my_groups(0), stream._my_groups(1))  # new shares every epoch


def test_integer_id_rows_agree_with_the_vocabulary(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for known, buckets in ((np.arange(0, 5000, 3), 1), (rng.choice(10**12, 2000, replace=False), 4)):
        vocabulary = Vocabulary(known, num_oov_buckets=buckets)
        lookup = IntegerIdRows.from_vocabulary(vocabulary)
        queries = np.concatenate([known, rng.integers(-10, int(known.max()) + 50, 3000)])
        np.testing.assert_array_equal(lookup(pa.array(queries)), vocabulary.lookup(pa.array(queries)))
        np.testing.assert_array_equal(lookup(queries), vocabulary.lookup(pa.array(queries)))
    dense, spread = IntegerIdRows(np.arange(10), np.arange(10)), IntegerIdRows(np.array([0, 10**15]), np.array([1, 2]))
    assert dense._table is not None
    assert spread._table is None
    assert spread(np.array([10**15, 5])).tolist() == [2, 0]
    # Ids told apart by their text (leading zeros) keep the vocabulary's own lookup.
    text = Vocabulary(["007", "7"])
    assert id_rows(text) == text.lookup
    assert isinstance(id_rows(Vocabulary([3, 1, 2])), IntegerIdRows)
    with pytest.raises(ValueError, match="null"):
        dense(pa.array([1, None]))
    with pytest.raises(TypeError, match="ids must be integers"):
        dense(pa.array(["1"]))


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    _log(tmp_path / "log.parquet")
    with pytest.raises(ValueError, match="shuffle_buffer must be at least 2 \\* batch_size = 256"):
        _stream(tmp_path / "log.parquet", shuffle_buffer=200)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        _stream(tmp_path / "log.parquet", batch_size=0)
    with pytest.raises(ValueError, match="no column\\(s\\) \\['rating'\\]"):
        ParquetBatches(tmp_path / "log.parquet", {"rating": _identity}, batch_size=8)
    with pytest.raises(ValueError, match="does not exist"):
        ParquetBatches(tmp_path / "missing.parquet", {"ts": _identity}, batch_size=8)
    bad = ParquetBatches(tmp_path / "log.parquet", {"ts": lambda array: np.zeros(3)}, batch_size=8, shuffle=False)
    with pytest.raises(ValueError, match="encoder of column 'ts' returned shape \\(3,\\)"):
        next(iter(bad))
