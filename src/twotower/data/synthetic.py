"""A generated implicit-feedback data set with a known latent structure, for examples and tests.

Users and items get random latent vectors; each user interacts with items drawn from a softmax over
``user . item / temperature`` plus an item popularity term, so a two-tower model can learn real structure and
top-K accuracy measures something (unlike uniformly random pairs). :func:`write_synthetic_log` writes logs of
any length to Parquet in chunks (topics shared by users and items, power-law popularity and activity, times in
order), for the pipeline at scale without downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class SyntheticInteractions:
    """Interactions split into train and test.

    Attributes:
        train_users, train_items: ``[n_train]`` int64 ids of the training pairs.
        test_users, test_items: ``[n_test]`` int64 ids of the held-out pairs.
        num_users, num_items: vocabulary sizes (ids are ``0..n-1``).
    """

    train_users: torch.Tensor
    train_items: torch.Tensor
    test_users: torch.Tensor
    test_items: torch.Tensor
    num_users: int
    num_items: int


def _require_positive_ints(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def make_synthetic_interactions(
    num_users: int = 1000,
    num_items: int = 500,
    interactions_per_user: int = 40,
    latent_dim: int = 8,
    temperature: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SyntheticInteractions:
    """Generate interactions; every argument must be positive (``test_fraction`` in ``(0, 1)``).

    Returns:
        A :class:`SyntheticInteractions` with ``num_users * interactions_per_user`` pairs, shuffled and split.
    """
    _require_positive_ints(
        num_users=num_users, num_items=num_items, interactions_per_user=interactions_per_user, latent_dim=latent_dim
    )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    users = torch.randn(num_users, latent_dim, generator=generator) / latent_dim**0.5
    items = torch.randn(num_items, latent_dim, generator=generator) / latent_dim**0.5
    popularity = torch.randn(num_items, generator=generator)
    logits = (users @ items.T) / temperature + popularity
    chosen = torch.multinomial(
        torch.softmax(logits, dim=1), interactions_per_user, replacement=True, generator=generator
    )
    user_ids = torch.arange(num_users).repeat_interleave(interactions_per_user)
    item_ids = chosen.reshape(-1)
    order = torch.randperm(user_ids.shape[0], generator=generator)
    user_ids, item_ids = user_ids[order], item_ids[order]
    num_test = max(1, round(test_fraction * user_ids.shape[0]))
    return SyntheticInteractions(
        train_users=user_ids[num_test:],
        train_items=item_ids[num_test:],
        test_users=user_ids[:num_test],
        test_items=item_ids[:num_test],
        num_users=num_users,
        num_items=num_items,
    )


@dataclass(frozen=True)
class SyntheticLog:
    """A generated log written to Parquet, and the latent structure it was drawn from.

    Attributes:
        path: the Parquet file (columns ``user_id``, ``item_id``, ``ts``: ``int64``, rows in time order).
        item_topics: ``[num_items]`` each item's topic.
        user_topics: ``[num_users, favourites]`` each user's favourite topics (an interaction picks one of them,
            else, with probability ``explore``, any topic).
    """

    path: Path
    item_topics: np.ndarray
    user_topics: np.ndarray


def write_synthetic_log(
    path: str | os.PathLike[str],
    num_rows: int,
    num_users: int,
    num_items: int,
    *,
    num_topics: int = 64,
    favourites: int = 3,
    explore: float = 0.2,
    popularity_exponent: float = 0.9,
    activity_exponent: float = 0.5,
    start: int = 1_600_000_000,
    days: int = 365,
    chunk_rows: int = 2_000_000,
    seed: int = 0,
) -> SyntheticLog:
    """Write a large, learnable interaction log to Parquet in chunks (one row group each), never holding it whole.

    Each item belongs to one of ``num_topics`` topics; each user has ``favourites`` favourite topics. A row's user
    is drawn by activity (``1 / rank ** activity_exponent`` over shuffled users), its topic among the user's
    favourites (or, with probability ``explore``, uniformly), and its item within the topic by popularity (``1 /
    rank ** popularity_exponent`` over shuffled items, so popularity is a power law overall too). Users who share
    topics share items: a two-tower model learns the structure and beats popularity. Times grow from ``start``
    over ``days``. The file is written beside ``path`` and renamed into place when complete.

    Returns:
        the path and the latent structure (:class:`SyntheticLog`).
    """
    _require_positive_ints(num_rows=num_rows, num_users=num_users, num_items=num_items, num_topics=num_topics,
                           favourites=favourites, chunk_rows=chunk_rows, days=days)  # fmt: skip
    if not 0 <= explore <= 1:
        raise ValueError(f"explore must lie in [0, 1], got {explore}")
    for name, exponent in (("popularity_exponent", popularity_exponent), ("activity_exponent", activity_exponent)):
        if not 0 <= exponent < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {exponent}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    item_topics = rng.integers(0, num_topics, num_items)
    user_topics = rng.integers(0, num_topics, (num_users, favourites))
    item_weight = np.empty(num_items)
    item_weight[rng.permutation(num_items)] = 1.0 / np.arange(1, num_items + 1) ** popularity_exponent
    # Items sorted by topic, with the popularity cumulated within each topic: an item of topic t is found by
    # bisecting a uniform draw scaled to that topic's segment.
    by_topic = np.argsort(item_topics, kind="stable")
    cumulated = np.cumsum(item_weight[by_topic])
    ends = np.searchsorted(item_topics[by_topic], np.arange(num_topics), side="right")
    segment_end = cumulated[np.maximum(ends - 1, 0)] * (ends > 0)
    segment_start = np.concatenate(([0.0], segment_end[:-1]))
    empty = segment_end <= segment_start  # a topic without items: its rows take any item
    user_cdf = np.empty(num_users)
    user_cdf[rng.permutation(num_users)] = 1.0 / np.arange(1, num_users + 1) ** activity_exponent
    user_cdf = np.cumsum(user_cdf)
    user_cdf /= user_cdf[-1]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("ts", pa.int64())])
    seconds = days * 86_400
    try:
        with pq.ParquetWriter(partial, schema) as writer:
            for begin in range(0, num_rows, chunk_rows):
                count = min(chunk_rows, num_rows - begin)
                users = np.minimum(np.searchsorted(user_cdf, rng.random(count)), num_users - 1)
                topics = user_topics[users, rng.integers(0, favourites, count)]
                wandering = rng.random(count) < explore
                topics[wandering] = rng.integers(0, num_topics, int(wandering.sum()))
                topics[empty[topics]] = item_topics[0]  # that topic has an item
                low, high = segment_start[topics], segment_end[topics]
                draws = low + rng.random(count) * (high - low)
                # A draw rounded up to its segment's end would land in the next topic: kept in its own.
                positions = np.minimum(np.searchsorted(cumulated, draws, side="right"), ends[topics] - 1)
                items = by_topic[positions]
                times = start + (begin + np.sort(rng.integers(0, count, count))) * seconds // num_rows
                writer.write_table(pa.table({"user_id": users, "item_id": items, "ts": times}, schema=schema))
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return SyntheticLog(target, item_topics, user_topics)
