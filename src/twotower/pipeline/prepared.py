"""A split log turned into what training and evaluation use: vocabularies, embedding rows, seen items, counts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower.data.interactions import Interactions, InteractionsError
from twotower.data.splits import Split
from twotower.vocabulary import Vocabulary


@dataclass(frozen=True)
class PartRows:
    """One part of the split as embedding rows: ``users [n]``, ``items [n]`` (``int64`` tensors), ``weights``,
    and the rows' codes in the log (``user_codes``, ``item_codes``: ``[n]`` numpy ``int32``), which tell apart
    users (or items) that share an OOV row.

    A user or item outside its vocabulary has a row below the vocabulary's OOV bucket count (for items: 0).
    """

    users: torch.Tensor
    items: torch.Tensor
    weights: torch.Tensor | None
    user_codes: np.ndarray
    item_codes: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])


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
    """The distinct values of ``codes`` (all in ``[0, num_codes)``), sorted: one counting pass, no sort or hash."""
    present: np.ndarray = np.flatnonzero(np.bincount(codes, minlength=num_codes))
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
    users = Vocabulary(interactions.user_ids.take(pa.array(user_codes)), num_oov_buckets=user_oov_buckets)
    if interactions.in_catalogue:
        item_values = interactions.item_ids
    else:
        item_codes = _distinct_codes(interactions.item_codes[split.train], interactions.num_items)
        item_values = interactions.item_ids.take(pa.array(item_codes))
    items = Vocabulary(item_values)
    # Each distinct id is looked up once, then gathered per row.
    user_row_of_code = users.lookup(interactions.user_ids)
    item_row_of_code = items.lookup(interactions.item_ids)
    weights = interactions.weights

    def part(rows: np.ndarray) -> PartRows:
        return PartRows(
            users=torch.from_numpy(user_row_of_code[interactions.user_codes[rows]]),
            items=torch.from_numpy(item_row_of_code[interactions.item_codes[rows]]),
            weights=None if weights is None else torch.from_numpy(weights[rows]),
            user_codes=interactions.user_codes[rows],
            item_codes=interactions.item_codes[rows],
        )

    train = part(split.train)
    if not bool((train.items > 0).any()):
        raise InteractionsError("the training rows hold no item of the vocabulary")
    counts = np.bincount(
        train.items.numpy(), weights=None if train.weights is None else train.weights.numpy(), minlength=len(items)
    ).astype(np.float64)
    counts[0] = 0.0
    # Seen items per user row, CSR, duplicates merged.
    # A sort and a neighbour comparison: numpy's hash-based unique is several times slower on tens of millions.
    pairs = np.sort(train.users.numpy().astype(np.int64) * len(items) + train.items.numpy())
    if pairs.size:
        pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
    seen_users, seen_items = pairs // len(items), pairs % len(items)
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(seen_users, minlength=len(users)), out=indptr[1:])
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
