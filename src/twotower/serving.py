"""Serving: retrieval bundles and an HTTP service.

A *bundle* is one directory holding everything needed to answer queries: the query tower exported with
``torch.export`` (a TorchScript trace where export fails), the candidate index, the query vocabulary, the
items seen per user for exclusions, and metadata; ``manifest.json``, written last, lists every file with its
SHA-256. :func:`load_bundle` verifies them and refuses a tampered or partial bundle.

:func:`create_app` builds a FastAPI application over a loaded bundle: ``POST /recommend`` and ``GET /healthz``;
``twotower serve --run DIR`` runs it with uvicorn on 127.0.0.1. No endpoint writes to disk. Requests that arrive
while a search runs are answered together by one batched search (:class:`MicroBatcher`): exact search costs
nearly the same for 16 queries as for one, and no request waits for a batch to fill.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models from the endpoint annotations
# at run time, and the models are local to create_app so that fastapi stays an optional dependency.
import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from twotower._checks import ends_in_nul
from twotower._files import parse_json, read_verified_directory, write_manifest_directory
from twotower.features import FeatureError, FeatureTower, build_feature_tower
from twotower.features.requests import RequestFeatures
from twotower.indexes import AnisotropicIVF, BruteForce, Faiss, TopK
from twotower.towers import TowerFormatError, build_tower, describe_tower, tower_tensors
from twotower.vocabulary import Vocabulary

#: Version 2: the tower is a layer list and safetensors weights. Version 1 bundles held a ``torch.export``
#: archive, which can carry pickled code; they are refused (save the bundle again).
BUNDLE_FORMAT = "twotower.bundle/2"
MAX_K = 1000
MAX_EXCLUSIONS = 10_000
MAX_BODY_BYTES = 1 << 20
#: How a bundle answers a query id its vocabulary does not hold: the most popular training items
#: (``"popularity"``), a feature tower's answer from the request's other features (``"features"``), the tower's
#: out-of-vocabulary row (``"oov"``), or a ``KeyError`` / HTTP 404 (``"error"``); ``"auto"``: ``"features"`` for
#: a feature tower that reads more than the id, else ``"popularity"``.
UnknownQueries = Literal["auto", "popularity", "features", "oov", "error"]
UNKNOWN_QUERY_POLICIES = ("auto", "popularity", "features", "oov", "error")
# A popularity ranking long enough for any request: MAX_K items left after MAX_EXCLUSIONS are removed.
POPULARITY_DEPTH = MAX_K + MAX_EXCLUSIONS


class Recommendations(list[tuple[str, float]]):
    """``(item, score)`` pairs, best first, and where they came from: :attr:`source` is ``"model"`` (the query
    tower and the index), ``"oov"`` (the tower's out-of-vocabulary row, for an unknown id), ``"features"`` (a
    feature tower's answer for an unknown id, from its other features) or ``"popularity"`` (the most popular
    training items, for an unknown id; the score is the item's training count)."""

    def __init__(self, pairs: Any = (), source: str = "model") -> None:
        super().__init__(pairs)
        self.source = source


class BundleError(ValueError):
    """A bundle directory is missing, partial, tampered with or malformed."""


def _Tower(embedding: nn.Embedding) -> nn.Sequential:  # noqa: N802 (kept for code that built bundles with it)
    """The id tower of a bundle: vocabulary rows ``[b]`` to embeddings ``[b, d]``, as a plain layer chain."""
    return nn.Sequential(embedding)


#: The index kinds a bundle can hold, by the name metadata.json records.
_INDEX_KINDS: dict[str, type[BruteForce] | type[Faiss] | type[AnisotropicIVF]] = {
    "BruteForce": BruteForce,
    "Faiss": Faiss,
    "AnisotropicIVF": AnisotropicIVF,
}


def save_bundle(
    directory: str | os.PathLike[str],
    query_tower: nn.Module,
    index: TopK,
    query_vocabulary: Vocabulary,
    seen: dict[str, list[str]] | None = None,
    metadata: dict[str, Any] | None = None,
    item_titles: dict[str, str] | None = None,
    popularity: Sequence[tuple[str, float]] | None = None,
    query_features: RequestFeatures | None = None,
) -> Path:
    """Write a bundle directory atomically (built beside it, then swapped into place in one step).

    Nothing in a bundle is code: the query tower is saved as a layer list (see :mod:`twotower.towers`) with its
    weights in safetensors, and every other file is JSON or safetensors.

    Args:
        directory: where the bundle goes (must not exist yet, be empty, or be a previous bundle, which is
            replaced).
        query_tower: maps ``[b]`` int64 vocabulary rows to ``[b, d]`` embeddings; a chain of ``nn.Embedding``,
            ``nn.Linear`` and ``nn.ReLU`` (an ``nn.Sequential``, or one ``nn.Embedding``).
        index: a built :class:`BruteForce`, :class:`Faiss` or :class:`AnisotropicIVF` index whose ids are the
            items.
        query_vocabulary: the vocabulary of query ids (row 0 is out-of-vocabulary).
        seen: items to exclude per query id (e.g. the user's training items).
        metadata: free-form JSON-serialisable description.
        item_titles: display titles of items by id, returned beside the ids; an item without one is shown by its
            id (MovieLens runs use the titles themselves as ids, as TFRS does).
        popularity: ``(item id, training count)`` pairs, most popular first: the answer for query ids the
            vocabulary does not hold (see :data:`UnknownQueries`). The first :data:`POPULARITY_DEPTH` are kept.
        query_features: with a :class:`~twotower.features.FeatureTower` as ``query_tower``: how a request
            (user id and context) becomes its inputs (:class:`~twotower.features.requests.RequestFeatures`).

    Returns:
        the bundle's path. Its ``manifest.json``'s SHA-256 (:attr:`Bundle.manifest_sha256` once loaded) pins
        this exact bundle: pass it to :func:`load_bundle` as ``expected_manifest_sha256``.
    """
    if not isinstance(index, (BruteForce, Faiss, AnisotropicIVF)):
        raise TypeError(f"index must be a BruteForce, Faiss or AnisotropicIVF index, got {type(index).__name__}")
    if not isinstance(query_vocabulary, Vocabulary):
        raise TypeError(f"query_vocabulary must be a Vocabulary, got {type(query_vocabulary).__name__}")
    if item_titles is not None and not isinstance(item_titles, dict):
        raise TypeError(f"item_titles must be a dict of item id to title, got {type(item_titles).__name__}")
    if seen is not None and not isinstance(seen, dict):
        raise TypeError(f"seen must be a dict of query id to item ids, got {type(seen).__name__}")
    if isinstance(query_tower, FeatureTower):
        if query_features is None:
            raise TypeError("a FeatureTower query tower needs query_features (how requests become its inputs)")
        description: Any = {"kind": "features", **query_tower.describe()}
        tensors = {name: value.detach().cpu().contiguous() for name, value in query_tower.state_dict().items()}
    else:
        description, tensors = describe_tower(query_tower), tower_tensors(query_tower)
    target = Path(directory)
    _refuse_foreign_directory(target, "bundle")
    files = {
        "tower.safetensors": save_tensors(tensors),
        "vocabulary.json": _json(query_vocabulary.to_json()),
        "seen.json": _json({str(key): [str(item) for item in items] for key, items in (seen or {}).items()}),
        "items.json": _json({str(k): str(v) for k, v in (item_titles or {}).items()}),
        "popularity.json": _json(_popularity_pairs(popularity)),
        "metadata.json": _json(
            {"index_kind": type(index).__name__, "tower": description, "metadata": metadata or {}}, indent=2
        ),
    }

    if query_features is not None:
        files["query_features.json"] = _json(query_features.to_json())

    def fill(building: Path) -> None:
        for name, payload in files.items():
            (building / name).write_bytes(payload)
        index.save(building / "index.safetensors")

    write_manifest_directory(target, BUNDLE_FORMAT, fill)
    return target


def _popularity_pairs(popularity: Sequence[tuple[str, float]] | None) -> list[list[Any]]:
    if popularity is None:
        return []
    pairs = []
    for entry in list(popularity)[:POPULARITY_DEPTH]:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise TypeError(f"popularity must hold (item id, count) pairs, got {entry!r}")
        count = float(entry[1])
        if not math.isfinite(count):
            raise ValueError(f"popularity counts must be finite, got {count} for {entry[0]!r}")
        pairs.append([entry[0], count])
    return pairs


def _json(value: Any, indent: int | None = None) -> bytes:
    # ensure_ascii=False, then strict UTF-8: a string that cannot be encoded (a lone surrogate) fails here, at
    # save time, rather than as a server error when it is sent.
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"a bundle string is not valid Unicode text: {error}") from error


