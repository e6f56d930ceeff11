"""Training-step time against the item table's size: dense embedding gradients against sparse ones.

With dense gradients (``nn.Embedding`` and the fused ``keras_adagrad``) every step zeroes, fills and updates the
whole ``[rows, 64]`` table, its gradient and its Adagrad accumulator: O(table). With ``sparse_embeddings`` the
gradient holds the batch's rows and ``sparse_keras_adagrad`` updates only those (TensorFlow's sparse Adagrad, the
same arithmetic): O(batch). Each size builds both models of the pipeline (``IdRetrievalModel``: a 100,000-row user
table, the item table, the in-batch softmax at batch 4096), warms each up, then alternates their steps
(dense, sparse, dense, ...) and reports each one's median step.

    python benchmarks/embedding_step.py                      # item tables of 10k, 100k, 1M, 10M rows
    python benchmarks/embedding_step.py --rows 10000 1000000 --json steps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from twotower.optim import keras_adagrad, sparse_keras_adagrad
from twotower.pipeline.model import IdRetrievalModel


def _step(model: IdRetrievalModel, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model.compute_loss(batch, training=True).backward()
    optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per path and size (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    print(f"batch {args.batch_size}, {args.dim}-d, in-batch softmax, {args.threads} threads; median of {args.steps} "
          f"interleaved steps per path")  # fmt: skip
    print(f"{'item rows':>12}{'dense ms':>12}{'sparse ms':>12}{'dense / sparse':>16}")
    for table_rows in args.rows:
        models = {}
        for path in ("dense", "sparse"):
            torch.manual_seed(0)
            model = IdRetrievalModel(100_000, table_rows, args.dim, sparse_embeddings=path == "sparse")
            adagrad = sparse_keras_adagrad if path == "sparse" else keras_adagrad
            models[path] = (model, adagrad(model.parameters(), 0.1))
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for step in range(args.steps + 1):
            users = torch.randint(0, 100_000, (args.batch_size,), generator=generator)
            items = torch.randint(1, table_rows, (args.batch_size,), generator=generator)
            for path in ("dense", "sparse") if step % 2 == 0 else ("sparse", "dense"):
                seconds = _step(*models[path], (users, items))
                if step:  # the first step of each is a warm-up (first touches of the tables and accumulators)
                    times[path].append(seconds)
        del models
        medians = {path: 1000 * statistics.median(values) for path, values in times.items()}
        print(f"{table_rows:>12,}{medians['dense']:>12.1f}{medians['sparse']:>12.1f}"
              f"{medians['dense'] / medians['sparse']:>16.1f}")  # fmt: skip
        rows_out += [{"table_rows": table_rows, "path": path, "ms_per_step": medians[path]} for path in medians]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows_out, handle, indent=2)


if __name__ == "__main__":
    main()
