"""Approximate search on realistic corpora: FAISS configurations against exact search, side by side.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/ann.py [--size 1000000]

Random vectors have no cluster structure and make every approximate index look bad. The corpora are built from
the trained MovieLens 100K reference model (32-d): its 1,664 title embeddings, followed by perturbed copies of
themselves up to ``--size`` rows. Queries are the 943 trained user embeddings. Two perturbations, one table each:

* ``tutorial``: as TFRS's efficient-serving tutorial builds its corpus, each copy multiplied elementwise by
  uniform [0, 1) noise. The copies spread widely, and the true top 100 of a query come from many directions;
* ``gaussian``: small Gaussian noise (``--noise`` times the embeddings' std), ~600 tight near-copies per title,
  the cluster structure partitioning indexes are made for.

Each index is timed two ways, both on 2 threads:

* batch: all queries in one call, as an offline evaluation sends them; exact search is then a GEMM;
* one query per call, as a server receives them (the first ``--single-queries`` queries, one at a time).

``x exact`` divides by the faster of the two exact searches (twotower's BruteForce, FAISS's IndexFlatIP) in the
same mode; ``x Flat`` by FAISS's IndexFlatIP alone, the usual baseline of ANN benchmarks. Recall@k is the mean
fraction of each query's exact top-k that the index also returns in its top k.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from twotower.indexes import BruteForce, Faiss, FaissSearchParameters, TopK, recall_at_k
from twotower.workload import WorkloadConfig, train_and_evaluate

# Per corpus, (factory, build options, per-call settings): each setting is timed on the same built index.
CONFIGS: dict[str, list[tuple[str, dict[str, Any], list[dict[str, int]]]]] = {
    "tutorial": [
        ("IVF1024,Flat", {}, [{"nprobe": 32}, {"nprobe": 128}]),
        # 4-bit fast-scan codes (one per dimension) rank the probed cells cheaply; the best k_factor * k of them
        # are reranked by their exact inner products.
        ("IVF1024,PQ32x4fs,RFlat", {}, [{"nprobe": 96, "k_factor": 8}, {"nprobe": 128, "k_factor": 4},
                                        {"nprobe": 128, "k_factor": 8}]),
        ("HNSW32", {}, [{"ef_search": 128}, {"ef_search": 512}]),
    ],
    "gaussian": [
        ("IVF1024,Flat", {}, [{"nprobe": 32}]),
        ("IVF4096,Flat", {"train_size": 200_000}, [{"nprobe": 64}]),
        ("IVF1024,PQ32x4fs,RFlat", {}, [{"nprobe": 32, "k_factor": 4}]),
        ("HNSW32", {}, [{"ef_search": 512}]),
    ],
}  # fmt: skip


def build_corpus(titles: torch.Tensor, size: int, perturbation: str, noise: float) -> torch.Tensor:
    """``[size, d]``: the titles, then perturbed copies of them in order (title 0, 1, ..., 0, 1, ...)."""
    generator = torch.Generator().manual_seed(0)
    copies = size - titles.shape[0]
    base = titles.repeat(copies // titles.shape[0] + 1, 1)[:copies]
    if perturbation == "tutorial":
        perturbed = base * torch.rand(base.shape, generator=generator)
    else:
        perturbed = base + noise * titles.std() * torch.randn(base.shape, generator=generator)
    return torch.cat([titles, perturbed]).contiguous()


def rates(search: Callable[[torch.Tensor], Any], queries: torch.Tensor, single_queries: int) -> tuple[float, float]:
    """``(batch queries/s, one-query-per-call queries/s)``, each the best of two passes."""
    search(queries[:1])
    batch = min(_timed(lambda: search(queries)) for _ in range(2))
    single_set = queries[:single_queries]
    single = min(_timed(lambda: [search(single_set[i : i + 1]) for i in range(single_set.shape[0])]) for _ in range(2))
    return queries.shape[0] / batch, single_set.shape[0] / single


def _timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="corpus rows (default 1,000,000)")
    parser.add_argument("--perturbation", nargs="+", choices=["tutorial", "gaussian"], default=["tutorial", "gaussian"])
    parser.add_argument("--noise", type=float, default=0.1, help="gaussian: noise std relative to the titles' (0.1)")
    parser.add_argument("--single-queries", type=int, default=200, help="queries timed one per call (200)")
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch/FAISS threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    model = train_and_evaluate(WorkloadConfig(), data_dir=args.data_dir, progress=False, say=lambda line: None).model
    with torch.no_grad():
        titles = model.item_embedding.weight[1:].detach().clone()
        queries = model.user_embedding.weight[1:].detach().clone()
    for perturbation in args.perturbation:
        corpus = build_corpus(titles, args.size, perturbation, args.noise)
        print(
            f"\ncorpus {args.size:,} x {corpus.shape[1]} (trained title embeddings, {perturbation} perturbation), "
            f"{queries.shape[0]} queries ({args.single_queries} of them one per call), {args.threads} threads"
        )
        compare(corpus, queries, CONFIGS[perturbation], args.single_queries)


def compare(
    corpus: torch.Tensor,
    queries: torch.Tensor,
    configs: list[tuple[str, dict[str, Any], list[dict[str, int]]]],
    single_queries: int,
) -> None:
    """Print the table for one corpus: both exact searches, then every FAISS configuration."""
    rows: list[tuple[str, float, float, float, float, float]] = []
    truth: dict[int, torch.Tensor] = {}
    exact_rates = [0.0, 0.0]
    flat_rates = [0.0, 0.0]
    for label, build in (
        ("exact: twotower BruteForce", lambda: BruteForce(k=100).index(corpus)),
        ("exact: FAISS Flat (IP)", lambda: Faiss("Flat", k=100).index(corpus)),
    ):
        started = time.perf_counter()
        exact: TopK = build()
        build_seconds = time.perf_counter() - started
        found = {k: exact(queries, k=k)[1] for k in (10, 100)}
        truth = truth or found  # the first exact search is the reference; the second checks it
        batch, single = rates(lambda q, index=exact: index(q, k=100), queries, single_queries)
        exact_rates = [max(exact_rates[0], batch), max(exact_rates[1], single)]
        flat_rates = [batch, single]  # the last exact search is FAISS's
        rows.append(
            (
                label,
                build_seconds,
                batch,
                single,
                recall_at_k(found[10], truth[10]),
                recall_at_k(found[100], truth[100]),
            )
        )
    for factory, options, settings in configs:
        started = time.perf_counter()
        index = Faiss(factory, k=100, **options).index(corpus)
        build_seconds = time.perf_counter() - started
        for setting in settings:
            name = f"{factory} " + " ".join(f"{key}={value}" for key, value in setting.items())
            recall_10 = recall_at_k(index.search(queries, k=10, params=FaissSearchParameters(**setting))[1], truth[10])
            recall_100 = recall_at_k(
                index.search(queries, k=100, params=FaissSearchParameters(**setting))[1], truth[100]
            )
            batch, single = rates(
                lambda q, s=setting, i=index: i.search(q, k=100, params=FaissSearchParameters(**s)),
                queries,
                single_queries,
            )
            rows.append((name, build_seconds, batch, single, recall_10, recall_100))
        del index
    header = f"{'index':<48}{'build s':>8}{'batch q/s':>11}{'x exact':>8}{'x Flat':>8}"
    print(header + f"{'1-query q/s':>12}{'x exact':>8}{'x Flat':>8}{'recall@10':>11}{'recall@100':>12}")
    for name, build_seconds, batch, single, recall_10, recall_100 in rows:
        print(
            f"{name:<48}{build_seconds:>8.1f}{batch:>11,.0f}{batch / exact_rates[0]:>8.2f}{batch / flat_rates[0]:>8.1f}"
            f"{single:>12,.0f}{single / exact_rates[1]:>8.1f}{single / flat_rates[1]:>8.1f}"
            f"{recall_10:>11.4f}{recall_100:>12.4f}"
        )


if __name__ == "__main__":
    main()
