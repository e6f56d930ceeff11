"""The reference workload: TFRS's basic retrieval tutorial on MovieLens, end to end.

User-id and movie-title towers (32-d embeddings, Keras's uniform(±0.05) initialisation) trained with the
:class:`~twotower.tasks.Retrieval` task (SUM loss), Adagrad 0.1 with Keras's defaults (initial accumulator 0.1,
epsilon 1e-7), batch 8192, 3 epochs; evaluation with batch 4096 and factorized top-K over every movie title.
Beyond the tutorial it also measures Recall@K and NDCG@K per user with the user's training items excluded, and
saves a run directory that :func:`load_run` verifies and :func:`recommend` answers from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower import distributed
from twotower._files import (
    atomic_write,
    new_directory_beside,
    parse_json,
    read_verified_directory,
    replace_directory,
)
from twotower.data.batches import Batches
from twotower.data.movielens import MovieLens, load_movielens
from twotower.indexes import BruteForce, Streaming
from twotower.metrics import CorpusRanking, FactorizedTopK
from twotower.models import Model
from twotower.optim import keras_adagrad
from twotower.tasks import Precision, Retrieval
from twotower.vocabulary import Vocabulary

# Batches, keras_adagrad and Vocabulary are general tools (twotower.data.batches, twotower.optim,
# twotower.vocabulary); the names stay importable from here for code written against earlier releases.
__all__ = [
    "PUBLISHED",
    "RECALL_KS",
    "BasicRetrievalModel",
    "Batches",
    "LoadedRun",
    "PreparedData",
    "RunError",
    "TitleBatches",
    "Vocabulary",
    "WorkloadConfig",
    "evaluate_ranking",
    "keras_adagrad",
    "load_run",
    "prepare",
    "recommend",
    "save_run",
    "train_and_evaluate",
]

#: Test top-K accuracy published with the TFRS basic retrieval tutorial (top-1/5/10/50/100).
PUBLISHED = {1: 0.0010, 5: 0.0087, 10: 0.0212, 50: 0.1218, 100: 0.2334}
RUN_FORMAT = "twotower.run/1"
RECALL_KS = (1, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class WorkloadConfig:
    """Settings of the reference workload (the TFRS tutorial's by default)."""

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


class BasicRetrievalModel(Model):
    """The tutorial's model: a user-id tower and a movie-title tower joined by the Retrieval task.

    Args:
        users: vocabulary of user ids.
        titles: vocabulary of movie titles; the corpus is every title in it.
        embedding_dim: width of both towers.
        precision: the loss's matrix products, ``"float32"`` or ``"bf16"`` (see :class:`~twotower.tasks.Retrieval`).
    """

    def __init__(
        self, users: Vocabulary, titles: Vocabulary, embedding_dim: int = 32, precision: Precision = "float32"
    ) -> None:
        super().__init__()
        self.users, self.titles = users, titles
        self.user_model = nn.Embedding(len(users), embedding_dim)
        self.movie_model = nn.Embedding(len(titles), embedding_dim)
        # Keras's Embedding initialiser: uniform(-0.05, 0.05).
        nn.init.uniform_(self.user_model.weight, -0.05, 0.05)
        nn.init.uniform_(self.movie_model.weight, -0.05, 0.05)
        corpus = TitleBatches(self.movie_model, torch.arange(1, len(titles)), titles.values)
        self.task = Retrieval(metrics=FactorizedTopK(Streaming(k=100).index_from_dataset(corpus)), precision=precision)

    def compute_loss(self, batch: Any, training: bool = False) -> torch.Tensor:
        """``batch`` is ``(user indices [b], title indices [b])``; returns the SUM softmax loss."""
        users, titles = batch
        loss: torch.Tensor = self.task(self.user_model(users), self.movie_model(titles), compute_metrics=not training)
        return loss

    def title_index(self) -> BruteForce:
        """An exact index of every title's current embedding, with the titles as ids."""
        with torch.no_grad():
            embeddings = self.movie_model(torch.arange(1, len(self.titles)))
        return BruteForce(k=100).index(embeddings, self.titles.values)


@dataclass
class PreparedData:
    """Vocabularies and index tensors of one split."""

    users: Vocabulary
    titles: Vocabulary
    train_users: torch.Tensor
    train_titles: torch.Tensor
    test_users: torch.Tensor
    test_titles: torch.Tensor


def prepare(data: MovieLens, seed: int) -> PreparedData:
    """Vocabularies over every user and every movie title, and the seeded 80/20 split as index tensors."""
    train_rows, test_rows = data.split(seed=seed)
    users, titles = Vocabulary(data.user_ids), Vocabulary(data.all_movie_titles)
    user_index = torch.as_tensor(users.lookup(data.user_ids))
    title_index = torch.as_tensor(titles.lookup(data.movie_titles))
    return PreparedData(
        users=users,
        titles=titles,
        train_users=user_index[train_rows],
        train_titles=title_index[train_rows],
        test_users=user_index[test_rows],
        test_titles=title_index[test_rows],
    )


def _per_user(users: torch.Tensor, titles: torch.Tensor, vocabulary: Vocabulary) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for user, title in zip(users.tolist(), titles.tolist(), strict=True):
        grouped.setdefault(user, []).append(str(vocabulary.values[title - 1]))
    return grouped


def _popularity(prepared: PreparedData) -> list[tuple[str, float]]:
    """``(title, training count)``, most watched first (ties: by vocabulary order): unknown users' answer."""
    counts = np.bincount(prepared.train_titles.numpy(), minlength=len(prepared.titles) + 1)
    order = np.lexsort((np.arange(counts.shape[0]), -counts))
    return [
        (str(prepared.titles.values[row - 1]), float(counts[row]))
        for row in order.tolist()
        if row >= 1 and counts[row] > 0
    ]


def evaluate_ranking(model: BasicRetrievalModel, prepared: PreparedData) -> dict[str, float]:
    """Recall/Precision/NDCG@K, hit rate and MRR per test user, the user's training titles excluded."""
    relevant = _per_user(prepared.test_users, prepared.test_titles, prepared.titles)
    seen = _per_user(prepared.train_users, prepared.train_titles, prepared.titles)
    user_rows = sorted(relevant)
    # Under torch.distributed each rank ranks its share of the users; the metric sums the ranks' states.
    user_rows = user_rows[distributed.shard_rows(len(user_rows))]
    metric = CorpusRanking(model.title_index(), ks=RECALL_KS, name="corpus")
    with torch.no_grad():
        queries = model.user_model(torch.as_tensor(user_rows))
    metric.update(queries, [relevant[user] for user in user_rows], [seen.get(user, []) for user in user_rows])
    return metric.results()


def train_and_evaluate(
    config: WorkloadConfig,
    data: MovieLens | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[BasicRetrievalModel, PreparedData, dict[str, Any]]:
    """Run the reference workload; returns the model, its data, and ``{"history", "untrained", "test"}``."""
    data = data if data is not None else load_movielens(config.dataset, data_dir=data_dir)
    torch.manual_seed(config.seed)
    prepared = prepare(data, config.seed)
    model = BasicRetrievalModel(prepared.users, prepared.titles, config.embedding_dim, config.precision)
    optimizer = keras_adagrad(model.parameters(), config.learning_rate)
    # Under torch.distributed (torchrun) each rank takes its slice of every global batch; the gradients are
    # summed, so training is the single-process computation on the same global batches.
    shard = distributed.is_distributed()
    train = Batches(prepared.train_users, prepared.train_titles, batch_size=config.batch_size, shuffle=True,
                    seed=config.seed, shard=shard)  # fmt: skip
    test = Batches(prepared.test_users, prepared.test_titles, batch_size=config.test_batch_size, shuffle=False,
                   shard=shard)  # fmt: skip
    untrained = model.evaluate(test, progress=False)
    history = model.fit(train, optimizer, epochs=config.epochs, checkpoint_dir=checkpoint_dir, progress=progress)
    results = {**model.evaluate(test, progress=progress), **evaluate_ranking(model, prepared)}
    return model, prepared, {"history": history, "untrained": untrained, "test": results}


def save_run(
    directory: str | os.PathLike[str],
    model: BasicRetrievalModel,
    prepared: PreparedData,
    results: dict[str, Any],
    config: WorkloadConfig,
) -> Path:
    """Write the run: model, title index, vocabularies, seen items, metrics, plot, bundle and a checksum manifest.

    The run is built in a new folder beside ``directory`` and swapped into place in one step: a process killed at
    any point leaves the previous run (or none, for a first save) or the new one, whole, never a mixture. An
    existing ``directory`` must be a previous run or empty.
    """
    from safetensors.torch import save

    from twotower.serving import _refuse_foreign_directory, _Tower, save_bundle

    directory = Path(directory)
    _refuse_foreign_directory(directory, "run")
    files: dict[str, bytes] = {}
    files["model.safetensors"] = save({name: tensor.contiguous() for name, tensor in model.state_dict().items()})
    files["vocabularies.json"] = json.dumps(
        {"user_id": prepared.users.known_values(), "movie_title": prepared.titles.known_values()}
    ).encode()
    seen = _per_user(prepared.train_users, prepared.train_titles, prepared.titles)
    seen_by_id = {str(prepared.users.values[user - 1]): titles for user, titles in seen.items()}
    files["seen.json"] = json.dumps(seen_by_id).encode()
    files["metrics.json"] = json.dumps({"config": asdict(config), **results}, indent=2).encode()
    files["plot.png"] = _plot(results)
    building = new_directory_beside(directory)
    try:
        title_index = model.title_index()
        title_index.save(building / "index.safetensors")
        files["index.safetensors"] = (building / "index.safetensors").read_bytes()
        for name, payload in files.items():
            if name != "index.safetensors":
                (building / name).write_bytes(payload)
        save_bundle(
            building / "bundle",
            _Tower(model.user_model),
            title_index,
            prepared.users,
            seen_by_id,
            {"workload": "MovieLens basic retrieval", "config": asdict(config)},
            popularity=_popularity(prepared),
        )
        manifest = {
            "format": RUN_FORMAT,
            "config": asdict(config),
            "files": {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()},
        }
        atomic_write(building / "manifest.json", json.dumps(manifest, indent=2).encode())
        replace_directory(building, directory)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return directory


def _plot(results: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(10, 4))
    history = results["history"]
    loss_axis.plot([row["epoch"] for row in history], [row["loss"] for row in history], marker="o")
    loss_axis.set(title="Training loss per epoch (mean batch SUM loss)", xlabel="epoch", ylabel="loss")
    test = results["test"]
    recall_axis.plot(RECALL_KS, [test[f"corpus/recall@{k}"] for k in RECALL_KS], marker="o", label="Recall@K")
    recall_axis.plot(RECALL_KS, [test[f"corpus/ndcg@{k}"] for k in RECALL_KS], marker="s", label="NDCG@K")
    recall_axis.set(title="Test users, seen items excluded", xlabel="K", xscale="log")
    recall_axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


class RunError(ValueError):
    """A run directory is missing, incomplete or corrupt."""


@dataclass
class LoadedRun:
    """A verified run directory."""

    model: BasicRetrievalModel
    index: BruteForce
    seen: dict[str, list[str]]
    metrics: dict[str, Any]


def load_run(directory: str | os.PathLike[str]) -> LoadedRun:
    """Load and verify a run written by :func:`save_run` (every file against the manifest's SHA-256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(directory)
    # The run's bundle/ folder has a manifest of its own: the run's manifest is not exclusive.
    manifest, contents = read_verified_directory(directory, RUN_FORMAT, RunError, "run", exclusive=False)
    missing = sorted({"model.safetensors", "index.safetensors", "vocabularies.json", "seen.json", "metrics.json"}
                     - set(contents))  # fmt: skip
    if missing:
        raise RunError(f"{directory} is not a complete run: the manifest does not list {missing}")
    vocabularies = parse_json(contents["vocabularies.json"], f"{directory}/vocabularies.json", RunError)
    if not isinstance(vocabularies, dict) or not all(
        isinstance(vocabularies.get(name), list) and all(isinstance(value, str) for value in vocabularies[name])
        for name in ("user_id", "movie_title")
    ):
        raise RunError(f"{directory}/vocabularies.json must hold user_id and movie_title lists of strings")
    try:
        config = WorkloadConfig(**manifest["config"])
        users, titles = Vocabulary(vocabularies["user_id"]), Vocabulary(vocabularies["movie_title"])
    except (TypeError, ValueError, KeyError) as error:
        raise RunError(f"{directory}/manifest.json holds no valid workload config: {error}") from error
    model = BasicRetrievalModel(users, titles, config.embedding_dim, config.precision)
    try:
        model.load_state_dict(load(contents["model.safetensors"]))
    except (SafetensorError, RuntimeError) as error:
        raise RunError(f"{directory}/model.safetensors does not fit the run's vocabularies: {error}") from error
    try:
        index = BruteForce.load(directory / "index.safetensors")
    except ValueError as error:
        raise RunError(str(error)) from error
    seen = parse_json(contents["seen.json"], f"{directory}/seen.json", RunError)
    if not isinstance(seen, dict):
        raise RunError(f"{directory}/seen.json must map user ids to lists of titles")
    return LoadedRun(
        model=model,
        index=index,
        seen=seen,
        metrics=parse_json(contents["metrics.json"], f"{directory}/metrics.json", RunError),
    )


def recommend(run: LoadedRun, user_id: str, k: int = 10, exclude_seen: bool = True) -> list[tuple[str, float]]:
    """Top-``k`` ``(title, score)`` for ``user_id``, leaving out the titles the user rated in training."""
    users = run.model.users
    index = int(users.lookup([user_id])[0])
    if index == 0:
        raise KeyError(
            f"unknown user id {user_id!r}: the run knows {len(users) - 1} users "
            f"({str(users.values[0])!r} .. {str(users.values[-1])!r})"
        )
    with torch.no_grad():
        query = run.model.user_model(torch.tensor([index]))
    seen = run.seen.get(user_id, []) if exclude_seen else []
    scores, titles, rows = run.index.query_rows(query, k, [seen])
    # Fewer than k titles left after the exclusions: the empty slots (row -1) are not recommendations.
    return [
        (str(title), float(score))
        for title, score, row in zip(titles[0], scores[0].tolist(), rows[0].tolist(), strict=True)
        if row >= 0
    ]
