"""Beyond in-batch negatives on MovieLens 100K: the logQ correction and mixed negative sampling, measured.

    TWOTOWER_DATA_DIR=../shared/data python benchmarks/negatives.py [--seeds 0 1 2 3 4]

The tutorial's model and schedule (32-d towers, Adagrad 0.1, batch 8192, 3 epochs, SUM loss) under five
training variants, each over the same seeds:

* ``in-batch``: the tutorial as is;
* ``in-batch, hits removed``: duplicates of a row's positive removed from its softmax;
* ``+ logQ (counting)``: plus the correction with exact inclusion probabilities from the stream's counts;
* ``+ logQ (streaming)``: the same with the hashed streaming estimator of Yi et al.;
* ``mixed + logQ``: plus 2,048 titles drawn uniformly per batch as extra negatives (Yang et al.), corrected by
  the probability of a title being among the columns, in-batch or sampled.

Prints mean and standard deviation of test top-100 accuracy (TFRS's metric) and Recall@100 / NDCG@100 per user
with seen titles excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from twotower.data.movielens import load_movielens
from twotower.sampling import (
    CountingEstimator,
    StreamingFrequencyEstimator,
    UniformSampler,
    mixed_inclusion_probability,
)
from twotower.workload import BasicRetrievalModel, Batches, evaluate_ranking, keras_adagrad, prepare

VARIANTS = ["in-batch", "in-batch, hits removed", "+ logQ (counting)", "+ logQ (streaming)", "mixed + logQ"]
SAMPLED = 2048


class Variant(BasicRetrievalModel):
    """The tutorial model whose training loss follows one of the variants."""

    def __init__(self, variant: str, users: Any, titles: Any, seed: int) -> None:
        super().__init__(users, titles, 32)
        self.variant = variant
        self.task.remove_accidental_hits = variant != "in-batch"
        num_titles = len(titles) - 1
        self.counting = CountingEstimator(len(titles))
        self.streaming = StreamingFrequencyEstimator(num_buckets=1 << 16, alpha=0.3, initial_gap=2.0)
        self.sampler = UniformSampler(num_titles)
        self.generator = torch.Generator().manual_seed(seed)

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        users, titles = batch
        queries, positives = self.user_model(users), self.movie_model(titles)
        if not training:
            # Evaluation is the tutorial's for every variant: score-based top-K, no ids, nothing removed.
            removal, self.task.remove_accidental_hits = self.task.remove_accidental_hits, False
            try:
                loss: torch.Tensor = self.task(queries, positives, compute_metrics=True)
            finally:
                self.task.remove_accidental_hits = removal
            return loss
        if self.variant in ("in-batch", "in-batch, hits removed"):
            return self.task(queries, positives, candidate_ids=titles)  # type: ignore[no-any-return]
        if self.variant == "+ logQ (counting)":
            probability = self.counting.update(titles)
            return self.task(  # type: ignore[no-any-return]
                queries, positives, candidate_sampling_probability=probability, candidate_ids=titles
            )
        if self.variant == "+ logQ (streaming)":
            probability = self.streaming.update(titles)
            return self.task(  # type: ignore[no-any-return]
                queries, positives, candidate_sampling_probability=probability, candidate_ids=titles
            )
        self.counting.update(titles)
        sampled, _ = self.sampler.sample(SAMPLED, generator=self.generator)
        sampled = sampled + 1  # vocabulary row 0 is the out-of-vocabulary bucket
        all_ids = torch.cat([titles, sampled])
        in_batch = self.counting.probability(all_ids, batch_size=titles.shape[0])
        probability = mixed_inclusion_probability(in_batch, self.sampler.inclusion(all_ids - 1, SAMPLED))
        candidates = torch.cat([positives, self.movie_model(sampled)])
        return self.task(  # type: ignore[no-any-return]
            queries, candidates, candidate_sampling_probability=probability, candidate_ids=all_ids
        )


def run(variant: str, data: Any, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    prepared = prepare(data, seed)
    model = Variant(variant, prepared.users, prepared.titles, seed)
    optimizer = keras_adagrad(model.parameters())
    train = Batches(prepared.train_users, prepared.train_titles, batch_size=8192, shuffle=True, seed=seed)
    test = Batches(prepared.test_users, prepared.test_titles, batch_size=4096, shuffle=False)
    model.fit(train, optimizer, epochs=3, progress=False)
    return {**model.evaluate(test, progress=False), **evaluate_ranking(model, prepared)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0..4)")
    parser.add_argument("--data-dir", help="folder with ml-100k/ or ml-100k.zip (default: $TWOTOWER_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_movielens("100k", data_dir=args.data_dir)
    keys = {
        "top-100 acc": "factorized_top_k/top_100_categorical_accuracy",
        "Recall@100": "model/recall@100",
        "NDCG@100": "model/ndcg@100",
    }
    started = time.perf_counter()
    table = {variant: [run(variant, data, seed) for seed in args.seeds] for variant in VARIANTS}
    print(f"MovieLens 100K, seeds {args.seeds}, {time.perf_counter() - started:.0f}s; mean ± std over seeds\n")
    print(f"{'training variant':<26}" + "".join(f"{name:>20}" for name in keys))
    for variant, results in table.items():
        cells = []
        for key in keys.values():
            values = [result[key] for result in results]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"{variant:<26}" + "".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()
