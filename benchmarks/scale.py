"""Scale: step time against table size (dense against sparse updates), and a 100M-row log streamed from Parquet.

Part 1, step time. With dense gradients (``nn.Embedding`` and the fused ``keras_adagrad``) every step zeroes,
fills and updates the whole ``[rows, 64]`` table, its gradient and its Adagrad accumulator: O(table). With
``sparse_embeddings`` the gradient holds the batch's rows and ``sparse_keras_adagrad`` updates only those
(TensorFlow's sparse Adagrad, the same arithmetic): O(batch). Each size builds both models of the pipeline
(``IdRetrievalModel``: a 100,000-row user table, the item table, the in-batch softmax at batch 4096), warms each
up, then alternates their steps (dense, sparse, dense, ...) and reports each one's median step.

Part 2, streaming (skipped with ``--quick``). A generated log (``write_synthetic_log``: 100M rows, 10M users, 1M
items, in time order) is split by time (the last 1% of the rows held out); one pass fits the vocabularies and the
training counts, then a separate process trains the sparse model (Adagrad 0.1, logQ correction) on the training
rows streamed by ``ParquetBatches`` (shuffle buffer of 2M rows; one epoch unless ``--train-examples`` says fewer)
and evaluates Recall@100, seen items excluded, for a sample of the held-out users against popularity. It reports
examples/s, the process's peak RSS and the tables' memory.

    python benchmarks/scale.py --quick                  # step table only (item tables of 10k .. 10M rows)
    python benchmarks/scale.py --json scale.json        # and the 100M-row streamed run (about 20 minutes)
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

import numpy as np
import torch

from twotower.optim import keras_adagrad, sparse_keras_adagrad
from twotower.pipeline.model import IdRetrievalModel


def _step(model: IdRetrievalModel, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...]) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model.compute_loss(batch, training=True).backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return time.perf_counter() - started


def step_table(sizes: list[int], batch_size: int, dim: int, steps: int) -> list[dict[str, Any]]:
    """Median step (ms) of the dense and the sparse path for each item-table size, interleaved; prints a table."""
    generator = torch.Generator().manual_seed(0)
    rows_out: list[dict[str, Any]] = []
    print(f"batch {batch_size}, {dim}-d, in-batch softmax, 100,000 users; median of {steps} interleaved steps per "
          "path")  # fmt: skip
    print(f"{'item rows':>12}{'dense ms':>12}{'sparse ms':>12}{'dense / sparse':>16}{'sparse / sparse@first':>24}")
    first_sparse = None
    for table_rows in sizes:
        models = {}
        for path in ("dense", "sparse"):
            torch.manual_seed(0)
            model = IdRetrievalModel(
                100_000, table_rows, dim, batch_size=batch_size, sparse_embeddings=path == "sparse"
            )
            adagrad = sparse_keras_adagrad if path == "sparse" else keras_adagrad
            models[path] = (model, adagrad(model.parameters(), 0.1))
        times: dict[str, list[float]] = {"dense": [], "sparse": []}
        for step in range(steps + 1):
            users = torch.randint(0, 100_000, (batch_size,), generator=generator)
            items = torch.randint(1, table_rows, (batch_size,), generator=generator)
            for path in ("dense", "sparse") if step % 2 == 0 else ("sparse", "dense"):
                seconds = _step(*models[path], (users, items))
                if step:  # the first step of each is a warm-up (first touches of the tables and accumulators)
                    times[path].append(seconds)
        del models
        medians = {path: 1000 * statistics.median(values) for path, values in times.items()}
        first_sparse = first_sparse or medians["sparse"]
        print(f"{table_rows:>12,}{medians['dense']:>12.1f}{medians['sparse']:>12.1f}"
              f"{medians['dense'] / medians['sparse']:>16.1f}{medians['sparse'] / first_sparse:>24.2f}")  # fmt: skip
        rows_out += [{"table_rows": table_rows, "path": path, "ms_per_step": medians[path]} for path in medians]
    return rows_out


def _identity(array: Any) -> np.ndarray:
    return np.asarray(array.to_numpy(zero_copy_only=False))


def prepare_log(path: Path, rows: int, users: int, items: int, held_out: float) -> dict[str, Any]:
    """Generate the log if absent; one streamed pass for the time cutoff, the training users and item counts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from twotower.data import write_synthetic_log

    if not path.exists():
        started = time.perf_counter()
        write_synthetic_log(path, rows, users, items, seed=0)
        print(f"generated {rows:,} rows ({users:,} users, {items:,} items) in {time.perf_counter() - started:.0f} s: "
              f"{path} ({path.stat().st_size / 2**30:.2f} GiB)")  # fmt: skip
    file = pq.ParquetFile(path)
    # The log is in time order: the cutoff is the time of the first held-out row (its row group alone is read).
    first_test = int(rows * (1 - held_out))
    group, start = 0, 0
    while start + file.metadata.row_group(group).num_rows <= first_test:
        start += file.metadata.row_group(group).num_rows
        group += 1
    cutoff = int(file.read_row_group(group, columns=["ts"]).column("ts")[first_test - start].as_py())
    started = time.perf_counter()
    trained_users = np.zeros(users, dtype=bool)
    counts = np.zeros(items, dtype=np.int64)
    train_rows = 0
    for batch in file.iter_batches(batch_size=1 << 21, columns=["user_id", "item_id", "ts"]):
        keep = pc.less(batch.column("ts"), cutoff)
        kept = batch.filter(keep)
        trained_users[_identity(kept.column("user_id"))] = True
        counts += np.bincount(_identity(kept.column("item_id")), minlength=items)
        train_rows += kept.num_rows
    print(
        f"time split: {train_rows:,} training rows before {cutoff}, {rows - train_rows:,} held out; "
        f"{int(trained_users.sum()):,} training users; vocabulary pass {time.perf_counter() - started:.0f} s"
    )
    return {"cutoff": cutoff, "trained_users": trained_users, "item_counts": counts, "train_rows": train_rows}


