"""Child process of tests/test_files.py: saves runs in a loop into one directory until it is killed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from twotower.data.movielens import Vocabulary
from twotower.workload import RECALL_KS, BasicRetrievalModel, PreparedData, WorkloadConfig, save_run


def variant(seed: int) -> tuple[BasicRetrievalModel, PreparedData, dict[str, object], WorkloadConfig]:
    """A small run whose weights and config are determined by ``seed``."""
    torch.manual_seed(seed)
    users = Vocabulary([f"u{i}" for i in range(50)])
    titles = Vocabulary([f"title {i}" for i in range(80)])
    model = BasicRetrievalModel(users, titles, embedding_dim=8)
    rng = np.random.default_rng(seed)
    rows = [torch.as_tensor(rng.integers(1, n, size=200)) for n in (len(users), len(titles))] * 2
    prepared = PreparedData(users, titles, *rows)
    test = {f"corpus/{name}@{k}": 0.1 for k in RECALL_KS for name in ("recall", "ndcg")}
    results: dict[str, object] = {"history": [{"epoch": 1.0, "loss": 1.0}], "test": test}
    return model, prepared, results, WorkloadConfig(seed=seed, embedding_dim=8)


def main() -> None:
    directory = Path(sys.argv[1])
    runs = [variant(seed) for seed in (1, 2)]
    print("ready", flush=True)
    number = 0
    while True:
        model, prepared, results, config = runs[number % 2]
        print(f"start {number}", flush=True)
        save_run(directory, model, prepared, results, config)
        print(f"done {number}", flush=True)
        number += 1


if __name__ == "__main__":
    main()
