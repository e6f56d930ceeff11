"""The towers' features for a pipeline run: where each column comes from, fitting, and the transformed inputs.

A query feature reads the user id (``user_col``), the event time (``time_col``, as seconds), a column of the
user table (``users``), or any other column of the log: context, taken from each interaction. A candidate
feature reads the item id (``item_col``), the display title (``item_title_col``), a column of the catalogue
(``items``), or a column of the log (each item's first row). Features are fitted on the training rows (or, with
``fit_features_on = "all"``, every row, as the TFRS tutorials adapt their layers on the whole data set); the
candidate features on every item of the vocabulary (the catalogue is known before training).

Inputs are held three ways so that nothing is transformed twice: per user code (user-level features, gathered by
each row's user), per log row (context), per item vocabulary row (candidates).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from twotower.data.interactions import Interactions, InteractionsError, read_table
from twotower.data.movielens import MovieLens
from twotower.features import FeatureError, FeatureSpec, FittedFeature, fit_feature
from twotower.features.preprocessing import seconds_since_epoch
from twotower.features.requests import RequestFeatures
from twotower.pipeline.config import PipelineConfig
from twotower.pipeline.prepared import PreparedInteractions
from twotower.vocabulary import as_id_strings

#: Where a feature's column comes from.
USER, TIME, USER_TABLE, CONTEXT, ITEM, TITLE, CATALOGUE, LOG = (
    "user", "time", "user table", "context", "item", "title", "catalogue", "log",
)  # fmt: skip


def query_specs(config: PipelineConfig) -> tuple[FeatureSpec, ...]:
    """The query tower's features: the config's, or the user id alone."""
    return config.query_features or (FeatureSpec(name=config.user_col, type="id", oov_buckets=config.user_oov_buckets),)


def candidate_specs(config: PipelineConfig) -> tuple[FeatureSpec, ...]:
    """The candidate tower's features: the config's, or the item id alone."""
    return config.candidate_features or (FeatureSpec(name=config.item_col, type="id"),)


def column_names(path: str | os.PathLike[str]) -> list[str]:
    """The column names of a CSV or Parquet file (or directory of parts), from its header or schema only."""
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    location = Path(path)
    if not location.exists():
        raise InteractionsError(f"no such file or directory: {location}")
    if location.is_dir() or location.suffix.lower() in (".parquet", ".pq"):
        return list(ds.dataset(location, format="parquet").schema.names)
    delimiter = "\t" if ".tsv" in location.name.lower() else ","
    return list(pacsv.open_csv(location, parse_options=pacsv.ParseOptions(delimiter=delimiter)).schema.names)


def sources(
    config: PipelineConfig, catalogue_columns: Sequence[str], user_table_columns: Sequence[str]
) -> dict[str, str]:
    """``{feature name: source}`` for both towers (see the module docstring); query names first."""
    found: dict[str, str] = {}
    for spec in query_specs(config):
        if spec.column == config.user_col:
            found[spec.name] = USER
        elif config.time_col and spec.column == config.time_col:
            found[spec.name] = TIME
        elif spec.column in user_table_columns:
            found[spec.name] = USER_TABLE
        else:
            found[spec.name] = CONTEXT
    for spec in candidate_specs(config):
        if spec.column == config.item_col:
            found["candidate:" + spec.name] = ITEM
        elif config.item_title_col and spec.column == config.item_title_col:
            found["candidate:" + spec.name] = TITLE
        elif spec.column in catalogue_columns:
            found["candidate:" + spec.name] = CATALOGUE
        else:
            found["candidate:" + spec.name] = LOG
    return found


def feature_tables(config: PipelineConfig) -> tuple[list[str], list[str]]:
    """The column names of the catalogue and of the user table the config names (empty where none)."""
    if config.movielens_release is not None:
        catalogue = list(MovieLens.CATALOGUE_COLUMNS)
    else:
        catalogue = column_names(config.items) if config.items else []
    return catalogue, column_names(config.users) if config.users else []


def context_columns(config: PipelineConfig) -> list[str]:
    """The log columns the features need beyond the id, time and weight columns (read as context)."""
    if not config.featurized:
        return []
    catalogue, user_table = feature_tables(config)
    found = sources(config, catalogue, user_table)
    specs = {spec.name: spec for spec in query_specs(config)}
    specs.update({"candidate:" + spec.name: spec for spec in candidate_specs(config)})
    wanted = [specs[name].column for name, source in found.items() if source in (CONTEXT, LOG)]
    return list(dict.fromkeys(wanted))


@dataclass
class TowerInputs:
    """Fitted features of both towers and their inputs for one log.

    Attributes:
        query_features, candidate_features: the fitted features, in tower order.
        user_codes: ``[rows]`` the log's user code of each row.
        user_inputs: per user code (``[len(log.user_ids), ...]``): the user-level query inputs.
        row_inputs: per log row: the context query inputs.
        item_inputs: per item vocabulary row (``[len(items), ...]``; row 0 is the OOV item): candidate inputs.
        user_table: the user table's feature columns by user id (for serving), or ``None``.
        query_sources: each query feature's source (:data:`USER`, :data:`TIME`, :data:`USER_TABLE` or
            :data:`CONTEXT`), in tower order.
    """

    query_features: list[FittedFeature]
    candidate_features: list[FittedFeature]
    user_codes: np.ndarray
    user_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    row_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    item_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    user_table: pa.Table | None = None
    query_sources: list[str] = field(default_factory=list)

    def query_inputs(self, log_rows: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The query tower's inputs of ``log_rows`` (``{name: [len(log_rows), ...]}``)."""
        rows = torch.as_tensor(log_rows, dtype=torch.int64)
        codes = torch.from_numpy(self.user_codes)[rows]
        inputs = {name: values[codes] for name, values in self.user_inputs.items()}
        inputs.update({name: values[rows] for name, values in self.row_inputs.items()})
        return inputs


