"""TorchRec-sharded tables (2 gloo processes) against one process on the same global batches: the loss, the
gradients (read from a plain SGD step) and Adagrad's updates; every rank holds only its shard.

Runs in the TorchRec environment (``bash benchmarks/torchrec_env.sh``); skipped where TorchRec is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

from sharded_worker import run  # pytest puts this folder on sys.path (no __init__.py)

from twotower.distributed.sharded_tables import initial_rows
from twotower.tasks import Retrieval

USERS, ITEMS, DIM = 300, 200, 8


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    # Items drawn from a few rows, so that rows repeat within and across the ranks' shares of a batch.
    return [(torch.randint(0, USERS, (64,), generator=generator), torch.randint(0, 40, (64,), generator=generator))
            for _ in range(3)]  # fmt: skip


def _single_process(optimizer: str, lr: float) -> dict[str, Any]:
    """The same model in plain torch on the global batches: dense tables, torch's own optimizer."""
    user = torch.nn.Parameter(initial_rows(3, 0, USERS, DIM, 0.05).double())
    item = torch.nn.Parameter(initial_rows(4, 0, ITEMS, DIM, 0.05).double())
    step = (torch.optim.SGD([user, item], lr=lr) if optimizer == "sgd"
            else torch.optim.Adagrad([user, item], lr=lr, eps=1e-7, initial_accumulator_value=0.0))  # fmt: skip
    task = Retrieval()
    losses, grads, tables = [], [], []
    for users, items in _batches():
        step.zero_grad()
        loss = task(user[users], item[items])
        loss.backward()
        assert user.grad is not None
        assert item.grad is not None
        grads.append({"user": user.grad.clone(), "item": item.grad.clone()})
        step.step()
        losses.append(float(loss))
        tables.append({"user": user.detach().clone(), "item": item.detach().clone()})
    return {"losses": losses, "grads": grads, "tables": tables}


def _case(sharding: str, optimizer: str, lr: float) -> dict[str, Any]:
    return {"num_users": USERS, "num_items": ITEMS, "dim": DIM, "sharding": sharding, "optimizer": optimizer,
            "lr": lr, "batches": _batches()}  # fmt: skip


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise"])
def test_sharded_gradients_equal_one_process(sharding: str, tmp_path: Path) -> None:
    got = run(2, _case(sharding, "sgd", 1.0), tmp_path)
    expected = _single_process("sgd", 1.0)
    before = {"user": initial_rows(3, 0, USERS, DIM, 0.05), "item": initial_rows(4, 0, ITEMS, DIM, 0.05)}
    for number, (loss, reference) in enumerate(zip(got["losses"], expected["losses"], strict=True)):
        assert loss == pytest.approx(reference, rel=1e-5)
        for name in ("user", "item"):
            # SGD with lr 1: the step is the gradient of the global batch's loss, summed over the ranks' queries.
            gradient = before[name] - got["tables"][number][name]
            torch.testing.assert_close(gradient.double(), expected["grads"][number][name], rtol=1e-4, atol=1e-6)
            before[name] = got["tables"][number][name]
    shards = got["shards"]
    if sharding == "row_wise":  # each rank holds half of each table's rows, not a copy
        assert [shard["user"] for shard in shards] == [[((150, DIM), [0, 0])], [((150, DIM), [150, 0])]]
        assert [shard["item"] for shard in shards] == [[((100, DIM), [0, 0])], [((100, DIM), [100, 0])]]
    else:  # each table whole on one rank
        assert sorted(len(shard["user"]) + 2 * len(shard["item"]) for shard in shards) == [1, 2]


def test_sharded_adagrad_equals_torchs_adagrad(tmp_path: Path) -> None:
    got = run(2, _case("row_wise", "adagrad", 0.1), tmp_path)
    expected = _single_process("adagrad", 0.1)
    for number in range(3):
        assert got["losses"][number] == pytest.approx(expected["losses"][number], rel=1e-5)
        for name in ("user", "item"):
            torch.testing.assert_close(got["tables"][number][name].double(), expected["tables"][number][name],
                                       rtol=1e-5, atol=2e-6)  # fmt: skip
