"""The service and its bundles under attack: nothing loaded runs code, limits hold on what is received, hostile
clients cannot exhaust the server, and error answers never repeat the request."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[test]')")
from fastapi.testclient import TestClient

from twotower import BruteForce
from twotower.cli import main
from twotower.data.movielens import Vocabulary
from twotower.serving import (
    MAX_BODY_BYTES,
    BundleError,
    _Tower,
    create_app,
    load_bundle,
    make_server,
    save_bundle,
)

USERS = Vocabulary([f"u{i}" for i in range(40)])
ITEMS = np.array([f"item-{i}" for i in range(300)])


def _bundle(directory: Path) -> Path:
    torch.manual_seed(0)
    index = BruteForce(k=10).index(torch.randn(300, 8), ITEMS)
    return save_bundle(directory / "bundle", _Tower(nn.Embedding(len(USERS), 8)), index, USERS, {"u3": ["item-1"]})


class _Marker:
    """Unpickling this runs ``Path(marker).touch()``: what a crafted archive does at load time."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _rewrite_manifest(directory: Path, format_name: str | None = None) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    names = sorted(path.name for path in directory.iterdir() if path.name != "manifest.json")
    manifest["files"] = {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}
    if format_name is not None:
        manifest["format"] = format_name
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("attack", ["v1_archive", "tower_path", "pickled_weights", "manifest_path"])
def test_a_crafted_bundle_never_runs_code(tmp_path: Path, attack: str) -> None:
    """Whatever the files say (and with a manifest recomputed to match them, as an attacker would), loading
    refuses the bundle and the payload never runs."""
    directory = _bundle(tmp_path)
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Marker(marker))
    metadata = json.loads((directory / "metadata.json").read_text())
    if attack == "v1_archive":
        (directory / "query_tower.pt2").write_bytes(payload)
        metadata["tower"] = "query_tower.pt2"
        (directory / "tower.safetensors").unlink()
        format_name = "twotower.bundle/1"
    elif attack == "tower_path":
        (tmp_path / "elsewhere.pt2").write_bytes(payload)
        metadata["tower"] = "../elsewhere.pt2"
        format_name = None
    elif attack == "pickled_weights":
        (directory / "tower.safetensors").write_bytes(payload)
        format_name = None
    else:
        (tmp_path / "outside.json").write_text("[]")
        format_name = None
    (directory / "metadata.json").write_text(json.dumps(metadata))
    _rewrite_manifest(directory, format_name)
    if attack == "manifest_path":
        manifest = json.loads((directory / "manifest.json").read_text())
        manifest["files"]["../outside.json"] = hashlib.sha256(b"[]").hexdigest()
        (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError):
        load_bundle(directory)
    assert not marker.exists()


def test_a_bundle_can_be_pinned_by_its_manifest(tmp_path: Path) -> None:
    directory = _bundle(tmp_path)
    digest = hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
    bundle = load_bundle(directory, expected_manifest_sha256=digest)
    assert bundle.manifest_sha256 == digest
    # Rewritten consistently (new files, matching manifest): checksums pass, the pin does not.
    save_bundle(directory, nn.Embedding(len(USERS), 8), bundle.index, USERS)
    load_bundle(directory)
    with pytest.raises(BundleError, match="not the expected one"):
        load_bundle(directory, expected_manifest_sha256=digest)


def test_towers_that_are_code_cannot_be_saved(tmp_path: Path) -> None:
    class Custom(nn.Module):
        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            return rows.float()[:, None]

    with pytest.raises(TypeError, match="a saved tower is data, not code"):
        save_bundle(tmp_path / "b", Custom(), BruteForce().index(torch.randn(4, 1)), USERS)
    assert not (tmp_path / "b").exists()


