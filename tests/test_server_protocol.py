"""The gateway's HTTP protocol (gateway/cli/server.py) leaves nothing per request for the cyclic garbage
collector: a request's cycle, its event and bound methods are freed when the request ends. A reference
cycle per POST (the lingering-close transport holding its cycle) made every request's objects wait for a
collection, which walked ~25,000 of them every few hundred requests: ~13 µs a request at c64 and a
pause of several milliseconds in the tail."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.cli.server import http_protocol
from tests.support.processes import free_port


async def _echo(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def _serving(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """`app` under uvicorn with the gateway's protocol, in a thread of this process; its URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http_protocol(10.0), log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def server_url() -> Iterator[str]:
    with _serving(_echo) as url:
        yield url


def _live_cycles() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, RequestResponseCycle))


def test_finished_post_requests_leave_no_cycle_for_the_collector(server_url: str) -> None:
    gc.collect()
    gc.disable()  # only reference counting frees anything now
    try:
        before = _live_cycles()
        with httpx.Client(base_url=server_url) as client:  # one keep-alive connection
            for i in range(50):
                answer = client.post("/", content=b"x" * (i + 1))
                assert answer.status_code == 200 and answer.content == b"x" * (i + 1)
        time.sleep(0.2)  # the server thread finishes the last cycle
        left = _live_cycles() - before
    finally:
        gc.enable()
    assert left <= 2, f"{left} finished request cycles are waiting for the garbage collector"


def test_a_refusal_before_the_body_still_lingers_then_closes() -> None:
    """The weak reference still finds its cycle: a POST answered before its body is read gets its answer
    (no reset) and the connection is closed after it."""
    async def refuse(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 413, "headers": [(b"connection", b"close")]})
        await send({"type": "http.response.body", "body": b"too large"})

    def body() -> Iterator[bytes]:
        for _ in range(64):
            yield b"y" * 16384  # 1 MiB the server never reads

    with _serving(refuse) as url:
        answer = httpx.post(url + "/", content=body(), timeout=10)
    assert answer.status_code == 413 and answer.content == b"too large"
