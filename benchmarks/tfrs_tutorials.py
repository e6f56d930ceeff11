"""TFRS's feature tutorials (context features, deep retrieval) as our example configs, over several seeds, beside
the published numbers.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/tfrs_tutorials.py [--seeds 0 1 2 3 4]
        [--only deep_retrieval_1layer ...] [--json results.json]

Each example of ``examples/`` runs through the pipeline exactly as ``twotower train --config examples/<name>.toml``
does (the tutorials' split, fixed by ``split_seed = 42``; the seed changes the initialisation and the shuffling).
Also run: the two-layer deep model with the logQ correction, and with mixed negatives (1,024 uniform samples per
batch) and the logQ correction, to show what they add. Prints the mean, standard deviation, minimum and maximum
of the test top-100 accuracy (TFRS's ``factorized_top_k/top_100_categorical_accuracy``; for the deep models the
last of the every-5-epochs validations, as the tutorial reports) and, with ``--json``, writes every run's history.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from twotower.pipeline.config import load_config
from twotower.pipeline.training import load_interactions, train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KEY = "factorized_top_k/top_100_categorical_accuracy"
#: What the tutorials' notebooks report (test top-100 accuracy).
PUBLISHED = {
    "context_features_no_time": "about 0.2",
    "context_features": "clearly better than without",
    "deep_retrieval_1layer": "0.27",
    "deep_retrieval_2layers": "0.29",
    "deep_retrieval_2layers + logQ": "(not in TFRS)",
    "deep_retrieval_2layers + mixed, logQ": "(not in TFRS)",
}
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "context_features_no_time": ("context_features_no_time", {}),
    "context_features": ("context_features", {}),
    "deep_retrieval_1layer": ("deep_retrieval_1layer", {}),
    "deep_retrieval_2layers": ("deep_retrieval_2layers", {}),
    "deep_retrieval_2layers + logQ": ("deep_retrieval_2layers", {"logq": True}),
    "deep_retrieval_2layers + mixed, logQ": ("deep_retrieval_2layers", {"negatives": "mixed", "logq": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0..4)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    parser.add_argument("--epochs", type=int, help="override the examples' epochs (a quick look, not a reproduction)")
    parser.add_argument("--data-dir", default="", help="folder with ml-100k/ (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="write every run's results and history here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = args.only or list(RUNS)
    everything: dict[str, list[dict[str, Any]]] = {}
    interactions = None
    for name in chosen:
        example, changes = RUNS[name]
        everything[name] = []
        for seed in args.seeds:
            overrides: dict[str, Any] = {"seed": seed, **changes, "data_dir": args.data_dir}
            if args.epochs:
                overrides["epochs"] = args.epochs
            config = load_config(EXAMPLES / f"{example}.toml", overrides)
            interactions = interactions if interactions is not None else load_interactions(config)
            started = time.perf_counter()
            trained = train(config, progress=False, say=lambda line: None, interactions=interactions)
            seconds = time.perf_counter() - started
            test = trained.results["test"]
            everything[name].append({"seed": seed, "seconds": seconds, "test": test, "history": trained.history})
            print(f"{name} seed {seed}: test top-100 accuracy {test[KEY]:.4f} ({seconds:.0f}s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(everything, indent=1))
    print(f"\n{'run':<40}{'seeds':>6}{'mean':>9}{'std':>9}{'min':>9}{'max':>9}   published")
    for name, runs in everything.items():
        values = [run["test"][KEY] for run in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<40}{len(values):>6}{statistics.mean(values):>9.4f}{spread:>9.4f}{min(values):>9.4f}"
              f"{max(values):>9.4f}   {PUBLISHED[name]}")  # fmt: skip


if __name__ == "__main__":
    main()