def _aligned(table: pa.Table, id_col: str, ids: pa.Array, column: str, what: str) -> pa.Array:
    """``table[column]`` for each of ``ids`` (by ``table[id_col]`` as text; first match), null where absent."""
    keys = as_id_strings(table.column(id_col).drop_null(), f"{what}'s {id_col!r}")
    values = table.column(column).filter(pc.is_valid(table.column(id_col))).combine_chunks()
    positions = pc.index_in(ids, value_set=keys)
    return values.take(positions)


def _first_per_item(interactions: Interactions, column: pa.Array, item_ids: pa.Array) -> pa.Array:
    """Each of ``item_ids``' value of a log column, from its first row; null for an item without rows."""
    codes = interactions.item_codes
    first = np.full(interactions.num_items, -1, dtype=np.int64)
    backwards = np.arange(codes.shape[0] - 1, -1, -1)
    first[codes[backwards]] = backwards  # the earliest row is written last
    found = pc.fill_null(pc.index_in(item_ids, value_set=interactions.item_ids), -1)
    item_codes = found.to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.where(item_codes >= 0, first[np.maximum(item_codes, 0)], -1)
    return column.take(pa.array(np.maximum(rows, 0), mask=rows < 0))


def build_tower_inputs(
    config: PipelineConfig,
    interactions: Interactions,
    prepared: PreparedInteractions,
    catalogue: pa.Table | None = None,
    fitted: tuple[Sequence[FittedFeature], Sequence[FittedFeature]] | None = None,
) -> TowerInputs:
    """Fit the towers' features (or apply ``fitted`` ones: a saved run's) and transform the log.

    Args:
        catalogue: the item catalogue as a table (default: read ``config.items``; a MovieLens release's is
            built from its movies).
        fitted: ``(query features, candidate features)`` already fitted: applied, not refitted.

    Raises:
        FeatureError: a feature's column holds values its type cannot take, naming the feature.
    """
    catalogue_columns, user_table_columns = feature_tables(config)
    found = sources(config, catalogue_columns, user_table_columns)
    query, candidate = query_specs(config), candidate_specs(config)
    from_catalogue = any(found["candidate:" + spec.name] == CATALOGUE for spec in candidate)
    if catalogue is None and from_catalogue and config.movielens_release is not None:
        from twotower.data.movielens import load_movielens

        catalogue = load_movielens(config.movielens_release, data_dir=config.data_dir or None).catalogue()
    if catalogue is None and config.items and from_catalogue:
        id_col = config.item_id_col or config.item_col
        wanted = [id_col, *(spec.column for spec in candidate if found["candidate:" + spec.name] == CATALOGUE)]
        catalogue = read_table(config.items, list(dict.fromkeys(wanted)), id_columns=(id_col,))
    user_table = None
    if config.users and any(found[spec.name] == USER_TABLE for spec in query):
        id_col = config.user_table_id_col or config.user_col
        wanted = [id_col, *(spec.column for spec in query if found[spec.name] == USER_TABLE)]
        user_table = read_table(config.users, list(dict.fromkeys(wanted)), id_columns=(id_col,))
    train_rows = slice(None) if config.fit_features_on == "all" else prepared.train.log_rows
    item_ids = pa.concat_arrays([pa.nulls(1, pa.large_string()), prepared.items.arrow_values])  # row 0: OOV

    def query_values(spec: FeatureSpec) -> tuple[Any, str]:
        """The column's values per user code (``"code"``) or per log row (``"row"``)."""
        source = found[spec.name]
        if source == USER:
            return interactions.user_ids, "code"
        if source == TIME:
            assert interactions.timestamps is not None
            return pa.array(interactions.timestamps), "row"
        if source == USER_TABLE:
            assert user_table is not None
            return _aligned(user_table, config.user_table_id_col or config.user_col, interactions.user_ids,
                            spec.column, "the user table"), "code"  # fmt: skip
        return interactions.context[spec.column], "row"

    def candidate_values(spec: FeatureSpec) -> Any:
        source = found["candidate:" + spec.name]
        if source == ITEM:
            return item_ids
        if source == TITLE:
            titles = interactions.item_titles
            return pa.array([None] + [titles.get(item) for item in prepared.items.arrow_values.to_pylist()],
                            type=pa.large_string())  # fmt: skip
        if source == CATALOGUE:
            assert catalogue is not None
            return _aligned(catalogue, config.item_id_col or config.item_col, item_ids, spec.column, "the catalogue")
        return _first_per_item(interactions, interactions.context[spec.column], item_ids)

    inputs = TowerInputs([], [], interactions.user_codes, user_table=user_table,
                         query_sources=[found[spec.name] for spec in query])  # fmt: skip
    for position, spec in enumerate(query):
        values, level = query_values(spec)
        if fitted is not None:
            feature = fitted[0][position]
        else:
            training = (
                values.take(pa.array(interactions.user_codes[train_rows]))
                if level == "code"
                else (values if isinstance(train_rows, slice) else values.take(pa.array(train_rows)))
            )
            feature = fit_feature(spec, training)
        inputs.query_features.append(feature)
        (inputs.user_inputs if level == "code" else inputs.row_inputs).update(feature.transform(values))
    for position, spec in enumerate(candidate):
        values = candidate_values(spec)
        feature = fitted[1][position] if fitted is not None else fit_feature(spec, values.slice(1))
        inputs.candidate_features.append(feature)
        inputs.item_inputs.update(feature.transform(values))
    if fitted is not None:
        for tower, given, specs in (("query", fitted[0], query), ("candidate", fitted[1], candidate)):
            if [feature.spec for feature in given] != list(specs):
                raise FeatureError(f"the saved {tower} features do not match the config's {tower} features")
    return inputs


