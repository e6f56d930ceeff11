"""twotower against TensorFlow Recommenders 0.7.7, interleaved in one run on this machine.

    bash benchmarks/tfrs_env.sh python benchmarks/peer_tfrs.py --data-dir ../shared/data

1. Training: the MovieLens 100K basic-retrieval workload (64-d user and title towers, the SUM loss, Adagrad 0.1)
   at batch 256, 1024, 4096 and 8192. For each batch size both libraries get the same training rows in the same
   order, train one warm-up epoch (excluded: graph tracing, first touches), then alternate single epochs,
   TFRS / twotower / twotower bf16, for --pairs rounds (the order of the three rotates each round, so that a
   slower or faster moment of a shared machine falls on each library in turn), each after 0.3 s of rest so that
   the previous library's spinning worker threads are idle (untimed). Each round gives one per-pair
   ratio, twotower's examples/s over TFRS's in that round; the table prints each library's median examples/s and
   the median, min and max of the per-pair ratios.
2. Evaluation: test loss plus factorized top-K over every title, interleaved in the same way.
3. Test top-K accuracy after 3 epochs at batch 8192, for TFRS, twotower and twotower bf16.
4. Exact top-100 over N = 1,000,000 x D = 64 candidates for 4,096 queries: TFRS's BruteForce and Streaming
   against twotower's.
5. twotower's step breakdown at batch 1024, 4096 and 8192 (benchmarks/step_breakdown.py, without TensorFlow).
6. Large item tables (--table-rows, default 1M and 10M rows; --skip-tables leaves it out): id towers of a
   100,000-row user table and the item table, 64-d, the in-batch softmax at batch 4096, Adagrad 0.1, on the same
   random batches. TFRS's Embedding gives IndexedSlices gradients, which Keras's Adagrad applies to the touched
   rows only (TF's sparse Adagrad); twotower runs its sparse path (``sparse_embeddings``, sparse_keras_adagrad).
   A warm-up pass, then passes over the batches interleaved as in 1.

7. The deep retrieval tutorial's two-layer featurized model (user id + timestamp buckets + standardised
   timestamp; title id + title words; dense [64, 32]) at batch 4096 (--deep-batch-sizes), both fed the same
   training rows in the same order: TFRS's model exactly as the tutorial writes it (its Keras preprocessing
   layers inside the model, applied to each batch's raw strings and times), twotower's from
   ``examples/deep_retrieval_2layers.toml`` through the pipeline (the preprocessing fitted and applied once, as
   a saved run applies it). Warm-up, then interleaved epochs as in 1. (--only-deep runs this section alone.)

Every library runs with 2 threads (TensorFlow's intra- and inter-op pools, torch's pool).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import torch

import step_breakdown
from twotower import BruteForce, Streaming
from twotower.data.movielens import load_movielens
from twotower.optim import sparse_keras_adagrad
from twotower.pipeline.model import IdRetrievalModel
from twotower.workload import BasicRetrievalModel, Batches, keras_adagrad, prepare

DIM = 64
LIBRARIES = ("TFRS", "twotower", "twotower bf16")


class TfrsModel(tfrs.Model):  # type: ignore[misc]
    """The tutorial's model in TFRS, 64-d."""

    def __init__(self, users: np.ndarray, titles: np.ndarray) -> None:
        super().__init__()
        initializer = tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=0)
        self.user_model = tf.keras.Sequential(
            [tf.keras.layers.StringLookup(vocabulary=users, mask_token=None),
             tf.keras.layers.Embedding(len(users) + 1, DIM, embeddings_initializer=initializer)]
        )  # fmt: skip
        self.movie_model = tf.keras.Sequential(
            [tf.keras.layers.StringLookup(vocabulary=titles, mask_token=None),
             tf.keras.layers.Embedding(len(titles) + 1, DIM, embeddings_initializer=initializer)]
        )  # fmt: skip
        candidates = tf.data.Dataset.from_tensor_slices(titles).batch(128).map(self.movie_model)
        self.task = tfrs.tasks.Retrieval(metrics=tfrs.metrics.FactorizedTopK(candidates=candidates))

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.task(
            self.user_model(features["user_id"]),
            self.movie_model(features["movie_title"]),
            compute_metrics=not training,
        )


