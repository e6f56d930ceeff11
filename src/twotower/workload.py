"""The reference workload: TFRS's basic retrieval tutorial on MovieLens, as a configuration of the pipeline.

The tutorial's settings (:meth:`WorkloadConfig.pipeline_config`) run through :mod:`twotower.pipeline` like any
own-data run: MovieLens ratings read as an interaction log (users and movie titles as ids, every title of the
release as the catalogue), the seeded 80/20 random split, vocabularies over every user and title, the pipeline's
:class:`~twotower.pipeline.IdRetrievalModel` (32-d embeddings initialised uniform(±0.05) as Keras does), the
in-batch softmax without the logQ correction (SUM loss), Keras's Adagrad at 0.1, batch 8192, 3 epochs, then the
pipeline's evaluation: TFRS's top-K accuracy over every title, Recall/NDCG@K per user with the user's training
titles excluded, and the popularity baseline. :func:`train_and_evaluate` returns the pipeline's
:class:`~twotower.pipeline.TrainedModel`; ``twotower quickstart`` saves it with
:func:`~twotower.pipeline.save_run`, so ``recommend``, ``evaluate`` and ``serve`` answer from it as from any run.

:class:`BasicRetrievalModel` is the same model built from two vocabularies, with the tutorial's names
(``user_model``, ``movie_model``) and TFRS's ``FactorizedTopK`` metric on its task, for the benchmarks that drive
the training loop themselves, as the tutorial does (``benchmarks/peer_tfrs.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower.data.batches import Batches
from twotower.data.movielens import MovieLens
from twotower.indexes import BruteForce, Streaming
from twotower.metrics import FactorizedTopK
from twotower.optim import keras_adagrad
from twotower.pipeline import training as pipeline
from twotower.pipeline.config import PipelineConfig
from twotower.pipeline.model import IdRetrievalModel
from twotower.pipeline.prepared import PreparedInteractions
from twotower.tasks import Precision, Retrieval
from twotower.vocabulary import Vocabulary

# Batches, keras_adagrad and Vocabulary are general tools (twotower.data.batches, twotower.optim,
# twotower.vocabulary); the names stay importable from here for code written against earlier releases.
__all__ = [
    "PUBLISHED",
    "RECALL_KS",
    "BasicRetrievalModel",
    "Batches",
    "PreparedData",
    "TitleBatches",
    "Vocabulary",
    "WorkloadConfig",
    "evaluate_ranking",
    "keras_adagrad",
    "prepare",
    "train_and_evaluate",
]

#: Test top-K accuracy published with the TFRS basic retrieval tutorial (top-1/5/10/50/100).
PUBLISHED = {1: 0.0010, 5: 0.0087, 10: 0.0212, 50: 0.1218, 100: 0.2334}
RECALL_KS = (1, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class WorkloadConfig:
    """Settings of the reference workload that ``twotower quickstart`` lets one vary (the tutorial's by default)."""

    dataset: str = "100k"
    seed: int = 42
    embedding_dim: int = 32
    epochs: int = 3
    batch_size: int = 8192
    test_batch_size: int = 4096
    learning_rate: float = 0.1
    #: The loss's matrix products: ``"float32"`` or ``"bf16"`` (see :class:`~twotower.tasks.Retrieval`).
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "epochs", "batch_size", "test_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.precision not in ("float32", "bf16"):
            raise ValueError(f"precision must be 'float32' or 'bf16', got {self.precision!r}")

    def pipeline_config(self, data_dir: str | os.PathLike[str] | None = None, out: str = "") -> PipelineConfig:
        """The tutorial as pipeline settings (what the run's ``config.toml`` holds)."""
        return PipelineConfig(
            interactions=f"movielens:{self.dataset}",
            user_col="user_id",
            item_col="movie_title",
            time_col="timestamp",
            data_dir=str(data_dir) if data_dir else "",
            split="random",
            test_fraction=0.2,
            validation_fraction=0.0,
            user_vocabulary="all",
            embedding_dim=self.embedding_dim,
            init_scale=0.05,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            negatives="in-batch",
            logq=False,
            remove_accidental_hits=False,
            patience=0,
            precision=self.precision,
            seed=self.seed,
            ks=RECALL_KS,
            eval_batch_size=self.test_batch_size,
            out=out,
        )


def train_and_evaluate(
    config: WorkloadConfig,
    data: MovieLens | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
    out: str = "",
) -> pipeline.TrainedModel:
    """Run the reference workload through the pipeline; ``results`` holds ``"untrained"`` (the same evaluation
    before training: what chance gives) and ``"test"``."""
    settings = config.pipeline_config(data_dir, out)
    interactions = None if data is None else pipeline.movielens_interactions(data, settings)
    return pipeline.train(settings, progress=progress, say=say, interactions=interactions, evaluate_untrained=True)


class TitleBatches:
    """Re-iterable batches of candidate embeddings: every movie title through the current movie tower.

    Like TFRS's ``movies.batch(128).map(movie_model)``, it is evaluated lazily, so the factorized metric always
    ranks the corpus as the model stands.
    """

    def __init__(self, tower: nn.Module, title_indices: torch.Tensor, titles: np.ndarray, batch_size: int = 1024):
        self.tower, self.title_indices, self.titles, self.batch_size = tower, title_indices, titles, batch_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        with torch.no_grad():
            for start in range(0, self.title_indices.shape[0], self.batch_size):
                end = start + self.batch_size
                yield self.titles[start:end], self.tower(self.title_indices[start:end])


class BasicRetrievalModel(IdRetrievalModel):
    """The pipeline's id model as the tutorial builds it: a user-id tower and a movie-title tower, the in-batch
    softmax without logQ, and TFRS's ``FactorizedTopK`` over every title on the task (updated by ``evaluate``).

    Args:
        users: vocabulary of user ids.
        titles: vocabulary of movie titles; the corpus is every title in it.
        embedding_dim: width of both towers.
        precision: the loss's matrix products, ``"float32"`` or ``"bf16"`` (see :class:`~twotower.tasks.Retrieval`).
    """

    def __init__(
        self, users: Vocabulary, titles: Vocabulary, embedding_dim: int = 32, precision: Precision = "float32"
    ) -> None:
        super().__init__(
            len(users), len(titles), embedding_dim, init_scale=0.05, remove_accidental_hits=False, precision=precision
        )
        self.users, self.titles = users, titles
        corpus = TitleBatches(self.item_embedding, torch.arange(1, len(titles)), titles.values)
        metric = FactorizedTopK(Streaming(k=100).index_from_dataset(corpus))
        self.task = Retrieval(metrics=metric, remove_accidental_hits=False, precision=precision)

    @property
    def user_model(self) -> nn.Embedding:
        """The user tower (the tutorial's name for :attr:`user_embedding`)."""
        return self.user_embedding

    @property
    def movie_model(self) -> nn.Embedding:
        """The title tower (the tutorial's name for :attr:`item_embedding`)."""
        return self.item_embedding

    def title_index(self) -> BruteForce:
        """An exact index of every title's current embedding, with the titles as ids."""
        with torch.no_grad():
            embeddings = self.movie_model(torch.arange(1, len(self.titles)))
        return BruteForce(k=100).index(embeddings, self.titles.values)


@dataclass
class PreparedData:
    """The reference workload's split as tensors of vocabulary rows (``int64``), and the pipeline's own form."""

    users: Vocabulary
    titles: Vocabulary
    train_users: torch.Tensor
    train_titles: torch.Tensor
    test_users: torch.Tensor
    test_titles: torch.Tensor
    prepared: PreparedInteractions


def prepare(data: MovieLens, seed: int, config: WorkloadConfig | None = None) -> PreparedData:
    """The pipeline's reading, seeded 80/20 split and vocabularies (every user, every title) of ``data``."""
    settings = (config or WorkloadConfig()).pipeline_config().replace(seed=seed)
    prepared = pipeline.prepare(settings, pipeline.movielens_interactions(data, settings))
    train, test = prepared.train, prepared.test
    return PreparedData(
        users=prepared.users,
        titles=prepared.items,
        train_users=train.users.long(),
        train_titles=train.items.long(),
        test_users=test.users.long(),
        test_titles=test.items.long(),
        prepared=prepared,
    )


def evaluate_ranking(model: IdRetrievalModel, prepared: PreparedData) -> dict[str, Any]:
    """The pipeline's evaluation of ``model`` on the test split (see :func:`~twotower.pipeline.evaluate_part`)."""
    from twotower.pipeline.evaluation import evaluate_part

    return evaluate_part(model, prepared.prepared, prepared.prepared.test, ks=RECALL_KS)
