"""A split log turned into what training and evaluation use: vocabularies, embedding rows, seen items, counts."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower.data._chunks import chunk_bounds, for_each_chunk
from twotower.data.interactions import Interactions, InteractionsError
from twotower.data.splits import Split
from twotower.vocabulary import Vocabulary


@dataclass(frozen=True)
class PartRows:
    """One part of the split: where its rows lie in the log (``log_rows``), from which its embedding rows
    (:attr:`users`, :attr:`items`) and ids (:attr:`user_codes`, :attr:`item_codes`: they tell apart users or
    items that share an OOV row) are gathered when asked for, not held: on a log of tens of millions of rows that
    would be 8 bytes per row for every part, kept for as long as the run.

    A user or item outside its vocabulary has a row below the vocabulary's OOV bucket count (for items: 0).
    """

    log_rows: np.ndarray
    log: Interactions = field(repr=False)
    user_row_of_code: np.ndarray = field(repr=False)
    item_row_of_code: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return int(self.log_rows.shape[0])

    @property
    def users(self) -> torch.Tensor:
        """``[n]`` ``int32``: each row's user embedding row (gathered on every access: keep it if reused)."""
        return torch.from_numpy(_rows_of(self.user_row_of_code, self.log.user_codes, self.log_rows))

    @property
    def items(self) -> torch.Tensor:
        """``[n]`` ``int32``: each row's item embedding row (gathered on every access: keep it if reused)."""
        return torch.from_numpy(_rows_of(self.item_row_of_code, self.log.item_codes, self.log_rows))

    @property
    def weights(self) -> torch.Tensor | None:
        """``[n]`` ``float32`` weights, or ``None`` for a log without them."""
        weights = self.log.weights
        return None if weights is None else torch.from_numpy(weights[self.log_rows])

    @property
    def user_codes(self) -> np.ndarray:
        """``[n]`` ``int32``: each row's code into the log's ``user_ids``."""
        codes: np.ndarray = self.log.user_codes[self.log_rows]
        return codes

    @property
    def item_codes(self) -> np.ndarray:
        """``[n]`` ``int32``: each row's code into the log's ``item_ids``."""
        codes: np.ndarray = self.log.item_codes[self.log_rows]
        return codes


@dataclass(frozen=True)
class PreparedInteractions:
    """Vocabularies fitted on the training rows and every part of the split as embedding rows.

    Attributes:
        users: the user vocabulary (training users, or all with ``user_vocabulary="all"``).
        items: the item vocabulary: the catalogue's items, or the training rows' items; one OOV row (0).
        train, validation, test: the parts as rows.
        item_counts: ``[len(items)]`` ``float64`` training interactions per item row (weighted).
        seen_indptr, seen_items: the training item rows of each user row, CSR (``seen_items[indptr[u]:
            indptr[u + 1]]``), for leaving them out of that user's rankings.
        split: how the parts were cut.
        item_titles: display titles by item id.
    """

    users: Vocabulary
    items: Vocabulary
    train: PartRows
    validation: PartRows
    test: PartRows
    item_counts: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray
    split: Split
    item_titles: dict[str, str]

    def seen_of(self, user_rows: np.ndarray) -> list[np.ndarray]:
        """The training item rows of each of ``user_rows``."""
        return [self.seen_items[self.seen_indptr[row] : self.seen_indptr[row + 1]] for row in user_rows.tolist()]

    def popularity(self) -> list[tuple[str, float]]:
        """``(item id, training count)``, most popular first (ties: by id order), items with no count left out."""
        order = np.lexsort((np.arange(self.item_counts.shape[0]), -self.item_counts))
        order = order[self.item_counts[order] > 0]
        ids = self.items.arrow_values
        return [(str(ids[int(row) - 1]), float(self.item_counts[row])) for row in order if row >= 1]


