"""The ``twotower`` command line.

``twotower quickstart`` trains a two-tower model end to end on a generated data set with the
:class:`~twotower.tasks.Retrieval` task and prints its test metrics next to those of the untrained model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from twotower.data.synthetic import SyntheticInteractions, make_synthetic_interactions
from twotower.indexes import BruteForce
from twotower.metrics import BatchTopKAccuracy, FactorizedTopK, LossMean
from twotower.tasks import Retrieval


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``twotower`` command."""
    parser = argparse.ArgumentParser(prog="twotower", description="Two-tower retrieval in PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quick = commands.add_parser(
        "quickstart",
        help="train and evaluate a two-tower model on a generated data set",
        description="Train a two-tower retrieval model with the Retrieval task on generated user-item "
        "interactions, then print test top-K accuracy over the whole item corpus.",
    )
    quick.add_argument("--num-users", type=_positive_int, default=2000, help="users to generate (default 2000)")
    quick.add_argument("--num-items", type=_positive_int, default=1000, help="items to generate (default 1000)")
    quick.add_argument(
        "--interactions-per-user", type=_positive_int, default=50, help="interactions per user (default 50)"
    )
    quick.add_argument("--dim", type=_positive_int, default=32, help="embedding dimension (default 32)")
    quick.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (default 5)")
    quick.add_argument("--batch-size", type=_positive_int, default=1024, help="training batch size (default 1024)")
    quick.add_argument("--learning-rate", type=_positive_float, default=0.1, help="Adagrad learning rate (default 0.1)")
    quick.add_argument("--seed", type=int, default=0, help="random seed for data and model (default 0)")
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


def run_quickstart(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train and evaluate as ``twotower quickstart`` does; returns ``{"untrained": ..., "trained": ...}``."""
    torch.manual_seed(args.seed)
    data = make_synthetic_interactions(
        num_users=args.num_users,
        num_items=args.num_items,
        interactions_per_user=args.interactions_per_user,
        seed=args.seed,
    )
    model = EmbeddingTwoTower(data.num_users, data.num_items, args.dim)
    task = Retrieval(batch_metrics=[BatchTopKAccuracy(k=1)], loss_metrics=[LossMean()])
    optimizer = torch.optim.Adagrad(model.parameters(), lr=args.learning_rate, initial_accumulator_value=0.1, eps=1e-7)
    print(
        f"twotower quickstart: {data.num_users} users, {data.num_items} items, "
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twotower`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        run_quickstart(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
