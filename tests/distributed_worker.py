"""Worker processes for tests/test_distributed.py (gloo, CPU); importable by multiprocessing's spawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from twotower import BruteForce, FactorizedTopK, Retrieval, distributed
from twotower.models import Model
from twotower.workload import Batches

EXTRAS_PER_RANK = 2


def task_case(case: dict[str, Any]) -> dict[str, Any]:
    """This rank's share of one Retrieval case: local loss and gradients, gathered on every rank."""
    me, size = dist.get_rank(), dist.get_world_size()
    rows = distributed.shard_rows(case["queries"].shape[0])
    extras = slice(me * EXTRAS_PER_RANK, (me + 1) * EXTRAS_PER_RANK)
    queries = case["queries"][rows].clone().requires_grad_(True)
    candidates = torch.cat([case["positives"][rows], case["extras"][extras]]).clone().requires_grad_(True)
    call: dict[str, Any] = {}
    if case["ids"] is not None:
        call["candidate_ids"] = torch.cat([case["ids"][0][rows], case["ids"][1][extras]])
    if case["probability"] is not None:
        call["candidate_sampling_probability"] = torch.cat(
            [case["probability"][0][rows], case["probability"][1][extras]]
        )
    if case["weights"] is not None:
        call["sample_weight"] = case["weights"][rows]
    task = Retrieval(**case["options"])
    loss = task(queries, candidates, **call)
    loss.backward()
    assert queries.grad is not None
    assert candidates.grad is not None
    query_grads, _ = distributed.gather(queries.grad)
    count = rows.stop - rows.start
    positive_grads, _ = distributed.gather(candidates.grad[:count])
    extra_grads, _ = distributed.gather(candidates.grad[count:])
    del size
    return {
        "loss": float(distributed.all_reduce_sum(loss.detach())),
        "queries": torch.cat(query_grads),
        "positives": torch.cat(positive_grads),
        "extras": torch.cat(extra_grads),
        "loss_metric": task.metric_results(),
    }


def topk_case(case: dict[str, Any]) -> dict[str, Any]:
    """Sharded exact search and a factorized metric over the shards."""
    corpus, ids, queries, k = case["corpus"], case["ids"], case["queries"], case["k"]
    shard = distributed.shard_rows(corpus.shape[0])
    index = distributed.ShardedIndex(BruteForce()).index(corpus[shard], ids[shard])
    mine = distributed.shard_rows(queries.shape[0])
    scores, found = index(queries[mine], k=k)
    score_parts, _ = distributed.gather(scores)
    id_parts, _ = distributed.gather(found)
    excluded_scores, excluded_ids = index.query_with_exclusions(queries[mine], case["exclusions"][mine], k=k)
    excluded_score_parts, _ = distributed.gather(excluded_scores)
    excluded_id_parts, _ = distributed.gather(excluded_ids)
    metric = FactorizedTopK(index, ks=(1, 3, 10))
    metric.update(queries[mine], case["true"][mine], case["true_ids"][mine])
    return {
        "scores": torch.cat(score_parts),
        "ids": torch.cat(id_parts),
        "excluded_scores": torch.cat(excluded_score_parts),
        "excluded_ids": torch.cat(excluded_id_parts),
        "metric": metric.results(),
    }


class TowerModel(Model):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.users = nn.Embedding(60, 6)
        self.items = nn.Embedding(40, 6)
        self.task = Retrieval(remove_accidental_hits=True, temperature=0.5)

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        users, items = batch
        loss: torch.Tensor = self.task(self.users(users), self.items(items), candidate_ids=items)
        return loss

    def regularization_loss(self) -> torch.Tensor:
        return 1e-3 * self.items.weight.square().sum()


def fit_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train with each rank on its slice of every global batch; return the final parameters and history."""
    model = TowerModel()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.1, eps=1e-7)
    train = Batches(case["users"], case["items"], batch_size=32, shuffle=True, seed=3, shard=dist.is_initialized())
    history = model.fit(train, optimizer, epochs=2, progress=False)
    return {"state": {name: tensor.clone() for name, tensor in model.state_dict().items()}, "history": history}


def stream_case(case: dict[str, Any]) -> dict[str, Any]:
    """Stream a Parquet file for an epoch on every rank; gather what each rank read and its batch sizes."""
    from twotower.data.streaming import ParquetBatches

    def identity(array: Any) -> np.ndarray:
        return np.asarray(array.to_numpy(zero_copy_only=False))

    stream = ParquetBatches(case["path"], {"ts": identity}, batch_size=case["batch_size"], shuffle_buffer=256, seed=5)
    batches = [batch[0] for batch in stream]
    mine = {"rows": torch.cat(batches).tolist(), "sizes": [len(batch) for batch in batches]}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {"ranks": gathered}


def worker(rank: int, world: int, init_file: str, cases_file: str, output: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cases = torch.load(cases_file, weights_only=False)
        results = {
            "task": [task_case(case) for case in cases["task"]],
            "topk": topk_case(cases["topk"]),
            "fit": fit_case(cases["fit"]),
            "stream": stream_case(cases["stream"]),
        }
        if rank == 0:
            torch.save(results, output)
        dist.barrier()
        Path(f"{output}.done-{rank}").touch()
    finally:
        dist.destroy_process_group()


def run(world: int, cases: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Spawn ``world`` gloo processes on the cases; returns rank 0's results."""
    import torch.multiprocessing as mp

    cases_file, output = directory / "cases.pt", directory / "results.pt"
    torch.save(cases, cases_file)
    init_file = directory / "init"
    try:
        mp.spawn(worker, args=(world, str(init_file), str(cases_file), str(output)), nprocs=world, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a process while tearing its sockets down ("terminate called without an active
        # exception") after the work is over. Accept that only if every rank got past its final barrier.
        if not all(Path(f"{output}.done-{rank}").exists() for rank in range(world)):
            raise
    result: dict[str, Any] = torch.load(output, weights_only=False)
    return result


def numpy_ids(values: torch.Tensor) -> np.ndarray:
    return values.numpy()
