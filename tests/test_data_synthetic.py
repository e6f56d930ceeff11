"""Generated logs written to Parquet: their shape, their latent structure counted by hand, and learnability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from twotower.data import write_synthetic_log

START, DAYS = 1_600_000_000, 30


def test_the_log_is_written_in_chunks_in_time_order(tmp_path: Path) -> None:
    log = write_synthetic_log(tmp_path / "log.parquet", 40_000, 300, 200, num_topics=10, favourites=2,
                              explore=0.25, start=START, days=DAYS, chunk_rows=7_000, seed=5)  # fmt: skip
    assert log.path == tmp_path / "log.parquet"
    assert [entry.name for entry in tmp_path.iterdir()] == ["log.parquet"]  # no partial file left
    metadata = pq.ParquetFile(log.path).metadata
    assert (metadata.num_rows, metadata.num_row_groups) == (40_000, 6)  # 5 chunks of 7,000 and one of 5,000
    table = pq.read_table(log.path)
    users, items, times = (table.column(name).to_numpy() for name in ("user_id", "item_id", "ts"))
    assert users.min() >= 0 and users.max() < 300  # noqa: PT018 - one range
    assert items.min() >= 0 and items.max() < 200  # noqa: PT018 - one range
    assert bool((np.diff(times) >= 0).all())
    assert times[0] >= START
    assert times[-1] < START + DAYS * 86_400
    # Every topic has items here, so a row's topic is one of its user's favourites except when it explores:
    # P = (1 - explore) + explore * |favourites of u| / topics, averaged over the rows' users.
    assert set(np.unique(log.item_topics).tolist()) == set(range(10))
    favourite = [set(topics.tolist()) for topics in log.user_topics]
    hits = np.array([log.item_topics[item] in favourite[user] for user, item in zip(users, items, strict=True)])
    expected = float(np.mean([0.75 + 0.25 * len(favourite[user]) / 10 for user in users]))
    spread = np.sqrt(expected * (1 - expected) / users.shape[0])
    assert abs(hits.mean() - expected) < 5 * spread
    # Power-law popularity: the most popular 5% of items hold far more than 5% of the rows.
    counts = np.sort(np.bincount(items, minlength=200))[::-1]
    assert counts[:10].sum() > 0.2 * items.shape[0]


def test_the_same_seed_writes_the_same_log(tmp_path: Path) -> None:
    first = write_synthetic_log(tmp_path / "a.parquet", 5_000, 100, 50, seed=1, chunk_rows=2_000)
    again = write_synthetic_log(tmp_path / "b.parquet", 5_000, 100, 50, seed=1, chunk_rows=2_000)
    other = write_synthetic_log(tmp_path / "c.parquet", 5_000, 100, 50, seed=2, chunk_rows=2_000)
    assert pq.read_table(first.path).equals(pq.read_table(again.path))
    assert not pq.read_table(first.path).equals(pq.read_table(other.path))


def test_a_model_learns_the_log_beyond_popularity(tmp_path: Path) -> None:
    from twotower.pipeline import PipelineConfig, train

    log = write_synthetic_log(tmp_path / "log.parquet", 40_000, 1_000, 500, num_topics=20, seed=3)
    config = PipelineConfig(interactions=str(log.path), user_col="user_id", item_col="item_id", time_col="ts",
                            split="last-n", last_n=2, epochs=10, batch_size=512, patience=0, embedding_dim=32,
                            ks=(10, 100))  # fmt: skip
    test = train(config, progress=False, say=lambda line: None).results["test"]
    assert test["model/recall@100"] > 1.2 * test["popularity/recall@100"]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_items must be a positive int, got 0"):
        write_synthetic_log(tmp_path / "x.parquet", 10, 10, 0)
    with pytest.raises(ValueError, match=r"explore must lie in \[0, 1\], got 1.5"):
        write_synthetic_log(tmp_path / "x.parquet", 10, 10, 10, explore=1.5)
    with pytest.raises(ValueError, match="popularity_exponent must be a finite number >= 0, got -1"):
        write_synthetic_log(tmp_path / "x.parquet", 10, 10, 10, popularity_exponent=-1)
    assert not (tmp_path / "x.parquet").exists()
