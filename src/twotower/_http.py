"""What keeps the HTTP service up under hostile or broken clients, beneath the FastAPI application.

* :class:`BodyLimit` counts the bytes a request body actually delivers (chunked or not), whatever its
  ``content-length`` says, and answers 413 past the limit without handing anything to the application.
* :class:`GuardedH11Protocol` is uvicorn's HTTP/1.1 protocol with a deadline for each request to arrive whole
  (headers and body: a client that trickles them, as slowloris does, is disconnected) and a cap on open
  connections (past it, new connections are closed at once, before they cost a request's memory).
* :class:`RepeatedLogFilter` lets a message through a few times per interval and then counts it, so a flood of
  bad connections cannot fill the disk with the same warning.

``uvicorn`` is imported only where the server is started, so these stay optional like FastAPI.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _answer(send: Send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: read each request body up to ``limit`` bytes before the application sees it.

    A ``content-length`` above the limit is refused before reading; a body that turns out longer than the limit
    (``Transfer-Encoding: chunked`` has no length) is refused as soon as the limit is passed, so at most
    ``limit`` bytes of it are ever held. The application then gets the whole body in one message.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    await _answer(send, 400, "content-length must be a whole number")
                    return
                if int(value) > self.limit:
                    await _answer(send, 413, f"body larger than {self.limit} bytes")
                    return
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _answer(send, 413, f"body larger than {self.limit} bytes")
                return
            parts.append(body)
            if not message.get("more_body", False):
                break
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()  # after the body: only the disconnect is left to wait for

        await self.app(scope, replay, send)


class RepeatedLogFilter(logging.Filter):
    """Pass each distinct message template at most ``burst`` times per ``interval`` seconds; then count the rest
    and report the count with the next message that passes ("... (N similar lines suppressed)")."""

    def __init__(self, burst: int = 5, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval, self.clock = burst, interval, clock
        self._windows: dict[str, tuple[float, int, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.levelno}:{record.msg}"
        now = self.clock()
        with self._lock:
            start, passed, suppressed = self._windows.get(key, (now, 0, 0))
            if now - start >= self.interval:
                start, passed = now, 0
            if passed >= self.burst:
                self._windows[key] = (start, passed, suppressed + 1)
                return False
            self._windows[key] = (start, passed + 1, 0)
            if len(self._windows) > 10_000:  # templates are few; this bounds the table against odd loggers
                self._windows.clear()
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar lines suppressed)"
        return True


def guarded_protocol(request_timeout: float, max_connections: int) -> type[Any]:
    """uvicorn's h11 protocol class with a per-request deadline and a connection cap (see the module)."""
    import asyncio

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """Closes a connection whose request has not arrived whole ``request_timeout`` seconds after the
        connection opened (or after its previous response), and connections beyond ``max_connections``."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # connection_lost removes it from the set
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def handle_events(self) -> None:
            super().handle_events()
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                self._disarm()  # the request is whole: the application is answering it

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                return  # answered already in progress
            if cycle is not None and not cycle.response_started and self.conn.our_state is h11.SEND_RESPONSE:
                # Headers came, the body is still trickling in: stop it with a 408.
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    return GuardedH11Protocol
