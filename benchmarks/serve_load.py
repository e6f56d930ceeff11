"""A bounded load test of `twotower serve` on loopback: requests/s, latency percentiles and errors.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/serve_load.py [--size 1000000] [--requests 2000]

Builds a bundle whose corpus is the trained MovieLens title embeddings enlarged to --size rows by small
perturbations (as benchmarks/ann.py does), starts `python -m twotower serve` on 127.0.0.1 in a child process,
sends a fixed number of top-10 requests for random users with 16 in flight at once, then stops the server.
Nothing leaves this machine.
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
from pathlib import Path

import httpx
import numpy as np
import torch

from twotower.indexes import BruteForce, Faiss, TopK
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1_000_000, help="corpus rows (default 1,000,000)")
    parser.add_argument("--requests", type=int, default=2000, help="requests to send (default 2000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--index", choices=["exact", "ivf"], default="exact", help="BruteForce or IVF1024,Flat")
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    args = parser.parse_args()
    model, prepared, _ = train_and_evaluate(WorkloadConfig(), data_dir=args.data_dir, progress=False)
    with torch.no_grad():
        titles = model.movie_model.weight[1:].detach()
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, titles.shape[0], (args.size,), generator=generator)
    corpus = titles[picks] + 0.1 * titles.std() * torch.randn(args.size, titles.shape[1], generator=generator)
    ids = np.array([f"{prepared.titles.values[p]} #{i}" for i, p in enumerate(picks.tolist())])
    index: TopK = (
        BruteForce(k=10).index(corpus, ids)
        if args.index == "exact"
        else Faiss("IVF1024,Flat", nprobe=32).index(corpus, ids)
    )
    with tempfile.TemporaryDirectory() as directory:
        bundle = save_bundle(Path(directory) / "bundle", _Tower(model.user_model), index, prepared.users)
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "twotower", "serve", "--run", str(bundle), "--port", str(port)]
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.5)
            users = [str(user) for user in prepared.users.values]
            asyncio.run(_load(url, users, 50, args.concurrency))  # warm-up
            latencies, errors, elapsed = asyncio.run(_load(url, users, args.requests, args.concurrency))
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies_ms = sorted(1000 * value for value in latencies)
    p99 = latencies_ms[min(len(latencies_ms) - 1, int(0.99 * len(latencies_ms)))]
    print(f"corpus {args.size:,} x {corpus.shape[1]} ({args.index}), top-10, {args.requests} requests, "
          f"concurrency {args.concurrency}, loopback\n")  # fmt: skip
    print(f"{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    print(f"{args.requests / elapsed:>12.1f}{statistics.median(latencies_ms):>10.1f}{p99:>10.1f}{errors:>8}")


if __name__ == "__main__":
    main()
