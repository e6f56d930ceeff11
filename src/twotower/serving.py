"""Serving: retrieval bundles and an HTTP service.

A *bundle* is one directory holding everything needed to answer queries: the query tower exported with
``torch.export`` (a TorchScript trace where export fails), the candidate index, the query vocabulary, the
items seen per user for exclusions, and metadata; ``manifest.json``, written last, lists every file with its
SHA-256. :func:`load_bundle` verifies them and refuses a tampered or partial bundle.

:func:`create_app` builds a FastAPI application over a loaded bundle: ``POST /recommend`` and ``GET /healthz``;
``twotower serve --run DIR`` runs it with uvicorn on 127.0.0.1. No endpoint writes to disk.
"""

# No `from __future__ import annotations` here: FastAPI reads the request models from the endpoint annotations
# at run time, and the models are local to create_app so that fastapi stays an optional dependency.
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
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
) -> Path:
    """Write a bundle directory atomically (built in a temporary folder, then renamed into place).

    Args:
        directory: where the bundle goes (must not exist yet, or be a previous bundle, which is replaced).
        query_tower: maps ``[b]`` int64 vocabulary rows to ``[b, d]`` embeddings.
        index: a built :class:`BruteForce` or :class:`Faiss` index whose ids are the items.
        query_vocabulary: the vocabulary of query ids (row 0 is out-of-vocabulary).
        seen: items to exclude per query id (e.g. the user's training items).
        metadata: free-form JSON-serialisable description.
    """
    if not isinstance(index, (BruteForce, Faiss)):
        raise TypeError(f"index must be a BruteForce or Faiss index, got {type(index).__name__}")
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

    def recommend(
        self, query_id: str, k: int = 10, exclude: list[str] | None = None, exclude_seen: bool = True
    ) -> list[tuple[str, float]]:
        """Top-``k`` ``(item, score)`` pairs for ``query_id``; raises ``KeyError`` for an unknown id."""
        row = int(self.vocabulary.lookup([query_id])[0])
        if row == 0:
            raise KeyError(f"unknown query id {query_id!r}")
        with torch.no_grad():
            embedding = self.tower(torch.tensor([row], dtype=torch.int64))
        excluded = list(exclude or []) + (self.seen.get(query_id, []) if exclude_seen else [])
        scores, items = self.index.query_with_exclusions(embedding, [np.asarray(excluded)], k=k)
        pairs = zip(np.asarray(items)[0].tolist(), scores[0].tolist(), strict=True)
        return [(str(item), float(score)) for item, score in pairs if score != float("-inf")]


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
    )


def create_app(bundle: Bundle) -> Any:
    """A FastAPI application answering from ``bundle``: ``POST /recommend``, ``GET /healthz``."""
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
        score: float

    class RecommendResponse(BaseModel):
        user_id: str
        items: list[Item]

    app = FastAPI(title="twotower", description="Two-tower retrieval service")

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return JSONResponse(status_code=413, content={"detail": f"body larger than {MAX_BODY_BYTES} bytes"})
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "candidates": bundle.index.num_candidates, "exact": bundle.index.is_exact()}

    @app.post("/recommend", response_model=RecommendResponse)
    def recommend(request: RecommendRequest) -> RecommendResponse:
        try:
            pairs = bundle.recommend(request.user_id, request.k, request.exclude, request.exclude_seen)
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error.args[0])) from error
        return RecommendResponse(user_id=request.user_id, items=[Item(id=item, score=score) for item, score in pairs])

    return app
