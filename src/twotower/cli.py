"""The ``twotower`` command line.

* ``twotower quickstart``: the reference workload (TFRS's MovieLens 100K basic retrieval) trained, evaluated and
  saved as a run directory, with example recommendations;
* ``twotower recommend --run DIR --user ID``: recommendations from a saved run;
* ``twotower synthetic``: a two-tower model on a generated data set (no download needed).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from twotower import distributed
from twotower.data.movielens import DataError, load_movielens
from twotower.data.synthetic import SyntheticInteractions, make_synthetic_interactions
from twotower.indexes import BruteForce
from twotower.metrics import BatchTopKAccuracy, FactorizedTopK, LossMean
from twotower.serving import BundleError
from twotower.tasks import Retrieval
from twotower.workload import (
    PUBLISHED,
    RunError,
    WorkloadConfig,
    keras_adagrad,
    load_run,
    recommend,
    save_run,
    train_and_evaluate,
)


class EmbeddingTwoTower(nn.Module):
    """A query tower and a candidate tower, each an embedding table of ``dim`` columns."""

    def __init__(self, num_users: int, num_items: int, dim: int) -> None:
        super().__init__()
        self.user_tower = nn.Embedding(num_users, dim)
        self.item_tower = nn.Embedding(num_items, dim)
        # Keras's default Embedding initialiser, as in the TFRS tutorials.
        nn.init.uniform_(self.user_tower.weight, -0.05, 0.05)
        nn.init.uniform_(self.item_tower.weight, -0.05, 0.05)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_workload_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``quickstart`` and ``train``."""
    parser.add_argument("--data-dir", help="folder holding ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument(
        "--dataset", choices=["100k", "latest-small", "1m"], default="100k", help="MovieLens release (default 100k)"
    )
    parser.add_argument("--run-dir", default="runs/quickstart", help="where to save the run (default runs/quickstart)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the split, initialisation and shuffling (42)")
    parser.add_argument("--epochs", type=_positive_int, default=3, help="training epochs (default 3)")
    parser.add_argument("--batch-size", type=_positive_int, default=8192, help="training batch size (default 8192)")
    parser.add_argument("--embedding-dim", type=_positive_int, default=32, help="tower width (default 32)")
    parser.add_argument("--learning-rate", type=_positive_float, default=0.1, help="Adagrad learning rate (0.1)")
    parser.add_argument(
        "--precision",
        choices=["float32", "bf16"],
        default="float32",
        help="the loss's matrix products: float32 (default) or bf16 (faster on CPUs with bf16 matrix units)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``twotower`` command."""
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower retrieval in PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = commands.add_parser(
        "quickstart",
        help="train, evaluate and save the MovieLens reference workload (TFRS's basic retrieval tutorial)",
        description="Train the TFRS basic-retrieval model on MovieLens (user-id and movie-title towers, Adagrad, "
        "in-batch softmax), print test top-K accuracy, Recall@K and NDCG@K (seen items excluded), save the run "
        "and show example recommendations. The data is read from --data-dir or $TWOTOWER_DATA_DIR, else "
        "downloaded from GroupLens and verified by checksum.",
    )
    _add_workload_flags(quick)
    quick.add_argument("--examples", type=int, default=3, help="users to show recommendations for (default 3)")

    train = commands.add_parser(
        "train",
        help="train, evaluate and save the reference workload; runs unchanged under torchrun",
        description="The quickstart's training and evaluation without the examples. Under 'torchrun "
        "--nproc-per-node N' each process takes its slice of every global batch, negatives are shared across "
        "processes and gradients summed, so the result does not depend on N; rank 0 prints and saves.",
    )
    _add_workload_flags(train)

    recommend = commands.add_parser(
        "recommend",
        help="recommend movies for a user from a saved run",
        description="Load a run saved by 'twotower quickstart' (verifying every file's checksum) and print the "
        "top-k movie titles for a user, leaving out the titles the user rated in training.",
    )
    recommend.add_argument("--run", required=True, help="the run directory")
    recommend.add_argument("--user", required=True, help="the MovieLens user id, e.g. 42")
    recommend.add_argument("-k", type=_positive_int, default=10, help="number of titles (default 10)")
    recommend.add_argument("--include-seen", action="store_true", help="do not exclude titles seen in training")

    serve = commands.add_parser(
        "serve",
        help="serve recommendations over HTTP from a saved run (FastAPI + uvicorn)",
        description="Load the retrieval bundle of a run saved by 'twotower quickstart' (RUN/bundle, every file "
        "verified) and answer POST /recommend {user_id, k, exclude, exclude_seen} and GET /healthz.",
    )
    serve.add_argument("--run", required=True, help="the run directory (or a bundle directory)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--max-batch",
        type=_positive_int,
        default=64,
        help="most concurrent requests answered by one batched search (default 64; 1 turns batching off)",
    )
    serve.add_argument(
        "--expect-manifest-sha256",
        metavar="HEX",
        help="serve only if the bundle's manifest.json has this SHA-256 (pins the exact bundle; printed at start)",
    )
    serve.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds a request has to arrive whole; slower clients are disconnected (default 10)",
    )
    serve.add_argument(
        "--max-connections", type=_positive_int, default=1000, help="connections open at once (default 1000)"
    )

    synthetic = commands.add_parser(
        "synthetic",
        help="train and evaluate a two-tower model on a generated data set",
        description="Train a two-tower retrieval model with the Retrieval task on generated user-item "
        "interactions, then print test top-K accuracy over the whole item corpus.",
    )
    synthetic.add_argument("--num-users", type=_positive_int, default=2000, help="users to generate (default 2000)")
    synthetic.add_argument("--num-items", type=_positive_int, default=1000, help="items to generate (default 1000)")
    synthetic.add_argument(
        "--interactions-per-user", type=_positive_int, default=50, help="interactions per user (default 50)"
    )
    synthetic.add_argument("--dim", type=_positive_int, default=32, help="embedding dimension (default 32)")
    synthetic.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default 5)")
    synthetic.add_argument("--batch-size", type=_positive_int, default=1024, help="training batch size (default 1024)")
    synthetic.add_argument(
        "--learning-rate", type=_positive_float, default=0.1, help="Adagrad learning rate (default 0.1)"
    )
    synthetic.add_argument("--seed", type=int, default=0, help="random seed for data and model (default 0)")
    return parser