def test_an_mlp_tower_round_trips_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tower = nn.Sequential(nn.Embedding(len(USERS), 6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    directory = save_bundle(tmp_path / "b", tower, BruteForce().index(torch.randn(30, 4)), USERS)
    rows = torch.arange(len(USERS))
    with torch.no_grad():
        assert torch.equal(load_bundle(directory).tower(rows), tower(rows))


def test_a_trailing_nul_is_not_the_same_user() -> None:
    """numpy strings drop trailing NULs: "u3\\x00" was served as u3, without u3's seen items excluded."""
    assert USERS.lookup(["u3\x00", "u3"]).tolist() == [0, int(USERS.lookup(["u3"])[0])]
    with pytest.raises(ValueError, match="ending in a NUL character"):
        Vocabulary(["a", "a\x00"])


def test_a_trailing_nul_user_gets_a_404(tmp_path: Path) -> None:
    client = TestClient(create_app(load_bundle(_bundle(tmp_path))))
    assert client.post("/recommend", json={"user_id": "u3\x00"}).status_code == 404
    # A NUL-terminated exclusion is no item's id: it excludes nothing (and not "item-1"'s namesake).
    plain = client.post("/recommend", json={"user_id": "u5", "k": 300, "exclude_seen": False}).json()["items"]
    odd = client.post("/recommend", json={"user_id": "u5", "k": 300, "exclude": ["item-7\x00"]}).json()["items"]
    assert [item["id"] for item in odd] == [item["id"] for item in plain]


def test_a_chunked_body_is_limited_by_the_bytes_received(tmp_path: Path) -> None:
    """Transfer-Encoding: chunked has no content-length: 100 MiB used to be read and parsed whole."""
    client = TestClient(create_app(load_bundle(_bundle(tmp_path))))
    sent = [0]

    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u1", "exclude": ['
        for _ in range(100 * 1024):  # 100 MiB if read to the end
            sent[0] += 1
            yield b'"' + b"x" * 1018 + b'",'
        yield b'"y"]}'

    response = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert len(response.content) < 200


def test_a_chunked_body_over_the_wire_is_cut_off_at_the_limit(tmp_path: Path) -> None:
    """The same over a socket: the server answers 413 once the limit is passed, long before 100 MiB."""
    with _Server(_bundle(tmp_path)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
        chunk = b'"' + b"x" * 4090 + b'",'
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        sent, answer = 0, b""
        sock.setblocking(False)
        try:
            while sent < 100 << 20 and not answer:
                try:
                    sock.sendall(framed)
                    sent += len(chunk)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    time.sleep(0.01)
                try:
                    answer = sock.recv(4096)
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    break
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 413")
        # Cut off near the limit: what was sent beyond it sat in the kernel's socket buffers, not in the server.
        assert sent < 24 * MAX_BODY_BYTES


def test_validation_errors_never_repeat_the_input(tmp_path: Path) -> None:
    client = TestClient(create_app(load_bundle(_bundle(tmp_path))))
    body = {"user_id": "u1", "exclude": ["x" * 50] * 10_001}  # over the exclusion limit, under the body limit
    response = client.post("/recommend", json=body)
    assert response.status_code == 422
    assert len(response.content) < 2_000
    assert b"xxxx" not in response.content
    assert response.json()["detail"][0]["loc"] == ["body", "exclude"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"user_id": "u1", "k": NaN}',
        b'{"user_id": "u1", "k": Infinity}',
        b'{"user_id": "\\ud800"}',
        b'{"user_id": "u1", "exclude": ["\\udc00"]}',
    ],
)
def test_nan_and_lone_surrogates_get_a_422_not_a_500(tmp_path: Path, raw: bytes) -> None:
    client = TestClient(create_app(load_bundle(_bundle(tmp_path))), raise_server_exceptions=False)
    response = client.post("/recommend", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "detail" in response.json()


def test_serve_on_an_unreadable_bundle_prints_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import twotower.serving

    def unreadable(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "bundle" / "index.safetensors"))

    monkeypatch.setattr(twotower.serving, "load_bundle", unreadable)
    assert main(["serve", "--run", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("twotower serve: error: Permission denied")
    assert "index.safetensors" in error


class _Server:
    """make_server on an ephemeral loopback port, in a thread."""

    def __init__(self, directory: Path, **settings: Any) -> None:
        self.server = make_server(load_bundle(directory), port=0, **settings)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def ask(self) -> int:
        import httpx

        response = httpx.post(f"http://127.0.0.1:{self.port}/recommend", json={"user_id": "u4", "k": 3}, timeout=10)
        return response.status_code


def _closed(sock: socket.socket, wait: float) -> bool:
    """Whether the server closes ``sock`` within ``wait`` seconds (after an answer such as a 408, or none)."""
    sock.settimeout(wait)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset by the server
        return True
    return True


def test_slowloris_clients_are_cut_off_and_others_still_served(tmp_path: Path) -> None:
    """A bounded slowloris run on loopback: 150 clients that never finish their headers, 20 that trickle a body.
    The server answers normal requests meanwhile and closes the slow ones after the request deadline."""
    with _Server(_bundle(tmp_path), request_timeout=1.0, max_connections=400) as server:
        slow = []
        for number in range(170):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if number < 150:
                sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\ncontent-length: 1000\r\n\r\n{")
            slow.append(sock)
        assert server.ask() == 200  # served while the slow clients hold their connections
        time.sleep(1.5)
        try:
            assert all(_closed(sock, 3.0) for sock in slow)
            assert server.ask() == 200
            deadline = time.monotonic() + 5
            while server.connections() > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.connections() == 0
        finally:
            for sock in slow:
                sock.close()


def test_connections_beyond_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    with _Server(_bundle(tmp_path), request_timeout=30.0, max_connections=40) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(100)]
        try:
            time.sleep(0.5)
            assert server.connections() <= 40
            refused = sum(_closed(sock, 0.5) for sock in held)
            assert refused >= 60
        finally:
            for sock in held:
                sock.close()


def test_repeated_log_lines_are_rate_limited() -> None:
    from twotower._http import RepeatedLogFilter

    now = [0.0]
    log_filter = RepeatedLogFilter(burst=5, interval=10.0, clock=lambda: now[0])
    logger = logging.getLogger("twotower.test.flood")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger.addHandler(Keep())
    logger.addFilter(log_filter)
    logger.propagate = False
    for _ in range(10_000):
        logger.warning("Invalid HTTP request received.")
    logger.warning("another message")
    assert len(records) == 6
    now[0] = 11.0
    logger.warning("Invalid HTTP request received.")
    assert records[-1] == "Invalid HTTP request received. (9995 similar lines suppressed)"
