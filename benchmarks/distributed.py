"""Step time of the in-batch softmax with negatives shared across processes, at a fixed global batch.

    python benchmarks/distributed.py [--global-batch 8192] [--dim 64]

Runs the same training step (two embedding towers, Retrieval task with default options, gradient all-reduce,
Adagrad) on 1 process with 2 threads and on 2 gloo processes with 1 thread each, on this machine's 2 cores,
and prints side by side: the whole step, and the all-gather of the candidate embeddings alone (the price of
sharing negatives). On GPUs with NCCL the all-gather runs over NVLink/PCIe instead of shared memory; see the
README.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from twotower import Retrieval, distributed


def measure(global_batch: int, dim: int, steps: int) -> dict[str, float]:
    """Median step and all-gather times (ms) of this process, for its share of the global batch."""
    torch.manual_seed(0)
    users, items = nn.Embedding(50_000, dim), nn.Embedding(20_000, dim)
    parameters = [*users.parameters(), *items.parameters()]
    optimizer = torch.optim.Adagrad(parameters, lr=0.1)
    task = Retrieval()
    generator = torch.Generator().manual_seed(1)
    rows = distributed.shard_rows(global_batch)
    step_times, gather_times = [], []
    for step in range(steps + 2):
        user_ids = torch.randint(0, 50_000, (global_batch,), generator=generator)[rows]
        item_ids = torch.randint(0, 20_000, (global_batch,), generator=generator)[rows]
        if distributed.is_distributed():
            dist.barrier()
        started = time.perf_counter()
        loss = task(users(user_ids), items(item_ids))
        optimizer.zero_grad()
        loss.backward()
        distributed.all_reduce_gradients(parameters)
        optimizer.step()
        elapsed = time.perf_counter() - started
        if distributed.is_distributed():
            embeddings = items(item_ids).detach()
            dist.barrier()
            started = time.perf_counter()
            distributed.gather_with_grad(embeddings)
            gather_times.append(time.perf_counter() - started)
        if step >= 2:
            step_times.append(elapsed)
    middle = sorted(step_times)[len(step_times) // 2]
    gather = sorted(gather_times)[len(gather_times) // 2] if gather_times else 0.0
    return {"step_ms": 1000 * middle, "gather_ms": 1000 * gather}


def _worker(rank: int, world: int, init: str, output: str, global_batch: int, dim: int, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = measure(global_batch, dim, steps)
    if rank == 0:
        torch.save(result, output)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=8192, help="global batch size (default 8192)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10; the median is shown)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    single = measure(args.global_batch, args.dim, args.steps)
    with tempfile.TemporaryDirectory() as directory:
        output = str(Path(directory) / "result.pt")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(2, str(Path(directory) / "init"), output, args.global_batch, args.dim, args.steps),
                 nprocs=2, join=True)  # fmt: skip
        double = torch.load(output)
    print(f"global batch {args.global_batch}, D = {args.dim}, median of {args.steps} steps, 2 CPU cores\n")
    print(f"{'processes':<34}{'step ms':>10}{'all-gather ms':>16}{'examples/s':>14}")
    for name, result in (("1 process x 2 threads", single), ("2 processes x 1 thread (gloo)", double)):
        rate = args.global_batch / (result["step_ms"] / 1000)
        print(f"{name:<34}{result['step_ms']:>10.1f}{result['gather_ms']:>16.2f}{rate:>14,.0f}")


if __name__ == "__main__":
    main()
