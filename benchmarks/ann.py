"""Approximate search on realistic corpora: FAISS configurations and ScaNN against exact search, side by side.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/ann.py [--size 1000000] [--json FILE]
    TWOTOWER_DATA_DIR=../shared/data bash benchmarks/scann_env.sh python benchmarks/ann.py --scann [--json FILE]

ScaNN (TFRS's approximate search, ``tfrs.layers.factorized_top_k.ScaNN``) lives in its own environment, built by
``benchmarks/scann_env.sh``; ``--scann`` adds its rows: one tree-AH searcher per corpus as TFRS's serving
tutorial configures it (1,000 leaves, anisotropic hashing over 2-dimension blocks, exact reordering), and again
with 2,000 leaves, each timed at a sweep of leaves searched and reorder depths (per call, on the same searcher).
twotower's ``AnisotropicIVF`` (the same scheme with its own native scan) is built once per corpus with its
default partitions (2,000 here) and timed at the settings ``target_recall=0.95`` chose and at a sweep. Under each
table, the best batch and one-query q/s each library reaches at recall@100 >= 0.95.

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

Every index and setting is built first; then ``--rounds`` rounds (default 3) time every row in turn, the order
rotating each round, and the table gives each row's median.

``x exact`` divides by the faster of the two exact searches (twotower's BruteForce, FAISS's IndexFlatIP) in the
same mode; ``x Flat`` by FAISS's IndexFlatIP alone, the usual baseline of ANN benchmarks. Recall@k is the mean
fraction of each query's exact top-k that the index also returns in its top k. ``--json FILE`` writes every row
as ``{"corpus", "library", "config", "batch_qps", "one_query_qps", "recall_at_10", "recall_at_100"}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.indexes import (
    AnisotropicIVF,
    AnisotropicSearchParameters,
    BruteForce,
    Faiss,
    FaissSearchParameters,
    TopK,
    recall_at_k,
)
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
# twotower's AnisotropicIVF (ScaNN's scheme, a native scan): one build per corpus with its default partitions
# (2 sqrt(n), 2,000 here), timed at the settings target_recall=0.95 chooses (tuned on the odd-numbered users'
# embeddings, the serving-time queries a user would hold out) and at a sweep of partitions searched and reorder
# depths around both corpora's frontiers.
ANISOTROPIC_TARGET = 0.95
ANISOTROPIC_SETTINGS = [
    {"leaves_to_search": leaves, "reorder": reorder}
    for leaves in (3, 4, 5, 8, 15, 40, 120, 130, 140, 160)
    for reorder in (150, 200, 300, 400, 500)
]
# ScaNN's searcher as TFRS's efficient-serving tutorial builds it (1,000 leaves), and again with twotower's 2,000
# (with which ScaNN, too, is faster on these corpora), each timed at its own sweep of per-call settings.
SCANN_TRAINING_SAMPLE, SCANN_MAX_REORDER = 250_000, 1000
SCANN_BUILDS = {
    1000: [{"leaves_to_search": leaves, "pre_reorder_num_neighbors": reorder}
           for leaves in (25, 50, 75, 100, 150) for reorder in (250, 500, 750, 1000)],
    2000: [{"leaves_to_search": leaves, "pre_reorder_num_neighbors": reorder}
           for leaves in (10, 15, 20, 40, 80, 120, 140, 160) for reorder in (200, 300, 400, 500, 600, 1000)],
}  # fmt: skip
#: The recall@100 the summary under each table compares the libraries at.
SUMMARY_RECALL = 0.95


@dataclass
class Row:
    """One index at one setting: its two searches (``[nq, d]`` float32 queries to top-100 ids) and recalls."""

    library: str
    config: str
    build_seconds: float
    batch: Callable[[torch.Tensor], Any]
    single: Callable[[torch.Tensor], Any]
    recall_at_10: float
    recall_at_100: float
    batch_rates: list[float]
    single_rates: list[float]


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


def rates(row: Row, queries: torch.Tensor, single_queries: int) -> None:
    """One round: ``row``'s batch queries/s (all queries in one call) and one-query-per-call queries/s (the first
    ``single_queries``), appended to its lists."""
    row.batch(queries[:1])
    row.batch_rates.append(queries.shape[0] / _timed(lambda: row.batch(queries)))
    single_set = queries[:single_queries]
    single = _timed(lambda: [row.single(single_set[i : i + 1]) for i in range(single_set.shape[0])])
    row.single_rates.append(single_set.shape[0] / single)


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
    parser.add_argument("--threads", type=int, default=2, help="torch/FAISS/ScaNN threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--scann", action="store_true", help="add ScaNN's rows (run in benchmarks/scann_env.sh)")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.scann:
        try:
            import scann  # noqa: F401
        except ImportError:
            parser.error("--scann needs ScaNN: run this script through benchmarks/scann_env.sh")
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    model = train_and_evaluate(WorkloadConfig(), data_dir=args.data_dir, progress=False, say=lambda line: None).model
    with torch.no_grad():
        titles = model.item_embedding.weight[1:].detach().clone()
        queries = model.user_embedding.weight[1:].detach().clone()
    records: list[dict[str, Any]] = []
    for perturbation in args.perturbation:
        corpus = build_corpus(titles, args.size, perturbation, args.noise)
        print(
            f"\ncorpus {args.size:,} x {corpus.shape[1]} (trained title embeddings, {perturbation} perturbation), "
            f"{queries.shape[0]} queries ({args.single_queries} of them one per call), {args.threads} threads, "
            f"medians of {args.rounds} interleaved rounds"
        )
        rows = compare(corpus, queries, CONFIGS[perturbation], args, perturbation)
        records += [{"corpus": perturbation, "library": row.library, "config": row.config,
                     "batch_qps": statistics.median(row.batch_rates),
                     "one_query_qps": statistics.median(row.single_rates),
                     "recall_at_10": row.recall_at_10, "recall_at_100": row.recall_at_100} for row in rows]  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


def _scann_rows(corpus: torch.Tensor, queries: torch.Tensor, truth: dict[int, torch.Tensor], threads: int) -> list[Row]:
    """ScaNN's tree-AH searcher, one build per entry of ``SCANN_BUILDS``, at each of its settings."""
    import scann

    database = corpus.numpy()
    rows = []
    for leaves, settings in SCANN_BUILDS.items():
        started = time.perf_counter()
        builder = scann.scann_ops_pybind.builder(database, 100, "dot_product")
        searcher = (
            builder.tree(num_leaves=leaves, num_leaves_to_search=100, training_sample_size=SCANN_TRAINING_SAMPLE)
            .score_ah(2, anisotropic_quantization_threshold=0.2)
            .reorder(SCANN_MAX_REORDER)
            .build()
        )
        build_seconds = time.perf_counter() - started
        if hasattr(searcher, "set_num_threads"):
            searcher.set_num_threads(threads)
        query_array = queries.numpy()
        for setting in settings:

            def batch(q: torch.Tensor, s: dict[str, int] = setting, k: int = 100, found_by: Any = searcher) -> Any:
                found, _ = found_by.search_batched_parallel(q.numpy(), final_num_neighbors=k, **s)
                return torch.from_numpy(np.asarray(found, dtype=np.int64))

            def single(q: torch.Tensor, s: dict[str, int] = setting, found_by: Any = searcher) -> Any:
                return found_by.search(q.numpy()[0], final_num_neighbors=100, **s)

            recalls = {k: recall_at_k(batch(torch.from_numpy(query_array), k=k), truth[k]) for k in (10, 100)}
            config = (f"tree{leaves},AH2,reorder leaves_to_search={setting['leaves_to_search']} "
                      f"reorder={setting['pre_reorder_num_neighbors']}")  # fmt: skip
            rows.append(Row("scann", config, build_seconds, batch, single, recalls[10], recalls[100], [], []))
    return rows