def stream_run(args: argparse.Namespace) -> dict[str, Any]:
    """Train on the streamed log and evaluate (run in its own process, for its own peak RSS)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from twotower.data.streaming import IntegerIdRows, ParquetBatches
    from twotower.metrics import CorpusRanking

    torch.set_num_threads(args.threads)
    path = Path(args.log)
    facts = prepare_log(path, args.log_rows, args.users, args.items, args.held_out)
    known_users = np.flatnonzero(facts["trained_users"])
    user_rows = IntegerIdRows(known_users, np.arange(1, known_users.shape[0] + 1))  # row 0: unseen users
    item_rows = IntegerIdRows(np.arange(args.items), np.arange(1, args.items + 1))  # the whole catalogue
    stream = ParquetBatches(
        path, {"user_id": user_rows, "item_id": item_rows}, batch_size=args.batch_size,
        shuffle_buffer=args.shuffle_buffer, seed=0, filter=pc.field("ts") < facts["cutoff"],
    )  # fmt: skip
    torch.manual_seed(0)
    # The in-batch softmax with the logQ correction (from the training counts; row 0, OOV, has none): without it
    # the popular items, the batches' most frequent negatives, are pushed down.
    counts = np.concatenate([[0], facts["item_counts"]]) if args.logq == "on" else None
    model = IdRetrievalModel(known_users.shape[0] + 1, args.items + 1, args.dim, init_scale=0.05, item_counts=counts,
                             batch_size=args.batch_size, sparse_embeddings=True)  # fmt: skip
    optimizer = sparse_keras_adagrad(model.parameters(), args.learning_rate)
    table_bytes = sum(parameter.numel() * 4 * 2 for parameter in model.parameters())  # weights + accumulators
    steps = (args.train_examples or facts["train_rows"]) // args.batch_size
    examples, started, losses = 0, time.perf_counter(), []
    model.train()
    for step, batch in enumerate(stream):
        if step == steps:
            break
        losses.append(model.train_step(batch, optimizer)["loss"] / batch[0].shape[0])
        examples += batch[0].shape[0]
        if (step + 1) % 500 == 0:
            rate = examples / (time.perf_counter() - started)
            print(f"  {examples:>12,} examples, {rate:,.0f}/s, mean loss (last 500) {np.mean(losses[-500:]):.3f}",
                  flush=True)  # fmt: skip
    seconds = time.perf_counter() - started
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Evaluation: a sample of the held-out users that training saw; their training items are excluded.
    file = pq.ParquetFile(path)
    # The log is in time order: the statistics skip every row group before the cutoff.
    test = pq.read_table(path, columns=["user_id", "item_id"], filters=pc.field("ts") >= facts["cutoff"])
    test_users, test_items = _identity(test.column("user_id")), _identity(test.column("item_id"))
    seen_users = np.unique(test_users[facts["trained_users"][test_users]])
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(seen_users, min(args.eval_users, seen_users.shape[0]), replace=False))
    chosen = np.zeros(args.users, dtype=bool)
    chosen[sample] = True
    pairs: list[list[np.ndarray]] = [[], []]
    for batch in file.iter_batches(batch_size=1 << 21, columns=["user_id", "item_id", "ts"]):
        kept = batch.filter(pc.less(batch.column("ts"), facts["cutoff"]))
        users = _identity(kept.column("user_id"))
        mine = chosen[users]
        pairs[0].append(users[mine])
        pairs[1].append(_identity(kept.column("item_id"))[mine])
    seen_u, seen_i = np.concatenate(pairs[0]), np.concatenate(pairs[1])
    position = {int(user): index for index, user in enumerate(sample)}
    seen: list[list[int]] = [[] for _ in sample]
    relevant: list[list[int]] = [[] for _ in sample]
    for user, item in zip(seen_u.tolist(), seen_i.tolist(), strict=True):
        seen[position[user]].append(item + 1)
    in_sample = chosen[test_users]
    for user, item in zip(test_users[in_sample].tolist(), test_items[in_sample].tolist(), strict=True):
        relevant[position[user]].append(item + 1)
    from twotower.indexes import BruteForce

    popular = BruteForce(k=100).index(torch.as_tensor(facts["item_counts"], dtype=torch.float32)[:, None],
                                      torch.arange(1, args.items + 1))  # fmt: skip
    ranking = CorpusRanking(model.item_index(), ks=(10, 100), name="model")
    baseline = CorpusRanking(popular, ks=(10, 100), name="popularity")
    model.eval()
    rows = torch.from_numpy(user_rows(sample))
    for begin in range(0, sample.shape[0], 1024):
        end = begin + 1024
        with torch.no_grad():
            queries = model.user_embedding(rows[begin:end])
        ranking.update(queries, relevant[begin:end], seen[begin:end])
        baseline.update(torch.ones(queries.shape[0], 1), relevant[begin:end], seen[begin:end])
    results = {**ranking.results(), **baseline.results()}
    return {
        "log_rows": args.log_rows, "users": args.users, "items": args.items, "train_rows": facts["train_rows"],
        "examples": examples, "seconds": seconds, "examples_per_s": examples / seconds,
        "peak_rss_gib_training": train_rss, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "table_rows": int(sum(parameter.shape[0] for parameter in model.parameters())),
        "table_gib": table_bytes / 2**30, "bytes_per_row": 2 * 4 * args.dim,
        "eval_users": int(sample.shape[0]), "first_loss": float(np.mean(losses[:100])),
        "last_loss": float(np.mean(losses[-100:])), **{key: float(value) for key, value in results.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the step table only (no 100M-row run)")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000],
                        help="item-table sizes of the step table")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per path and size (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "twotower-scale-100M.parquet"),
                        help="the generated log (written if absent)")  # fmt: skip
    parser.add_argument("--log-rows", type=int, default=100_000_000)
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--held-out", type=float, default=0.01, help="the last fraction of the log, by time")
    parser.add_argument("--train-examples", type=int, default=0, help="examples to train on (default 0: one epoch)")
    parser.add_argument("--shuffle-buffer", type=int, default=1 << 21)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--logq", choices=("on", "off"), default="on", help="the logQ correction (default on)")
    parser.add_argument("--eval-users", type=int, default=20_000)
    parser.add_argument("--json", help="also write the step table's rows as JSON (table_rows, path, ms_per_step)")
    parser.add_argument("--stream-json", help="also write the streamed run's figures as JSON")
    parser.add_argument("--stream-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stream_only:
        print("RESULT " + json.dumps(stream_run(args)), flush=True)
        return
    rows = step_table(args.rows, args.batch_size, args.dim, args.steps)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    if not args.quick:
        child = [sys.executable, __file__, "--stream-only", *sys.argv[1:]]
        result = None
        with subprocess.Popen(child, stdout=subprocess.PIPE, text=True) as process:
            assert process.stdout is not None
            for line in process.stdout:  # the child's progress as it comes
                if line.startswith("RESULT "):
                    result = line[len("RESULT ") :]
                else:
                    print(line, end="", flush=True)
        if process.returncode or result is None:
            raise SystemExit(f"the streamed run failed (exit status {process.returncode})")
        run = json.loads(result)
        print(f"\nstreamed: {run['examples']:,} examples of {run['train_rows']:,} training rows in "
              f"{run['seconds']:.0f} s = {run['examples_per_s']:,.0f} examples/s; peak RSS {run['peak_rss_gib']:.2f} "
              f"GiB (training {run['peak_rss_gib_training']:.2f}); tables {run['table_rows']:,} rows x "
              f"{run['bytes_per_row']} B (weights + Adagrad) = {run['table_gib']:.2f} GiB")  # fmt: skip
        print(f"Recall@100 on {run['eval_users']:,} held-out users (seen items excluded): model "
              f"{run['model/recall@100']:.4f}, popularity {run['popularity/recall@100']:.4f}; Recall@10 "
              f"{run['model/recall@10']:.4f} vs {run['popularity/recall@10']:.4f}")  # fmt: skip
        if args.stream_json:
            with open(args.stream_json, "w", encoding="utf-8") as handle:
                json.dump(run, handle, indent=2)


if __name__ == "__main__":
    main()
