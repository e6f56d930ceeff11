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
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from twotower._files import atomic_write, read_verified_directory
from twotower.data.movielens import Vocabulary
from twotower.indexes import BruteForce, Faiss, TopK

BUNDLE_FORMAT = "twotower.bundle/1"
MAX_K = 1000
MAX_EXCLUSIONS = 10_000
MAX_BODY_BYTES = 1 << 20


class BundleError(ValueError):
    """A bundle directory is missing, partial, tampered with or malformed."""


class _Tower(nn.Module):
    """Query ids (vocabulary rows) to embeddings: what the bundle exports."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        embeddings: torch.Tensor = self.embedding(rows)
        return embeddings


def _export_tower(tower: nn.Module, example: torch.Tensor, directory: Path) -> str:
    """Save the tower as ``query_tower.pt2`` (torch.export) or, failing that, ``query_tower.ts`` (TorchScript)."""
    tower = tower.eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(tower, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, directory / "query_tower.pt2")
        return "query_tower.pt2"
    except Exception:
        traced = torch.jit.trace(tower, (example,))  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(directory / "query_tower.ts"))
        return "query_tower.ts"


def save_bundle(
    directory: str | os.PathLike[str],
    query_tower: nn.Module,
    index: TopK,
    query_vocabulary: Vocabulary,
    seen: dict[str, list[str]] | None = None,
    metadata: dict[str, Any] | None = None,
    item_titles: dict[str, str] | None = None,
) -> Path:
    """Write a bundle directory atomically (built in a temporary folder, then renamed into place).

    Args:
        directory: where the bundle goes (must not exist yet, or be a previous bundle, which is replaced).
        query_tower: maps ``[b]`` int64 vocabulary rows to ``[b, d]`` embeddings.
        index: a built :class:`BruteForce` or :class:`Faiss` index whose ids are the items.
        query_vocabulary: the vocabulary of query ids (row 0 is out-of-vocabulary).
        seen: items to exclude per query id (e.g. the user's training items).
        metadata: free-form JSON-serialisable description.
        item_titles: display titles of items by id, returned beside the ids; an item without one is shown by its
            id (MovieLens runs use the titles themselves as ids, as TFRS does).
    """
    if not isinstance(index, (BruteForce, Faiss)):
        raise TypeError(f"index must be a BruteForce or Faiss index, got {type(index).__name__}")
    if item_titles is not None and not isinstance(item_titles, dict):
        raise TypeError(f"item_titles must be a dict of item id to title, got {type(item_titles).__name__}")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        example = torch.tensor([1, min(2, len(query_vocabulary) - 1)], dtype=torch.int64)
        tower_file = _export_tower(query_tower, example, building)
        index_file = "index.safetensors"
        index.save(building / index_file)
        (building / "vocabulary.json").write_text(json.dumps(query_vocabulary.to_list()))
        (building / "seen.json").write_text(json.dumps(seen or {}))
        (building / "items.json").write_text(json.dumps({str(k): str(v) for k, v in (item_titles or {}).items()}))
        info = {"index_kind": type(index).__name__, "tower": tower_file, "metadata": metadata or {}}
        (building / "metadata.json").write_text(json.dumps(info, indent=2))
        files = sorted(path.name for path in building.iterdir())
        manifest = {
            "format": BUNDLE_FORMAT,
            "files": {name: hashlib.sha256((building / name).read_bytes()).hexdigest() for name in files},
        }
        atomic_write(building / "manifest.json", json.dumps(manifest, indent=2).encode())
        if target.exists():
            shutil.rmtree(target)
        os.replace(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


@dataclass
class Bundle:
    """A verified bundle, ready to answer queries."""

    tower: Any
    index: TopK
    vocabulary: Vocabulary
    seen: dict[str, list[str]]
    metadata: dict[str, Any]
    item_titles: dict[str, str] = field(default_factory=dict)

    def title_of(self, item: str) -> str:
        """The item's display title: from the bundle's item map, else the id itself."""
        return self.item_titles.get(item, item)

    def recommend(
        self, query_id: str, k: int = 10, exclude: Sequence[str] | None = None, exclude_seen: bool = True
    ) -> list[tuple[str, float]]:
        """Top-``k`` ``(item, score)`` pairs for ``query_id``; raises ``KeyError`` for an unknown id."""
        answer = self.recommend_batch([Query(query_id, k, tuple(exclude or ()), exclude_seen)])[0]
        if isinstance(answer, KeyError):
            raise answer
        return answer

    def recommend_batch(self, queries: Sequence["Query"]) -> list[list[tuple[str, float]] | KeyError]:
        """Answer several queries with one tower call and one index search per distinct ``k``.

        Returns:
            one entry per query, in order: its ``(item, score)`` pairs (best first, excluded items left out), or
            a ``KeyError`` for a query id the vocabulary does not know. Each answer equals what
            :meth:`recommend` gives for that query alone.
        """
        rows = self.vocabulary.lookup([query.query_id for query in queries])
        answers: list[list[tuple[str, float]] | KeyError] = [
            KeyError(f"unknown query id {query.query_id!r}") for query in queries
        ]
        known = [position for position, row in enumerate(rows.tolist()) if row != 0]
        if not known:
            return answers
        with torch.no_grad():
            embeddings = self.tower(torch.as_tensor(rows[known], dtype=torch.int64))
        by_k: dict[int, list[int]] = {}
        for slot, position in enumerate(known):
            by_k.setdefault(queries[position].k, []).append(slot)
        for k, slots in by_k.items():
            exclusions = []
            for slot in slots:
                query = queries[known[slot]]
                seen = self.seen.get(query.query_id, []) if query.exclude_seen else []
                exclusions.append(np.asarray([*query.exclude, *seen]))
            scores, items = self.index.query_with_exclusions(embeddings[slots], exclusions, k=k)
            for slot, item_row, score_row in zip(slots, np.asarray(items).tolist(), scores.tolist(), strict=True):
                answers[known[slot]] = [
                    (str(item), float(score)) for item, score in zip(item_row, score_row, strict=True)
                    if score != float("-inf")
                ]  # fmt: skip
        return answers


@dataclass(frozen=True)
class Query:
    """One recommendation request: the query id, how many items, ids to leave out, and whether to leave out
    the items the query id has already seen."""

    query_id: str
    k: int = 10
    exclude: tuple[str, ...] = ()
    exclude_seen: bool = True

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

    def submit(self, query: Query) -> "concurrent.futures.Future[list[tuple[str, float]]]":
        """Queue ``query``; the future gets its answer, or the ``KeyError`` of an unknown id."""
        future: concurrent.futures.Future[list[tuple[str, float]]] = concurrent.futures.Future()
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


def _load_tower(path: Path) -> Any:
    if path.suffix == ".pt2":
        return torch.export.load(path).module()
    return torch.jit.load(str(path))  # type: ignore[no-untyped-call]


def load_bundle(directory: str | os.PathLike[str]) -> Bundle:
    """Load a bundle written by :func:`save_bundle`, verifying every file against the manifest."""
    directory = Path(directory)
    _, contents = read_verified_directory(directory, BUNDLE_FORMAT, BundleError, "bundle", exclusive=True)
    info = json.loads(contents["metadata.json"])
    tower_path = directory / info["tower"]
    tower = _load_tower(tower_path)
    index: TopK
    if info["index_kind"] == "Faiss":
        index = Faiss.load(directory / "index.safetensors")
    else:
        index = BruteForce.load(directory / "index.safetensors")
    return Bundle(
        tower=tower,
        index=index,
        vocabulary=Vocabulary(json.loads(contents["vocabulary.json"])),
        seen=json.loads(contents["seen.json"]),
        metadata=info["metadata"],
        # Bundles written before the item map existed have no items.json.
        item_titles=json.loads(contents["items.json"]) if "items.json" in contents else {},
    )


def create_app(bundle: Bundle, max_batch: int = 64) -> Any:
    """A FastAPI application answering from ``bundle``: ``POST /recommend``, ``GET /healthz``.

    Concurrent requests are answered together, up to ``max_batch`` per search (see :class:`MicroBatcher`).
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, Field

    class RecommendRequest(BaseModel):
        user_id: str = Field(min_length=1, max_length=256, description="the query (user) id")
        k: int = Field(default=10, ge=1, le=MAX_K, description="how many items")
        exclude: list[str] = Field(default_factory=list, max_length=MAX_EXCLUSIONS, description="ids to leave out")
        exclude_seen: bool = Field(default=True, description="also leave out the user's training items")

    class Item(BaseModel):
        id: str
        title: str
        score: float

    class RecommendResponse(BaseModel):
        user_id: str
        items: list[Item]

    batcher = MicroBatcher(bundle, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        batcher.stop()

    app = FastAPI(title="twotower", description="Two-tower retrieval service", lifespan=lifespan)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return JSONResponse(status_code=400, content={"detail": "content-length must be a whole number"})
            if int(length) > MAX_BODY_BYTES:
                return JSONResponse(status_code=413, content={"detail": f"body larger than {MAX_BODY_BYTES} bytes"})
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "candidates": bundle.index.num_candidates, "exact": bundle.index.is_exact()}

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest) -> RecommendResponse:
        query = Query(request.user_id, request.k, tuple(request.exclude), request.exclude_seen)
        try:
            pairs = await asyncio.wrap_future(batcher.submit(query))
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error.args[0])) from error
        return RecommendResponse(
            user_id=request.user_id,
            items=[Item(id=item, title=bundle.title_of(item), score=score) for item, score in pairs],
        )

    return app
