"""Sharded tables on TorchRec: 2 gloo processes, a row-wise sharded item table, against one process holding it all.

    bash benchmarks/torchrec_env.sh python benchmarks/sharded_tables.py              # 10M item rows, 3 rounds
    bash benchmarks/torchrec_env.sh python benchmarks/sharded_tables.py --items 1000000 --rounds 1

Both train the id towers (a 100,000-row user table and the item table, 64-d, the in-batch softmax over the
global batch of 4096, Adagrad 0.1) on the same random batches:
- one process (2 threads): twotower's own sparse path (``IdRetrievalModel(sparse_embeddings=True)``,
  ``sparse_keras_adagrad``), every table whole in the process;
- 2 gloo processes (1 thread each): ``ShardedIdRetrievalModel`` (``twotower.distributed.sharded_tables``), both
  tables row-wise sharded by TorchRec, FBGEMM's Adagrad fused into the backward, each rank with half of every
  global batch and twotower's cross-rank negatives.
Each configuration runs in fresh processes (so that each peak RSS is its own), alternating for ``--rounds``
rounds; it reports examples/s over the timed steps (after warm-up steps) and each process's peak RSS and its
resident set after training (the steady state, without the start's transients).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BATCH, USERS, DIM = 4096, 100_000, 64


def _batches(items: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(0, USERS, (BATCH,), generator=generator), torch.randint(1, items, (BATCH,),
             generator=generator)) for _ in range(count)]  # fmt: skip


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gib() -> float:
    """The resident set now (after training: the steady state, without the start's transients)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def one_process(items: int, warmup: int, steps: int) -> dict[str, Any]:
    from twotower.optim import sparse_keras_adagrad
    from twotower.pipeline.model import IdRetrievalModel

    torch.set_num_threads(2)
    model = IdRetrievalModel(USERS, items, DIM, batch_size=BATCH, remove_accidental_hits=False, sparse_embeddings=True)
    optimizer = sparse_keras_adagrad(model.parameters(), 0.1)
    batches = _batches(items, warmup + steps)
    for number, batch in enumerate(batches):
        if number == warmup:
            started = time.perf_counter()
        model.train_step(batch, optimizer)
    seconds = time.perf_counter() - started
    return {"examples_per_s": steps * BATCH / seconds, "peak_rss_gib": [_peak_rss_gib()], "rss_gib": [_rss_gib()]}


def _rank(rank: int, world: int, init_file: str, items: int, warmup: int, steps: int, output: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from twotower.distributed import shard_rows
    from twotower.distributed.sharded_tables import ShardedIdRetrievalModel

    model = ShardedIdRetrievalModel(USERS, items, DIM, sharding="row_wise", learning_rate=0.1)
    batches = _batches(items, warmup + steps)
    for number, (users, positives) in enumerate(batches):
        if number == warmup:
            dist.barrier()
            started = time.perf_counter()
        share = shard_rows(users.shape[0])
        model.train_step((users[share], positives[share]), model.table_optimizer)
    dist.barrier()
    seconds = time.perf_counter() - started
    memory: list[Any] = [None] * world
    dist.all_gather_object(memory, (_peak_rss_gib(), _rss_gib()))
    if rank == 0:
        Path(output).write_text(json.dumps({"examples_per_s": steps * BATCH / seconds,
                                            "peak_rss_gib": [peak for peak, _ in memory],
                                            "rss_gib": [now for _, now in memory]}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def sharded(items: int, warmup: int, steps: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "result.json")
        mp.spawn(_rank, args=(2, os.path.join(directory, "init"), items, warmup, steps, output), nprocs=2)
        result: dict[str, Any] = json.loads(Path(output).read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000_000, help="item-table rows (default 10M)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", choices=("one", "sharded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = one_process if args.child == "one" else sharded
        print("RESULT " + json.dumps(run(args.items, args.warmup, args.steps)), flush=True)
        return
    results: dict[str, list[dict[str, Any]]] = {"one": [], "sharded": []}
    for round_ in range(args.rounds):
        for child in ("one", "sharded") if round_ % 2 == 0 else ("sharded", "one"):
            command = [sys.executable, __file__, "--child", child, "--items", str(args.items), "--warmup",
                       str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            results[child].append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    table_gib = args.items * DIM * 4 * 2 / 2**30
    print(f"{args.items:,}-row item table + {USERS:,} users, {DIM}-d (weights + Adagrad state {table_gib:.2f} GiB), "
          f"batch {BATCH}; {args.rounds} alternating rounds, {args.steps} timed steps each")  # fmt: skip
    print(f"{'configuration':<44}{'examples/s (median, each round)':>36}{'per process GiB: peak, after':>32}")
    labels = {"one": "1 process, 2 threads, whole tables", "sharded": "2 gloo processes, row-wise (TorchRec)"}
    for child, label in labels.items():
        rates = [result["examples_per_s"] for result in results[child]]
        peak = statistics.median(max(result["peak_rss_gib"]) for result in results[child])
        after = statistics.median(max(result["rss_gib"]) for result in results[child])
        cells = ", ".join(f"{rate:,.0f}" for rate in rates)
        print(f"{label:<44}{statistics.median(rates):>10,.0f} ({cells}){'':>4}{peak:>10.2f}, {after:.2f}")


if __name__ == "__main__":
    main()