def _anisotropic_rows(corpus: torch.Tensor, queries: torch.Tensor, truth: dict[int, torch.Tensor]) -> list[Row]:
    """twotower's AnisotropicIVF (one build, tuned for ``ANISOTROPIC_TARGET`` on the odd-numbered queries) at its
    tuned settings and at every setting of ``ANISOTROPIC_SETTINGS``."""
    started = time.perf_counter()
    index = AnisotropicIVF(k=100, target_recall=ANISOTROPIC_TARGET, tuning_queries=queries[1::2]).index(corpus)
    build_seconds = time.perf_counter() - started
    tuned = index.search_settings
    settings: list[dict[str, int | None]] = [{"leaves_to_search": tuned.leaves_to_search, "reorder": tuned.reorder}]
    rows = []
    for number, setting in enumerate(settings + [s for s in ANISOTROPIC_SETTINGS if s != settings[0]]):
        params = AnisotropicSearchParameters(**setting)
        recalls = {k: recall_at_k(index.search(queries, k=k, params=params).ids, truth[k]) for k in (10, 100)}
        search = lambda q, p=params: index.search(q, k=100, params=p)  # noqa: E731
        label = f"target_recall={ANISOTROPIC_TARGET} chose " if number == 0 else ""
        config = (f"AnisotropicIVF{index.snapshot().leaves} {label}leaves_to_search={setting['leaves_to_search']} "
                  f"reorder={setting['reorder']}")  # fmt: skip
        rows.append(Row("twotower", config, build_seconds, search, search, recalls[10], recalls[100], [], []))
    return rows


