"""Splits of an interaction log, each checked against the rows chosen by hand (plain Python loops)."""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pytest

from twotower.data import Interactions, InteractionsError, split_interactions


def _log(seed: int = 0, n: int = 600, users: int = 40, with_times: bool = True, in_order: bool = False) -> Interactions:
    """``in_order``: the rows in time order, as a log written as it happened (the split then bisects)."""
    rng = np.random.default_rng(seed)
    times = 1_500_000_000 + 3_600 * rng.integers(0, 200, n)  # ties on purpose: only 200 distinct times
    columns = {
        "u": rng.integers(0, users, n),
        "i": rng.integers(0, 30, n),
        "t": np.sort(times) if in_order else times,
    }
    table = pa.table(columns if with_times else {k: v for k, v in columns.items() if k != "t"})
    return Interactions.from_arrow(table, "u", "i", time_col="t" if with_times else None)


def _covers(log: Interactions, *parts: np.ndarray) -> None:
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(log))), "the parts must be disjoint and cover every row"


@pytest.mark.parametrize("in_order", [False, True])
def test_time_split_by_quantile_puts_every_later_row_in_test(in_order: bool) -> None:
    log = _log(in_order=in_order)
    split = split_interactions(log, "time", test_fraction=0.2, validation_fraction=0.0)
    assert log.timestamps is not None
    times = log.timestamps.tolist()
    cut = sorted(times)[int(np.ceil(0.8 * (len(times) - 1)))]  # numpy's "higher" quantile, by hand
    assert sorted(split.test.tolist()) == [r for r, t in enumerate(times) if t >= cut]
    assert sorted(split.train.tolist()) == [r for r, t in enumerate(times) if t < cut]
    assert split.validation.size == 0
    when = datetime.datetime.fromtimestamp(cut, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert when in split.description
    _covers(log, split.train, split.test)


@pytest.mark.parametrize("in_order", [False, True])
def test_time_split_from_a_date_and_its_validation_cut(in_order: bool) -> None:
    log = _log(in_order=in_order)
    assert log.timestamps is not None
    times = log.timestamps.tolist()
    moment = datetime.datetime(2017, 7, 20, tzinfo=datetime.timezone.utc)
    split = split_interactions(log, "time", test_from="2017-07-20", validation_fraction=0.25)
    start = int(moment.timestamp())
    assert sorted(split.test.tolist()) == [r for r, t in enumerate(times) if t >= start]
    earlier = [t for t in times if t < start]
    validation_cut = sorted(earlier)[int(np.ceil(0.75 * (len(earlier) - 1)))]
    assert sorted(split.validation.tolist()) == [r for r, t in enumerate(times) if validation_cut <= t < start]
    assert max(times[r] for r in split.train) < validation_cut
    _covers(log, split.train, split.validation, split.test)


@pytest.mark.parametrize("count", [1, 3])
def test_last_n_takes_each_users_latest_rows(count: int) -> None:
    log = _log(seed=1)
    assert log.timestamps is not None
    users, times = log.user_codes.tolist(), log.timestamps.tolist()
    expected: list[int] = []
    for user in set(users):
        rows = sorted((r for r in range(len(users)) if users[r] == user), key=lambda r: (times[r], r))
        if len(rows) > count:  # a user needs a training row
            expected += rows[-count:]
    split = split_interactions(log, "last-n", last_n=count, validation_fraction=0.0)
    assert sorted(split.test.tolist()) == sorted(expected)
    assert "last" in split.description
    _covers(log, split.train, split.test)


def test_last_n_leaves_short_histories_in_training() -> None:
    table = pa.table({"u": ["a", "a", "a", "b"], "i": ["x", "y", "z", "x"], "t": [3, 1, 2, 5]})
    log = Interactions.from_arrow(table, "u", "i", time_col="t")
    split = split_interactions(log, "last-n", last_n=1, validation_fraction=0.0)
    assert split.test.tolist() == [0]  # a's latest (t=3); b has one row, which stays in training
    assert sorted(split.train.tolist()) == [1, 2, 3]


def test_last_n_without_times_uses_row_order() -> None:
    log = _log(with_times=False)
    split = split_interactions(log, "last-n", last_n=2, validation_fraction=0.0)
    users = log.user_codes.tolist()
    expected = []
    for user in set(users):
        rows = [r for r in range(len(users)) if users[r] == user]
        if len(rows) > 2:
            expected += rows[-2:]
    assert sorted(split.test.tolist()) == sorted(expected)
    assert "by row order" in split.description


def test_random_split_is_a_seeded_permutation() -> None:
    log = _log()
    split = split_interactions(log, "random", test_fraction=0.2, validation_fraction=0.0, seed=7)
    order = np.random.default_rng(7).permutation(len(log))
    assert split.train.tolist() == order[:480].tolist()
    assert split.test.tolist() == order[480:].tolist()
    again = split_interactions(log, "random", test_fraction=0.2, validation_fraction=0.0, seed=7)
    assert again.test.tolist() == split.test.tolist()
    other = split_interactions(log, "random", test_fraction=0.2, validation_fraction=0.0, seed=8)
    assert other.test.tolist() != split.test.tolist()


def test_random_split_cuts_validation_from_the_training_rows() -> None:
    """The validation part is a second seeded permutation (seed + 1) of the training rows, its last share."""
    log = _log()
    split = split_interactions(log, "random", test_fraction=0.2, validation_fraction=0.25, seed=7)
    first = np.random.default_rng(7).permutation(len(log))
    training = first[:480]
    second = np.random.default_rng(8).permutation(480)
    assert split.test.tolist() == first[480:].tolist()
    assert split.train.tolist() == training[second[:360]].tolist()
    assert split.validation.tolist() == training[second[360:]].tolist()
    _covers(log, split.train, split.validation, split.test)


def test_bad_splits_are_refused() -> None:
    log = _log()
    for either in (log, _log(in_order=True)):
        with pytest.raises(InteractionsError, match="leaves no test rows"):
            split_interactions(either, "time", test_from="2100-01-01")
        with pytest.raises(InteractionsError, match="leaves no training rows"):
            split_interactions(either, "time", test_from="1990-01-01")
    with pytest.raises(ValueError, match=r"test_from must be an ISO-8601 date.*got 'June'"):
        split_interactions(log, "time", test_from="June")
    with pytest.raises(ValueError, match=r"test_fraction must lie in \(0, 1\), got 1.5"):
        split_interactions(log, "random", test_fraction=1.5)
    with pytest.raises(ValueError, match="last_n must be a positive int, got 0"):
        split_interactions(log, "last-n", last_n=0)
    with pytest.raises(ValueError, match="method must be one of"):
        split_interactions(log, "stratified")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a time split needs a time column"):
        split_interactions(_log(with_times=False), "time")
    single = Interactions.from_arrow(pa.table({"u": ["a", "b"], "i": ["x", "y"]}), "u", "i")
    with pytest.raises(InteractionsError, match="the last-n split leaves no test rows"):
        split_interactions(single, "last-n")


@pytest.mark.parametrize("shape", ["spread", "clustered", "constant", "two values", "negative"])
def test_the_time_cut_is_numpys_higher_quantile(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked histogram selection equals ``np.quantile(..., method="higher")`` on the selected values, at
    every quantile, for spreads that put everything in one bin or across chunk boundaries."""
    import twotower.data.splits as splits_module
    from twotower.data import _chunks

    monkeypatch.setattr(_chunks, "CHUNK", 1_000)  # many chunks, so pieces straddle them
    rng = np.random.default_rng(11)
    n = 7_919
    values = {
        "spread": rng.integers(1_500_000_000, 1_700_000_000, n),
        "clustered": np.concatenate([rng.integers(0, 3, n - 5), [10**15] * 5]),
        "constant": np.full(n, 1_600_000_000),
        "two values": rng.choice([5, 9], n),
        "negative": rng.integers(-(10**12), 10**6, n),
    }[shape].astype(np.int64)
    within = rng.random(n) < 0.7
    for quantile in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        assert splits_module._quantile_higher(values, quantile) == int(np.quantile(values, quantile, method="higher"))
        expected = int(np.quantile(values[within], quantile, method="higher"))
        assert splits_module._quantile_higher(values, quantile, within) == expected
