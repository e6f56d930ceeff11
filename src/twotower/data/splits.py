"""Train / validation / test splits of an interaction log: a global time cut, per-user leave-last-N, or random.

A time split is what a deployed model faces (it is trained on the past and serves the future); leave-last-N keeps
every user in training; a random split is TFRS's tutorials' (80/20, seeded). The validation split, used for early
stopping, is cut from the training rows by the same method, so that it stands to training as the test split does.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from twotower.data._chunks import chunk_bounds
from twotower.data.interactions import Interactions, InteractionsError

SplitMethod = Literal["time", "random", "last-n"]
SPLIT_METHODS = ("time", "random", "last-n")


@dataclass(frozen=True)
class Split:
    """Row indices (into the log) of each part, and how they were cut.

    Attributes:
        train, validation, test: disjoint row indices covering the log (``int32`` below 2**31 rows, else
            ``int64``); ``validation`` may be empty.
        description: one line saying how the parts were cut (e.g. the time of the cut).
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    description: str


def _index_type(count: int) -> type[np.signedinteger[Any]]:
    """Row indices are ``int32`` below 2**31 rows: half the memory of ``int64`` on logs of tens of millions."""
    return np.int32 if count < 2**31 else np.int64


def _positions(mask: np.ndarray, index_type: type[np.signedinteger[Any]]) -> np.ndarray:
    """``np.flatnonzero(mask)`` as ``index_type``, without a whole-length ``int64`` temporary."""
    parts = [(np.flatnonzero(mask[start:end]) + start).astype(index_type) for start, end in chunk_bounds(mask.shape[0])]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=index_type)


#: The exact quantile is found by a histogram of this many bins, then a selection within one bin.
_QUANTILE_BINS = 1 << 16


