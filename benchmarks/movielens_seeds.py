"""The MovieLens 100K reference workload over several seeds, next to the TFRS tutorial's published numbers.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/movielens_seeds.py [--seeds 0 1 2 3 4] [--precision bf16]

Each seed changes the 80/20 split, the initialisation and the shuffling. Prints the mean and the standard
deviation of test top-K accuracy (TFRS's factorized metric) and of Recall@K / NDCG@K (per user, seen items
excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from twotower.data.movielens import load_movielens
from twotower.workload import PUBLISHED, WorkloadConfig, train_and_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0..4)")
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32", help="the loss's products")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_movielens("100k", data_dir=args.data_dir)
    runs = []
    for seed in args.seeds:
        started = time.perf_counter()
        results = train_and_evaluate(
            WorkloadConfig(seed=seed, precision=args.precision), data=data, progress=False, say=lambda line: None
        ).results
        runs.append(results["test"])
        top100 = results["test"]["factorized_top_k/top_100_categorical_accuracy"]
        print(f"seed {seed}: top-100 {top100:.4f} ({time.perf_counter() - started:.1f}s)")

    def row(name: str, key: str, published: float | None = None) -> None:
        values = [run[key] for run in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        reference = f"{published:>12.4f}" if published is not None else f"{'':>12}"
        print(
            f"{name:<24}{statistics.mean(values):>10.4f}{spread:>10.4f}{min(values):>10.4f}{max(values):>10.4f}{reference}"
        )

    print(f"\nprecision {args.precision}")
    print(f"\n{len(runs)} seeds{'':<16}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}{'TFRS':>12}")
    for k, published in PUBLISHED.items():
        row(f"top-{k} accuracy", f"factorized_top_k/top_{k}_categorical_accuracy", published)
    for k in (10, 50, 100):
        row(f"Recall@{k} (seen excl.)", f"model/recall@{k}")
        row(f"NDCG@{k} (seen excl.)", f"model/ndcg@{k}")


if __name__ == "__main__":
    main()
