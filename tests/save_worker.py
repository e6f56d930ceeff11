"""Child process of tests/test_files.py: saves runs in a loop into one directory until it is killed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from twotower.data import Interactions
from twotower.pipeline import PipelineConfig, TrainedModel, build_model, save_run
from twotower.pipeline.training import prepare


def variant(seed: int) -> TrainedModel:
    """A small untrained pipeline run whose log, weights and config are determined by ``seed``."""
    rng = np.random.default_rng(seed)
    table = pa.table(
        {"user": [f"u{u}" for u in rng.integers(0, 50, 400)], "item": [f"title {i}" for i in rng.integers(0, 80, 400)]}
    )
    config = PipelineConfig(user_col="user", item_col="item", split="random", validation_fraction=0.0, embedding_dim=8,
                            seed=seed)  # fmt: skip
    interactions = Interactions.from_arrow(table, "user", "item")
    prepared = prepare(config, interactions)
    model = build_model(config, prepared)
    test = {f"model/{name}@{k}": 0.1 for k in config.ks for name in ("recall", "ndcg")}
    return TrainedModel(config, interactions, prepared, model, [{"epoch": 1.0, "loss": 1.0}], 1, {"test": test})


def main() -> None:
    directory = Path(sys.argv[1])
    runs = [variant(seed) for seed in (1, 2)]
    print("ready", flush=True)
    number = 0
    while True:
        print(f"start {number}", flush=True)
        save_run(directory, runs[number % 2], overwrite=True)
        print(f"done {number}", flush=True)
        number += 1


if __name__ == "__main__":
    main()