def _quantile_higher(values: np.ndarray, quantile: float, within: np.ndarray | None = None) -> int:
    """``np.quantile(values[within], quantile, method="higher")`` for integers, exactly, without copying them.

    numpy copies the values and partitions the copy; here three chunked passes (the range, a histogram of the
    values, then the values of the one bin holding the wanted rank) leave only that bin to partition.
    """
    chunks = chunk_bounds(values.shape[0])

    def pieces() -> Iterator[np.ndarray]:
        for start, end in chunks:
            yield values[start:end] if within is None else values[start:end][within[start:end]]

    count = int(values.shape[0] if within is None else np.count_nonzero(within))
    if count == 0:
        raise ValueError("a quantile of no values")
    extremes = [(int(piece.min()), int(piece.max())) for piece in pieces() if piece.size]
    low, high = min(least for least, _ in extremes), max(most for _, most in extremes)
    # numpy's "higher": the value at sorted position ceil(quantile * (count - 1)), the index computed in float64.
    rank = int(np.ceil(np.float64(quantile) * (count - 1)))
    width = (high - low) // _QUANTILE_BINS + 1
    histogram = np.zeros(_QUANTILE_BINS, dtype=np.int64)
    for piece in pieces():
        histogram += np.bincount((piece - low) // width, minlength=_QUANTILE_BINS)
    below = np.cumsum(histogram)
    chosen = int(np.searchsorted(below, rank, side="right"))  # the bin holding sorted position ``rank``
    rank -= int(below[chosen - 1]) if chosen else 0
    start = low + chosen * width
    in_bin = np.concatenate([piece[(piece >= start) & (piece < start + width)] for piece in pieces()])
    return int(np.partition(in_bin, rank)[rank])


def _test_from(before: str) -> int:
    try:
        moment = datetime.datetime.fromisoformat(before)
    except ValueError:
        raise ValueError(f"test_from must be an ISO-8601 date or time such as 2018-06-01, got {before!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


def _describe_cut(cut: int, what: str) -> str:
    when = datetime.datetime.fromtimestamp(cut, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{what} from {when} on"


def _time_cut(
    times: np.ndarray, fraction: float, before: str | None, what: str, within: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """``[n]`` bool, the rows at or after the cut: the ``1 - fraction`` quantile of ``times[within]``, or the
    date ``before``."""
    cut = _test_from(before) if before is not None else _quantile_higher(times, 1.0 - fraction, within)
    return times >= cut, _describe_cut(cut, what)


def _in_time_order(times: np.ndarray) -> bool:
    """Whether ``times`` never decreases (a log written as it happened), checked chunk by chunk."""
    return all(
        bool((times[max(start - 1, 0) + 1 : end] >= times[max(start - 1, 0) : end - 1]).all())
        for start, end in chunk_bounds(times.shape[0])
    )


def _sorted_cut(times: np.ndarray, end: int, fraction: float, before: str | None, what: str) -> tuple[int, str]:
    """:func:`_time_cut` of ``times[:end]`` when they never decrease: the first row at or after the cut, found by
    bisection (the quantile of sorted values is the value at its rank)."""
    rank = int(np.ceil(np.float64(1.0 - fraction) * (end - 1)))  # as _quantile_higher's
    cut = _test_from(before) if before is not None else int(times[rank])
    return int(np.searchsorted(times[:end], cut, side="left")), _describe_cut(cut, what)


def _split_in_time_order(
    times: np.ndarray, test_fraction: float, validation_fraction: float, test_from: str | None
) -> Split:
    """The time split of a log whose times never decrease: every part a range of rows, no mask or sort."""
    count = times.shape[0]
    index_type = _index_type(count)
    boundary, description = _sorted_cut(times, count, test_fraction, test_from, "test")
    if boundary == count:
        raise InteractionsError(f"the time split leaves no test rows: {description}")
    if boundary == 0:
        raise InteractionsError(f"the time split leaves no training rows: {description}")
    train_end = boundary
    if validation_fraction > 0:
        validation_start, text = _sorted_cut(times, boundary, validation_fraction, None, "validation")
        if 0 < validation_start < boundary:
            train_end, description = validation_start, f"{description}; {text}"
    return Split(
        train=np.arange(train_end, dtype=index_type),
        validation=np.arange(train_end, boundary, dtype=index_type),
        test=np.arange(boundary, count, dtype=index_type),
        description=description,
    )


def _last_n_per_user(users: np.ndarray, times: np.ndarray | None, count: int) -> np.ndarray:
    """``[n]`` bool: each user's last ``count`` rows by time (ties and logs without times: by row order), for users
    with more than ``count`` rows (a user needs at least one training row)."""
    rows = np.arange(users.shape[0])
    order = np.lexsort((rows, users)) if times is None else np.lexsort((rows, times, users))
    sorted_users = users[order]
    # Position from the end of each user's run of rows.
    boundaries = np.flatnonzero(np.diff(sorted_users)) + 1
    ends = np.append(boundaries, sorted_users.shape[0])
    starts = np.insert(boundaries, 0, 0)
    lengths = ends - starts
    from_end = np.repeat(ends, lengths) - np.arange(sorted_users.shape[0])  # 1 for the last row
    chosen = (from_end <= count) & (np.repeat(lengths, lengths) > count)
    mask = np.zeros(users.shape[0], dtype=bool)
    mask[order[chosen]] = True
    return mask


def split_interactions(
    interactions: Interactions,
    method: SplitMethod = "time",
    test_fraction: float = 0.1,
    validation_fraction: float = 0.1,
    test_from: str | None = None,
    last_n: int = 1,
    seed: int = 0,
) -> Split:
    """Split a log into train, validation and test rows.

    Args:
        interactions: the log.
        method: ``"time"``: every row at or after a global cut (the ``1 - test_fraction`` quantile of the times,
            or ``test_from``) is test; ``"last-n"``: each user's ``last_n`` latest rows are test (users with
            ``last_n`` rows or fewer stay wholly in training); ``"random"``: a seeded ``test_fraction`` of rows.
        test_fraction: the share of rows for test (``time`` and ``random``), in ``(0, 1)``.
        validation_fraction: the share of the training rows cut off, by the same method, for validation; 0 for
            none. With ``last-n`` any value > 0 takes each user's ``last_n`` latest training rows.
        test_from: with ``time``, the first test moment as an ISO-8601 date or time (UTC unless it says).
        last_n: with ``last-n``, how many rows per user.
        seed: the seed of ``random``.

    Raises:
        ValueError: a bad argument, or a method that needs times on a log without them.
        InteractionsError: the split leaves no training or no test rows.
    """
    if method not in SPLIT_METHODS:
        raise ValueError(f"method must be one of {SPLIT_METHODS}, got {method!r}")
    for name, value, low in (("test_fraction", test_fraction, 0.0), ("validation_fraction", validation_fraction, -1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < 1:
            bounds = "(0, 1)" if low == 0.0 else "[0, 1)"
            raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 1:
        raise ValueError(f"last_n must be a positive int, got {last_n!r}")
    times = interactions.timestamps
    if method == "time" and times is None:
        raise ValueError("a time split needs a time column (time_col / --time-col); use --split random or last-n")
    if method == "time" and times is not None and _in_time_order(times):
        return _split_in_time_order(times, test_fraction, validation_fraction, test_from)
    index_type = _index_type(len(interactions))

    def cut(part: np.ndarray | None, fraction: float, what: str, salt: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Split ``part`` (row indices; ``None``: the whole log) into (kept, cut off, description)."""

        def of(values: np.ndarray) -> np.ndarray:
            return values if part is None else values[part]

        if method == "time":
            assert times is not None
            within = None
            if part is not None:
                within = np.zeros(times.shape[0], dtype=bool)
                within[part] = True
            after, text = _time_cut(times, fraction, test_from if salt == 0 else None, what, within)
            if part is not None:
                after = after[part]
        elif method == "last-n":
            after = _last_n_per_user(of(interactions.user_codes), None if times is None else of(times), last_n)
            text = f"{what}: each user's last {last_n} interaction(s)" + ("" if times is not None else " by row order")
        else:
            # As MovieLens.split and the TFRS tutorials: a seeded permutation, the first share kept.
            count = len(interactions) if part is None else part.shape[0]
            order = np.random.default_rng(seed + salt).permutation(count).astype(index_type)
            kept = round((1.0 - fraction) * count)
            text = f"{what}: a random {fraction:.0%} (seed {seed})"
            if part is not None:  # positions within the part, as rows of the log
                return part[order[:kept]], part[order[kept:]], text
            return order[:kept], order[kept:], text
        if part is None:
            return _positions(~after, index_type), _positions(after, index_type), text
        return part[~after], part[after], text

    train, test, description = cut(None, test_fraction, "test", 0)
    if test.shape[0] == 0:
        raise InteractionsError(f"the {method} split leaves no test rows: {description}")
    if train.shape[0] == 0:
        raise InteractionsError(f"the {method} split leaves no training rows: {description}")
    validation = np.zeros(0, dtype=index_type)
    if validation_fraction > 0:
        kept, validation, text = cut(train, validation_fraction, "validation", 1)
        if kept.shape[0] and validation.shape[0]:
            train, description = kept, f"{description}; {text}"
        else:
            validation = np.zeros(0, dtype=index_type)
    return Split(train=train, validation=validation, test=test, description=description)
