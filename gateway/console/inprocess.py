"""The console as a client of the gateway's own API: in-process ASGI calls, no socket, no second copy of
any handler. Whatever the API answers a key, the console shows, refusals included.

A call carries either the key being signed in with (`Authorization`) or a signed-in session's caller,
vouched for in the ASGI scope (gateway/api/callers.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
from starlette.types import ASGIApp, Message

from gateway.tenancy.vouched import VOUCHED_CALLER
from gateway.tenancy.tenants import Caller

log = logging.getLogger("gateway.console")

Params = Mapping[str, Any] | Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class ApiAnswer:
    status: int
    body: Any  # the parsed JSON (None when the body was not JSON)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        """The error's message, as OpenAI's envelope has it."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        return f"The gateway answered {self.status}."


class ApiClient:
    def __init__(self, app: ASGIApp, *, caller: Caller | None = None, key: str | None = None) -> None:
        self._app = app
        self._caller = caller
        self._key = key

    async def get(self, path: str, params: Params | None = None) -> ApiAnswer:
        return await self.call("GET", path, params)

    async def post(self, path: str, body: Any = None, params: Params | None = None) -> ApiAnswer:
        return await self.call("POST", path, params, body)

    async def call(self, method: str, path: str, params: Params | None = None, body: Any = None) -> ApiAnswer:
        query = urlencode([(k, v) for k, v in _pairs(params) if v is not None and v != ""], doseq=True)
        raw = b"" if body is None else orjson.dumps(body)
        headers = [(b"host", b"console.internal"), (b"accept", b"application/json")]
        if raw:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        if self._key is not None:
            headers.append((b"authorization", f"Bearer {self._key}".encode("utf-8", "replace")))
        extensions: dict[str, Any] = {}
        if self._caller is not None:
            extensions[VOUCHED_CALLER] = self._caller
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 0),
                 "server": ("console.internal", 80), "extensions": extensions, "state": {}}
        status, content = await _exchange(self._app, scope, raw)
        try:
            parsed = orjson.loads(content) if content else None
        except orjson.JSONDecodeError:
            parsed = None
        return ApiAnswer(status, parsed)


def _pairs(params: Params | None) -> list[tuple[str, Any]]:
    if params is None:
        return []
    return list(params.items()) if isinstance(params, Mapping) else list(params)


async def _exchange(app: ASGIApp, scope: dict, body: bytes) -> tuple[int, bytes]:
    done = asyncio.Event()
    delivered = False
    status = 500
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the "client" stays until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    except Exception:  # Starlette re-raises after its 500 handler has answered: the answer stands
        if not done.is_set():
            log.exception("in-process API call %s %s failed", scope["method"], scope["path"])
            return 500, b""
    finally:
        done.set()
    return status, b"".join(chunks)