def _seconds(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


#: Seconds of rest before each timed run (not timed): TensorFlow's and OpenMP's worker threads spin for a while
#: after their last task, and without the rest they take the CPUs from whichever library runs next.
SETTLE_SECONDS = 0.3


def _interleaved(runs: dict[str, Callable[[], Any]], pairs: int, items: int) -> dict[str, list[float]]:
    """``items``/s of each run over ``pairs`` rounds; the order of the runs rotates every round, and each run
    starts after ``SETTLE_SECONDS`` of rest."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(pairs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(SETTLE_SECONDS)
            rates[name].append(items / _seconds(runs[name]))
    return rates


class Workload:
    """Both libraries' models and data for one batch size; the training rows in one fixed order."""

    def __init__(self, prepared: Any, batch_size: int, seed: int = 0) -> None:
        self.prepared = prepared
        order = np.random.default_rng(seed).permutation(prepared.train_users.shape[0])
        self.users, self.titles = prepared.train_users[order], prepared.train_titles[order]
        self.num_rows = int(self.users.shape[0])
        self.batch_size = batch_size

    def tfrs_model(self, seed: int) -> tuple[Any, Any]:
        tf.keras.utils.set_random_seed(seed)
        model = TfrsModel(self.prepared.users.values, self.prepared.titles.values)
        model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
        # Index i >= 1 of a Vocabulary is its value i - 1: the same rows, as the strings TFRS looks up.
        columns = {
            "user_id": self.prepared.users.values[self.users.numpy() - 1],
            "movie_title": self.prepared.titles.values[self.titles.numpy() - 1],
        }
        data = tf.data.Dataset.from_tensor_slices(columns).batch(self.batch_size).cache()
        return model, data

    def twotower_model(self, seed: int, precision: str) -> tuple[BasicRetrievalModel, Any, Batches]:
        torch.manual_seed(seed)
        model = BasicRetrievalModel(self.prepared.users, self.prepared.titles, DIM, precision=precision)
        optimizer = keras_adagrad(model.parameters())
        return model, optimizer, Batches(self.users, self.titles, batch_size=self.batch_size, shuffle=False)


def training(prepared: Any, batch_size: int, pairs: int) -> dict[str, list[float]]:
    workload = Workload(prepared, batch_size)
    tfrs_model, tfrs_data = workload.tfrs_model(0)
    ours, optimizer, batches = workload.twotower_model(0, "float32")
    ours_bf16, optimizer_bf16, batches_bf16 = workload.twotower_model(0, "bf16")
    runs: dict[str, Callable[[], Any]] = {
        "TFRS": lambda: tfrs_model.fit(tfrs_data, epochs=1, verbose=0),
        "twotower": lambda: ours.fit(batches, optimizer, epochs=1, progress=False),
        "twotower bf16": lambda: ours_bf16.fit(batches_bf16, optimizer_bf16, epochs=1, progress=False),
    }
    for run in runs.values():
        run()  # warm-up
    return _interleaved(runs, pairs, workload.num_rows)


def accuracy_and_evaluation(prepared: Any, pairs: int) -> tuple[dict[str, dict[int, float]], dict[str, list[float]]]:
    """Test top-K accuracy after 3 epochs at batch 8192 (seed 42), then interleaved evaluation throughput."""
    workload = Workload(prepared, 8192, seed=42)
    tfrs_model, tfrs_data = workload.tfrs_model(42)
    tfrs_model.fit(tfrs_data.shuffle(100_000, seed=42, reshuffle_each_iteration=True), epochs=3, verbose=0)
    test = {
        "user_id": prepared.users.values[prepared.test_users.numpy() - 1],
        "movie_title": prepared.titles.values[prepared.test_titles.numpy() - 1],
    }
    tfrs_test = tf.data.Dataset.from_tensor_slices(test).batch(4096).cache()
    models: dict[str, BasicRetrievalModel] = {}
    for name, precision in (("twotower", "float32"), ("twotower bf16", "bf16")):
        torch.manual_seed(42)
        model = BasicRetrievalModel(prepared.users, prepared.titles, DIM, precision=precision)
        train = Batches(prepared.train_users, prepared.train_titles, batch_size=8192, shuffle=True, seed=42)
        model.fit(train, keras_adagrad(model.parameters()), epochs=3, progress=False)
        models[name] = model
    ours_test = Batches(prepared.test_users, prepared.test_titles, batch_size=4096, shuffle=False)
    results: dict[str, dict[str, float]] = {"TFRS": tfrs_model.evaluate(tfrs_test, return_dict=True, verbose=0)}
    for name, model in models.items():
        results[name] = model.evaluate(ours_test, progress=False)
    accuracy = {
        name: {k: float(metrics[f"factorized_top_k/top_{k}_categorical_accuracy"]) for k in (1, 5, 10, 50, 100)}
        for name, metrics in results.items()
    }
    runs: dict[str, Callable[[], Any]] = {
        "TFRS": lambda: tfrs_model.evaluate(tfrs_test, verbose=0),
        "twotower": lambda: models["twotower"].evaluate(ours_test, progress=False),
        "twotower bf16": lambda: models["twotower bf16"].evaluate(ours_test, progress=False),
    }
    rates = _interleaved(runs, pairs, int(prepared.test_users.shape[0]))
    return accuracy, rates


def topk_run(num_candidates: int, num_queries: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((num_candidates, DIM), dtype=np.float32)
    queries = rng.standard_normal((num_queries, DIM), dtype=np.float32)
    rates: dict[str, float] = {}
    brute = tfrs.layers.factorized_top_k.BruteForce(k=100)
    brute.index(tf.constant(corpus))
    brute(tf.constant(queries[:64]), k=100)
    rates["TFRS BruteForce"] = num_queries / _seconds(lambda: brute(tf.constant(queries), k=100))
    streaming = tfrs.layers.factorized_top_k.Streaming(k=100)
    streaming.index_from_dataset(tf.data.Dataset.from_tensor_slices(corpus).batch(65536))
    rates["TFRS Streaming"] = num_queries / _seconds(lambda: streaming(tf.constant(queries), k=100))
    corpus_t, queries_t = torch.from_numpy(corpus), torch.from_numpy(queries)
    index = BruteForce(k=100).index(corpus_t)
    index(queries_t[:64])
    rates["twotower BruteForce"] = num_queries / _seconds(lambda: index(queries_t))
    stream = Streaming(k=100).index_from_dataset(list(corpus_t.split(65536)))
    rates["twotower Streaming"] = num_queries / _seconds(lambda: stream(queries_t))
    return rates


class TfrsIdModel(tfrs.Model):  # type: ignore[misc]
    """Integer user and item ids straight into two Embedding tables, TFRS's Retrieval task (no metrics)."""

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        initializer = tf.keras.initializers.RandomUniform(-0.05, 0.05, seed=0)
        self.user_embedding = tf.keras.layers.Embedding(num_users, DIM, embeddings_initializer=initializer)
        self.item_embedding = tf.keras.layers.Embedding(num_items, DIM, embeddings_initializer=initializer)
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.task(self.user_embedding(features["user"]), self.item_embedding(features["item"]))


def large_tables(table_rows: int, pairs: int, batch_size: int = 4096, batches: int = 12) -> dict[str, list[float]]:
    """Examples/s of TFRS's and twotower's sparse training on an item table of ``table_rows`` rows."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, 100_000, batches * batch_size)
    items = rng.integers(1, table_rows, batches * batch_size)
    tf.keras.utils.set_random_seed(0)
    theirs = TfrsIdModel(100_000, table_rows)
    theirs.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    data = tf.data.Dataset.from_tensor_slices({"user": users, "item": items}).batch(batch_size).cache()
    torch.manual_seed(0)
    # TFRS's Retrieval keeps accidental hits; so does this model, to run the same softmax.
    ours = IdRetrievalModel(100_000, table_rows, DIM, batch_size=batch_size, remove_accidental_hits=False,
                            sparse_embeddings=True)  # fmt: skip
    optimizer = sparse_keras_adagrad(ours.parameters(), 0.1)
    rows = Batches(torch.from_numpy(users), torch.from_numpy(items), batch_size=batch_size, shuffle=False)
    runs: dict[str, Callable[[], Any]] = {
        "TFRS": lambda: theirs.fit(data, epochs=1, verbose=0),
        "twotower": lambda: ours.fit(rows, optimizer, epochs=1, progress=False),
    }
    for run in runs.values():
        run()  # warm-up: tracing, and the first touches of the tables and accumulators
    return _interleaved(runs, pairs, batches * batch_size)


class TfrsDeepModel(tfrs.Model):  # type: ignore[misc]
    """The deep retrieval tutorial's ``MovielensModel``: query and candidate models with dense layers."""

    def __init__(self, users: np.ndarray, titles: np.ndarray, timestamps: np.ndarray, layer_sizes: list[int]):
        super().__init__()
        layers = tf.keras.layers

        def dense() -> Any:
            stack = tf.keras.Sequential()
            for size in layer_sizes[:-1]:
                stack.add(layers.Dense(size, activation="relu"))
            stack.add(layers.Dense(layer_sizes[-1]))
            return stack

        self.user_embedding = tf.keras.Sequential(
            [layers.StringLookup(vocabulary=users, mask_token=None), layers.Embedding(len(users) + 1, 32)]
        )
        buckets = np.linspace(timestamps.min(), timestamps.max(), num=1000)
        self.timestamp_embedding = tf.keras.Sequential(
            [layers.Discretization(buckets.tolist()), layers.Embedding(len(buckets) + 1, 32)]
        )
        self.normalized_timestamp = layers.Normalization(axis=None)
        self.normalized_timestamp.adapt(timestamps)
        self.title_embedding = tf.keras.Sequential(
            [layers.StringLookup(vocabulary=titles, mask_token=None), layers.Embedding(len(titles) + 1, 32)]
        )
        vectorizer = layers.TextVectorization(max_tokens=10_000)
        vectorizer.adapt(titles)
        self.title_text_embedding = tf.keras.Sequential(
            [vectorizer, layers.Embedding(10_000, 32, mask_zero=True), layers.GlobalAveragePooling1D()]
        )
        self.query_dense, self.candidate_dense = dense(), dense()
        self.task = tfrs.tasks.Retrieval()

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        stamps = features["timestamp"]
        query = tf.concat(
            [self.user_embedding(features["user_id"]), self.timestamp_embedding(stamps),
             tf.reshape(self.normalized_timestamp(stamps), (-1, 1))], axis=1,
        )  # fmt: skip
        titles = features["movie_title"]
        candidate = tf.concat([self.title_embedding(titles), self.title_text_embedding(titles)], axis=1)
        return self.task(self.query_dense(query), self.candidate_dense(candidate), compute_metrics=not training)


def deep_training(data_dir: str | None, batch_size: int, pairs: int) -> dict[str, list[float]]:
    """Examples/s of the two-layer featurized model in TFRS and twotower at ``batch_size``."""
    from pathlib import Path

    from twotower.data.batches import Batches as RowBatches
    from twotower.pipeline.config import load_config
    from twotower.pipeline.features import FeatureBatches, build_tower_inputs
    from twotower.pipeline.training import build_model, load_interactions
    from twotower.pipeline.training import prepare as prepare_split

    example = Path(__file__).resolve().parent.parent / "examples" / "deep_retrieval_2layers.toml"
    config = load_config(example, {"batch_size": batch_size, "data_dir": data_dir or "", "seed": 0})
    interactions = load_interactions(config)
    split = prepare_split(config, interactions)
    inputs = build_tower_inputs(config, interactions, split)
    ours = build_model(config, split, inputs)
    optimizer = keras_adagrad(ours.parameters())
    rows = split.train.log_rows[np.random.default_rng(0).permutation(len(split.train))]
    batches = FeatureBatches(
        RowBatches(torch.from_numpy(rows.astype(np.int64)), _items_of(split, rows), batch_size=batch_size,
                   shuffle=False),
        inputs,
    )  # fmt: skip
    # TFRS gets the same rows, as the raw values its preprocessing layers take.
    users = interactions.user_ids.to_numpy(zero_copy_only=False).astype(str)
    items = interactions.item_ids.to_numpy(zero_copy_only=False).astype(str)
    assert interactions.timestamps is not None
    stamps = interactions.timestamps
    tf.keras.utils.set_random_seed(0)
    theirs = TfrsDeepModel(np.unique(users), np.unique(items), stamps.astype(np.float64), list(config.layer_sizes))
    theirs.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    columns = {
        "user_id": users[interactions.user_codes[rows]],
        "movie_title": items[interactions.item_codes[rows]],
        "timestamp": stamps[rows],
    }
    data = tf.data.Dataset.from_tensor_slices(columns).batch(batch_size).cache()
    runs: dict[str, Callable[[], Any]] = {
        "TFRS": lambda: theirs.fit(data, epochs=1, verbose=0),
        "twotower": lambda: ours.fit(batches, optimizer, epochs=1, progress=False),
    }
    for run in runs.values():
        run()  # warm-up
    return _interleaved(runs, pairs, int(rows.shape[0]))


def _items_of(split: Any, rows: np.ndarray) -> torch.Tensor:
    """The item vocabulary rows of log rows ``rows``."""
    return torch.from_numpy(split.train.item_row_of_code[split.train.log.item_codes[rows]].astype(np.int64))


def _print_rates(label: str, rates: dict[str, list[float]]) -> None:
    medians = [statistics.median(rates[name]) for name in LIBRARIES]
    cells = "".join(f"{median:>12,.0f}" for median in medians)
    ratios = []
    for name in LIBRARIES[1:]:
        per_pair = [ours / theirs for ours, theirs in zip(rates[name], rates["TFRS"], strict=True)]
        ratios.append(f"{statistics.median(per_pair):>6.2f} [{min(per_pair):.2f}-{max(per_pair):.2f}]")
    print(f"{label:<26}{cells}  {ratios[0]:>20}  {ratios[1]:>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--pairs", type=int, default=7, help="interleaved rounds per measurement (default 7)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--corpus", type=int, default=1_000_000, help="top-K corpus size (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=4096, help="top-K queries (default 4096)")
    parser.add_argument("--skip-topk", action="store_true", help="leave out the exact top-K comparison")
    parser.add_argument("--skip-breakdown", action="store_true", help="leave out twotower's step breakdown")
    parser.add_argument("--table-rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="item-table sizes of the large-table comparison (default 1M and 10M)")  # fmt: skip
    parser.add_argument("--skip-tables", action="store_true", help="leave out the large-table comparison")
    parser.add_argument("--only-tables", action="store_true", help="run the large-table comparison alone")
    parser.add_argument("--deep-batch-sizes", type=int, nargs="+", default=[4096],
                        help="batch sizes of the deep featurized model (default 4096)")  # fmt: skip
    parser.add_argument("--only-deep", action="store_true", help="run the deep featurized comparison alone")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    torch.set_num_threads(2)
    print(f"tensorflow {tf.__version__}, tfrs {tfrs.__version__}, torch {torch.__version__}; 2 threads; "
          f"{args.pairs} interleaved rounds per row\n")  # fmt: skip
    if not args.only_deep:
        if not args.only_tables:
            movielens(args)
        if not args.skip_tables:
            large_table_rows(args)
    print(f"\n{'deep retrieval [64, 32] + features':<36}{'TFRS ex/s':>12}{'twotower ex/s':>15}{'ratio [min-max]':>22}")
    for batch_size in args.deep_batch_sizes:
        rates = deep_training(args.data_dir, batch_size, args.pairs)
        per_pair = [ours / theirs for ours, theirs in zip(rates["twotower"], rates["TFRS"], strict=True)]
        print(f"{f'train, batch {batch_size}':<36}{statistics.median(rates['TFRS']):>12,.0f}"
              f"{statistics.median(rates['twotower']):>15,.0f}{statistics.median(per_pair):>10.2f} "
              f"[{min(per_pair):.2f}-{max(per_pair):.2f}]")  # fmt: skip


def large_table_rows(args: argparse.Namespace) -> None:
    """Section 6: sparse training on large item tables."""
    print(f"\n{'sparse training, batch 4096':<36}{'TFRS ex/s':>12}{'twotower ex/s':>15}{'ratio [min-max]':>22}")
    for table_rows in args.table_rows:
        rates = large_tables(table_rows, args.pairs)
        per_pair = [ours / theirs for ours, theirs in zip(rates["twotower"], rates["TFRS"], strict=True)]
        print(f"{f'{table_rows:,} item rows':<36}{statistics.median(rates['TFRS']):>12,.0f}"
              f"{statistics.median(rates['twotower']):>15,.0f}{statistics.median(per_pair):>10.2f} "
              f"[{min(per_pair):.2f}-{max(per_pair):.2f}]")  # fmt: skip


def movielens(args: argparse.Namespace) -> None:
    """Sections 1-5: the MovieLens 100K comparisons."""
    prepared = prepare(load_movielens("100k", data_dir=args.data_dir), seed=42)
    header = "".join(f"{name:>12}" for name in ("TFRS", "twotower", "tt bf16"))
    print(f"{'MovieLens 100K, 64-d':<26}{header}  {'ratio fp32 [min-max]':>20}  {'ratio bf16 [min-max]':>20}")
    for batch_size in args.batch_sizes:
        _print_rates(f"train ex/s, batch {batch_size}", training(prepared, batch_size, args.pairs))
    accuracy, evaluation = accuracy_and_evaluation(prepared, args.pairs)
    _print_rates("evaluate queries/s", evaluation)
    print(f"\n{'test accuracy (8192, 3 ep.)':<26}{header}")
    for k in (1, 5, 10, 50, 100):
        print(f"{'top-' + str(k):<26}" + "".join(f"{accuracy[name][k]:>12.4f}" for name in LIBRARIES))
    if not args.skip_topk:
        rates = topk_run(args.corpus, args.queries)
        title = f"exact top-100, {args.corpus:,} x {DIM}, {args.queries:,} queries"
        print(f"\n{title:<44}{'queries/s':>12}{'vs TFRS BF':>12}")
        for name, rate in rates.items():
            print(f"{name:<44}{rate:>12,.0f}{rate / rates['TFRS BruteForce']:>12.2f}")
    if not args.skip_breakdown:
        print()
        step_breakdown.print_breakdowns(prepared, (1024, 4096, 8192), DIM)


if __name__ == "__main__":
    main()
