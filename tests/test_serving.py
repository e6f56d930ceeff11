"""Bundles and the HTTP service (FastAPI's TestClient): answers equal the in-process index; bad input gets 4xx."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[test]')")
from fastapi.testclient import TestClient

from twotower import BruteForce
from twotower.data.movielens import Vocabulary
from twotower.indexes import AnisotropicIVF, Faiss
from twotower.serving import BundleError, MicroBatcher, Query, _Tower, create_app, load_bundle, save_bundle

USERS = Vocabulary([f"u{i}" for i in range(40)])
ITEMS = np.array([f"item-{i}" for i in range(300)])


def _bundle(directory: Path, kind: str = "exact") -> tuple[Path, nn.Embedding, torch.Tensor]:
    torch.manual_seed(0)
    tower = nn.Embedding(len(USERS), 8)
    items = torch.randn(300, 8)
    index: BruteForce | Faiss | AnisotropicIVF
    if kind == "exact":
        index = BruteForce(k=10).index(items, ITEMS)
    elif kind == "faiss":
        index = Faiss("Flat").index(items, ITEMS)
    else:  # every partition scanned, every candidate reordered: exact answers from the approximate index
        index = AnisotropicIVF(k=10, leaves=5, leaves_to_search=5, reorder=300).index(items, ITEMS)
    seen = {"u3": ["item-1", "item-2"]}
    return save_bundle(directory / "bundle", _Tower(tower), index, USERS, seen, {"name": "test"}), tower, items


def _expected(tower: nn.Embedding, items: torch.Tensor, user: str, k: int, excluded: list[str]) -> list[str]:
    with torch.no_grad():
        query = tower(torch.as_tensor(USERS.lookup([user])))
    scores = (query.double() @ items.double().T)[0].numpy()
    order = [j for j in np.argsort(-scores, kind="stable") if ITEMS[j] not in set(excluded)]
    return [str(ITEMS[j]) for j in order[:k]]


def test_recommend_matches_the_index_and_honours_exclusions(tmp_path: Path) -> None:
    directory, tower, items = _bundle(tmp_path)
    client = TestClient(create_app(load_bundle(directory)))
    assert client.get("/healthz").json() == {"status": "ok", "candidates": 300, "exact": True}
    response = client.post("/recommend", json={"user_id": "u7", "k": 5})
    assert response.status_code == 200
    assert [item["id"] for item in response.json()["items"]] == _expected(tower, items, "u7", 5, [])
    best = _expected(tower, items, "u3", 3, ["item-1", "item-2"])
    response = client.post("/recommend", json={"user_id": "u3", "k": 3, "exclude": [best[0]]})
    got = [item["id"] for item in response.json()["items"]]
    assert got == _expected(tower, items, "u3", 3, ["item-1", "item-2", best[0]])
    with_seen = client.post("/recommend", json={"user_id": "u3", "k": 300, "exclude_seen": False}).json()["items"]
    assert {"item-1", "item-2"} <= {item["id"] for item in with_seen}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"user_id": ""}, 422),
        ({"user_id": "u1", "k": 0}, 422),
        ({"user_id": "u1", "k": 5000}, 422),
        ({"user_id": "u1", "k": "many"}, 422),
        ({"user_id": "u1", "exclude": "item-1"}, 422),
        ({"user_id": "nobody"}, 404),
    ],
)
def test_bad_requests(tmp_path: Path, body: dict[str, object], status: int) -> None:
    directory, _, _ = _bundle(tmp_path)
    client = TestClient(create_app(load_bundle(directory)))
    response = client.post("/recommend", json=body)
    assert response.status_code == status
    assert "detail" in response.json()


def test_body_size_is_bounded(tmp_path: Path) -> None:
    directory, _, _ = _bundle(tmp_path)
    client = TestClient(create_app(load_bundle(directory)))
    body = json.dumps({"user_id": "u1", "exclude": ["x" * 100] * 20_000})
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_anisotropic_bundle_serves_with_exclusions(tmp_path: Path) -> None:
    directory, tower, items = _bundle(tmp_path, "anisotropic")
    client = TestClient(create_app(load_bundle(directory)))
    assert client.get("/healthz").json() == {"status": "ok", "candidates": 300, "exact": False}
    response = client.post("/recommend", json={"user_id": "u7", "k": 5})
    assert [item["id"] for item in response.json()["items"]] == _expected(tower, items, "u7", 5, [])
    response = client.post("/recommend", json={"user_id": "u3", "k": 4})
    assert [item["id"] for item in response.json()["items"]] == _expected(tower, items, "u3", 4, ["item-1", "item-2"])


@pytest.mark.parametrize("kind", ["exact", "faiss", "anisotropic"])
def test_bundle_round_trip_is_bit_identical(tmp_path: Path, kind: str) -> None:
    directory, tower, _ = _bundle(tmp_path, kind)
    bundle = load_bundle(directory)
    rows = torch.as_tensor(USERS.lookup(["u1", "u2", "u39"]))
    with torch.no_grad():
        assert torch.equal(bundle.tower(rows), tower(rows))
    assert bundle.metadata == {"name": "test"}
    first = bundle.recommend("u5", k=10)
    again = load_bundle(directory).recommend("u5", k=10)
    assert first == again


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "was modified: its SHA-256 does not match the manifest"),
        ("remove", r"is incomplete: seen\.json is missing"),
        ("extra", "does not list"),
        ("manifest", "has no manifest.json"),
    ],
)
def test_damaged_bundles_are_refused(tmp_path: Path, damage: str, message: str) -> None:
    directory, _, _ = _bundle(tmp_path)
    if damage == "tamper":
        with (directory / "vocabulary.json").open("a") as handle:
            handle.write(" ")
    elif damage == "remove":
        (directory / "seen.json").unlink()
    elif damage == "extra":
        (directory / "notes.txt").write_text("x")
    else:
        (directory / "manifest.json").unlink()
    with pytest.raises(BundleError, match=message):
        load_bundle(directory)
    with pytest.raises(BundleError, match="no bundle directory"):
        load_bundle(tmp_path / "missing")


def test_body_with_a_malformed_length_is_refused(tmp_path: Path) -> None:
    directory, _, _ = _bundle(tmp_path)
    client = TestClient(create_app(load_bundle(directory)))
    response = client.post(
        "/recommend", content=b"{}", headers={"content-type": "application/json", "content-length": "lots"}
    )
    assert response.status_code == 400


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_waiting_requests_are_answered_in_one_batch(tmp_path: Path, kind: str) -> None:
    directory, tower, items = _bundle(tmp_path, kind)
    bundle = load_bundle(directory)
    queries = [
        Query("u7", 5),
        Query("u3", 3),  # u3 has seen item-1 and item-2
        Query("nobody", 4),
        Query("u3", 3, ("item-9",), exclude_seen=False),
        Query("u12", 300),
    ]
    batcher = MicroBatcher(bundle, max_batch=8, start=False)
    futures = [batcher.submit(query) for query in queries]
    batcher.start()
    answers = [future.exception(timeout=30) or future.result() for future in futures]
    batcher.stop()
    assert (batcher.batches, batcher.largest_batch) == (1, 5)
    assert isinstance(answers[2], KeyError)
    for query, answer in zip(queries, answers, strict=True):
        if query.query_id == "nobody":
            continue
        assert isinstance(answer, list)
        excluded = [*query.exclude, *(["item-1", "item-2"] if query.exclude_seen and query.query_id == "u3" else [])]
        assert [item for item, _ in answer] == _expected(tower, items, query.query_id, query.k, excluded)


def test_batches_never_exceed_max_batch(tmp_path: Path) -> None:
    directory, tower, items = _bundle(tmp_path)
    batcher = MicroBatcher(load_bundle(directory), max_batch=3, start=False)
    users = [f"u{i}" for i in range(7)]
    futures = [batcher.submit(Query(user, 4)) for user in users]
    batcher.start()
    answers = [future.result(timeout=30) for future in futures]
    batcher.stop()
    assert (batcher.batches, batcher.largest_batch) == (3, 3)  # 3 + 3 + 1
    for user, answer in zip(users, answers, strict=True):
        assert [item for item, _ in answer] == _expected(tower, items, user, 4, [])


def test_concurrent_http_requests_get_their_own_answers(tmp_path: Path) -> None:
    directory, tower, items = _bundle(tmp_path)
    users = [f"u{i}" for i in range(4, 40)]
    with TestClient(create_app(load_bundle(directory), max_batch=16)) as client:

        def ask(user: str) -> list[str]:
            response = client.post("/recommend", json={"user_id": user, "k": 6})
            assert response.status_code == 200
            return [item["id"] for item in response.json()["items"]]

        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(ask, users))
    assert answers == [_expected(tower, items, user, 6, []) for user in users]


def test_twotower_serve_answers_over_loopback(tmp_path: Path) -> None:
    """`python -m twotower serve` end to end: a child process on 127.0.0.1 answers as the in-process index."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    directory, tower, items = _bundle(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [sys.executable, "-m", "twotower", "serve", "--run", str(directory), "--port", str(port)]
    server = subprocess.Popen([*command, "--max-batch", "4"], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/healthz", timeout=1.0)
                break
            except httpx.HTTPError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.monotonic() < deadline, "the server did not start within 60 s"
                time.sleep(0.2)
        assert health.json() == {"status": "ok", "candidates": 300, "exact": True}
        response = httpx.post(url + "/recommend", json={"user_id": "u9", "k": 4}, timeout=10.0)
        assert [item["id"] for item in response.json()["items"]] == _expected(tower, items, "u9", 4, [])
        assert httpx.post(url + "/recommend", json={"user_id": "u9", "k": 0}, timeout=10.0).status_code == 422
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_titles_come_from_the_item_map_or_the_id(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = nn.Embedding(len(USERS), 8)
    items = torch.randn(300, 8)
    titles = {f"item-{i}": f"Title {i} (19{i % 100:02d})" for i in range(0, 300, 2)}  # odd items have none
    directory = save_bundle(
        tmp_path / "bundle", _Tower(tower), BruteForce(k=10).index(items, ITEMS), USERS, item_titles=titles
    )
    bundle = load_bundle(directory)
    client = TestClient(create_app(bundle))
    answer = client.post("/recommend", json={"user_id": "u2", "k": 20}).json()["items"]
    assert [item["id"] for item in answer] == _expected(tower, items, "u2", 20, [])
    for item in answer:
        number = int(item["id"].split("-")[1])
        assert item["title"] == (f"Title {number} (19{number % 100:02d})" if number % 2 == 0 else item["id"])
    # The map is part of the checksummed bundle.
    with (directory / "items.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(BundleError, match=r"items\.json is corrupt or was modified"):
        load_bundle(directory)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"query_id": ""}, "query_id must be a non-empty str"),
        ({"query_id": 7}, "query_id must be a non-empty str"),
        ({"query_id": "u1", "k": 0}, "k must be a positive int"),
        ({"query_id": "u1", "k": True}, "k must be a positive int"),
        ({"query_id": "u1", "exclude": ["item-1"]}, "exclude must be a tuple of str ids"),
        ({"query_id": "u1", "exclude": (3,)}, "exclude must be a tuple of str ids"),
        ({"query_id": "u1", "exclude_seen": "yes"}, "exclude_seen must be a bool"),
    ],
)
def test_bad_queries_are_refused_before_they_reach_a_batch(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Query(**arguments)  # type: ignore[arg-type]


def test_bad_batcher_and_bundle_arguments(tmp_path: Path) -> None:
    directory, _, _ = _bundle(tmp_path)
    bundle = load_bundle(directory)
    for max_batch in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_batch must be a positive int"):
            MicroBatcher(bundle, max_batch=max_batch, start=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item_titles must be a dict"):
        save_bundle(
            tmp_path / "other", _Tower(nn.Embedding(len(USERS), 8)), BruteForce().index(torch.randn(5, 8)), USERS,
            item_titles=[("a", "b")],  # type: ignore[arg-type]
        )  # fmt: skip