def _distinct_codes(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """The distinct values of ``codes`` (all in ``[0, num_codes)``), sorted: one marking pass, no sort or hash."""
    marked = np.zeros(num_codes, dtype=bool)
    marked[codes] = True  # a scatter of one byte: several times faster than bincount's counting
    present: np.ndarray = np.flatnonzero(marked)
    return present


def prepare_interactions(
    interactions: Interactions, split: Split, user_vocabulary: str = "train", user_oov_buckets: int = 1
) -> PreparedInteractions:
    """Fit the vocabularies on ``split.train`` (users: on every row with ``user_vocabulary="all"``) and express
    every part as embedding rows.

    Raises:
        InteractionsError: the training rows hold no item of the vocabulary.
    """
    user_rows = slice(None) if user_vocabulary == "all" else split.train
    user_codes = _distinct_codes(interactions.user_codes[user_rows], interactions.num_users)
    if interactions.in_catalogue:
        item_codes = np.arange(interactions.num_items)
    else:
        item_codes = _distinct_codes(interactions.item_codes[split.train], interactions.num_items)
    # Each distinct id is looked up once, then gathered per row.
    users, user_row_of_code = _fit_vocabulary(interactions.user_ids, user_codes, user_oov_buckets)
    items, item_row_of_code = _fit_vocabulary(interactions.item_ids, item_codes, 1)

    def part(rows: np.ndarray) -> PartRows:
        return PartRows(rows, interactions, user_row_of_code, item_row_of_code)

    train = part(split.train)
    counts, indptr, seen_items = _counts_and_seen(train, len(users), len(items))
    if not bool((seen_items > 0).any()):
        raise InteractionsError("the training rows hold no item of the vocabulary")
    return PreparedInteractions(
        users=users,
        items=items,
        train=train,
        validation=part(split.validation),
        test=part(split.test),
        item_counts=counts,
        seen_indptr=indptr,
        seen_items=seen_items,
        split=split,
        item_titles=interactions.item_titles,
    )


def _rows_of(row_of_code: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``row_of_code[codes[rows]]``, chunk by chunk on a few threads: no whole-length temporary of the codes."""
    out = np.empty(rows.shape[0], dtype=row_of_code.dtype)

    def gather(start: int, end: int) -> None:
        np.take(row_of_code, codes[rows[start:end]], out=out[start:end])

    for_each_chunk(rows.shape[0], gather)
    return out


def _fit_vocabulary(ids: pa.Array, codes: np.ndarray, num_oov_buckets: int) -> tuple[Vocabulary, np.ndarray]:
    """The vocabulary of ``ids[codes]`` and ``[len(ids)]`` ``int32``: the vocabulary row of every id.

    The log's ids are sorted as text (see :class:`~twotower.data.Interactions`), so the vocabulary's values are
    ``ids[codes]`` in that order and code ``codes[j]`` has row ``num_oov_buckets + j``: no hash lookup. The other
    ids get their OOV bucket; a vocabulary in any other order is looked up.
    """
    values = ids.take(pa.array(codes))
    vocabulary = Vocabulary(values, num_oov_buckets=num_oov_buckets)
    if not vocabulary.arrow_values.equals(values):
        return vocabulary, vocabulary.lookup(ids).astype(np.int32)
    rows = np.zeros(len(ids), dtype=np.int32)
    rows[codes] = np.arange(vocabulary.num_oov_buckets, len(vocabulary), dtype=np.int32)
    if vocabulary.num_oov_buckets > 1 and codes.shape[0] < len(ids):
        others = np.ones(len(ids), dtype=bool)
        others[codes] = False
        rows[others] = vocabulary.lookup(ids.filter(pa.array(others)))
    return vocabulary, rows


def _counts_and_seen(train: PartRows, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item counts [num_items] float64, indptr [num_users + 1] int64, seen item rows int32)``: the training
    interactions per item row (weighted; the OOV row's set to 0) and each user row's distinct item rows, CSR,
    ascending.

    One ``int64`` key ``user * num_items + item`` per training row, sorted in place (numpy's vectorised sort; its
    hash-based unique is several times slower on tens of millions of rows) and deduplicated in place, so that the
    pass holds 8 bytes per training row and no more: neither the rows' users nor their items are kept beside it.
    """
    rows, log, weights = train.log_rows, train.log, train.log.weights
    keys = np.empty(rows.shape[0], dtype=np.int64)
    counts = np.zeros(num_items, dtype=np.float64)
    adding = threading.Lock()

    def key(start: int, end: int) -> None:
        chosen = rows[start:end]
        items = train.item_row_of_code[log.item_codes[chosen]]
        partial = np.bincount(items, None if weights is None else weights[chosen], minlength=num_items)
        with adding:
            np.add(counts, partial, out=counts)
        part = keys[start:end]
        np.multiply(train.user_row_of_code[log.user_codes[chosen]], num_items, out=part, dtype=np.int64)
        part += items

    for_each_chunk(rows.shape[0], key)
    counts[0] = 0.0
    keys.sort()
    # In place: each chunk's first occurrences are moved to the front (never past where the chunk is read).
    kept = 0
    for start, end in chunk_bounds(keys.shape[0]):
        piece = keys[start:end]
        first = np.empty(piece.shape[0], dtype=bool)
        first[0] = start == 0 or piece[0] != keys[start - 1]
        np.not_equal(piece[1:], piece[:-1], out=first[1:])
        distinct = piece[first]
        keys[kept : kept + distinct.shape[0]] = distinct
        kept += distinct.shape[0]
    pairs = keys[:kept]
    # User row u's pairs are the keys in [u * num_items, (u + 1) * num_items): found by bisection, not division.
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    indptr[1:] = np.searchsorted(pairs, np.arange(1, num_users + 1, dtype=np.int64) * num_items)
    seen = np.empty(kept, dtype=np.int32)

    def item_of(start: int, end: int) -> None:
        np.remainder(pairs[start:end], num_items, out=seen[start:end], casting="unsafe")

    for_each_chunk(kept, item_of)
    return counts, indptr, seen


def describe_cold(prepared: PreparedInteractions, part: PartRows, name: str = "test") -> dict[str, int]:
    """Counts of ``part``'s users and rows that training cannot have learned: users outside the vocabulary
    (cold users) and rows whose item is outside it or never occurs in training (cold items)."""
    cold_user = part.users.numpy() < prepared.users.num_oov_buckets
    item_rows = part.items.numpy()
    cold_item = (item_rows == 0) | (prepared.item_counts[item_rows] == 0)

    def distinct(codes: np.ndarray) -> int:
        return int(pc.count_distinct(pa.array(codes)).as_py()) if codes.size else 0

    return {
        f"{name}_users": distinct(part.user_codes),
        f"{name}_cold_users": distinct(part.user_codes[cold_user]),
        f"{name}_rows": len(part),
        f"{name}_cold_user_rows": int(cold_user.sum()),
        f"{name}_items": distinct(part.item_codes),
        f"{name}_cold_items": distinct(part.item_codes[cold_item]),
        f"{name}_cold_item_rows": int(cold_item.sum()),
    }
