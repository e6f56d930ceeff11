"""Id-only against id + features on MovieLens latest-small with a time split: the own-data path.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/own_data_features.py [--seeds 0 1 2 3 4] [--json F]

Both models come from ``examples/movielens_latest_small_features.toml`` (the time split: the last 10% of ratings
for test, the 10% before them for validation and early stopping): the id model without its features and dense
layer (the pipeline's defaults: 64-d id embeddings, the logQ correction), the featurized one with user id + rating
time for queries and movie id + title words + genres for candidates, fitted on the training rows only. Each seed
changes the initialisation and shuffling (the split is fixed by time). Prints the test Recall@100 (each user's
training items excluded) of the users training saw, split by how many training interactions they have (1-4:
where features should matter most; 5 or more), and of the cold users (none in training), whom the id model
leaves to popularity and the featurized one can rank itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.pipeline.config import load_config
from twotower.pipeline.evaluation import evaluate_part
from twotower.pipeline.prepared import PartRows
from twotower.pipeline.training import load_interactions, train

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "movielens_latest_small_features.toml"


def _subset(part: PartRows, keep: np.ndarray) -> PartRows:
    return PartRows(part.log_rows[keep], part.log, part.user_row_of_code, part.item_row_of_code)


def measure(config: Any, interactions: Any) -> dict[str, float]:
    trained = train(config, progress=False, say=lambda line: None, interactions=interactions)
    prepared, test = trained.prepared, trained.prepared.test
    users = test.users.numpy()
    history = np.diff(prepared.seen_indptr)[users]  # distinct training items of each test row's user
    buckets = prepared.users.num_oov_buckets
    found: dict[str, float] = {"epochs kept": float(trained.best_epoch)}
    for name, keep in (("1-4 training items", (users >= buckets) & (history < 5)),
                       ("5+ training items", (users >= buckets) & (history >= 5))):  # fmt: skip
        if keep.any():
            scores = evaluate_part(trained.model, prepared, _subset(test, keep), ks=(100,), top_k_accuracy=False)
            found[f"{name}: users"] = float(scores["model/users"])
            found[f"{name}: Recall@100"] = float(scores["model/recall@100"])
            found[f"{name}: popularity"] = float(scores["popularity/recall@100"])
    overall = trained.results["test"]
    found["all seen users: Recall@100"] = float(overall["model/recall@100"])
    if "cold_users/recall@100" in overall:
        found["cold users: users"] = float(overall["cold_users/users"])
        found["cold users: popularity"] = float(overall["cold_users/recall@100"])
        if "cold_users_model/recall@100" in overall:
            found["cold users: model"] = float(overall["cold_users_model/recall@100"])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0..4)")
    parser.add_argument("--data-dir", default="", help="folder with ml-latest-small/ (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="write every run's numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    featurized = load_config(EXAMPLE, {"data_dir": args.data_dir})
    models = {
        "id only": featurized.replace(query_features=(), candidate_features=(), layer_sizes=()),
        "id + features": featurized,
    }
    interactions = load_interactions(featurized)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for seed in args.seeds:
        for name, config in models.items():  # interleaved: both models under the same machine load
            runs[name].append(measure(config.replace(seed=seed), interactions))
            print(f"seed {seed} {name}: {runs[name][-1]}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(runs, indent=1))
    keys = list(dict.fromkeys(key for found in runs.values() for run in found for key in run))
    print(f"\n{'':<34}" + "".join(f"{name:>22}" for name in models))
    for key in keys:
        cells = []
        for name in models:
            values = [run[key] for run in runs[name] if key in run]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):>13.4f} ± {spread:.4f}" if values else f"{'-':>22}")
        print(f"{key:<34}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
