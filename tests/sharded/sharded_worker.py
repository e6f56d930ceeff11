"""Worker of tests/sharded: train ShardedIdRetrievalModel on each rank's share of global batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def worker(rank: int, world: int, init_file: str, case: dict[str, Any], output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from twotower.distributed import shard_rows
        from twotower.distributed.sharded_tables import ShardedIdRetrievalModel

        model = ShardedIdRetrievalModel(case["num_users"], case["num_items"], case["dim"], sharding=case["sharding"],
                                        optimizer=case["optimizer"], learning_rate=case["lr"], seed=3)  # fmt: skip
        losses, tables = [], []
        for users, items in case["batches"]:
            share = shard_rows(users.shape[0])
            loss = model.compute_loss((users[share], items[share]), training=True)
            loss.backward()  # the fused optimizer updates the shards here
            losses.append(float(torch.distributed.nn.functional.all_reduce(loss.detach())))
            tables.append({name: model.full_table(name) for name in ("user", "item")})
        shards = {name: [(tuple(t.shape), offsets) for t, offsets in found] for name, found in model._shards().items()}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, shards)
        if rank == 0:
            torch.save({"losses": losses, "tables": tables, "shards": gathered}, output)
        dist.barrier()
        Path(f"{output}.done-{rank}").touch()
    finally:
        dist.destroy_process_group()


def run(world: int, case: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Spawn ``world`` gloo processes on ``case``; returns rank 0's results."""
    import torch.multiprocessing as mp

    output = directory / "results.pt"
    try:
        mp.spawn(worker, args=(world, str(directory / "init"), case, str(output)), nprocs=world, join=True)
    except mp.ProcessExitedException:
        # gloo may abort a process while tearing its sockets down, after the work: accept it if all got through.
        if not all(Path(f"{output}.done-{rank}").exists() for rank in range(world)):
            raise
    result: dict[str, Any] = torch.load(output, weights_only=True)
    return result
