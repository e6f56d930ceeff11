"""The settings of one pipeline run, from Python, a TOML file or command-line flags (flags override the file).

A run saves its resolved settings as ``config.toml`` (paths made absolute), so that
``twotower train --config runs/shop/config.toml`` trains the same model again.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from twotower.data.splits import SPLIT_METHODS
from twotower.features import FeatureError, FeatureSpec
from twotower.optim import OPTIMIZERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Negatives = Literal["in-batch", "mixed"]
#: The TOML section of every setting.
SECTIONS: dict[str, tuple[str, ...]] = {
    "data": (
        "interactions",
        "user_col",
        "item_col",
        "time_col",
        "weight_col",
        "items",
        "item_id_col",
        "item_title_col",
        "users",
        "user_table_id_col",
        "duplicates",
        "unknown_items",
        "data_dir",
    ),
    "split": ("split", "test_fraction", "validation_fraction", "test_from", "last_n", "split_seed"),
    "vocabulary": ("user_vocabulary", "user_oov_buckets", "fit_features_on"),
    "model": ("embedding_dim", "init_scale", "layer_sizes", "l2_normalize"),
    "training": (
        "epochs",
        "batch_size",
        "learning_rate",
        "optimizer",
        "negatives",
        "num_negatives",
        "logq",
        "remove_accidental_hits",
        "sparse_embeddings",
        "patience",
        "early_stopping_k",
        "precision",
        "seed",
    ),
    "evaluation": ("ks", "eval_batch_size", "track_every"),
    "serving": ("serving_index", "serving_target_recall"),
    "run": ("out",),
}
#: The sections that hold a tower's features (``[query.features]``, ``[candidate.features]``), by setting.
FEATURE_SECTIONS = {"query": "query_features", "candidate": "candidate_features"}
#: The settings that take one of a few words, and those words.
CHOICES: dict[str, tuple[str, ...]] = {
    "duplicates": ("keep", "drop"),
    "unknown_items": ("drop", "keep"),
    "split": SPLIT_METHODS,
    "user_vocabulary": ("train", "all"),
    "fit_features_on": ("train", "all"),
    "negatives": ("in-batch", "mixed"),
    "precision": ("float32", "bf16"),
    "optimizer": OPTIMIZERS,
    "serving_index": ("auto", "exact", "approximate"),
}
#: Settings that name files: resolved against the config file's folder, saved absolute.
_PATHS = ("interactions", "items", "users", "data_dir", "out")


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range."""


