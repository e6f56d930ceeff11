"""From settings to a trained, evaluated model: read, split, fit vocabularies, train with early stopping, evaluate."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from twotower import distributed
from twotower.data.batches import Batches
from twotower.data.interactions import Interactions, InteractionsError
from twotower.data.movielens import MovieLens
from twotower.data.splits import split_interactions
from twotower.features import FeatureTower
from twotower.optim import make_optimizer
from twotower.pipeline.config import PipelineConfig
from twotower.pipeline.evaluation import evaluate_part
from twotower.pipeline.features import FeatureBatches, TowerInputs, build_tower_inputs, context_columns
from twotower.pipeline.model import FeatureRetrievalModel, IdRetrievalModel, SoftmaxRetrievalModel
from twotower.pipeline.prepared import PreparedInteractions, prepare_interactions


def _reading_options(config: PipelineConfig) -> dict[str, Any]:
    return {
        "context_cols": context_columns(config),
        "time_col": config.time_col or None,
        "weight_col": config.weight_col or None,
        "item_id_col": config.item_id_col or None,
        "item_title_col": config.item_title_col or None,
        "duplicates": config.duplicates,
        "unknown_items": config.unknown_items,
    }


def movielens_interactions(data: MovieLens, config: PipelineConfig) -> Interactions:
    """A MovieLens release as an interaction log: its ratings (columns ``user_id``, ``movie_id``, ``movie_title``,
    ``rating``, ``timestamp``), with every movie of the release (``movie_id``, ``movie_title``, ``genres``: joined
    by ``|``) as the catalogue."""
    table = pa.table(
        {
            "user_id": data.user_ids,
            "movie_id": data.movie_ids,
            "movie_title": data.movie_titles,
            "rating": data.ratings,
            "timestamp": data.timestamps,
        }
    )
    catalogue = data.catalogue()
    return Interactions.from_arrow(
        table, config.user_col, config.item_col, items=catalogue, source=f"MovieLens {data.name}",
        **_reading_options(config),
    )  # fmt: skip


def load_interactions(config: PipelineConfig) -> Interactions:
    """Read the log ``config`` names: a file or directory, or a MovieLens release (``movielens:100k``)."""
    release = config.movielens_release
    if release is not None:
        from twotower.data.movielens import load_movielens

        return movielens_interactions(load_movielens(release, data_dir=config.data_dir or None), config)
    if not config.interactions:
        raise ValueError("no interactions given: pass --interactions FILE (or interactions = ... in the config)")
    return Interactions.from_file(
        config.interactions, config.user_col, config.item_col, items=config.items or None, **_reading_options(config)
    )


@dataclass
class TrainedModel:
    """What :func:`train` produced.

    Attributes:
        config: the settings.
        interactions: the log as read (its :attr:`~twotower.data.interactions.Interactions.report` says what
            reading did).
        prepared: vocabularies and the split as rows.
        model: the trained model (the best validation epoch's weights, with early stopping).
        history: one record per epoch: ``loss`` and, with a validation split, ``val_model/recall@K``.
        best_epoch: the epoch whose weights the model holds.
        results: ``{"test": ...}`` as :func:`~twotower.pipeline.evaluation.evaluate_part` returns.
        inputs: a featurized model's fitted features and inputs (``None`` for an id model).
    """

    config: PipelineConfig
    interactions: Interactions
    prepared: PreparedInteractions
    model: SoftmaxRetrievalModel
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    inputs: TowerInputs | None = None


#: The history key of the test top-100 accuracy that ``track_every`` records.
TRACKED_ACCURACY = "test_factorized_top_k/top_100_categorical_accuracy"


def prepare(config: PipelineConfig, interactions: Interactions) -> PreparedInteractions:
    """Split ``interactions`` and fit the vocabularies as ``config`` says."""
    split = split_interactions(
        interactions,
        method=config.split,  # type: ignore[arg-type]
        test_fraction=config.test_fraction,
        validation_fraction=config.validation_fraction,
        test_from=config.test_from or None,
        last_n=config.last_n,
        seed=config.seed if config.split_seed < 0 else config.split_seed,
    )
    prepared = prepare_interactions(interactions, split, config.user_vocabulary, config.user_oov_buckets)
    # A test split of cold users only would report popularity's numbers as the model's: refuse it.
    if not bool((prepared.test.users >= prepared.users.num_oov_buckets).any()):
        raise InteractionsError(
            f"the {config.split} split leaves no test user that training has seen ({split.description}; every test "
            "user is new): use an earlier --test-from, a larger --test-fraction, or --split last-n"
        )
    return prepared


def build_model(
    config: PipelineConfig, prepared: PreparedInteractions, inputs: TowerInputs | None = None
) -> SoftmaxRetrievalModel:
    """The model ``config`` describes, sized for ``prepared``'s vocabularies (seeded with ``config.seed``); a
    featurized config needs the fitted ``inputs`` (:func:`~twotower.pipeline.features.build_tower_inputs`)."""
    torch.manual_seed(config.seed)
    softmax: dict[str, Any] = {
        "item_counts": prepared.item_counts if config.logq else None,
        "batch_size": config.batch_size,
        "negatives": config.negatives,
        "num_negatives": config.num_negatives,
        "remove_accidental_hits": config.remove_accidental_hits,
        "precision": config.precision,
        "seed": config.seed,
    }
    if config.featurized:
        if inputs is None:
            raise ValueError("a featurized config needs its tower inputs (build_tower_inputs)")
        towers = [
            FeatureTower(features, config.embedding_dim, config.layer_sizes, config.l2_normalize, config.init_scale)
            for features in (inputs.query_features, inputs.candidate_features)
        ]
        return FeatureRetrievalModel(towers[0], towers[1], inputs, **softmax)
    return IdRetrievalModel(
        len(prepared.users),
        len(prepared.items),
        embedding_dim=config.embedding_dim,
        init_scale=config.init_scale,
        sparse_embeddings=config.sparse_embeddings,
        **softmax,
    )


def fit(
    config: PipelineConfig,
    prepared: PreparedInteractions,
    model: SoftmaxRetrievalModel,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[list[dict[str, float]], int]:
    """Train ``model`` on the training rows; returns the history and the epoch whose weights it keeps.

    With a validation split and ``patience > 0``, each epoch is scored by the validation Recall@K
    (``early_stopping_k``); training stops after ``patience`` epochs without a better one and the model goes
    back to the best epoch's weights.
    """
    train = prepared.train
    inputs = model.inputs if isinstance(model, FeatureRetrievalModel) else None
    # A featurized model's batches carry log rows, turned into the query tower's inputs batch by batch.
    queries = train.users if inputs is None else torch.from_numpy(train.log_rows.astype(np.int64))
    tensors = [queries, train.items] + ([train.weights] if train.weights is not None else [])
    # Under torch.distributed (torchrun) each rank takes its slice of every global batch; the gradients are summed
    # and the task scores every rank's queries against every rank's candidates, so training is the single-process
    # computation on the same global batches.
    batches = Batches(*tensors, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                      shard=distributed.is_distributed())  # fmt: skip
    batches_or_features: Any = batches if inputs is None else FeatureBatches(batches, inputs)
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.learning_rate, config.sparse_embeddings)
    early = config.patience > 0 and len(prepared.validation) > 0
    metric = f"model/recall@{config.early_stopping_k}"
    best: dict[str, Any] = {"score": -1.0, "epoch": 0, "state": None, "waited": 0}

    def after_epoch(record: dict[str, float]) -> bool:
        epoch = int(record["epoch"])
        line = f"epoch {epoch}/{config.epochs}: mean batch loss {record['loss']:,.2f}"
        if early:
            scores = evaluate_part(
                model, prepared, prepared.validation, ks=(config.early_stopping_k,), baseline=False,
                top_k_accuracy=False, batch_size=config.eval_batch_size,
            )  # fmt: skip
            score = float(scores[metric])
            record[f"val_{metric}"] = score
            line += f", validation Recall@{config.early_stopping_k} {score:.4f}"
            if score > best["score"]:
                best.update(score=score, epoch=epoch, state=copy.deepcopy(model.state_dict()), waited=0)
            else:
                best["waited"] += 1
        if config.track_every and (epoch % config.track_every == 0 or epoch == config.epochs):
            tracked = evaluate_part(
                model, prepared, prepared.test, ks=(config.early_stopping_k,), baseline=False, ranking=False,
                batch_size=config.eval_batch_size,
            )  # fmt: skip
            for key, value in tracked.items():
                if key.startswith("factorized_top_k/"):
                    record[f"test_{key}"] = float(value)
            line += f", test top-100 accuracy {record.get(TRACKED_ACCURACY, 0):.4f}"
        say(line)
        return bool(early and best["waited"] >= config.patience)

    history = model.fit(
        batches_or_features, optimizer, epochs=config.epochs, progress=progress, on_epoch_end=after_epoch
    )
    if early and best["state"] is not None:
        model.load_state_dict(best["state"])
        if best["epoch"] != len(history):
            say(f"early stopping: kept epoch {best['epoch']} (validation Recall@{config.early_stopping_k} "
                f"{best['score']:.4f})")  # fmt: skip
        return history, int(best["epoch"])
    return history, len(history)


def train(
    config: PipelineConfig,
    progress: bool = True,
    say: Callable[[str], None] = print,
    interactions: Interactions | None = None,
    evaluate_untrained: bool = False,
) -> TrainedModel:
    """Read, split, train and evaluate on the test split, as ``twotower train`` does (nothing is saved: see
    :func:`~twotower.pipeline.runs.save_run`).

    Args:
        interactions: the log, already read (default: read what ``config`` names).
        evaluate_untrained: also evaluate the model before training (``results["untrained"]``: what chance
            gives, the floor any trained number is read against).
    """
    interactions = interactions if interactions is not None else load_interactions(config)
    for line in interactions.report.lines():
        say(line)
    prepared = prepare(config, interactions)
    say(f"split: {prepared.split.description}")
    say(
        f"{len(prepared.train):,} training, {len(prepared.validation):,} validation and {len(prepared.test):,} test "
        f"interactions; {prepared.users.num_values:,} users and {prepared.items.num_values:,} items in the "
        "vocabularies"
    )
    inputs = build_tower_inputs(config, interactions, prepared) if config.featurized else None
    if inputs is not None:
        layers = f" -> dense {list(config.layer_sizes)}" if config.layer_sizes else ""
        for tower, features in (("query", inputs.query_features), ("candidate", inputs.candidate_features)):
            say(f"{tower} tower: {' + '.join(feature.summary() for feature in features)}{layers}")
    model = build_model(config, prepared, inputs)
    results: dict[str, Any] = {}
    if evaluate_untrained:
        results["untrained"] = evaluate_part(model, prepared, prepared.test, ks=config.ks, baseline=False,
                                             batch_size=config.eval_batch_size)  # fmt: skip
    history, best_epoch = fit(config, prepared, model, progress=progress, say=say)
    results["test"] = evaluate_part(model, prepared, prepared.test, ks=config.ks, batch_size=config.eval_batch_size)
    return TrainedModel(
        config=config,
        interactions=interactions,
        prepared=prepared,
        model=model,
        history=history,
        best_epoch=best_epoch,
        results=results,
        inputs=inputs,
    )
