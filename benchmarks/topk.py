"""Exact top-K search throughput: twotower against the GEMM limit, FAISS and a naive torch baseline.

Every method runs in its own subprocess (same seeded data, same thread count) so that its peak memory is its
own; the table is printed by this one run, side by side.

    python benchmarks/topk.py                      # N = 1M, D = 64, Q = 4096, k = 100, 2 threads, + 10M streaming
    python benchmarks/topk.py --n 200000 --skip-10m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

METHODS = ["gemm_only", "faiss_flat_ip", "naive_matmul_topk", "twotower_bruteforce", "twotower_streaming"]
# Extra rows: the same BruteForce search forced onto its other paths (see twotower._topk.search_mode).
VARIANTS = {
    "twotower_bruteforce[native fp32]": ("twotower_bruteforce", {"TWOTOWER_BF16_SCREEN": "0"}),
    "twotower_bruteforce[torch only]": ("twotower_bruteforce", {"TWOTOWER_NATIVE": "0"}),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class GeneratedCorpus:
    """Candidate batches generated on the fly from per-batch seeds: a corpus that never sits in memory."""

    def __init__(self, n: int, d: int, batch: int, seed: int) -> None:
        self.n, self.d, self.batch, self.seed = n, d, batch, seed

    def __iter__(self) -> Iterator[object]:
        import torch

        for number, start in enumerate(range(0, self.n, self.batch)):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
            yield torch.randn(min(self.batch, self.n - start), self.d, generator=generator)


def run_one(method: str, n: int, d: int, num_queries: int, k: int, threads: int) -> dict[str, float]:
    """Run one method in this process; returns seconds, peak memory above the starting point, and a checksum."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    baseline = _rss_mib()
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(num_queries, d, generator=generator)
    streaming_generated = method == "twotower_streaming_generated"
    corpus = None if streaming_generated else torch.randn(n, d, generator=generator)
    checksum = 0.0
    if method == "gemm_only":
        # The limit: float32 score matrix only, at the fastest of several block shapes.
        seconds = float("inf")
        for query_block, chunk in ((512, 1024), (1024, 4096), (512, 4096), (4096, 512)):
            block = torch.empty(query_block, chunk)
            started = time.perf_counter()
            for start in range(0, num_queries, query_block):
                rows = min(query_block, num_queries - start)
                for offset in range(0, n, chunk):
                    piece = corpus[offset : offset + chunk]  # type: ignore[index]
                    torch.mm(queries[start : start + rows], piece.T, out=block[:rows, : piece.shape[0]])
            seconds = min(seconds, time.perf_counter() - started)
    elif method == "faiss_flat_ip":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(d)
        index.add(corpus.numpy())  # type: ignore[union-attr]
        started = time.perf_counter()
        scores, _ = index.search(queries.numpy(), k)
        seconds = time.perf_counter() - started
        checksum = float(np.sum(scores[:, 0]))
    elif method == "naive_matmul_topk":
        started = time.perf_counter()
        parts = []
        for start in range(0, num_queries, 256):
            parts.append(torch.topk(queries[start : start + 256] @ corpus.T, k, dim=1).values)  # type: ignore[union-attr]
        seconds = time.perf_counter() - started
        checksum = float(torch.cat(parts)[:, 0].sum())
    elif method == "twotower_bruteforce":
        from twotower import BruteForce

        index = BruteForce(k=k).index(corpus)  # type: ignore[arg-type]
        index(queries[:8])  # builds the native kernel on a first run, outside the timing
        started = time.perf_counter()
        scores, _ = index(queries)
        seconds = time.perf_counter() - started
        checksum = float(scores[:, 0].sum())
    elif method in ("twotower_streaming", "twotower_streaming_generated"):
        from twotower import BruteForce, Streaming

        dataset = GeneratedCorpus(n, d, 65536, seed=1) if streaming_generated else list(corpus.split(65536))  # type: ignore[union-attr]
        index = Streaming(k=k).index_from_dataset(dataset)
        BruteForce(k=k).index(torch.zeros(k, d))(queries[:8])  # builds the native kernel outside the timing
        started = time.perf_counter()
        scores, _ = index(queries)
        seconds = time.perf_counter() - started
        checksum = float(scores[:, 0].sum())
    else:
        raise ValueError(f"unknown method {method}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mib": peak - baseline, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus size (default 1,000,000)")
    parser.add_argument("--d", type=int, default=64, help="embedding dimension (default 64)")
    parser.add_argument("--queries", type=int, default=4096, help="number of queries (default 4096)")
    parser.add_argument("--k", type=int, default=100, help="results per query (default 100)")
    parser.add_argument("--threads", type=int, default=2, help="torch/FAISS threads (default 2)")
    parser.add_argument("--skip-10m", action="store_true", help="skip the 10M-candidate streaming run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        n = args.n
        print(json.dumps(run_one(args.one, n, args.d, args.queries, args.k, args.threads)))
        return

    def child(method: str, n: int, env: dict[str, str] | None = None) -> dict[str, float]:
        command = [sys.executable, __file__, "--one", method, "--n", str(n), "--d", str(args.d),
                   "--queries", str(args.queries), "--k", str(args.k), "--threads", str(args.threads)]  # fmt: skip
        environment = {**os.environ, **(env or {})}
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
        return dict(json.loads(output.strip().splitlines()[-1]))

    corpus_mib = args.n * args.d * 4 / 2**20
    print(f"N = {args.n:,} x D = {args.d}, Q = {args.queries:,}, k = {args.k}, float32, {args.threads} threads; "
          f"corpus {corpus_mib:.0f} MiB")  # fmt: skip
    rows = [(method, args.n, child(method, args.n)) for method in METHODS]
    rows += [(name, args.n, child(method, args.n, env)) for name, (method, env) in VARIANTS.items()]
    if not args.skip_10m:
        rows.append(("twotower_streaming_generated", 10 * args.n, child("twotower_streaming_generated", 10 * args.n)))
    gemm_rate = args.queries / rows[0][2]["seconds"]
    faiss_rate = args.queries / rows[1][2]["seconds"]
    print(f"\n{'method':<32}{'N':>12}{'seconds':>10}{'queries/s':>12}{'vs GEMM':>9}{'vs FAISS':>10}{'peak MiB':>10}")
    for method, n, result in rows:
        rate = args.queries / result["seconds"]
        # The 10M row is compared at equal work: GEMM-only and FAISS rates scale as 1/N.
        scale = n / args.n
        print(f"{method:<32}{n:>12,}{result['seconds']:>10.2f}{rate:>12.0f}{rate * scale / gemm_rate:>9.2f}"
              f"{rate * scale / faiss_rate:>10.2f}{result['peak_mib']:>10.0f}")  # fmt: skip
    print("\nvs GEMM: throughput / GEMM-only throughput (float32 score matrix alone, no selection, best block shape).")
    print("twotower_bruteforce/streaming take the default path here; [native fp32] and [torch only] force the others.")
    print("peak MiB: peak resident memory of the method's process above its start (corpus and queries included,")
    print("except for the generated 10M streaming corpus, which is never held).")


if __name__ == "__main__":
    main()