@dataclass(frozen=True)
class PipelineConfig:
    """Every setting of a run, with defaults that work for an id-only model on an interaction log.

    Data: ``interactions`` is a CSV or Parquet file, a directory of Parquet parts, or ``movielens:100k`` (also
    ``movielens:latest-small``, ``movielens:1m``: ratings as interactions, movie titles as items, the release's
    movies as the catalogue). Split: see :func:`~twotower.data.splits.split_interactions`. Vocabulary: users are
    those of the training rows (``user_vocabulary="all"``: of every row, as the TFRS tutorials do), unknown users
    share ``user_oov_buckets`` hashed rows. Model: id embeddings of ``embedding_dim``, initialised
    uniform(±``init_scale``) as Keras does (``nn.Embedding``'s N(0, 1) default trains badly). Training: Adagrad
    (Keras's), the in-batch softmax with the logQ correction and, with ``negatives="mixed"``, ``num_negatives``
    extra uniformly sampled items per batch; early stopping on the validation Recall@``early_stopping_k`` after
    ``patience`` epochs without improvement (0: train every epoch). ``sparse_embeddings``: the tables' gradients
    hold only the batch's rows and Adagrad updates only those (TensorFlow's sparse Adagrad; the same weights),
    so a step costs O(batch) rather than O(table): for catalogues of millions. ``optimizer``: ``"adagrad"``
    (Keras's, TFRS's), ``"rowwise-adagrad"`` (one accumulator per row) or ``"adam"`` (lazy on sparse tables; give
    it a learning rate near Keras's 0.001): see :func:`~twotower.optim.make_optimizer`.

    Features (``[query.features]``, ``[candidate.features]``; see :mod:`twotower.features`): each tower embeds
    its features (``{name: "type"}`` or ``{name: {type = ..., column = ..., ...}}``), concatenates them and
    passes them through ``layer_sizes`` dense layers (ReLU on all but the last), then ``l2_normalize`` if set.
    A query feature's column is the user column, the time column, a column of the user table ``users``
    (keyed by ``user_table_id_col``, default ``user_col``), or any other column of the log (context, taken from
    each interaction); a candidate feature's column is the item column, a column of the catalogue ``items``, or
    of the log (each item's first row). The preprocessing is fitted on the training rows (``fit_features_on =
    "all"``: every row, as the TFRS tutorials do). Without features, a tower is its id's embedding.
    ``split_seed``: the random split's seed (-1: ``seed``), so that seeds of the model can vary over one split.
    ``track_every``: every this many epochs, record the test split's top-K accuracy in the history (the deep
    retrieval tutorial's curve; it reads the test split, so it is a report, never a choice of model).
    """

    interactions: str = ""
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = ""
    weight_col: str = ""
    items: str = ""
    item_id_col: str = ""
    item_title_col: str = ""
    users: str = ""
    user_table_id_col: str = ""
    duplicates: str = "keep"
    unknown_items: str = "drop"
    data_dir: str = ""
    split: str = "time"
    test_fraction: float = 0.1
    validation_fraction: float = 0.1
    test_from: str = ""
    last_n: int = 1
    split_seed: int = -1
    user_vocabulary: str = "train"
    user_oov_buckets: int = 1
    fit_features_on: str = "train"
    embedding_dim: int = 64
    init_scale: float = 0.05
    layer_sizes: tuple[int, ...] = ()
    l2_normalize: bool = False
    epochs: int = 30
    batch_size: int = 4096
    learning_rate: float = 0.1
    optimizer: str = "adagrad"
    negatives: str = "in-batch"
    num_negatives: int = 1024
    logq: bool = True
    remove_accidental_hits: bool = True
    sparse_embeddings: bool = False
    patience: int = 3
    early_stopping_k: int = 100
    precision: str = "float32"
    seed: int = 0
    ks: tuple[int, ...] = (10, 50, 100)
    eval_batch_size: int = 4096
    track_every: int = 0
    serving_index: str = "auto"
    serving_target_recall: float = 0.95
    out: str = ""
    query_features: tuple[FeatureSpec, ...] = ()
    candidate_features: tuple[FeatureSpec, ...] = ()

    def __post_init__(self) -> None:
        # A TOML file or a caller may give ks as a list; the frozen config keeps a tuple.
        for name in ("ks", "layer_sizes"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for section, name in FEATURE_SECTIONS.items():
            object.__setattr__(self, name, _feature_specs(getattr(self, name), f"[{section}.features]"))
        sizes: object = self.layer_sizes
        if not isinstance(sizes, tuple) or not all(
            isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 65536 for size in sizes
        ):
            raise ConfigError(f"layer_sizes must be a list of ints in [1, 65536], got {sizes!r}")
        if self.sparse_embeddings and self.featurized:
            raise ConfigError(
                "sparse_embeddings is for id towers: feature towers train their tables densely (leave it off)"
            )
        if self.split_seed < -1:
            raise ConfigError(f"split_seed must be >= 0 (or -1: the seed), got {self.split_seed}")
        if self.track_every < 0:
            raise ConfigError(f"track_every must be >= 0 (0: off), got {self.track_every}")
        kinds: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float), "bool": bool}
        for item in fields(self):
            value = getattr(self, item.name)
            expected = kinds.get(str(item.type))
            if expected is not None and (
                not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))
            ):
                raise ConfigError(f"{item.name} must be a {item.type}, got {value!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        counts = ("last_n", "user_oov_buckets", "embedding_dim", "epochs", "batch_size", "num_negatives")
        for name in (*counts, "early_stopping_k", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")
        for name in ("learning_rate", "init_scale"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 < self.serving_target_recall <= 1:
            raise ConfigError(f"serving_target_recall must lie in (0, 1], got {self.serving_target_recall}")
        if not self.ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.ks):
            raise ConfigError(f"ks must be a non-empty list of positive ints, got {list(self.ks)}")

    @property
    def featurized(self) -> bool:
        """Whether the towers are built from features (any feature, dense layer or normalisation), not ids only."""
        return bool(self.query_features or self.candidate_features or self.layer_sizes or self.l2_normalize)

    @property
    def movielens_release(self) -> str | None:
        """The MovieLens release named by ``interactions = "movielens:<release>"``, else ``None``."""
        return self.interactions.split(":", 1)[1] if self.interactions.startswith("movielens:") else None

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes`` (each checked)."""
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        """The settings as TOML, one section per :data:`SECTIONS` entry."""
        import tomli_w

        document: dict[str, dict[str, Any]] = {}
        for section, names in SECTIONS.items():
            document[section] = {name: _toml_value(getattr(self, name)) for name in names}
        for section, name in FEATURE_SECTIONS.items():
            specs: tuple[FeatureSpec, ...] = getattr(self, name)
            if specs:
                document[section] = {"features": {spec.name: spec.to_config() for spec in specs}}
        return tomli_w.dumps(document)


def _feature_specs(value: Any, where: str) -> tuple[FeatureSpec, ...]:
    """``{name: type or table}`` (a config's form) or FeatureSpecs, as a tuple of :class:`FeatureSpec`."""
    if isinstance(value, dict):
        try:
            return tuple(FeatureSpec.from_config(str(name), entry, where) for name, entry in value.items())
        except FeatureError as error:
            raise ConfigError(str(error)) from None
    if isinstance(value, (tuple, list)) and all(isinstance(spec, FeatureSpec) for spec in value):
        names = [spec.name for spec in value]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: feature names must be distinct, got {names}")
        return tuple(value)
    raise ConfigError(f'{where} must be a table of features (name = "type" or {{type = ...}}), got {value!r}')


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _flatten(document: dict[str, Any], source: str) -> dict[str, Any]:
    known = {name for names in SECTIONS.values() for name in names}
    settings: dict[str, Any] = {}
    for section, values in document.items():
        if section in FEATURE_SECTIONS:
            if not isinstance(values, dict) or set(values) - {"features"}:
                raise ConfigError(f"{source}: [{section}] holds only a [{section}.features] table")
            settings[FEATURE_SECTIONS[section]] = values.get("features", {})
            continue
        if section not in SECTIONS:
            sections = [*SECTIONS, *(f"{name}.features" for name in FEATURE_SECTIONS)]
            raise ConfigError(f"{source}: unknown section [{section}]; the sections are {sections}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of settings")
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown setting {name!r} in [{section}]")
            if name not in SECTIONS[section]:
                home = next(key for key, names in SECTIONS.items() if name in names)
                raise ConfigError(f"{source}: {name!r} belongs in [{home}], not [{section}]")
            settings[name] = value
    return settings


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a TOML config; ``overrides`` (e.g. command-line flags that were given) win over the file.

    Relative paths in the file are taken from the file's folder, so a config works from any directory.

    Raises:
        ConfigError: the file cannot be read or parsed, or holds an unknown or bad setting.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    settings = _flatten(document, str(path))
    for name in _PATHS:
        value = settings.get(name)
        if isinstance(value, str) and value and not value.startswith("movielens:") and not Path(value).is_absolute():
            settings[name] = str((path.parent / value).resolve())
    settings.update(overrides or {})
    return make_config(settings, str(path))


def make_config(settings: dict[str, Any], source: str = "the settings") -> PipelineConfig:
    """A :class:`PipelineConfig` from ``{name: value}``, with errors naming ``source``."""
    names = {item.name for item in fields(PipelineConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown settings {unknown}")
    try:
        return PipelineConfig(**settings)
    except TypeError as error:
        raise ConfigError(f"{source}: {error}") from None


def resolved(config: PipelineConfig) -> PipelineConfig:
    """``config`` with every file path absolute (what a run saves)."""
    changes = {}
    for name in _PATHS:
        value = getattr(config, name)
        if value and not value.startswith("movielens:"):
            changes[name] = str(Path(value).resolve())
    return config.replace(**changes)