def _refuse_foreign_directory(target: Path, kind: str) -> None:
    """Refuse to replace ``target`` unless it is missing, empty, or a previous twotower directory of this kind."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"{target} exists and is not a directory: refusing to replace it with a {kind}")
    if target.is_dir() and any(target.iterdir()) and not (target / "manifest.json").is_file():
        raise ValueError(
            f"{target} holds files but is not a twotower {kind} (no manifest.json): refusing to replace it"
        )


@dataclass
class Bundle:
    """A verified bundle, ready to answer queries."""

    tower: Any
    index: TopK
    vocabulary: Vocabulary
    seen: dict[str, list[str]]
    metadata: dict[str, Any]
    item_titles: dict[str, str] = field(default_factory=dict)
    #: the SHA-256 of the bundle's manifest.json, which pins every file of it (see :func:`load_bundle`).
    manifest_sha256: str = ""
    #: ``(item id, training count)``, most popular first: the answer to unknown query ids (may be empty).
    popularity: list[tuple[str, float]] = field(default_factory=list)
    #: what an unknown query id gets (see :data:`UnknownQueries`): the popularity ranking where the bundle
    #: has one, else a ``KeyError``.
    unknown_queries: UnknownQueries = "auto"
    #: a feature tower's request preprocessing (``None`` for an id tower).
    query_features: RequestFeatures | None = None

    def __post_init__(self) -> None:
        if self.unknown_queries not in UNKNOWN_QUERY_POLICIES:
            raise ValueError(f"unknown_queries must be one of {UNKNOWN_QUERY_POLICIES}, got {self.unknown_queries!r}")
        by_features = self.query_features is not None and self.query_features.uses_more_than_the_id
        if self.unknown_queries == "features" and not by_features:
            raise ValueError("unknown_queries 'features' needs a feature tower that reads more than the user id")
        if self.unknown_queries == "auto":
            self.unknown_queries = "features" if by_features else "popularity"

    def title_of(self, item: str) -> str:
        """The item's display title: from the bundle's item map, else the id itself."""
        return self.item_titles.get(item, item)

    def recommend(
        self,
        query_id: str,
        k: int = 10,
        exclude: Sequence[str] | None = None,
        exclude_seen: bool = True,
        context: dict[str, Any] | None = None,
    ) -> Recommendations:
        """Top-``k`` ``(item, score)`` pairs for ``query_id`` (:class:`Recommendations`, marked with their source);
        an unknown id is answered as :attr:`unknown_queries` says (a ``KeyError`` for ``"error"``). ``context``:
        a feature tower's context columns (e.g. ``{"timestamp": 879024327}``; see :meth:`check_context`)."""
        query = Query(query_id, k, tuple(exclude or ()), exclude_seen, tuple(sorted((context or {}).items())))
        self.check_context(query)
        answer = self.recommend_batch([query])[0]
        if isinstance(answer, KeyError):
            raise answer
        return answer

    def check_context(self, query: "Query") -> None:
        """Refuse a query whose context this bundle cannot use: any context for an id tower; for a feature tower
        a column no query feature reads or a value its feature cannot take.

        Raises:
            ValueError: naming the column.
        """
        if self.query_features is None:
            if query.context:
                raise ValueError("context: this bundle's query tower takes no features beyond the user id")
            return
        try:
            self.query_features.check_context(dict(query.context))
        except FeatureError as error:
            raise ValueError(f"context: {error}") from None

    def recommend_batch(self, queries: Sequence["Query"]) -> list[Recommendations | KeyError]:
        """Answer several queries with one tower call and one index search per distinct ``k``.

        Returns:
            one entry per query, in order: its :class:`Recommendations` (best first, excluded items left out),
            or, for a query id the vocabulary does not know, the popularity ranking or the OOV row's answer as
            :attr:`unknown_queries` says, or a ``KeyError`` (``"error"``, or ``"popularity"`` without a ranking).
            Each answer equals what :meth:`recommend` gives for that query alone.
        """
        rows = self.vocabulary.lookup([query.query_id for query in queries])
        answers: list[Recommendations | KeyError] = [
            KeyError(f"unknown query id {query.query_id!r}") for query in queries
        ]
        # A hashing vocabulary (no known values) has no unknown ids: every id has its bucket.
        hashing = self.vocabulary.num_values == 0
        buckets = self.vocabulary.num_oov_buckets
        unknown = [] if hashing else [position for position, row in enumerate(rows.tolist()) if row < buckets]
        sources = ["model"] * len(queries)
        if self.unknown_queries in ("oov", "features"):
            for position in unknown:
                sources[position] = self.unknown_queries
        if self.unknown_queries == "popularity" and self.popularity:
            for position in unknown:
                answers[position] = self._popular(queries[position])
        # Unknown ids are answered by the tower only with "oov" or "features"; otherwise by popularity above, or a
        # KeyError.
        not_by_tower = set(unknown) if self.unknown_queries not in ("oov", "features") else set()
        known = [position for position in range(len(queries)) if position not in not_by_tower]
        if not known:
            return answers
        with torch.no_grad():
            if self.query_features is not None:
                chosen = [queries[position] for position in known]
                embeddings = self.tower(self.query_features.inputs([(q.query_id, dict(q.context)) for q in chosen]))
            else:
                embeddings = self.tower(torch.as_tensor(rows[known], dtype=torch.int64))
        by_k: dict[int, list[int]] = {}
        for slot, position in enumerate(known):
            by_k.setdefault(queries[position].k, []).append(slot)
        for k, slots in by_k.items():
            exclusions = []
            for slot in slots:
                query = queries[known[slot]]
                seen = self.seen.get(query.query_id, []) if query.exclude_seen else []
                # An id ending in NUL is no item's id (none can hold one), and numpy would strip the NUL.
                exclusions.append([item for item in (*query.exclude, *seen) if not ends_in_nul(item)])
            scores, items, positions = self.index.query_rows(embeddings[slots], k, exclusions)
            answered = zip(slots, np.asarray(items).tolist(), scores.tolist(), positions.tolist(), strict=True)
            for slot, item_row, score_row, position_row in answered:
                # Empty slots (fewer than k items left) have position -1; a real item's score can be -inf.
                # Excluded items come back at -inf when fewer than k others remain: they are not recommendations.
                answers[known[slot]] = Recommendations(
                    [
                        (str(item), float(score))
                        for item, score, position in zip(item_row, score_row, position_row, strict=True)
                        if position >= 0 and score != -math.inf
                    ],
                    source=sources[known[slot]],
                )
        return answers

    def _popular(self, query: "Query") -> Recommendations:
        """The most popular items not excluded for ``query`` (an unknown id has no seen items)."""
        excluded = set(query.exclude)
        chosen = [(item, count) for item, count in self.popularity if item not in excluded][: query.k]
        return Recommendations(chosen, source="popularity")


