"""Data sets for retrieval: generated interactions (:mod:`twotower.data.synthetic`)."""

from twotower.data.synthetic import SyntheticInteractions, make_synthetic_interactions

__all__ = ["SyntheticInteractions", "make_synthetic_interactions"]
