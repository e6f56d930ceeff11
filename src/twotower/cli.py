"""The ``twotower`` command line.

* ``twotower quickstart``: the reference workload (TFRS's MovieLens 100K basic retrieval) trained, evaluated and
  saved as a run directory, with example recommendations;
* ``twotower train --interactions FILE --user-col C --item-col I [--time-col T] --out DIR`` (or ``--config
  FILE.toml``): your own interaction log to a trained, evaluated run, beside the popularity baseline;
* ``twotower evaluate --run DIR``: re-evaluate a run; ``twotower recommend --run DIR --user ID``: recommendations
  from a run or bundle; ``twotower serve --run DIR``: the HTTP service;
* ``twotower synthetic``: a two-tower model on a generated data set (no download needed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from twotower import distributed
from twotower.data.movielens import DataError, load_movielens
from twotower.data.synthetic import SyntheticInteractions, make_synthetic_interactions
from twotower.indexes import BruteForce
from twotower.metrics import BatchTopKAccuracy, FactorizedTopK, LossMean
from twotower.pipeline.runs import RunDirectoryError as RunError
from twotower.serving import BundleError, UnknownQueries
from twotower.tasks import Retrieval
from twotower.workload import PUBLISHED, WorkloadConfig, keras_adagrad, train_and_evaluate


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


#: The MovieLens reference workload's settings (TFRS's basic retrieval tutorial).
_WORKLOAD_DEFAULTS = {
    name: getattr(WorkloadConfig(), name)
    for name in ("seed", "epochs", "batch_size", "embedding_dim", "learning_rate", "precision")
}


def _add_workload_flags(parser: argparse.ArgumentParser, pipeline: bool = False) -> None:
    """The flags shared by ``quickstart`` and ``train`` (``train``'s default to None: the config file's value, else
    the pipeline's or the MovieLens workload's default)."""

    def default(name: str) -> Any:
        return None if pipeline else _WORKLOAD_DEFAULTS[name]

    parser.add_argument(
        "--data-dir",
        help="folder holding the MovieLens release chosen by --dataset, extracted (e.g. ml-100k/) or as its official "
        "zip (default: $TWOTOWER_DATA_DIR; else downloaded from GroupLens and verified)",
    )
    parser.add_argument(
        "--dataset", choices=["100k", "latest-small", "1m"], default="100k", help="MovieLens release (default 100k)"
    )
    parser.add_argument("--run-dir", default="runs/quickstart", help="where to save the run (default runs/quickstart)")
    parser.add_argument("--seed", type=int, default=default("seed"), help="seed of the split, initialisation and "
                        "shuffling (quickstart: 42)")  # fmt: skip
    parser.add_argument("--epochs", type=_positive_int, default=default("epochs"), help="training epochs "
                        "(quickstart: 3; train: at most this many, with early stopping)")  # fmt: skip
    parser.add_argument("--batch-size", type=_positive_int, default=default("batch_size"),
                        help="training batch size (quickstart: 8192; train: 4096)")  # fmt: skip
    parser.add_argument("--embedding-dim", type=_positive_int, default=default("embedding_dim"),
                        help="tower width (quickstart: 32; train: 64)")  # fmt: skip
    parser.add_argument("--learning-rate", type=_positive_float, default=default("learning_rate"),
                        help="Adagrad learning rate (0.1)")  # fmt: skip
    parser.add_argument(
        "--precision",
        choices=["float32", "bf16"],
        default=default("precision"),
        help="the loss's matrix products: float32 (default) or bf16 (faster on CPUs with bf16 matrix units)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (there are none when piped)")


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


#: ``twotower train``'s own-data flags: (setting, type, help). The flag is the setting's name (``--user-col`` sets
#: ``user_col``); a setting of :data:`~twotower.pipeline.config.CHOICES` takes one of its words; the help ends with
#: the :class:`~twotower.pipeline.PipelineConfig` default.
_PIPELINE_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("interactions", str, "the log: a CSV or Parquet file, a directory of Parquet parts, or movielens:100k"),
    ("user_col", str, "the user id column"),
    ("item_col", str, "the item id column"),
    (
        "time_col",
        str,
        "the event time column: integer seconds or milliseconds (detected and stated), timestamps, "
        "dates or ISO-8601 text",
    ),
    ("weight_col", str, "a column of non-negative weights for the loss"),
    ("items", str, "the item catalogue (CSV or Parquet): every item a candidate"),
    ("item_id_col", str, "the catalogue's id column (default: --item-col)"),
    ("item_title_col", str, "the catalogue's display-title column"),
    ("duplicates", str, "rows repeating an earlier (user, item, time)"),
    ("unknown_items", str, "interactions with items missing from the catalogue"),
    ("split", str, "time: a global time cut; last-n: each user's latest --last-n; random: seeded"),
    ("test_fraction", _fraction, "share of rows for test with time and random"),
    ("validation_fraction", _fraction, "share of training rows for validation (early stopping; 0: none)"),
    ("test_from", str, "with --split time: the first test moment, e.g. 2018-01-01"),
    ("last_n", _positive_int, "with --split last-n: test interactions per user"),
    ("user_vocabulary", str, "users with an embedding: those of the training rows or all"),
    ("user_oov_buckets", _positive_int, "rows shared by unknown users, by hash"),
    ("negatives", str, "in-batch or mixed: plus --num-negatives sampled items per batch"),
    ("num_negatives", _positive_int, "sampled negatives per batch with --negatives mixed"),
    ("logq", _on_off, "the logQ (sampling-bias) correction: on or off"),
    ("optimizer", str, "adagrad (Keras's), rowwise-adagrad (an accumulator per row) or adam (lazy; lr near 0.001)"),
    ("sparse_embeddings", _on_off, "sparse embedding gradients, Adagrad on the batch's rows only (large catalogues)"),
    ("patience", int, "early stopping: epochs without a better validation Recall@K (0: off)"),
    ("early_stopping_k", _positive_int, "the K of early stopping's Recall@K"),
    (
        "serving_index",
        str,
        "the run's serving index: exact, approximate (AnisotropicIVF) or auto (approximate from 100,000 items)",
    ),
    ("serving_target_recall", float, "recall@100 the approximate serving index is tuned for, in (0, 1]"),
    ("out", str, "the run directory to write"),
)


def _add_pipeline_flags(parser: argparse.ArgumentParser) -> None:
    """:data:`_PIPELINE_FLAGS` on ``parser``, each defaulting to None (the config file's value, else the default)."""
    from twotower.pipeline.config import CHOICES, PipelineConfig

    defaults = PipelineConfig()
    for setting, kind, text in _PIPELINE_FLAGS:
        default = getattr(defaults, setting)
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        help_text = f"{text} (default {shown})" if shown != "" and "default" not in text else text
        flag = "--" + setting.replace("_", "-")
        if setting in CHOICES:
            parser.add_argument(flag, choices=CHOICES[setting], default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _add_unknown_users_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unknown-users",
        choices=["auto", "popularity", "features", "oov", "error"],
        default="auto",
        help="a user the run does not know gets the most popular items, a feature tower's answer from the other "
        "features, the out-of-vocabulary row's answer, or an error; auto (default): features for a feature "
        "tower that reads more than the user id, else popularity; answers say which",
    )


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
        help="train, evaluate and save a model on your own interaction log (or the MovieLens reference workload)",
        description="With --interactions or --config: read the log (CSV, Parquet), split it, fit the vocabularies, "
        "train id towers (or, with [query.features] / [candidate.features] in the config, feature towers) with early "
        "stopping, print the test table beside the popularity baseline and save the run "
        "to --out (config.toml in it reproduces the run). Flags override the config file. Without them: the "
        "quickstart's MovieLens workload without the examples, which also runs under 'torchrun --nproc-per-node "
        "N' (negatives shared across processes, gradients summed; rank 0 prints and saves).",
    )
    _add_workload_flags(train, pipeline=True)
    train.add_argument("--config", help="a TOML file of settings (see examples/; flags given override it)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out (atomically)")
    _add_pipeline_flags(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="re-evaluate a run saved by 'twotower train' on its test split",
        description="Verify the run, read its data again (refused if it changed), split it as before, print the "
        "test table beside the popularity baseline and rewrite the run's metrics.json.",
    )
    evaluate.add_argument("--run", required=True, help="the run directory")

    recommend = commands.add_parser(
        "recommend",
        help="recommend items for a user from a saved run or bundle",
        description="Load the bundle of a run saved by 'twotower quickstart' or 'twotower train' (RUN/bundle, or a "
        "bundle directory; every file verified) and print the top-k items for a user, leaving out the items the "
        "user had in training. It answers exactly as 'twotower serve' does.",
    )
    recommend.add_argument("--run", required=True, help="the run directory (or a bundle directory)")
    recommend.add_argument("--user", required=True, help="the user id, e.g. 42")
    recommend.add_argument("-k", type=_positive_int, default=10, help="number of items (default 10)")
    recommend.add_argument("--include-seen", action="store_true", help="do not exclude items seen in training")
    recommend.add_argument(
        "--context", action="append", default=[], metavar="COLUMN=VALUE", type=_context_entry,
        help="a feature tower's context, e.g. --context timestamp=879024327 (numbers are read as numbers; "
        "repeat for several columns; a column left out takes its feature's default)",
    )  # fmt: skip
    _add_unknown_users_flag(recommend)

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
    _add_unknown_users_flag(serve)

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
    """Run the reference workload as ``twotower quickstart`` does: the pipeline with the TFRS tutorial's settings
    (:meth:`~twotower.workload.WorkloadConfig.pipeline_config`), saved as a pipeline run; returns its results."""
    from twotower.pipeline.runs import save_run
    from twotower.serving import load_bundle

    for name, value in _WORKLOAD_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
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
    trained = train_and_evaluate(config, data=data, data_dir=args.data_dir, progress=not args.no_progress, say=say)
    if distributed.is_distributed():
        say(f"trained on {distributed.world_size()} processes, negatives shared across them")
    results = trained.results
    if not lead:
        return results
    test, untrained = results["test"], results["untrained"]
    print(f"\n{'test top-K accuracy (TFRS metric)':<36}{'untrained':>10}{'trained':>10}{'TFRS tutorial':>15}")
    for k, published in PUBLISHED.items():
        name = f"factorized_top_k/top_{k}_categorical_accuracy"
        print(f"{'top-' + str(k):<36}{untrained[name]:>10.4f}{test[name]:>10.4f}{published:>15.4f}")
    _print_table(test, (10, 50, 100))
    run_dir = save_run(args.run_dir, trained, overwrite=True)
    print(f"\nsaved the run to {run_dir} ({time.perf_counter() - started:.1f}s)")
    bundle = load_bundle(run_dir / "bundle")
    for user in trained.prepared.users.known_values()[: max(getattr(args, "examples", 0), 0)]:
        titles = ", ".join(title for title, _ in bundle.recommend(user, k=5))
        print(f"user {user}: {titles}")
    return results