@dataclass(frozen=True)
class Query:
    """One recommendation request: the query id, how many items, ids to leave out, and whether to leave out
    the items the query id has already seen."""

    query_id: str
    k: int = 10
    exclude: tuple[str, ...] = ()
    exclude_seen: bool = True
    #: ``(column, value)`` pairs of a feature tower's context (values: str, int, float or ``None``).
    context: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        # Checked here, not in the batched search: one bad query must not fail the others batched with it.
        if not isinstance(self.query_id, str) or not self.query_id:
            raise ValueError(f"query_id must be a non-empty str, got {self.query_id!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if not isinstance(self.exclude, tuple) or not all(isinstance(item, str) for item in self.exclude):
            raise ValueError(f"exclude must be a tuple of str ids, got {self.exclude!r}")
        if not isinstance(self.exclude_seen, bool):
            raise ValueError(f"exclude_seen must be a bool, got {self.exclude_seen!r}")
        if not isinstance(self.context, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and (pair[1] is None or (isinstance(pair[1], (str, int, float)) and not isinstance(pair[1], bool)))
            for pair in self.context
        ):  # fmt: skip
            raise ValueError("context must be (column, value) pairs with str, int, float or None values")


class MicroBatcher:
    """Answers requests from many threads or tasks together, in one batched search per group.

    One worker thread takes the oldest waiting request together with every other request already waiting (up to
    ``max_batch``) and answers them with :meth:`Bundle.recommend_batch`. It never waits for more requests to
    arrive: an idle server answers a lone request at once, and a busy one batches whatever queued up during the
    previous search, which is where batching pays (exact search over a large corpus costs about as much for 16
    queries as for one).

    Args:
        bundle: the loaded bundle.
        max_batch: the most requests answered by one search.
        start: start the worker now; otherwise call :meth:`start`.
    """

    def __init__(self, bundle: Bundle, max_batch: int = 64, start: bool = True) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.bundle, self.max_batch = bundle, max_batch
        self._waiting: queue.SimpleQueue[tuple[Query, concurrent.futures.Future[Any]] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._answer_forever, name="twotower-batcher", daemon=True)
        self.batches = 0
        self.largest_batch = 0
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker thread."""
        self._worker.start()

    def stop(self) -> None:
        """Answer what is already waiting, then stop the worker."""
        self._waiting.put(None)
        if self._worker.is_alive():
            self._worker.join()

    def submit(self, query: Query) -> "concurrent.futures.Future[Recommendations]":
        """Queue ``query``; the future gets its answer, or the ``KeyError`` of an unknown id."""
        future: concurrent.futures.Future[Recommendations] = concurrent.futures.Future()
        self._waiting.put((query, future))
        return future

    def _answer_forever(self) -> None:
        stopping = False
        while not stopping:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    waiting = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                    break
                batch.append(waiting)
            live = [(query, future) for query, future in batch if future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(live))
            try:
                answers = self.bundle.recommend_batch([query for query, _ in live])
            except Exception as error:  # one bad batch must not kill the worker: each request gets the error
                for _, future in live:
                    future.set_exception(error)
                continue
            for (_, future), answer in zip(live, answers, strict=True):
                if isinstance(answer, KeyError):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)


def load_bundle(
    directory: str | os.PathLike[str],
    expected_manifest_sha256: str | None = None,
    unknown_queries: UnknownQueries = "auto",
) -> Bundle:
    """Load a bundle written by :func:`save_bundle`, verifying every file against the manifest.

    Loading runs no code from the bundle: the tower is rebuilt from its layer list and its weights read from
    safetensors, the rest is JSON. Every file name is fixed (none is taken from the bundle's metadata).

    Args:
        directory: the bundle.
        expected_manifest_sha256: the SHA-256 of the bundle's ``manifest.json`` (printed by ``twotower serve``
            and kept in :attr:`Bundle.manifest_sha256`). The checksums in a manifest only show that the files
            match it; pinning the manifest shows that the bundle is the one you expect.
        unknown_queries: what a query id the vocabulary does not hold gets (see :data:`UnknownQueries`).

    Raises:
        BundleError: the bundle is missing, incomplete, changed, not the pinned one, or malformed.
    """
    directory = Path(directory)
    manifest, contents = read_verified_directory(
        directory,
        BUNDLE_FORMAT,
        BundleError,
        "bundle",
        exclusive=True,
        expected_manifest_sha256=expected_manifest_sha256,
    )
    missing = sorted({*_BUNDLE_FILES} - set(contents))
    if missing:
        raise BundleError(f"{directory} is not a complete bundle: the manifest does not list {missing}")
    info = parse_json(contents["metadata.json"], f"{directory}/metadata.json", BundleError)
    if not isinstance(info, dict) or info.get("index_kind") not in _INDEX_KINDS or "tower" not in info:
        raise BundleError(
            f"{directory}/metadata.json must name the index kind ({', '.join(_INDEX_KINDS)}) and the tower"
        )
    described = info["tower"]
    query_features = None
    try:
        if isinstance(described, dict) and described.get("kind") == "features":
            if "query_features.json" not in contents:
                raise BundleError(f"{directory} has a feature tower but its manifest does not list query_features.json")
            fields_only = {key: value for key, value in described.items() if key != "kind"}
            tower: Any = build_feature_tower(fields_only, load_tensors(contents["tower.safetensors"]))
            request = parse_json(contents["query_features.json"], f"{directory}/query_features.json", BundleError)
            query_features = RequestFeatures.from_json(request, tower.features)
        else:
            tower = build_tower(described, load_tensors(contents["tower.safetensors"]))
    except (TowerFormatError, FeatureError, SafetensorError) as error:
        raise BundleError(
            f"{directory}/tower.safetensors does not hold the tower metadata.json describes: {error}"
        ) from error
    index_type = _INDEX_KINDS[info["index_kind"]]
    try:
        index: TopK = index_type.load(directory / "index.safetensors")
    except ValueError as error:
        raise BundleError(str(error)) from error
    vocabulary = parse_json(contents["vocabulary.json"], f"{directory}/vocabulary.json", BundleError)
    seen = parse_json(contents["seen.json"], f"{directory}/seen.json", BundleError)
    items = parse_json(contents["items.json"], f"{directory}/items.json", BundleError)
    popularity = (
        parse_json(contents["popularity.json"], f"{directory}/popularity.json", BundleError)
        if "popularity.json" in contents
        else []  # bundles saved before popularity fallbacks
    )
    if not isinstance(popularity, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], (int, float))
        and not isinstance(pair[1], bool)
        for pair in popularity
    ):
        raise BundleError(f"{directory}/popularity.json must be a list of [item id, count] pairs")
    if not isinstance(seen, dict) or not all(
        isinstance(values, list) and all(isinstance(value, str) for value in values) for values in seen.values()
    ):
        raise BundleError(f"{directory}/seen.json must map query ids to lists of item ids")
    if not isinstance(items, dict) or not all(isinstance(value, str) for value in items.values()):
        raise BundleError(f"{directory}/items.json must map item ids to titles")
    try:
        query_vocabulary = Vocabulary.from_json(vocabulary, f"{directory}/vocabulary.json")
    except (TypeError, ValueError) as error:
        raise BundleError(f"{directory}/vocabulary.json: {error}") from error
    return Bundle(
        tower=tower,
        index=index,
        vocabulary=query_vocabulary,
        seen=seen,
        metadata=info["metadata"] if isinstance(info.get("metadata"), dict) else {},
        item_titles=items,
        manifest_sha256=str(manifest["manifest_sha256"]),
        popularity=[(str(item), float(count)) for item, count in popularity],
        unknown_queries=unknown_queries,
        query_features=query_features,
    )


#: Every file of a bundle; their names are fixed here, never read from the bundle.
_BUNDLE_FILES = (
    "tower.safetensors",
    "index.safetensors",
    "vocabulary.json",
    "seen.json",
    "items.json",
    "metadata.json",
)


def create_app(bundle: Bundle, max_batch: int = 64) -> Any:
    """A FastAPI application answering from ``bundle``: ``POST /recommend``, ``GET /healthz``.

    Concurrent requests are answered together, up to ``max_batch`` per search (see :class:`MicroBatcher`).
    Request bodies are limited to ``MAX_BODY_BYTES`` as received (not as announced), strings must be valid
    Unicode, and error answers never repeat the request's values.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field, field_validator

    from twotower._http import BodyLimit

    class RecommendRequest(BaseModel):
        user_id: str = Field(min_length=1, max_length=256, description="the query (user) id")
        k: int = Field(default=10, ge=1, le=MAX_K, description="how many items")
        exclude: list[str] = Field(default_factory=list, max_length=MAX_EXCLUSIONS, description="ids to leave out")
        # strict: true or false only, not the strings "yes" / "no" that pydantic would read as booleans
        exclude_seen: bool = Field(default=True, strict=True, description="also leave out the user's training items")
        context: dict[str, str | int | float | None] = Field(
            default_factory=dict, max_length=64, description="a feature tower's context columns, e.g. the event time"
        )

        @field_validator("user_id")
        @classmethod
        def _unicode_id(cls, value: str) -> str:
            _require_unicode(value)
            return value

        @field_validator("exclude")
        @classmethod
        def _unicode_ids(cls, values: list[str]) -> list[str]:
            for value in values:
                _require_unicode(value)
            return values

    class Item(BaseModel):
        id: str
        title: str
        score: float

    class RecommendResponse(BaseModel):
        user_id: str
        items: list[Item]
        source: str = Field(
            description="model: the user's embedding; popularity: the user is unknown, the most popular items; "
            "oov: the user is unknown, the out-of-vocabulary row's answer; features: the user is unknown, the "
            "feature tower's answer from the other features"
        )

    batcher = MicroBatcher(bundle, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        batcher.stop()

    app = FastAPI(title="twotower", description="Two-tower retrieval service", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer repeats each offending input (a 100 MiB list came back whole, and a NaN or a lone
        # surrogate made the answer itself fail with a 500): say where and what, never the value.
        problems = [
            {"loc": [str(part) for part in problem.get("loc", ())], "msg": str(problem.get("msg", "")),
             "type": str(problem.get("type", ""))}
            for problem in error.errors()[:20]
        ]  # fmt: skip
        return JSONResponse(status_code=422, content={"detail": problems})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "candidates": bundle.index.num_candidates, "exact": bundle.index.is_exact()}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest) -> RecommendResponse:
        query = Query(request.user_id, request.k, tuple(request.exclude), request.exclude_seen,
                      tuple(sorted(request.context.items())))  # fmt: skip
        try:
            bundle.check_context(query)
        except ValueError:
            # Not the error's text: it may repeat the request's values.
            allowed = [] if bundle.query_features is None else bundle.query_features.context_columns
            raise HTTPException(
                status_code=422, detail=f"context may name only {allowed}, each with a value its feature takes"
            ) from None
        try:
            pairs = await asyncio.wrap_future(batcher.submit(query))
        except KeyError as error:
            raise HTTPException(
                status_code=404, detail="unknown user_id: the bundle's vocabulary does not hold it"
            ) from error
        return RecommendResponse(
            user_id=request.user_id,
            items=[Item(id=item, title=bundle.title_of(item), score=_json_score(score)) for item, score in pairs],
            source=getattr(pairs, "source", "model"),
        )

    return app


def _require_unicode(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None


def _json_score(score: float) -> float:
    # JSON has no infinity: a score beyond float32's range is sent as the largest finite float32 of its sign.
    if math.isinf(score):
        return math.copysign(float(np.finfo(np.float32).max), score)
    return score


def make_server(
    bundle: Bundle,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 64,
    request_timeout: float = 10.0,
    max_connections: int = 1000,
    keep_alive_timeout: int = 5,
) -> Any:
    """A uvicorn server for :func:`create_app`, hardened for hostile clients; call ``.run()`` to serve.

    Args:
        bundle: the loaded bundle.
        host, port: where to listen (127.0.0.1: this machine only).
        max_batch: see :class:`MicroBatcher`.
        request_timeout: seconds a request has to arrive whole (headers and body) after its connection opens or
            its previous answer goes out; slower clients are disconnected (slowloris).
        max_connections: connections open at once; more are closed as they arrive, and requests beyond it are
            answered 503, so file descriptors and memory stay bounded.
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
    """
    import logging

    import uvicorn

    from twotower._http import RepeatedLogFilter, guarded_protocol

    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0, got {request_timeout!r}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive int, got {max_connections!r}")
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RepeatedLogFilter) for existing in logger.filters):
            logger.addFilter(RepeatedLogFilter())
    config = uvicorn.Config(
        create_app(bundle, max_batch=max_batch),
        host=host,
        port=port,
        http=guarded_protocol(request_timeout, max_connections),
        timeout_keep_alive=keep_alive_timeout,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=16 * 1024,  # headers: 16 KiB at most
        log_level="warning",
        server_header=False,
    )
    return uvicorn.Server(config)