def _evaluate(model: EmbeddingTwoTower, data: SyntheticInteractions) -> dict[str, float]:
    with torch.no_grad():
        index = BruteForce(k=100).index(model.item_tower.weight.detach())
        task = Retrieval(metrics=FactorizedTopK(index, ks=(1, 5, 10, 50, 100)), loss_metrics=[LossMean()])
        for start in range(0, data.test_users.shape[0], 4096):
            users = data.test_users[start : start + 4096]
            items = data.test_items[start : start + 4096]
            task(
                model.user_tower(users),
                model.item_tower(items),
                candidate_ids=items,
                compute_batch_metrics=False,
            )
    return task.metric_results()


def run_synthetic(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train and evaluate as ``twotower synthetic`` does; returns ``{"untrained": ..., "trained": ...}``."""
    torch.manual_seed(args.seed)
    data = make_synthetic_interactions(
        num_users=args.num_users,
        num_items=args.num_items,
        interactions_per_user=args.interactions_per_user,
        seed=args.seed,
    )
    model = EmbeddingTwoTower(data.num_users, data.num_items, args.dim)
    task = Retrieval(batch_metrics=[BatchTopKAccuracy(k=1)], loss_metrics=[LossMean()])
    optimizer = keras_adagrad(model.parameters(), args.learning_rate)
    print(
        f"twotower synthetic: {data.num_users} users, {data.num_items} items, "
        f"{data.train_users.shape[0]} train / {data.test_users.shape[0]} test interactions"
    )
    untrained = _evaluate(model, data)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        started = time.perf_counter()
        task.reset_metrics()
        order = torch.randperm(data.train_users.shape[0], generator=generator)
        for start in range(0, order.shape[0], args.batch_size):
            batch = order[start : start + args.batch_size]
            items = data.train_items[batch]
            loss = task(model.user_tower(data.train_users[batch]), model.item_tower(items), candidate_ids=items)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results = task.metric_results()
        print(
            f"epoch {epoch + 1}/{args.epochs}: mean batch loss {results['loss_mean']:.2f}, "
            f"in-batch top-1 {results['batch_top_1_categorical_accuracy']:.4f} "
            f"({time.perf_counter() - started:.1f}s)"
        )
    trained = _evaluate(model, data)
    print(f"\n{'test metric (whole item corpus)':<46}{'untrained':>12}{'trained':>12}")
    for name in trained:
        if name.startswith("factorized_top_k/"):
            print(f"{name:<46}{untrained[name]:>12.4f}{trained[name]:>12.4f}")
    return {"untrained": untrained, "trained": trained}


def run_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    """Run the reference workload as ``twotower quickstart`` does; returns its results."""
    config = WorkloadConfig(
        dataset=args.dataset,
        seed=args.seed,
        embedding_dim=args.embedding_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        precision=args.precision,
    )
    data = load_movielens(config.dataset, data_dir=args.data_dir)
    distributed.init_from_environment()
    lead = distributed.rank() == 0
    say = print if lead else _quiet
    say(
        f"twotower quickstart: MovieLens {config.dataset}, {len(data):,} ratings; user-id and movie-title towers "
        f"({config.embedding_dim}-d), batch {config.batch_size}, {config.epochs} epochs"
    )
    started = time.perf_counter()
    model, prepared, results = train_and_evaluate(config, data=data, progress=not args.no_progress)
    if distributed.is_distributed():
        say(f"trained on {distributed.world_size()} processes, negatives shared across them")
    for row in results["history"]:
        say(f"epoch {int(row['epoch'])}: mean batch loss {row['loss']:,.1f}")
    if not lead:
        return results
    run_dir = save_run(args.run_dir, model, prepared, results, config)
    test = results["test"]
    print(f"\n{'test top-K accuracy (TFRS metric)':<36}{'untrained':>10}{'trained':>10}{'TFRS tutorial':>15}")
    for k, published in PUBLISHED.items():
        name = f"factorized_top_k/top_{k}_categorical_accuracy"
        print(f"{'top-' + str(k):<36}{results['untrained'][name]:>10.4f}{test[name]:>10.4f}{published:>15.4f}")
    print(f"\n{'per test user, seen items excluded':<36}{'Recall':>10}{'NDCG':>10}{'hit rate':>15}")
    for k in (10, 50, 100):
        print(
            f"{'@' + str(k):<36}{test[f'corpus/recall@{k}']:>10.4f}{test[f'corpus/ndcg@{k}']:>10.4f}"
            f"{test[f'corpus/hit_rate@{k}']:>15.4f}"
        )
    print(f"{'MRR@100':<36}{test['corpus/mrr']:>10.4f}")
    print(f"\nsaved the run to {run_dir} ({time.perf_counter() - started:.1f}s)")
    loaded = load_run(run_dir)
    for user in prepared.users.values[: max(getattr(args, "examples", 0), 0)]:
        titles = ", ".join(title for title, _ in recommend(loaded, str(user), k=5))
        print(f"user {user}: {titles}")
    return results


def run_serve(args: argparse.Namespace) -> None:
    """Serve the run's bundle with uvicorn until interrupted."""
    from twotower.serving import load_bundle, make_server

    directory = Path(args.run)
    bundle = load_bundle(
        directory / "bundle" if (directory / "bundle").is_dir() else directory,
        expected_manifest_sha256=args.expect_manifest_sha256,
    )
    server = make_server(
        bundle,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
    )
    print(
        f"twotower serve: {bundle.index.num_candidates:,} items, listening on http://{args.host}:{args.port} "
        f"(bundle manifest SHA-256 {bundle.manifest_sha256})",
        flush=True,
    )
    server.run()


def _quiet(*_: object, **__: object) -> None:
    """Ranks other than 0 print nothing."""


def run_recommend(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Answer ``twotower recommend``; prints and returns ``(title, score)`` pairs."""
    run = load_run(args.run)
    answer = recommend(run, args.user, k=args.k, exclude_seen=not args.include_seen)
    for rank, (title, score) in enumerate(answer, start=1):
        print(f"{rank:>3}. {title}  ({score:.3f})")
    return answer


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twotower`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("quickstart", "train"):
            try:
                run_quickstart(args)
            finally:
                distributed.shutdown()
        elif args.command == "recommend":
            run_recommend(args)
        elif args.command == "serve":
            run_serve(args)
        else:
            run_synthetic(args)
    except (DataError, RunError, BundleError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"twotower {args.command}: error: {message}", file=sys.stderr)
        return 1
    except OSError as error:  # an unreadable file, a full disk, a port in use: one line, no traceback
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"twotower {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
