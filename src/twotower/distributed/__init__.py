"""Multi-process training and evaluation on ``torch.distributed``, with negatives shared across ranks.

TFRS computes in-batch negatives per replica, so its loss and accuracy change with the number of devices.
twotower gathers every rank's candidates (with gradient, as open_clip's ``loss.py`` does) so that each query is
scored against the *global* batch: the sum of the ranks' losses is the single-process loss of the concatenated
batch, and, with gradients summed across ranks (:func:`all_reduce_gradients`), training is the same computation
whatever the number of processes.

* :func:`gather_with_grad` / :func:`gather` -- variable-size all-gathers along the first dimension;
* :func:`global_candidates` -- this rank's view of the global batch: its own positives first (so that row ``i``
  is still column ``i``), then the other ranks' positives, then every rank's extra negatives;
* :func:`shard_rows` -- this rank's contiguous share of a batch's rows (what ``Batches(shard=True)`` yields);
* :func:`all_reduce_gradients` -- gradients summed over ranks.

The exact index over a corpus sharded across ranks is :class:`twotower.indexes.ShardedIndex`.

Launch with ``torchrun --nproc-per-node N``: gloo on CPUs, NCCL on GPUs (:func:`init_from_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from twotower.ids import encode_ids


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_environment(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE``, ``RANK``, ...).

    Returns whether a multi-process group is now active. The backend defaults to NCCL when CUDA is available
    and gloo otherwise. Does nothing outside torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return is_distributed()
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=chosen)
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return is_distributed()


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _sizes(count: int, device: torch.device) -> list[int]:
    local = torch.tensor([count], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(size) for size in sizes]


def _pad(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    padding = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding]).contiguous()


def gather_with_grad(tensor: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """All ranks' ``tensor`` (first dimensions may differ), differentiable: gradients flow back to each rank.

    Returns ``(parts, sizes)``: ``parts[r]`` is rank ``r``'s tensor.
    """
    sizes = _sizes(tensor.shape[0], tensor.device)
    gathered = _AllGather.apply(_pad(tensor, max(sizes)))  # type: ignore[no-untyped-call]
    return [part[:size] for part, size in zip(gathered, sizes, strict=True)], sizes


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums each rank's share of the gradient over ranks and returns it to the rank.

    (``torch.distributed.nn.functional.all_gather`` does this too but is deprecated in recent releases; an
    all-reduce also works on gloo, which has no reduce-scatter.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *gradients: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([gradient.contiguous() for gradient in gradients])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather(tensor: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """All ranks' ``tensor`` (first dimensions may differ), without gradient."""
    sizes = _sizes(tensor.shape[0], tensor.device)
    padded = _pad(tensor.detach(), max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:size] for part, size in zip(parts, sizes, strict=True)], sizes


def gather_ids(ids: Any, length: int) -> list[np.ndarray]:
    """All ranks' ids (integers or strings), as numpy arrays."""
    values = encode_ids(ids, "candidate_ids", length).values
    if values.dtype.kind in "iu":
        parts, _ = gather(torch.as_tensor(values.astype(np.int64)))
        return [part.cpu().numpy() for part in parts]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, values.astype(str))
    return [np.asarray(part) for part in objects]


def _reorder(parts: Sequence[Any], num_positives: Sequence[int], me: int, join: Any) -> Any:
    """[my positives, other ranks' positives (rank order), every rank's extras (rank order)]."""
    positives = [parts[me][: num_positives[me]]] + [
        part[:count] for r, (part, count) in enumerate(zip(parts, num_positives, strict=True)) if r != me
    ]
    extras = [part[count:] for part, count in zip(parts, num_positives, strict=True)]
    return join([*positives, *extras])


def global_candidates(
    num_queries: int,
    candidate_embeddings: torch.Tensor,
    candidate_ids: Any = None,
    candidate_sampling_probability: torch.Tensor | None = None,
) -> tuple[torch.Tensor, np.ndarray | None, torch.Tensor | None]:
    """This rank's view of the global batch's candidates.

    Args:
        num_queries: this rank's number of queries (its first ``num_queries`` candidates are their positives).
        candidate_embeddings: ``[nc, d]`` this rank's candidates.
        candidate_ids: ``[nc]`` this rank's ids, or ``None``.
        candidate_sampling_probability: ``[nc]`` this rank's probabilities, or ``None``.

    Returns:
        ``(candidates, ids, probabilities)`` over every rank's candidates: this rank's positives first, then the
        other ranks' positives, then every rank's extras. Gradients flow back to the rank that computed each row.
    """
    me = dist.get_rank()
    parts, _ = gather_with_grad(candidate_embeddings)
    counts = [int(size) for size in _sizes(num_queries, candidate_embeddings.device)]
    candidates = _reorder(parts, counts, me, torch.cat)
    ids = None
    if candidate_ids is not None:
        ids = _reorder(gather_ids(candidate_ids, candidate_embeddings.shape[0]), counts, me, np.concatenate)
    probabilities = None
    if candidate_sampling_probability is not None:
        probability_parts, _ = gather(torch.as_tensor(candidate_sampling_probability, device=candidates.device))
        probabilities = _reorder(probability_parts, counts, me, torch.cat)
    return candidates, ids, probabilities


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a copy; no gradient)."""
    total = value.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter] | Iterator[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient over ranks, in one flat buffer.

    Each rank's loss is the sum over its own queries against the global batch, so the gradient of the global
    loss is the sum of the ranks' gradients (DDP would average them, which scales the learning rate by
    ``1 / world_size``).
    """
    if not is_distributed():
        return
    with_grad = [parameter for parameter in parameters if parameter.grad is not None]
    if not with_grad:
        return
    for parameter in with_grad:
        if parameter.grad is not None and parameter.grad.is_sparse:
            # A sparse embedding's rows differ by rank: summed densely (O(table), where one process is O(batch));
            # the optimizers' dense and row-wise updates are the same arithmetic on the rows that have gradient.
            parameter.grad = parameter.grad.to_dense()
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in with_grad])  # type: ignore[union-attr]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter in with_grad:
        assert parameter.grad is not None
        count = parameter.grad.numel()
        parameter.grad.copy_(flat[offset : offset + count].view_as(parameter.grad))
        offset += count


def shard_rows(num_rows: int) -> slice:
    """This rank's contiguous share of ``num_rows`` rows (ranks differ by at most one row)."""
    size, me = world_size(), rank()
    base, extra = divmod(num_rows, size)
    start = me * base + min(me, extra)
    return slice(start, start + base + (1 if me < extra else 0))


def __getattr__(name: str) -> Any:
    # ShardedIndex lives with the other indexes (twotower.indexes.sharded); this name keeps older imports working.
    if name == "ShardedIndex":
        from twotower.indexes.sharded import ShardedIndex

        return ShardedIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
