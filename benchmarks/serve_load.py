"""A bounded load test of `twotower serve` on loopback: requests/s, latency percentiles and errors.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/serve_load.py [--size 1000000] [--requests 2000]

Builds bundles whose corpus is the trained MovieLens title embeddings enlarged to --size rows as TFRS's
efficient-serving tutorial does (see benchmarks/ann.py), over exact search (BruteForce), over IVF1024 with 4-bit
fast-scan codes and exact refinement (nprobe 128, k_factor 4: recall@100 0.97 there), over twotower's
AnisotropicIVF (its default 2 sqrt(n) partitions, its search tuned for recall@100 0.95 at build time) and, with
--index hnsw, over HNSW32 (efSearch 512, recall@100 0.96). For each index and each --max-batch setting it starts
`python -m twotower serve` on 127.0.0.1 in a child process, sends a fixed number of top-10 requests for random
users with 16 in flight at once, and stops the server. ``--max-batch 1`` answers each request by its own search;
the default 64 answers the requests that queued up during a search together. Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch

from ann import build_corpus
from twotower.indexes import AnisotropicIVF, BruteForce, Faiss, TopK
from twotower.serving import _Tower, save_bundle
from twotower.workload import WorkloadConfig, train_and_evaluate


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _load(url: str, users: list[str], requests: int, concurrency: int) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    rng = np.random.default_rng(0)
    queue = [users[i] for i in rng.integers(0, len(users), size=requests)]
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:

        async def worker() -> None:
            nonlocal errors
            while queue:
                user = queue.pop()
                started = time.perf_counter()
                try:
                    response = await client.post("/recommend", json={"user_id": user, "k": 10})
                    if response.status_code != 200:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def _serve_and_load(
    bundle: Path, max_batch: int, users: list[str], requests: int, concurrency: int
) -> tuple[str, float]:
    port = _free_port()
    command = [sys.executable, "-m", "twotower", "serve", "--run", str(bundle), "--port", str(port)]
    server = subprocess.Popen([*command, "--max-batch", str(max_batch)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        asyncio.run(_load(url, users, 50, concurrency))  # warm-up
        latencies, errors, elapsed = asyncio.run(_load(url, users, requests, concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies_ms = sorted(1000 * value for value in latencies)
    p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
    rate = requests / elapsed
    return f"{rate:>12.1f}{statistics.median(latencies_ms):>10.1f}{p99:>10.1f}{errors:>8}", rate


INDEXES: dict[str, Callable[[], TopK]] = {
    "exact": lambda: BruteForce(k=10),
    "ivfpq": lambda: Faiss("IVF1024,PQ32x4fs,RFlat", nprobe=128, k_factor=4),
    "hnsw": lambda: Faiss("HNSW32", ef_search=512),
    # twotower's own approximate index, its search settings tuned at build time for recall@100 0.95
    "anisotropic": lambda: AnisotropicIVF(k=100, target_recall=0.95),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="corpus rows (default 1,000,000)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per server (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--index", nargs="+", choices=list(INDEXES), default=["exact", "ivfpq", "anisotropic"])
    parser.add_argument("--max-batch", nargs="+", type=int, default=[1, 64], help="server settings (1 and 64)")
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    args = parser.parse_args()
    trained = train_and_evaluate(WorkloadConfig(), data_dir=args.data_dir, progress=False, say=lambda line: None)
    model, prepared = trained.model, trained.prepared
    with torch.no_grad():
        titles = model.item_embedding.weight[1:].detach().clone()
    corpus = build_corpus(titles, args.size, "tutorial", 0.0)
    names = prepared.items.values
    ids = np.array([f"{names[i % titles.shape[0]]} #{i}" for i in range(args.size)])
    users = [str(user) for user in prepared.users.values]
    rows: list[tuple[str, int, str, float]] = []
    with tempfile.TemporaryDirectory() as directory:
        for kind in args.index:
            index = INDEXES[kind]().index(corpus, ids)
            bundle = save_bundle(Path(directory) / kind, _Tower(model.user_embedding), index, prepared.users)
            del index
            for max_batch in args.max_batch:
                line, rate = _serve_and_load(bundle, max_batch, users, args.requests, args.concurrency)
                rows.append((kind, max_batch, line, rate))
    print(f"corpus {args.size:,} x {corpus.shape[1]} (tutorial perturbation), top-10, {args.requests} requests per "
          f"server, concurrency {args.concurrency}, loopback\n")  # fmt: skip
    print(
        f"{'index':<12}{'max batch':>10}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'x unbatched':>13}"
    )
    for kind, max_batch, line, rate in rows:
        base = next((r for k, b, _, r in rows if k == kind and b == 1), rate)
        print(f"{kind:<12}{max_batch:>10}{line}{rate / base:>13.1f}")


if __name__ == "__main__":
    main()