class FeatureBatches:
    """Training batches of a featurized model: :class:`~twotower.data.batches.Batches` over the training rows'
    log rows, item rows (and weights), each batch's log rows turned into the query tower's inputs."""

    def __init__(self, batches: Any, inputs: TowerInputs) -> None:
        self.batches, self.inputs = batches, inputs

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        for batch in self.batches:
            yield (self.inputs.query_inputs(batch[0]), *batch[1:])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = self.batches.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)


def serving_features(config: PipelineConfig, inputs: TowerInputs) -> RequestFeatures:
    """How the run's bundle turns a request into query inputs: each query feature's source, and the user
    table's feature columns by user id (JSON values: times as seconds)."""
    kinds = {USER: "user", USER_TABLE: "user table", TIME: "context", CONTEXT: "context"}
    request_sources = [kinds[source] for source in inputs.query_sources]
    table: dict[str, dict[str, Any]] = {}
    if inputs.user_table is not None:
        id_col = config.user_table_id_col or config.user_col
        present = inputs.user_table.filter(pc.is_valid(inputs.user_table.column(id_col)))
        ids = as_id_strings(present.column(id_col), f"the user table's {id_col!r}").to_pylist()
        columns = {name: _json_values(present.column(name)) for name in present.column_names if name != id_col}
        for position, user in enumerate(ids):
            table.setdefault(user, {name: values[position] for name, values in columns.items()})
    return RequestFeatures(list(inputs.query_features), request_sources, table)


def _json_values(column: pa.ChunkedArray) -> list[Any]:
    """A column as JSON-ready values: timestamps and dates as seconds since the epoch."""
    return list(seconds_since_epoch(column).to_pylist())