def run_serve(args: argparse.Namespace) -> None:
    """Serve the run's bundle with uvicorn until interrupted."""
    from twotower.serving import load_bundle, make_server

    directory = Path(args.run)
    bundle = load_bundle(
        directory / "bundle" if (directory / "bundle").is_dir() else directory,
        expected_manifest_sha256=args.expect_manifest_sha256,
        unknown_queries=args.unknown_users,
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


def _load_served_bundle(path: str, unknown_users: str) -> Any:
    from twotower.serving import load_bundle

    directory = Path(path)
    if not directory.exists():
        raise RunError(f"no run directory at {directory}")
    policy = cast(UnknownQueries, unknown_users)  # argparse's choices already restrict it
    if not (directory / "bundle").is_dir():
        return load_bundle(directory, unknown_queries=policy)  # a bundle directory on its own
    # A run: its own manifest is checked first, so a damaged run is refused as `evaluate` would refuse it, even
    # where the damage is outside the bundle it serves from.
    from twotower._files import read_verified_directory
    from twotower.pipeline.runs import RUN_FORMAT

    read_verified_directory(directory, RUN_FORMAT, RunError, "run", exclusive=False)
    return load_bundle(directory / "bundle", unknown_queries=policy)


def _context_entry(text: str) -> tuple[str, str | int | float]:
    """``COLUMN=VALUE`` as ``(column, value)``: an integer or a finite number where the value reads as one."""
    column, equals, value = text.partition("=")
    if not equals or not column:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if math.isfinite(number):
            return column, number
    return column, value


def run_recommend(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Answer ``twotower recommend`` from the run's bundle, as ``serve`` would; prints and returns ``(item,
    score)`` pairs (a :class:`~twotower.serving.Recommendations`, whose ``source`` says how it was answered)."""
    bundle = _load_served_bundle(args.run, args.unknown_users)
    try:
        answer = bundle.recommend(args.user, k=args.k, exclude_seen=not args.include_seen,
                                  context=dict(args.context))  # fmt: skip
    except KeyError as error:
        raise RunError(
            f"unknown user id {args.user!r}: the run's vocabulary does not hold it (--unknown-users popularity "
            "answers such users with the most popular training items)"
        ) from error
    source = getattr(answer, "source", "model")
    if source == "popularity":
        print(f"user {args.user!r} is not in the run: the most popular training items (score: training count)")
    elif source == "oov":
        print(f"user {args.user!r} is not in the run: answered with the out-of-vocabulary row")
    elif source == "features":
        print(f"user {args.user!r} is not in the run: answered by the query tower from the other features")
    for rank, (item, score) in enumerate(answer, start=1):
        title = bundle.title_of(item)
        shown = item if title == item else f"{title} [{item}]"
        print(f"{rank:>3}. {shown}  ({score:.3f})")
    return list(answer)


def _print_table(test: dict[str, Any], ks: Sequence[int]) -> None:
    """The model beside popularity on the same test users, then cold users and TFRS's top-K accuracy."""
    users = test.get("model/users", 0)
    print(f"\ntest users with training history: {users:,} (training items excluded from their rankings)")
    print(f"{'metric':<16}{'model':>10}{'popularity':>12}{'model / pop.':>14}")
    names = [(f"Recall@{k}", f"recall@{k}") for k in ks] + [(f"NDCG@{k}", f"ndcg@{k}") for k in ks[-1:]]
    names += [(f"hit rate@{k}", f"hit_rate@{k}") for k in ks[-1:]] + [("MRR", "mrr")]
    for label, key in names:
        if f"model/{key}" in test:
            model, popular = test[f"model/{key}"], test.get(f"popularity/{key}")
            ratio = f"{model / popular:>14.2f}" if popular else f"{'':>14}"
            shown = f"{popular:>12.4f}" if popular is not None else f"{'':>12}"
            print(f"{label:<16}{model:>10.4f}{shown}{ratio}")
    cold = test.get("cold_users/users")
    if cold:
        k = ks[-1]
        print(f"cold test users (not in training, answered by popularity): {cold:,}; their Recall@{k} "
              f"{test[f'cold_users/recall@{k}']:.4f}")  # fmt: skip
    rows, cold_items = test.get("split/eval_rows", 0), test.get("split/eval_cold_item_rows", 0)
    if rows:
        print(f"test interactions with items never seen in training (misses for any id model): {cold_items:,} "
              f"of {rows:,}")  # fmt: skip
    accuracy = [k for k in (1, 5, 10, 50, 100) if f"factorized_top_k/top_{k}_categorical_accuracy" in test]
    if accuracy:
        values = ", ".join(f"top-{k} {test[f'factorized_top_k/top_{k}_categorical_accuracy']:.4f}" for k in accuracy)
        print(f"TFRS top-K accuracy (per test interaction, nothing excluded): {values}")


def run_train_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """``twotower train`` on an interaction log: train, evaluate, print, save; returns the test results."""
    from twotower.pipeline.runs import check_output_directory, config_from_flags, save_run
    from twotower.pipeline.training import train

    flags = {setting: getattr(args, setting) for setting, _, _ in _PIPELINE_FLAGS}
    for name in ("seed", "epochs", "batch_size", "embedding_dim", "learning_rate", "precision"):
        flags[name] = getattr(args, name)
    if args.data_dir is not None:
        flags["data_dir"] = args.data_dir
    config = config_from_flags(args.config, flags)
    if not config.out:
        raise ValueError("no run directory given: pass --out DIR (or out = ... under [run] in the config)")
    # Refuse a taken output directory before any work, and write nothing until the run is complete.
    check_output_directory(Path(config.out), args.overwrite)
    started = time.perf_counter()
    trained = train(config, progress=not args.no_progress, say=lambda line: print(line, flush=True))
    test: dict[str, Any] = trained.results["test"]
    _print_table(test, config.ks)
    directory = save_run(config.out, trained, overwrite=args.overwrite)
    print(f"\nsaved the run to {directory} ({time.perf_counter() - started:.1f}s); try: twotower recommend --run "
          f"{directory} --user {trained.prepared.users.known_values()[0]!r}")  # fmt: skip
    return test


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """``twotower evaluate --run DIR``."""
    from twotower.pipeline.runs import evaluate_run, load_pipeline_run

    run = load_pipeline_run(args.run)
    test = evaluate_run(args.run)
    _print_table(test, run.config.ks)
    print(f"\nwrote {Path(args.run) / 'metrics.json'}")
    return test


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twotower`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train" and (args.interactions is not None or args.config is not None):
            run_train_pipeline(args)
        elif args.command in ("quickstart", "train"):
            try:
                run_quickstart(args)
            finally:
                distributed.shutdown()
        elif args.command == "evaluate":
            run_evaluate(args)
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
