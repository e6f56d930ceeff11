"""Where one training step of the reference model goes, against its three matrix multiplies alone.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/step_breakdown.py [--batch-sizes 1024 4096 8192]

The MovieLens 100K reference model (64-d user and title towers, SUM loss, fused Adagrad) trains one warm-up
epoch, then an epoch under torch's profiler. Each operator's time is charged to one part of the step:

* data/batching: drawing the batch from ``Batches``;
* embedding gather: the towers' lookups (``aten::embedding``);
* logit GEMMs: ``Q C^T`` block by block, in the forward and again in the backward's recomputation;
* gradient GEMMs: ``G C`` and ``G^T Q``;
* softmax passes: everything else inside the blocked loss (row maxima, exponentials, sums, the gradient scaling);
* embedding scatter: the embedding tables' backward (``embedding_dense_backward``);
* optimizer: ``optimizer.step()``;
* other: the rest of the profiled step's wall time (the task's batch set-up, autograd, Python).

The profiled epoch's shares are applied to the median step time of five unprofiled epochs; each of those is
followed by one timing of the three GEMMs (the median of its 5 repeats), and the table gives their median.

The last row is the three GEMMs of one step alone (``Q C^T``, ``G C``, ``G^T Q`` of the full ``[B, B]`` matrix,
plain torch, fresh outputs): the cost of the loss's arithmetic with nothing else. With ``--precision bf16`` the
loss multiplies in bfloat16 and the reference GEMMs are bfloat16 too. Run it on another tree with
``PYTHONPATH=<tree>/src`` to compare before and after a change (a tree without ``precision`` runs float32).
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from twotower.data.movielens import load_movielens
from twotower.workload import BasicRetrievalModel, Batches, keras_adagrad, prepare

PARTS = (
    "data/batching",
    "embedding gather",
    "logit GEMMs (fwd + recompute)",
    "gradient GEMMs",
    "softmax passes",
    "embedding scatter",
    "optimizer",
    "other (set-up, autograd, Python)",
)
#: Unprofiled epochs per batch size, each followed by one timing of the three GEMMs; the medians are printed.
EPOCHS = 5
_GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul"}


def _model(prepared: Any, dim: int, precision: str) -> BasicRetrievalModel:
    if "precision" in inspect.signature(BasicRetrievalModel).parameters:
        return BasicRetrievalModel(prepared.users, prepared.titles, dim, precision=precision)
    if precision != "float32":
        raise SystemExit("this tree's BasicRetrievalModel has no precision option")
    return BasicRetrievalModel(prepared.users, prepared.titles, dim)


def _epoch(model: BasicRetrievalModel, optimizer: torch.optim.Optimizer, batches: Batches) -> int:
    """One epoch of the training step, each phase under a named range; returns the number of steps."""
    steps = 0
    iterator = iter(batches)
    while True:
        with record_function("data/batching"):
            batch = next(iterator, None)
        if batch is None:
            return steps
        loss = model.compute_loss(batch, training=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        with record_function("optimizer"):
            optimizer.step()
        steps += 1


def _within(event: FunctionEvent, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` found in the names of ``event``'s ancestors (itself included), or None."""
    node: FunctionEvent | None = event
    while node is not None:
        for name in names:
            if name in node.name:
                return name
        node = node.cpu_parent
    return None


def _charge(events: list[FunctionEvent], dim: int) -> dict[str, float]:
    """Seconds of self time of the profiled operators, per part of the step (other: not charged)."""
    parts: dict[str, float] = defaultdict(float)
    # The backward's name first: the forward's is a prefix of it.
    loss_scopes = ("_InBatchSoftmaxBackward", "_InBatchSoftmax")
    scopes = ("data/batching", "optimizer", *loss_scopes, "EmbeddingBackward", "aten::embedding")
    for event in events:
        seconds = event.self_cpu_time_total / 1e6
        scope = _within(event, scopes)
        if scope in ("data/batching", "optimizer"):
            parts[scope] += seconds
        elif scope in loss_scopes:
            if event.name in _GEMMS:
                shapes = event.input_shapes
                # Q C^T multiplies [rows, d] by [d, nc]: its inner dimension is the embedding width.
                inner = shapes[0][-1] if shapes and shapes[0] else None
                logit = event.name == "aten::mm" and inner == dim and shapes[1][-1] != dim
                parts["logit GEMMs (fwd + recompute)" if logit else "gradient GEMMs"] += seconds
            else:
                parts["softmax passes"] += seconds
        elif scope == "EmbeddingBackward":
            parts["embedding scatter"] += seconds
        elif scope == "aten::embedding":
            parts["embedding gather"] += seconds
    return parts


