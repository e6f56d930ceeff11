"""Data for retrieval: your own interaction logs (:mod:`twotower.data.interactions`), their splits
(:mod:`twotower.data.splits`), MovieLens (:mod:`twotower.data.movielens`), generated interactions
(:mod:`twotower.data.synthetic`) and training batches streamed from Parquet (:mod:`twotower.data.streaming`)."""

from twotower.data.interactions import Interactions, InteractionsError, ReadReport, read_table
from twotower.data.splits import Split, split_interactions
from twotower.data.streaming import IntegerIdRows, ParquetBatches, id_rows
from twotower.data.synthetic import (
    SyntheticInteractions,
    SyntheticLog,
    make_synthetic_interactions,
    write_synthetic_log,
)

__all__ = [
    "IntegerIdRows",
    "Interactions",
    "InteractionsError",
    "ParquetBatches",
    "ReadReport",
    "Split",
    "SyntheticInteractions",
    "SyntheticLog",
    "id_rows",
    "make_synthetic_interactions",
    "read_table",
    "split_interactions",
    "write_synthetic_log",
]
