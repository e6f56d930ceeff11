"""ShardedIdRetrievalModel's bad arguments and bad row indices: each named in the error. The arguments are checked
before TorchRec is needed, so those tests run in every environment; the indices need TorchRec (one gloo rank)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from twotower.distributed.sharded_tables import ShardedIdRetrievalModel


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"num_users": 0}, ValueError, "num_users must be a positive int"),
    ({"num_items": 2.5}, ValueError, "num_items must be a positive int"),
    ({"num_items": True}, ValueError, "num_items must be a positive int"),
    ({"embedding_dim": -1}, ValueError, "embedding_dim must be a positive int"),
    ({"sharding": "column_wise"}, ValueError, "sharding must be 'row_wise' or 'table_wise'"),
    ({"optimizer": "adam"}, ValueError, "optimizer must be 'adagrad', 'rowwise-adagrad' or 'sgd'"),
    ({"learning_rate": 0.0}, ValueError, r"learning_rate must lie in \(0.0, inf\]"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate must lie in"),
    ({"learning_rate": "0.1"}, TypeError, "learning_rate must be a number"),
    ({"eps": -1e-7}, ValueError, r"eps must lie in \[0.0, inf\]"),
    ({"init_scale": float("inf")}, ValueError, "init_scale must be finite"),
    ({"learning_rate": float("inf")}, ValueError, "learning_rate must be finite"),
    ({"seed": 1.0}, TypeError, "seed must be an int"),
    ({"remove_accidental_hits": 1}, TypeError, "remove_accidental_hits must be a bool"),
])  # fmt: skip
def test_bad_arguments_are_named_before_torchrec_is_needed(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    call: dict[str, Any] = {"num_users": 10, "num_items": 20, **arguments}
    with pytest.raises(error, match=message):
        ShardedIdRetrievalModel(**call)


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    pytest.importorskip("torchrec")
    pytest.importorskip("fbgemm_gpu")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("users", "items", "error", "message"), [
    (torch.tensor([0, 10]), torch.tensor([1, 2]), ValueError, r"users must lie in \[0, 10\) .*got 10"),
    (torch.tensor([0, 1]), torch.tensor([-1, 2]), ValueError, r"items must lie in \[0, 20\) .*got -1"),
    (torch.tensor([0.0, 1.0]), torch.tensor([1, 2]), TypeError, "users must hold integer row indices"),
    (torch.tensor([True, False]), torch.tensor([1, 2]), TypeError, "users must hold integer row indices"),
    (torch.zeros(2, 1, dtype=torch.int64), torch.tensor([1, 2]), ValueError, "users must be a 1-D tensor"),
    ([0, 1], torch.tensor([1, 2]), TypeError, "users must be a torch.Tensor"),
    (torch.tensor([0, 1, 2]), torch.tensor([1, 2]), ValueError, "users and items must be"),
])  # fmt: skip
def test_bad_row_indices_are_named(
    users: Any, items: Any, error: type[Exception], message: str, one_rank: None
) -> None:
    model = ShardedIdRetrievalModel(10, 20, 4)
    with pytest.raises(error, match=message):
        model.embed(users, items)


def test_good_rows_are_the_tables_rows(one_rank: None) -> None:
    """The check lets every valid index through, numpy's int32 included: the rows are the tables' rows, which
    one rank holds whole (the first and last rows, the edges of the check)."""
    model = ShardedIdRetrievalModel(10, 20, 4)
    users, items = np.array([0, 9, 3], dtype=np.int32), torch.tensor([19, 0, 7])
    user_rows, item_rows = model.embed(torch.from_numpy(users), items)
    torch.testing.assert_close(user_rows, model.full_table("user")[users.astype(np.int64)])
    torch.testing.assert_close(item_rows, model.full_table("item")[items])
