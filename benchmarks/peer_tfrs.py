"""twotower against TensorFlow Recommenders 0.7.7, side by side in one run on this machine.

    bash benchmarks/tfrs_env.sh python benchmarks/peer_tfrs.py --data-dir ../shared/data

1. The MovieLens 100K basic-retrieval workload on the same 80/20 split with 64-d towers: training examples/s at
   batch 1024 and 4096 (the SUM loss, Adagrad 0.1), evaluation queries/s (test loss plus factorized top-K over
   every title), and test top-K accuracy after 3 epochs at batch 8192, for both libraries.
2. Exact top-100 over N = 1,000,000 x D = 64 candidates for 4,096 queries: TFRS's BruteForce and Streaming
   against twotower's.

Both run with 2 threads (TensorFlow's intra- and inter-op pools, torch's pool). Training throughput is the best
of 3 runs of 2 epochs for each library, after a warm-up epoch.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import torch

from twotower import BruteForce, Streaming
from twotower.data.movielens import load_movielens
from twotower.workload import BasicRetrievalModel, Batches, keras_adagrad, prepare

DIM = 64
#: Each training measurement is the best of this many runs of 2 epochs, for both libraries.
REPEATS = 3


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


def tfrs_run(train: dict[str, np.ndarray], test: dict[str, np.ndarray], users: Any, titles: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in (1024, 4096):
        tf.keras.utils.set_random_seed(0)
        model = TfrsModel(users, titles)
        model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
        data = tf.data.Dataset.from_tensor_slices(train).shuffle(100_000, seed=0).batch(batch).cache()
        model.fit(data, epochs=1, verbose=0)  # warm-up: graph tracing
        seconds = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            model.fit(data, epochs=2, verbose=0)
            seconds = min(seconds, time.perf_counter() - started)
        results[f"train_{batch}"] = 2 * len(train["user_id"]) / seconds
    tf.keras.utils.set_random_seed(42)
    model = TfrsModel(users, titles)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    data = tf.data.Dataset.from_tensor_slices(train).shuffle(100_000, seed=42).batch(8192).cache()
    model.fit(data, epochs=3, verbose=0)
    test_data = tf.data.Dataset.from_tensor_slices(test).batch(4096).cache()
    model.evaluate(test_data, return_dict=True, verbose=0)  # warm-up
    started = time.perf_counter()
    metrics = model.evaluate(test_data, return_dict=True, verbose=0)
    results["evaluate_qps"] = len(test["user_id"]) / (time.perf_counter() - started)
    results["accuracy"] = {
        k: float(metrics[f"factorized_top_k/top_{k}_categorical_accuracy"]) for k in (1, 5, 10, 50, 100)
    }
    return results


def twotower_run(prepared: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for batch in (1024, 4096):
        torch.manual_seed(0)
        model = BasicRetrievalModel(prepared.users, prepared.titles, DIM)
        optimizer = keras_adagrad(model.parameters())
        train = Batches(prepared.train_users, prepared.train_titles, batch_size=batch, shuffle=True, seed=0)
        model.fit(train, optimizer, epochs=1, progress=False)
        seconds = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            model.fit(train, optimizer, epochs=2, progress=False)
            seconds = min(seconds, time.perf_counter() - started)
        results[f"train_{batch}"] = 2 * prepared.train_users.shape[0] / seconds
    torch.manual_seed(42)
    model = BasicRetrievalModel(prepared.users, prepared.titles, DIM)
    optimizer = keras_adagrad(model.parameters())
    model.fit(Batches(prepared.train_users, prepared.train_titles, batch_size=8192, shuffle=True, seed=42), optimizer,
              epochs=3, progress=False)  # fmt: skip
    test = Batches(prepared.test_users, prepared.test_titles, batch_size=4096, shuffle=False)
    model.evaluate(test, progress=False)
    started = time.perf_counter()
    metrics = model.evaluate(test, progress=False)
    results["evaluate_qps"] = prepared.test_users.shape[0] / (time.perf_counter() - started)
    results["accuracy"] = {k: metrics[f"factorized_top_k/top_{k}_categorical_accuracy"] for k in (1, 5, 10, 50, 100)}
    return results


def topk_run(num_candidates: int, num_queries: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((num_candidates, DIM), dtype=np.float32)
    queries = rng.standard_normal((num_queries, DIM), dtype=np.float32)
    rates: dict[str, float] = {}
    brute = tfrs.layers.factorized_top_k.BruteForce(k=100)
    brute.index(tf.constant(corpus))
    brute(tf.constant(queries[:64]), k=100)
    started = time.perf_counter()
    brute(tf.constant(queries), k=100)
    rates["TFRS BruteForce"] = num_queries / (time.perf_counter() - started)
    streaming = tfrs.layers.factorized_top_k.Streaming(k=100)
    streaming.index_from_dataset(tf.data.Dataset.from_tensor_slices(corpus).batch(65536))
    started = time.perf_counter()
    streaming(tf.constant(queries), k=100)
    rates["TFRS Streaming"] = num_queries / (time.perf_counter() - started)
    corpus_t, queries_t = torch.from_numpy(corpus), torch.from_numpy(queries)
    index = BruteForce(k=100).index(corpus_t)
    index(queries_t[:64])
    started = time.perf_counter()
    index(queries_t)
    rates["twotower BruteForce"] = num_queries / (time.perf_counter() - started)
    stream = Streaming(k=100).index_from_dataset(list(corpus_t.split(65536)))
    started = time.perf_counter()
    stream(queries_t)
    rates["twotower Streaming"] = num_queries / (time.perf_counter() - started)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--corpus", type=int, default=1_000_000, help="top-K corpus size (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=4096, help="top-K queries (default 4096)")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    torch.set_num_threads(2)
    data = load_movielens("100k", data_dir=args.data_dir)
    prepared = prepare(data, seed=42)
    train_rows, test_rows = data.split(seed=42)

    def columns(rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"user_id": data.user_ids[rows], "movie_title": data.movie_titles[rows]}

    theirs = tfrs_run(columns(train_rows), columns(test_rows), prepared.users.values, prepared.titles.values)
    ours = twotower_run(prepared)
    print(f"tensorflow {tf.__version__}, tfrs {tfrs.__version__}, torch {torch.__version__}; 2 threads\n")
    print(f"{'MovieLens 100K, 64-d towers, same split':<44}{'TFRS':>12}{'twotower':>12}{'ratio':>8}")
    rows = (
        ("train_1024", "training examples/s, batch 1024"),
        ("train_4096", "training examples/s, batch 4096"),
        ("evaluate_qps", "evaluation queries/s (loss + top-K)"),
    )
    for key, label in rows:
        print(f"{label:<44}{theirs[key]:>12,.0f}{ours[key]:>12,.0f}{ours[key] / theirs[key]:>8.2f}")
    for k in (1, 5, 10, 50, 100):
        print(f"{'test top-' + str(k) + ' accuracy (batch 8192, 3 epochs)':<44}"
              f"{theirs['accuracy'][k]:>12.4f}{ours['accuracy'][k]:>12.4f}")  # fmt: skip
    rates = topk_run(args.corpus, args.queries)
    title = f"exact top-100, {args.corpus:,} x {DIM}, {args.queries:,} queries"
    print(f"\n{title:<44}{'queries/s':>12}{'vs TFRS BF':>12}")
    for name, rate in rates.items():
        print(f"{name:<44}{rate:>12,.0f}{rate / rates['TFRS BruteForce']:>12.2f}")


if __name__ == "__main__":
    main()
