"""Vocabularies: strings to embedding rows, with an out-of-vocabulary row, as Keras's ``StringLookup``."""

from __future__ import annotations

import numpy as np

from twotower._checks import ends_in_nul, has_trailing_nul, refuse_trailing_nul


class Vocabulary:
    """String-to-index lookup with one out-of-vocabulary row, as Keras's ``StringLookup(mask_token=None)``.

    Index 0 is the OOV bucket; the known values, sorted, get 1..n. ``len(vocabulary)`` is ``n + 1``, the
    number of rows an embedding table needs.
    """

    def __init__(self, values: np.ndarray | list[str]) -> None:
        refuse_trailing_nul(values, "values")
        self.values = np.unique(np.asarray(values, dtype=str))
        if self.values.size == 0:
            raise ValueError("values must hold at least one value: a vocabulary cannot be empty")

    def __len__(self) -> int:
        return int(self.values.shape[0]) + 1

    def lookup(self, strings: np.ndarray | list[str]) -> np.ndarray:
        """``int64`` indices of ``strings``; unknown strings map to 0.

        Strings are compared as given: one ending in a NUL character (which numpy's strings would drop) is
        unknown, since no vocabulary value can end in one.
        """
        unknown = None
        if has_trailing_nul(strings):
            unknown = np.array([ends_in_nul(value) for value in strings])
        strings = np.asarray(strings, dtype=str)
        positions = np.searchsorted(self.values, strings)
        clipped = np.minimum(positions, self.values.shape[0] - 1)
        found = self.values[clipped] == strings
        if unknown is not None:
            found &= ~unknown.reshape(found.shape)
        return np.where(found, clipped + 1, 0).astype(np.int64)

    def to_list(self) -> list[str]:
        return [str(value) for value in self.values]
