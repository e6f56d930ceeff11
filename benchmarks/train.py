"""Training speed of the reference model, and the cost of one in-batch softmax step against its matrix multiplies.

    python benchmarks/train.py

Prints, side by side in one run (2 threads):
1. training throughput (examples/s) of the MovieLens 100K reference model (32-d user and title towers, Adagrad,
   SUM loss) at batch 1024 and 8192, with the blocked loss (default) and with materialised logits;
2. one forward + backward step of the in-batch softmax at B = 8192, D = 64: the three matrix multiplies alone
   (Q C^T, G C, G^T Q: the limit), the blocked loss, and a plain PyTorch step (materialised logits, log_softmax,
   one-hot labels).
Needs MovieLens 100K: pass --data-dir or set TWOTOWER_DATA_DIR (a folder holding ml-100k/ or ml-100k.zip).
"""

from __future__ import annotations

import argparse
import time

import torch

from twotower.data.movielens import load_movielens
from twotower.losses import in_batch_softmax_cross_entropy
from twotower.tasks import Retrieval
from twotower.workload import BasicRetrievalModel, Batches, keras_adagrad, prepare


def _best(function: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best


def training_throughput(data_dir: str | None, batch_size: int, fused: bool, epochs: int = 2) -> float:
    data = load_movielens("100k", data_dir=data_dir)
    prepared = prepare(data, seed=42)
    torch.manual_seed(0)
    model = BasicRetrievalModel(prepared.users, prepared.titles, 32)
    model.task.fused = fused
    optimizer = keras_adagrad(model.parameters())
    train = Batches(prepared.train_users, prepared.train_titles, batch_size=batch_size, shuffle=True, seed=0)
    model.fit(train, optimizer, epochs=1, progress=False)  # warm-up: allocations, first touches
    started = time.perf_counter()
    model.fit(train, optimizer, epochs=epochs, progress=False)
    return epochs * prepared.train_users.shape[0] / (time.perf_counter() - started)


def step_times(batch: int, dim: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(batch, dim, generator=generator, requires_grad=True)
    candidates = torch.randn(batch, dim, generator=generator, requires_grad=True)
    upstream = torch.randn(batch, batch, generator=generator)

    def gemms() -> None:
        with torch.no_grad():
            _ = queries @ candidates.T
            _ = upstream @ candidates
            _ = upstream.T @ queries

    def blocked() -> None:
        in_batch_softmax_cross_entropy(queries, candidates).sum().backward()

    def plain() -> None:
        logits = queries @ candidates.T
        labels = torch.eye(batch)
        (-(labels * torch.log_softmax(logits, dim=1)).sum()).backward()

    def task_step() -> None:
        Retrieval()(queries, candidates).backward()

    return {
        "3 GEMMs only (the limit)": _best(gemms, repeats),
        "blocked in-batch softmax (twotower)": _best(blocked, repeats),
        "Retrieval task call, default options": _best(task_step, repeats),
        "plain PyTorch (materialised logits)": _best(plain, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; the best is kept (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads\n")
    print(f"{'training (MovieLens 100K reference model)':<44}{'batch':>8}{'examples/s':>14}")
    for batch_size in (1024, 8192):
        for fused in (True, False):
            label = "blocked loss (default)" if fused else "materialised logits"
            rate = training_throughput(args.data_dir, batch_size, fused)
            print(f"{label:<44}{batch_size:>8}{rate:>14,.0f}")
    times = step_times(8192, 64, args.repeats)
    limit = times["3 GEMMs only (the limit)"]
    print(f"\n{'one step, B = 8192, D = 64 (forward + backward)':<44}{'ms':>8}{'x GEMMs':>14}")
    for name, seconds in times.items():
        print(f"{name:<44}{1000 * seconds:>8.0f}{seconds / limit:>14.2f}")


if __name__ == "__main__":
    main()
