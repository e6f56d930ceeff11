"""Run directories of the pipeline: written atomically, verified on load, re-evaluated in place.

A run holds ``config.toml`` (the resolved settings: ``twotower train --config RUN/config.toml`` trains it
again), ``model.safetensors``, ``vocabularies.json``, ``metrics.json``, ``plot.png``, ``data.json`` (the size
and SHA-256 of the files read, so that re-evaluation refuses changed data) and ``bundle/``, what ``twotower
serve`` and ``twotower recommend`` answer from; a featurized run also ``features.json`` (both towers' fitted
features and layers) and, with ``track_every``, ``accuracy.png`` (test top-100 accuracy against epoch);
``manifest.json``, written last, lists every file's SHA-256.
Nothing in a run is code: safetensors, JSON, TOML and a PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower._files import parse_json, read_verified_directory, write_manifest_directory
from twotower.features import FeatureError, build_feature_tower
from twotower.indexes import AnisotropicIVF, BruteForce
from twotower.pipeline.config import ConfigError, PipelineConfig, load_config, make_config, resolved
from twotower.pipeline.evaluation import evaluate_part
from twotower.pipeline.features import build_tower_inputs, serving_features
from twotower.pipeline.model import FeatureRetrievalModel, IdRetrievalModel, SoftmaxRetrievalModel
from twotower.pipeline.prepared import PreparedInteractions
from twotower.pipeline.training import TRACKED_ACCURACY, TrainedModel, build_model, load_interactions, prepare
from twotower.vocabulary import Vocabulary

RUN_FORMAT = "twotower.pipeline-run/1"
_RUN_FILES = ("config.toml", "model.safetensors", "vocabularies.json", "metrics.json", "data.json")


class RunDirectoryError(ValueError):
    """A run directory is missing, partial, changed, or not a run; or its output directory is taken."""


def data_fingerprint(config: PipelineConfig) -> dict[str, Any]:
    """Size and SHA-256 of every file the run reads (a directory's Parquet parts, sorted by name)."""
    files: dict[str, Any] = {}
    for setting in ("interactions", "items"):
        value = getattr(config, setting)
        if not value or value.startswith("movielens:"):
            continue
        path = Path(value)
        parts = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for part in parts:
            digest = hashlib.sha256()
            with part.open("rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
            files[str(part)] = {"bytes": part.stat().st_size, "sha256": digest.hexdigest()}
    return {"files": files, "movielens": config.movielens_release}


def check_output_directory(directory: Path, overwrite: bool) -> None:
    """Refuse to write a run over anything but nothing, an empty folder, or (with ``overwrite``) a run.

    Raises:
        RunDirectoryError: ``directory`` is a file, holds something that is not a twotower run, or is a run and
            ``overwrite`` is off.
    """
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise RunDirectoryError(f"{directory} exists and is not a directory: refusing to write a run there")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    manifest = directory / "manifest.json"
    try:
        format_name = json.loads(manifest.read_text(encoding="utf-8")).get("format") if manifest.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        format_name = None
    if format_name not in (RUN_FORMAT, "twotower.run/1"):
        raise RunDirectoryError(
            f"{directory} holds files that are not a twotower run: refusing to replace them (choose another --out)"
        )
    if not overwrite:
        raise RunDirectoryError(f"{directory} already holds a run: pass --overwrite to replace it (atomically)")


def _pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (no display is needed to draw a run's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    """``figure`` laid out and encoded as PNG, then closed."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def _plot(history: list[dict[str, float]], test: dict[str, Any], ks: tuple[int, ...], best_epoch: int) -> bytes:
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()

    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [int(row["epoch"]) for row in history]
    loss_axis.plot(epochs, [row["loss"] for row in history], marker="o", label="training loss")
    loss_axis.set(title="Training", xlabel="epoch", ylabel="mean batch loss")
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    validation = [key for key in history[0] if key.startswith("val_")] if history else []
    if validation:
        twin = loss_axis.twinx()
        twin.plot(epochs, [row[validation[0]] for row in history], marker="s", color="tab:orange",
                  label=validation[0].replace("val_model/", "validation "))  # fmt: skip
        twin.set_ylabel(validation[0].replace("val_model/", "validation "))
        twin.axvline(best_epoch, color="grey", linestyle=":", label=f"kept epoch {best_epoch}")
        twin.legend(loc="center right")
    loss_axis.legend(loc="upper right")
    for name, marker in (("model", "o"), ("popularity", "s")):
        if f"{name}/recall@{ks[0]}" in test:
            recall_axis.plot(ks, [test[f"{name}/recall@{k}"] for k in ks], marker=marker, label=f"{name} Recall@K")
    recall_axis.set(title="Test users, training items excluded", xlabel="K", ylabel="Recall@K", xscale="log")
    recall_axis.legend()
    return _png(figure)


def _accuracy_plot(history: list[dict[str, float]]) -> bytes | None:
    """The deep retrieval tutorial's figure: test top-100 accuracy against epoch (``track_every``), or ``None``."""
    points = [(int(row["epoch"]), row[TRACKED_ACCURACY]) for row in history if TRACKED_ACCURACY in row]
    if not points:
        return None
    figure, axis = _pyplot().subplots(figsize=(6, 4))
    axis.plot([epoch for epoch, _ in points], [value for _, value in points], marker=".")
    axis.set(title="Test top-100 accuracy while training", xlabel="epoch", ylabel="top-100 accuracy")
    axis.grid(alpha=0.3)
    return _png(figure)


def _metrics_document(trained: TrainedModel) -> dict[str, Any]:
    return {
        "config": asdict(trained.config),
        "read": asdict(trained.interactions.report),
        "split": trained.prepared.split.description,
        "history": trained.history,
        "best_epoch": trained.best_epoch,
        **trained.results,
    }


def _seen_by_id(prepared: PreparedInteractions) -> dict[str, list[str]]:
    users = prepared.users.arrow_values.to_pylist()
    items = prepared.items.arrow_values.to_pylist()
    buckets = prepared.users.num_oov_buckets
    seen: dict[str, list[str]] = {}
    for row, user in enumerate(users, start=buckets):
        rows = prepared.seen_items[prepared.seen_indptr[row] : prepared.seen_indptr[row + 1]]
        seen[str(user)] = [str(items[int(item) - 1]) for item in rows if item >= 1]
    return seen


#: With ``serving_index = "auto"``, catalogues of at least this many items are served by an approximate index.
APPROXIMATE_FROM = 100_000
#: Users whose embeddings tune an approximate serving index for its target recall.
TUNING_USERS = 500


def item_id_index(
    model: SoftmaxRetrievalModel, prepared: PreparedInteractions, config: PipelineConfig | None = None
) -> BruteForce | AnisotropicIVF:
    """The serving index of every item (rows 1..), with the item ids as its ids: exact, or (``serving_index``
    ``"approximate"``, or ``"auto"`` from :data:`APPROXIMATE_FROM` items) an :class:`AnisotropicIVF` tuned for
    ``serving_target_recall`` on the embeddings of up to :data:`TUNING_USERS` users, the queries it will serve."""
    embeddings = model.corpus_embeddings()
    ids = np.asarray(prepared.items.values)
    kind = "exact" if config is None else config.serving_index
    if kind == "auto":
        kind = "approximate" if embeddings.shape[0] >= APPROXIMATE_FROM else "exact"
    if kind == "exact":
        return BruteForce(k=100).index(embeddings, ids)
    assert config is not None
    tuning = tuning_queries(model, prepared, config.seed)
    index = AnisotropicIVF(
        k=min(100, embeddings.shape[0]), target_recall=config.serving_target_recall, tuning_queries=tuning,
        seed=config.seed,
    )  # fmt: skip
    return index.index(embeddings, ids)


def tuning_queries(model: SoftmaxRetrievalModel, prepared: PreparedInteractions, seed: int) -> torch.Tensor:
    """Up to :data:`TUNING_USERS` query embeddings of the kind serving answers: rows of the user table (id
    model), or the queries of randomly chosen training interactions (featurized: their context included)."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(model, IdRetrievalModel):
        users = model.user_embedding.weight[1:].detach()
        return users[torch.randperm(users.shape[0], generator=generator)[:TUNING_USERS]].clone()
    train = prepared.train
    positions = torch.randperm(len(train), generator=generator)[:TUNING_USERS].numpy()
    return model.query_embeddings(train, positions, train.users.numpy()[positions])


def save_run(directory: str | os.PathLike[str], trained: TrainedModel, overwrite: bool = False) -> Path:
    """Write ``trained`` as a run directory (see the module docstring), built beside it and swapped in at once.

    Raises:
        RunDirectoryError: see :func:`check_output_directory`.
    """
    from safetensors.torch import save

    from twotower.serving import _Tower, save_bundle

    target = Path(directory)
    check_output_directory(target, overwrite)
    config = resolved(trained.config)
    model = trained.model
    files: dict[str, bytes] = {
        "config.toml": config.to_toml().encode(),
        "model.safetensors": save({name: tensor.contiguous() for name, tensor in model.state_dict().items()}),
        "vocabularies.json": json.dumps(
            {"users": trained.prepared.users.to_json(), "items": trained.prepared.items.to_json()}
        ).encode(),
        "metrics.json": json.dumps(_metrics_document(trained), indent=2).encode(),
        "data.json": json.dumps(data_fingerprint(config), indent=2).encode(),
        "plot.png": _plot(trained.history, trained.results.get("test", {}), config.ks, trained.best_epoch),
    }
    accuracy = _accuracy_plot(trained.history)
    if accuracy is not None:
        files["accuracy.png"] = accuracy
    if isinstance(model, FeatureRetrievalModel):
        files["features.json"] = json.dumps(
            {"query": model.query_tower.describe(), "candidate": model.candidate_tower.describe()}
        ).encode()
        query_tower: nn.Module = model.query_tower
    else:
        assert isinstance(model, IdRetrievalModel)
        query_tower = _Tower(model.user_embedding)

    def fill(building: Path) -> None:
        for name, payload in files.items():
            (building / name).write_bytes(payload)
        save_bundle(
            building / "bundle",
            query_tower,
            item_id_index(model, trained.prepared, config),
            trained.prepared.users,
            _seen_by_id(trained.prepared),
            {"pipeline": RUN_FORMAT, "config": asdict(config)},
            item_titles=trained.prepared.item_titles,
            popularity=trained.prepared.popularity(),
            query_features=None if trained.inputs is None else serving_features(config, trained.inputs),
        )

    write_manifest_directory(target, RUN_FORMAT, fill)
    return target


@dataclass
class LoadedPipelineRun:
    """A verified run: its settings, vocabularies, model and saved metrics.

    ``model`` is the :class:`IdRetrievalModel`, or for a featurized run a module holding its ``query_tower`` and
    ``candidate_tower`` (the trained weights; their inputs come from the data, see :func:`evaluate_run`).
    """

    directory: Path
    config: PipelineConfig
    users: Vocabulary
    items: Vocabulary
    model: nn.Module
    metrics: dict[str, Any]
    data: dict[str, Any]


def load_pipeline_run(directory: str | os.PathLike[str]) -> LoadedPipelineRun:
    """Load and verify a run written by :func:`save_run` (every file against the manifest's SHA-256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(directory)
    _, contents = read_verified_directory(directory, RUN_FORMAT, RunDirectoryError, "run", exclusive=False)
    missing = sorted(set(_RUN_FILES) - set(contents))
    if missing:
        raise RunDirectoryError(f"{directory} is not a complete run: the manifest does not list {missing}")
    try:
        config = load_config(directory / "config.toml")
    except ConfigError as error:
        raise RunDirectoryError(f"{directory}/config.toml: {error}") from error
    vocabularies = parse_json(contents["vocabularies.json"], f"{directory}/vocabularies.json", RunDirectoryError)
    try:
        users = Vocabulary.from_json(vocabularies["users"], "users")
        items = Vocabulary.from_json(vocabularies["items"], "items")
    except (KeyError, TypeError, ValueError) as error:
        raise RunDirectoryError(f"{directory}/vocabularies.json: {error}") from error
    torch.manual_seed(config.seed)
    try:
        tensors = load(contents["model.safetensors"])
    except SafetensorError as error:
        raise RunDirectoryError(f"{directory}/model.safetensors is not a safetensors file: {error}") from error
    model: nn.Module
    if config.featurized:
        if "features.json" not in contents:
            raise RunDirectoryError(f"{directory} is a featurized run but its manifest does not list features.json")
        described = parse_json(contents["features.json"], f"{directory}/features.json", RunDirectoryError)
        try:
            towers = {
                name: build_feature_tower(described[tower], _prefixed(tensors, name))
                for tower, name in (("query", "query_tower"), ("candidate", "candidate_tower"))
            }
        except (KeyError, TypeError, FeatureError) as error:
            raise RunDirectoryError(f"{directory}: the towers do not load: {error}") from error
        if set(tensors) != {f"{name}.{key}" for name, tower in towers.items() for key in tower.state_dict()}:
            raise RunDirectoryError(f"{directory}/model.safetensors holds tensors no tower has")
        model = nn.ModuleDict(towers)
    else:
        model = IdRetrievalModel(len(users), len(items), config.embedding_dim, config.init_scale,
                                 precision=config.precision)  # type: ignore[arg-type]  # fmt: skip
        try:
            model.load_state_dict(tensors)
        except RuntimeError as error:
            raise RunDirectoryError(
                f"{directory}/model.safetensors does not fit the run's vocabularies: {error}"
            ) from error
    return LoadedPipelineRun(
        directory=directory,
        config=config,
        users=users,
        items=items,
        model=model,
        metrics=parse_json(contents["metrics.json"], f"{directory}/metrics.json", RunDirectoryError),
        data=parse_json(contents["data.json"], f"{directory}/data.json", RunDirectoryError),
    )


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1 :]: value for name, value in tensors.items() if name.startswith(prefix + ".")}


def evaluate_run(directory: str | os.PathLike[str], say: Any = print) -> dict[str, Any]:
    """Re-evaluate a saved run on its test split: the data is read again (and must be the data it was trained on,
    by size and SHA-256), split as before, and ``metrics.json`` is rewritten with the new results.

    Raises:
        RunDirectoryError: the run does not verify, or its data changed since training.
    """
    run = load_pipeline_run(directory)
    if data_fingerprint(run.config) != run.data:
        raise RunDirectoryError(
            f"the data of {run.directory} changed since it was trained (size or SHA-256 of "
            f"{sorted(run.data.get('files', {}))} differ): re-train instead"
        )
    interactions = load_interactions(run.config)
    prepared = prepare(run.config, interactions)
    if prepared.users != run.users or prepared.items != run.items:
        raise RunDirectoryError(f"re-reading the data of {run.directory} gave other vocabularies than the run's")
    inputs = None
    if run.config.featurized:
        towers: Any = run.model
        # The saved preprocessing is applied, not fitted again: the run's inputs, exactly.
        inputs = build_tower_inputs(run.config, interactions, prepared, fitted=(
            towers["query_tower"].features, towers["candidate_tower"].features))  # fmt: skip
    fresh = build_model(run.config, prepared, inputs)
    fresh.load_state_dict(run.model.state_dict())
    test = evaluate_part(fresh, prepared, prepared.test, ks=run.config.ks, batch_size=run.config.eval_batch_size)
    metrics = {**run.metrics, "test": test}
    _rewrite(run.directory, {"metrics.json": json.dumps(metrics, indent=2).encode()})
    return test


def _rewrite(directory: Path, changed: dict[str, bytes]) -> None:
    """Replace some files of a run and its manifest, atomically (a copy is changed, then swapped in)."""

    def fill(building: Path) -> None:
        shutil.rmtree(building)
        shutil.copytree(directory, building, symlinks=True)
        for name, payload in changed.items():
            (building / name).write_bytes(payload)

    write_manifest_directory(directory, RUN_FORMAT, fill)


def config_from_flags(config_path: str | None, flags: dict[str, Any]) -> PipelineConfig:
    """Settings from an optional TOML file with ``flags`` (only those given) overriding it."""
    given = {name: value for name, value in flags.items() if value is not None}
    if config_path:
        return load_config(config_path, given)
    return make_config(given, "the command line")