def three_gemms(batch_size: int, dim: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median seconds of ``Q C^T``, ``G C`` and ``G^T Q`` at ``[B, B]`` in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(batch_size, dim, generator=generator).to(dtype)
    candidates = torch.randn(batch_size, dim, generator=generator).to(dtype)
    upstream = torch.randn(batch_size, batch_size, generator=generator).to(dtype)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        _ = queries @ candidates.T
        _ = upstream @ candidates
        _ = upstream.T @ queries
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def breakdown(prepared: Any, batch_size: int, dim: int, precision: str) -> tuple[dict[str, float], float, float]:
    """Milliseconds per step of each part, the unprofiled step, and the three GEMMs alone."""
    torch.manual_seed(0)
    model = _model(prepared, dim, precision)
    optimizer = keras_adagrad(model.parameters())
    batches = Batches(prepared.train_users, prepared.train_titles, batch_size=batch_size, shuffle=True, seed=0)
    model.train()
    _epoch(model, optimizer, batches)  # warm-up
    gemm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # Epochs and the reference GEMMs alternate, so that both see the same moments of a shared machine.
    walls, gemms = [], []
    for _ in range(EPOCHS):
        started = time.perf_counter()
        steps = _epoch(model, optimizer, batches)
        walls.append((time.perf_counter() - started) / steps)
        gemms.append(three_gemms(batch_size, dim, gemm_dtype))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        started = time.perf_counter()
        steps = _epoch(model, optimizer, batches)
        profiled_wall = (time.perf_counter() - started) / steps
    parts = {name: seconds / steps for name, seconds in _charge(list(profiler.events()), dim).items()}
    parts["other (set-up, autograd, Python)"] = max(0.0, profiled_wall - sum(parts.values()))
    # The profiler slows the step down: its shares are applied to the median unprofiled step.
    wall = 1000 * statistics.median(walls)
    scale = wall / (1000 * sum(parts.values()))
    parts = {name: 1000 * seconds * scale for name, seconds in parts.items()}
    return parts, wall, 1000 * statistics.median(gemms)


def print_breakdowns(prepared: Any, batch_sizes: tuple[int, ...], dim: int, precision: str = "float32") -> None:
    """Print the table: one column per batch size, ms per step and the share of the step."""
    results = {batch: breakdown(prepared, batch, dim, precision) for batch in batch_sizes}
    title = f"twotower step, {dim}-d, {precision}: ms (share)"
    print(f"{title:<36}" + "".join(f"{'batch ' + str(batch):>18}" for batch in batch_sizes))
    for part in PARTS:
        cells = ""
        for batch in batch_sizes:
            parts, wall, _ = results[batch]
            value = parts.get(part, 0.0)
            cells += f"{value:>10.2f} ({100 * value / wall:>3.0f}%)"
        print(f"{part:<36}{cells}")
    print(f"{'whole step (unprofiled)':<36}" + "".join(f"{results[b][1]:>10.2f}{'':>8}" for b in batch_sizes))
    print(f"{'3 GEMMs alone':<36}" + "".join(f"{results[b][2]:>10.2f}{'':>8}" for b in batch_sizes))
    print(f"{'step / 3 GEMMs':<36}" + "".join(f"{results[b][1] / results[b][2]:>10.2f}{'':>8}" for b in batch_sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dim", type=int, default=64, help="tower width (default 64)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads\n")
    prepared = prepare(load_movielens("100k", data_dir=args.data_dir), seed=42)
    print_breakdowns(prepared, tuple(args.batch_sizes), args.dim, args.precision)


if __name__ == "__main__":
    main()
