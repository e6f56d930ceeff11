"""Serving requests to query-tower inputs: the user id, the user table's columns, and the request's context.

A bundle of a featurized run holds, beside the query tower (whose description carries the fitted features), the
source of each query feature and the user table's values by user id, as JSON: a request ``{"user_id": "42",
"context": {"timestamp": 879024327}}`` is turned into the tower's inputs by the same fitted transforms as in
training. A context column the request leaves out takes the feature's ``default``: the training median
(``"median"``; the OOV row for categorical features), the time of the request (``"now"``), or a number. An unknown
user still gets an answer: its id takes the OOV row, its other features count as they are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from twotower.features.preprocessing import FeatureError, FittedFeature

#: A query feature's source in a request.
SOURCES = ("user", "user table", "context")
_MAX_CONTEXT = 64


@dataclass
class RequestFeatures:
    """How a request becomes the query tower's inputs.

    Attributes:
        features: the query tower's fitted features (from its description).
        sources: per feature, ``"user"`` (the request's user id), ``"user table"`` (the user's row of the table)
            or ``"context"`` (the request's context, by column name).
        user_table: ``{user id: {column: value}}`` for the user-table features.
    """

    features: list[FittedFeature]
    sources: list[str]
    user_table: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.features) or not all(source in SOURCES for source in self.sources):
            raise FeatureError(f"a bundle's query features need one source each, of {list(SOURCES)}")

    @property
    def context_columns(self) -> list[str]:
        """The columns a request's context may carry."""
        return sorted(
            {f.spec.column for f, source in zip(self.features, self.sources, strict=True) if source == "context"}
        )

    @property
    def uses_more_than_the_id(self) -> bool:
        """Whether any feature but the user id is used (then unknown users are answered from those)."""
        return any(source != "user" for source in self.sources)

    def check_context(self, context: Mapping[str, Any]) -> None:
        """Refuse a context that names columns the tower does not read, or holds values its features cannot take.

        Raises:
            FeatureError: naming the column and what is expected.
        """
        if len(context) > _MAX_CONTEXT:
            raise FeatureError(f"context holds {len(context)} entries, at most {_MAX_CONTEXT}")
        known = set(self.context_columns)
        unknown = sorted(set(context) - known)
        if unknown:
            raise FeatureError(f"context names {unknown}, which no query feature reads; it may carry {sorted(known)}")
        for name, value in context.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FeatureError(f"context[{name!r}] must be finite, got {value}")
        self.inputs([("", context)])  # the transforms' own checks (a number for a timestamp, ...)

    def inputs(
        self, queries: Sequence[tuple[str, Mapping[str, Any]]], now: float | None = None
    ) -> dict[str, torch.Tensor]:
        """``{input name: [len(queries), ...]}`` for ``(user id, context)`` pairs."""
        moment = time.time() if now is None else now
        out: dict[str, torch.Tensor] = {}
        for feature, source in zip(self.features, self.sources, strict=True):
            column = feature.spec.column
            if source == "user":
                values: list[Any] = [user for user, _ in queries]
            elif source == "user table":
                values = [self.user_table.get(user, {}).get(column) for user, _ in queries]
            else:
                values = [context.get(column, self._default(feature, moment)) for _, context in queries]
            out.update(feature.transform(values))
        return out

    @staticmethod
    def _default(feature: FittedFeature, now: float) -> Any:
        default = feature.spec.default
        if default == "now":
            return now
        if default == "median" or feature.spec.type not in ("numeric", "timestamp"):
            return None  # the transform's own missing value: the median, or the OOV row
        return default

    def to_json(self) -> dict[str, Any]:
        """The sources and the user table (the features travel in the tower's description)."""
        return {"sources": list(self.sources), "user_table": self.user_table}

    @classmethod
    def from_json(cls, document: Any, features: list[FittedFeature]) -> RequestFeatures:
        """The request features :meth:`to_json` described, for the query tower's ``features``.

        Raises:
            FeatureError: the document is malformed.
        """
        if not isinstance(document, dict) or set(document) != {"sources", "user_table"}:
            raise FeatureError("query_features.json holds exactly: sources, user_table")
        sources, table = document["sources"], document["user_table"]
        if not isinstance(sources, list) or not all(isinstance(source, str) for source in sources):
            raise FeatureError("query_features.json: sources must be a list of strings")
        if not isinstance(table, dict) or not all(isinstance(row, dict) for row in table.values()):
            raise FeatureError("query_features.json: user_table must map user ids to {column: value}")
        return cls(features, sources, table)
