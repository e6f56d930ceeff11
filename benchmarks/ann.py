"""Approximate search on a realistic corpus: FAISS configurations against exact search, side by side.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/ann.py [--size 1000000]

Random vectors have no cluster structure and make every approximate index look bad. As TFRS's efficient-serving
tutorial does, the corpus is built from trained embeddings: the MovieLens 100K reference model is trained, and
its 1,664 title embeddings are enlarged to ``--size`` rows by small Gaussian perturbations. Queries are the
trained user embeddings. For each index the table shows the build time, queries/s, and recall@10 and
recall@100 against the exact top-k.
"""

from __future__ import annotations

import argparse
import time

import torch

from twotower.indexes import BruteForce, Faiss, TopK, recall_against_exact
from twotower.workload import WorkloadConfig, train_and_evaluate

CONFIGS = [
    ("IVF1024,Flat nprobe=32", "IVF1024,Flat", {"nprobe": 32}),
    ("IVF4096,Flat nprobe=16", "IVF4096,Flat", {"nprobe": 16}),
    ("IVF4096,Flat nprobe=64", "IVF4096,Flat", {"nprobe": 64}),
    ("IVF4096,PQ16x8 nprobe=64", "IVF4096,PQ16x8", {"nprobe": 64}),
    ("HNSW32 efSearch=512", "HNSW32", {"ef_search": 512}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="corpus rows (default 1,000,000)")
    parser.add_argument("--noise", type=float, default=0.1, help="perturbation, relative to embedding scale (0.1)")
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch/FAISS threads (default 2)")
    parser.add_argument("--skip", nargs="*", default=[], help="configuration names to skip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    model, _, _ = train_and_evaluate(WorkloadConfig(), data_dir=args.data_dir, progress=False)
    with torch.no_grad():
        titles = model.movie_model.weight[1:].detach()
        queries = model.user_model.weight[1:].detach()
    generator = torch.Generator().manual_seed(0)
    scale = titles.std() * args.noise
    base = titles[torch.randint(0, titles.shape[0], (args.size,), generator=generator)]
    corpus = (base + scale * torch.randn(base.shape, generator=generator)).contiguous()
    print(f"corpus {args.size:,} x {corpus.shape[1]} (trained title embeddings + noise), {queries.shape[0]} queries")
    started = time.perf_counter()
    exact = BruteForce(k=100).index(corpus)
    exact_build = time.perf_counter() - started
    rows: list[tuple[str, float, float, float, float]] = []
    _, _, exact_rate = recall_against_exact(exact, exact, queries, k=100)
    rows.append(("exact (BruteForce)", exact_build, exact_rate, 1.0, 1.0))
    for name, factory, options in CONFIGS:
        if name in args.skip:
            continue
        started = time.perf_counter()
        index: TopK = Faiss(factory, k=100, **options).index(corpus)
        build = time.perf_counter() - started
        recall_10, _, _ = recall_against_exact(index, exact, queries, k=10)
        recall_100, rate, _ = recall_against_exact(index, exact, queries, k=100)
        rows.append((name, build, rate, recall_10, recall_100))
    print(f"\n{'index':<28}{'build s':>9}{'queries/s':>12}{'vs exact':>10}{'recall@10':>11}{'recall@100':>12}")
    for name, build, rate, recall_10, recall_100 in rows:
        print(f"{name:<28}{build:>9.1f}{rate:>12,.0f}{rate / exact_rate:>10.1f}{recall_10:>11.4f}{recall_100:>12.4f}")


if __name__ == "__main__":
    main()