def compare(
    corpus: torch.Tensor,
    queries: torch.Tensor,
    configs: list[tuple[str, dict[str, Any], list[dict[str, int]]]],
    args: argparse.Namespace,
    perturbation: str,
) -> list[Row]:
    """Print the table for one corpus (both exact searches, every FAISS configuration, ScaNN's sweep with
    ``--scann``), timed in interleaved rounds; returns its rows."""
    rows: list[Row] = []
    truth: dict[int, torch.Tensor] = {}
    for label, build in (
        ("twotower BruteForce", lambda: BruteForce(k=100).index(corpus)),
        ("Flat (IP)", lambda: Faiss("Flat", k=100).index(corpus)),
    ):
        started = time.perf_counter()
        exact: TopK = build()
        build_seconds = time.perf_counter() - started
        found = {k: exact(queries, k=k)[1] for k in (10, 100)}
        truth = truth or found  # the first exact search is the reference; the second checks it
        search = lambda q, index=exact: index(q, k=100)  # noqa: E731
        library = "twotower" if label.startswith("twotower") else "faiss"
        rows.append(Row(library, f"exact: {label}", build_seconds, search, search,
                        recall_at_k(found[10], truth[10]), recall_at_k(found[100], truth[100]), [], []))  # fmt: skip
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
            search = lambda q, s=setting, i=index: i.search(q, k=100, params=FaissSearchParameters(**s))  # noqa: E731
            # twotower's Faiss index: FAISS's search behind twotower's interface (ids, exclusions, checks).
            rows.append(Row("faiss", name, build_seconds, search, search, recall_10, recall_100, [], []))
    rows += _anisotropic_rows(corpus, queries, truth)
    if args.scann:
        rows += _scann_rows(corpus, queries, truth, args.threads)
    for round_ in range(args.rounds):
        shift = round_ % len(rows)
        for row in rows[shift:] + rows[:shift]:
            rates(row, queries, args.single_queries)
    batch_medians = [statistics.median(row.batch_rates) for row in rows]
    single_medians = [statistics.median(row.single_rates) for row in rows]
    exact_rates = (max(batch_medians[:2]), max(single_medians[:2]))
    flat_rates = (batch_medians[1], single_medians[1])
    header = f"{'library':<9}{'index':<64}{'build s':>8}{'batch q/s':>11}{'x exact':>8}{'x Flat':>8}"
    print(header + f"{'1-query q/s':>12}{'x exact':>8}{'x Flat':>8}{'recall@10':>11}{'recall@100':>12}")
    for row, batch, single in zip(rows, batch_medians, single_medians, strict=True):
        print(
            f"{row.library:<9}{row.config:<64}{row.build_seconds:>8.1f}{batch:>11,.0f}{batch / exact_rates[0]:>8.2f}"
            f"{batch / flat_rates[0]:>8.1f}{single:>12,.0f}{single / exact_rates[1]:>8.1f}"
            f"{single / flat_rates[1]:>8.1f}{row.recall_at_10:>11.4f}{row.recall_at_100:>12.4f}"
        )
    print(f"best at recall@100 >= {SUMMARY_RECALL} ({perturbation}):")
    for mode, medians in (("batch", batch_medians), ("one query", single_medians)):
        best = {}
        for library in ("twotower", "faiss", "scann"):
            reached = [(rate, row.config) for row, rate in zip(rows, medians, strict=True)
                       if row.library == library and row.recall_at_100 >= SUMMARY_RECALL
                       and not row.config.startswith("exact")]  # fmt: skip
            if reached:
                best[library] = max(reached)
        line = "  ".join(f"{library} {rate:,.0f} q/s ({config})" for library, (rate, config) in best.items())
        ratio = (
            f"  twotower / ScaNN {best['twotower'][0] / best['scann'][0]:.2f}"
            if {"twotower", "scann"} <= set(best)
            else ""
        )
        print(f"  {mode}: {line}{ratio}")
    return rows


if __name__ == "__main__":
    main()
