"""A fake vLLM 0.32 OpenAI server whose faults can be switched on at will, for the gateway's own tests.

A real engine cannot be made to hang, crash mid-stream, answer garbage or shed load on demand; this one
can. It speaks vLLM 0.32.0's wire format exactly as captured in the samples (field sets and their order,
``cmpl-``/``chatcmpl-`` ids, ``system_fingerprint``, usage chunks, ``data: {json}\\n\\n`` framing, the
empty-text first completion chunk, the chat role chunk) and mirrors vLLM's error envelope
(``vllm/entrypoints/serve/exception_handling``).

Run::

    python -m tests.support.fault_upstream --port P [--served-model-name NAME ...]

Engine endpoints: ``GET /health``, ``GET /version``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``POST /tokenize``.

Control API (JSON):

* ``POST /control/mode`` ``{"mode": M, "times": N?, ...params}`` sets the behaviour of the following
  generation requests (``/v1/completions``, ``/v1/chat/completions``); ``GET /control/mode`` returns it,
  with ``times`` = how many uses are left (null: until changed). After ``times`` uses the mode falls back
  to ``normal``. For ``unhealthy`` a use is one ``/health`` probe (the only thing it changes).
* ``GET /control/requests``: one record per generation request, oldest first:
  ``{"id", "path", "body", "started", "ended", "disconnected", "chunks_sent", "mode", "stream", "headers"}``.
  ``id`` is the response's id (``cmpl-...`` / ``chatcmpl-...``; ``X-Request-Id`` or the body's
  ``request_id`` is honoured as in vLLM). ``ended`` is set when the response was finished, when the
  server cut the connection, or when it noticed the client had gone (``disconnected: true``); client
  disconnects are seen at once (uvicorn's ``http.disconnect``, no polling delay). ``chunks_sent`` counts
  SSE events, ``[DONE]`` included. ``DELETE /control/requests`` clears them.
* ``POST /control/reset``: mode back to ``normal``, records cleared.

Modes (parameters every streaming mode accepts: ``chunks``, ``ttft_s``, ``inter_chunk_s``):

* ``normal``: ``chunks`` generated tokens (default: the request's max_tokens, else 16; capped at
  max_tokens like a real engine), token ``i`` is the text ``" tok{i}"``. ``ttft_s``: delay before the first
  token; as in vLLM (Starlette's StreamingResponse) a stream's headers go out at once and the first SSE
  event waits ``ttft_s``; a non-streamed answer waits for the whole generation. ``header_delay_s`` delays the
  headers too. ``inter_chunk_s``: delay between tokens.
* ``hang_before_headers``: read the request, send nothing until the client goes away.
* ``hang_mid_stream`` (``after``, default 2): headers and ``after`` SSE events, then nothing until the
  client goes away. Not streamed: same as hang_before_headers.
* ``close_mid_stream`` (``after``, default 2; ``how``: ``"fin"`` (default) or ``"rst"``): headers and
  ``after`` SSE events, then the TCP connection is closed under the response with no ``[DONE]`` and no
  chunked terminator: ``fin`` flushes and closes the socket (the client reads exactly ``after`` events,
  then an incomplete chunked body: httpx.RemoteProtocolError); ``rst`` sets SO_LINGER 0 and aborts, so the
  peer gets a TCP reset (httpx.ReadError, or RemoteProtocolError if it reads EOF first). Not streamed: a
  Content-Length header, half the body, then the same cut.
* ``error_mid_stream`` (``after``, default 2; ``status``, ``message``): ``after`` events, then vLLM's in-stream
  error event ``data: {"error": {...}}`` (serialized with ``json.dumps`` spacing, as vLLM does) and
  ``data: [DONE]`` -- what vLLM sends when generation fails after the 200. Not streamed: the error JSON
  with that status.
* ``garbage`` (``body``: optional text): 200, ``application/json`` (or ``text/event-stream`` when streaming)
  and a body that is neither JSON nor SSE.
* ``status`` (``status``, default 503; ``message``, ``type``): vLLM's error body
  ``{"error": {"message", "type", "param": null, "code": status}}`` with that status.
* ``unhealthy``: ``/health`` answers 503 (empty body, as vLLM); requests are answered normally.

In-process: ``create_app(...)`` returns the ASGI app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import struct
import time
from collections import deque
from http import HTTPStatus
from typing import Any

import orjson

VLLM_VERSION = "0.32.0"
DEFAULT_FINGERPRINT = "vllm-0.32.0-d1da1118"  # as in the 0.32.0 samples

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MODES = (
    "normal",
    "hang_before_headers",
    "hang_mid_stream",
    "close_mid_stream",
    "error_mid_stream",
    "garbage",
    "status",
    "unhealthy",
)

# vLLM 0.32 error types (serve/exception_handling/error_response.py, handlers/*.py) and the message of
# the error it raises for that status.
_ERROR_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("BadRequestError", "Injected bad request."),
    404: ("NotFoundError", "The model does not exist."),
    422: ("UnprocessableEntityError", "Injected unprocessable entity."),
    500: ("InternalServerError", "EngineCore encountered an issue. See stack trace (above) for the root cause."),
    501: ("NotImplementedError", "Injected not implemented."),
    # QueueOverflowError, a GracefulHTTPError: its type is the status phrase.
    503: (
        "Service Unavailable",
        "The engine is currently busy and cannot accept new requests. "
        "Please try again later or on a different instance.",
    ),
}

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
_DONE = b"data: [DONE]\n\n"


def error_body(status: int, message: str | None = None, err_type: str | None = None, param: str | None = None) -> dict:
    default_type, default_message = _ERROR_DEFAULTS.get(status, (None, None))
    if default_type is None:
        try:
            default_type = HTTPStatus(status).phrase
        except ValueError:
            default_type = "Error"
        default_message = default_type
    return {
        "error": {
            "message": message if message is not None else default_message,
            "type": err_type if err_type is not None else default_type,
            "param": param,
            "code": status,
        }
    }


def count_words(text: Any) -> int:
    if isinstance(text, str):
        return len(text.split())
    if isinstance(text, list):  # a list of prompts, token ids or content parts
        total = 0
        for item in text:
            if isinstance(item, dict):
                total += count_words(item.get("text") or item.get("content") or "")
            elif isinstance(item, str):
                total += count_words(item)
            else:
                total += 1
        return total
    return 0


def prompt_token_count(body: dict) -> int:
    """Like /tokenize: whitespace-separated words + 1 (the BOS token)."""
    if "messages" in body:
        messages = body.get("messages") or []
        return sum(count_words(m.get("content")) for m in messages if isinstance(m, dict)) + 1
    return count_words(body.get("prompt", "")) + 1


class _Request:
    """One generation request: its record and the watcher that notices the client leaving."""

    __slots__ = ("record", "watcher", "finished", "server_closed")

    def __init__(self, record: dict) -> None:
        self.record = record
        self.watcher: asyncio.Task | None = None
        self.finished = False  # the final byte is on its way: a later http.disconnect is not the client's
        self.server_closed = False

    @property
    def gone(self) -> bool:
        return self.record["disconnected"]

    async def watch(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not (self.finished or self.server_closed):
                    self.record["disconnected"] = True
                    if self.record["ended"] is None:
                        self.record["ended"] = time.time()
                return

    async def pause(self, delay: float) -> bool:
        """Wait `delay` s, or less if the client goes; True if it went."""
        if delay > 0 and not self.gone:
            await asyncio.wait((self.watcher,), timeout=delay)
        return self.gone

    async def hang(self) -> None:
        await asyncio.wait((self.watcher,))

    def end(self) -> None:
        if self.record["ended"] is None:
            self.record["ended"] = time.time()


class FaultUpstream:
    """The ASGI app."""

    def __init__(
        self,
        served_model_names: list[str] | None = None,
        max_model_len: int = 4096,
        model_root: str | None = None,
        system_fingerprint: str = DEFAULT_FINGERPRINT,
        max_records: int = 20_000,
        check_model: bool = True,
    ) -> None:
        self.model_names = served_model_names or ["fake-model"]
        self.max_model_len = max_model_len
        self.model_root = model_root or f"/models/{self.model_names[0]}"
        self.fingerprint = system_fingerprint
        self.check_model = check_model
        self.created = int(time.time())
        self.records: deque[dict] = deque(maxlen=max_records)
        self.mode: dict = {"mode": "normal"}
        self.times_left: int | None = None

    # ---- mode bookkeeping ----------------------------------------------------------------------

    def _set_mode(self, spec: dict) -> None:
        times = spec.pop("times", None)
        self.mode = spec
        self.times_left = int(times) if times is not None else None
        if self.times_left is not None and self.times_left <= 0:
            self._reset_mode()

    def _reset_mode(self) -> None:
        self.mode = {"mode": "normal"}
        self.times_left = None

    def _take_mode(self, for_health: bool) -> dict:
        """The mode for this request; uses up one of its `times` if it applies."""
        mode = self.mode
        unhealthy = mode["mode"] == "unhealthy"
        if unhealthy != for_health:
            # /health outside `unhealthy` is healthy; generation under `unhealthy` is answered normally
            return {"mode": "normal"} if for_health else mode
        if self.times_left is not None:
            self.times_left -= 1
            if self.times_left <= 0:
                self._reset_mode()
        return mode

    # ---- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        method = scope["method"]

        if path in GENERATION_PATHS and method == "POST":
            await self._generation(scope, receive, send, path)
        elif path == "/health" and method == "GET":
            mode = self._take_mode(for_health=True)
            await _respond(send, 503 if mode["mode"] == "unhealthy" else 200, b"", [])
        elif path == "/v1/models" and method == "GET":
            await _respond_json(send, 200, self._models())
        elif path == "/tokenize" and method == "POST":
            body = await _read_json(receive)
            if not isinstance(body, dict):
                await _respond_json(send, 400, error_body(400, "Invalid JSON body."))
                return
            count = prompt_token_count(body)
            await _respond_json(
                send,
                200,
                {
                    "count": count,
                    "max_model_len": self.max_model_len,
                    "tokens": [1, *range(100, 100 + count - 1)],
                    "token_strs": None,
                },
            )
        elif path == "/version" and method == "GET":
            await _respond_json(send, 200, {"version": VLLM_VERSION})
        elif path.startswith("/control/"):
            await self._control(scope, receive, send, path, method)
        else:
            await _respond_json(send, 404, {"detail": "Not Found"})

    def _models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "vllm",
                    "root": self.model_root,
                    "parent": None,
                    "max_model_len": self.max_model_len,
                    "permission": [
                        {
                            "id": f"modelperm-{secrets.token_hex(8)}",
                            "object": "model_permission",
                            "created": self.created,
                            "allow_create_engine": False,
                            "allow_sampling": True,
                            "allow_logprobs": True,
                            "allow_search_indices": False,
                            "allow_view": True,
                            "allow_fine_tuning": False,
                            "organization": "*",
                            "group": None,
                            "is_blocking": False,
                        }
                    ],
                }
                for name in self.model_names
            ],
        }

    async def _control(self, scope, receive, send, path: str, method: str) -> None:
        if path == "/control/mode":
            if method == "GET":
                await _respond_json(send, 200, {**self.mode, "times": self.times_left})
                return
            if method == "POST":
                spec = await _read_json(receive)
                if not isinstance(spec, dict) or spec.get("mode") not in MODES:
                    await _respond_json(send, 400, {"detail": f"body must be {{'mode': one of {list(MODES)}, ...}}"})
                    return
                self._set_mode(spec)
                await _respond_json(send, 200, {**self.mode, "times": self.times_left})
                return
        elif path == "/control/requests":
            if method == "GET":
                await _respond_json(send, 200, list(self.records))
                return
            if method == "DELETE":
                self.records.clear()
                await _respond_json(send, 200, {"cleared": True})
                return
        elif path == "/control/reset" and method == "POST":
            self._reset_mode()
            self.records.clear()
            await _respond_json(send, 200, {"mode": "normal", "times": None})
            return
        status = 405 if path in ("/control/mode", "/control/requests") else 404
        await _respond_json(send, status, {"detail": "no such control"})

    # ---- generation ------------------------------------------------------------------------------

    async def _generation(self, scope, receive, send, path: str) -> None:
        raw = await _read_body(receive)
        mode = self._take_mode(for_health=False)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        chat = path == "/v1/chat/completions"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        base_id = headers.get("x-request-id") or (body.get("request_id") if isinstance(body, dict) else None)
        request_id = ("chatcmpl-" if chat else "cmpl-") + (base_id or secrets.token_hex(8))
        stream = bool(body.get("stream")) if isinstance(body, dict) else False
        record = {
            "id": request_id,
            "path": path,
            "body": body,
            "started": time.time(),
            "ended": None,
            "disconnected": False,
            "chunks_sent": 0,
            "mode": mode["mode"],
            "stream": stream,
            "headers": headers,
        }
        self.records.append(record)
        req = _Request(record)
        req.watcher = asyncio.get_running_loop().create_task(req.watch(receive))
        try:
            await self._answer(req, send, mode, body, chat, stream, request_id)
        finally:
            req.end()
            if not req.watcher.done():
                req.watcher.cancel()

    async def _answer(
        self, req: _Request, send, mode: dict, body: Any, chat: bool, stream: bool, request_id: str
    ) -> None:
        name = mode["mode"]
        if not isinstance(body, dict):
            req.finished = True
            await _respond_json(send, 400, error_body(400, "Invalid JSON body."))
            return

        if name == "hang_before_headers" or (name == "hang_mid_stream" and not stream):
            await req.hang()
            return
        if name == "status":
            status = int(mode.get("status", 503))
            req.finished = True
            await _respond_json(send, status, error_body(status, mode.get("message"), mode.get("type")))
            return
        if name == "garbage":
            default = "data: {this is not sse\n\n<oops>" if stream else "<html>this is not json"
            req.finished = True
            await _respond(send, 200, mode.get("body", default).encode(), _SSE_HEADERS if stream else _JSON_HEADERS)
            return
        if name == "error_mid_stream" and not stream:
            status = int(mode.get("status", 500))
            req.finished = True
            err = error_body(status, mode.get("message", "Internal server error"), mode.get("type"))
            await _respond_json(send, status, err)
            return

        if self.check_model and body.get("model") and body["model"] not in self.model_names:
            req.finished = True
            message = f"The model `{body['model']}` does not exist. Valid aliases: {', '.join(self.model_names)}."
            await _respond_json(send, 404, error_body(404, message, "NotFoundError", "model"))
            return

        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        n_tokens = int(mode.get("chunks", max_tokens if max_tokens is not None else 16))
        if max_tokens is not None:
            n_tokens = min(n_tokens, int(max_tokens))
        n_tokens = max(n_tokens, 0)
        finish_reason = "length" if max_tokens is not None and n_tokens >= int(max_tokens) else "stop"
        prompt_tokens = prompt_token_count(body)
        ttft = float(mode.get("ttft_s", 0))
        inter = float(mode.get("inter_chunk_s", 0))
        header_delay = float(mode.get("header_delay_s", 0))
        created = int(time.time())

        if not stream:
            delay = header_delay + ttft + inter * max(n_tokens - 1, 0)
            if await req.pause(delay):
                return
            text = "".join(f" tok{i}" for i in range(n_tokens))
            usage = {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + n_tokens,
                "completion_tokens": n_tokens,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            }
            payload = (
                self._chat_response(request_id, created, text, finish_reason, usage)
                if chat
                else self._completion_response(request_id, created, text, finish_reason, usage)
            )
            data = orjson.dumps(payload)
            if name == "close_mid_stream":
                headers = [*_JSON_HEADERS, (b"content-length", str(len(data)).encode())]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True})
                await self._cut(req, send, mode.get("how", "fin"))
                return
            req.finished = True
            await _respond(send, 200, data, _JSON_HEADERS)
            return

        # ---- streamed -----------------------------------------------------------------------------
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))
        events = self._chat_events if chat else self._completion_events
        fault_at = None
        if name in ("hang_mid_stream", "close_mid_stream", "error_mid_stream"):
            fault_at = max(int(mode.get("after", 2)), 0)

        if await req.pause(header_delay):
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        record = req.record
        sent = 0
        gen = events(request_id, created, n_tokens, finish_reason, prompt_tokens, include_usage, continuous)
        for delay, chunk in gen:
            if fault_at is not None and (sent >= fault_at or chunk is _DONE):
                break
            if delay is None:
                delay = ttft if sent == 0 else inter
            if await req.pause(delay):
                return
            if chunk is _DONE:
                req.finished = True
            await send({"type": "http.response.body", "body": chunk, "more_body": chunk is not _DONE})
            sent += 1
            record["chunks_sent"] = sent
        else:
            return

        # the fault, after `after` events ([DONE] is never sent before it)
        if name == "hang_mid_stream":
            await req.hang()
        elif name == "close_mid_stream":
            await self._cut(req, send, mode.get("how", "fin"))
        elif name == "error_mid_stream":
            status = int(mode.get("status", 500))
            err = error_body(status, mode.get("message", "Internal server error"), mode.get("type"))
            # vLLM: json.dumps(ErrorResponse.model_dump()), default separators
            event = b"data: " + json.dumps(err).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
            req.finished = True
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
            record["chunks_sent"] = sent + 2

    async def _cut(self, req: _Request, send, how: str) -> None:
        """Close the TCP connection under an unfinished response."""
        req.server_closed = True
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is None:  # not uvicorn: let the server tear the connection down
            raise RuntimeError("fault_upstream: close_mid_stream")
        if how == "rst":
            # let what was sent reach the peer first, then reset
            for _ in range(20):
                if transport.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            transport.abort()
        else:
            transport.close()  # flushes what was written, then FIN: no chunked terminator
        req.end()
        # wait for uvicorn to see the connection lost, so that it does not complain of an unfinished response
        await asyncio.wait((req.watcher,), timeout=1)

    def _completion_events(self, request_id, created, n, finish_reason, prompt_tokens, include_usage, continuous):
        """(delay or None for the default, bytes) per SSE event, as vLLM 0.32's completion stream."""
        model = self.model_names[0]
        head = _chunk_head(request_id, "text_completion", created, model)

        def chunk(text: str, finish: str | None, done_tokens: int, last: bool) -> bytes:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "prompt_token_ids": None,
                "token_ids": None,
            }
            out = head + orjson.dumps([choice])
            if continuous:
                usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done_tokens,
                         "completion_tokens": done_tokens}
                out += b',"usage":' + orjson.dumps(usage)
            if last and not include_usage:
                out += b',"system_fingerprint":' + orjson.dumps(self.fingerprint)
            return out + b"}\n\n"

        # vLLM 0.32 opens with an empty-text chunk (the detokenizer holding back the first token's text)
        yield None, chunk("", None if n else finish_reason, 0, n == 0)
        for i in range(n):
            yield (0.0 if i == 0 else None), chunk(f" tok{i}", finish_reason if i == n - 1 else None, i + 1, i == n - 1)
        if include_usage:
            yield 0.0, self._usage_chunk(head, prompt_tokens, n)
        yield 0.0, _DONE

    def _chat_events(self, request_id, created, n, finish_reason, prompt_tokens, include_usage, continuous):
        """(delay or None for the default, bytes) per SSE event, as vLLM 0.32's chat stream."""
        model = self.model_names[0]
        head = _chunk_head(request_id, "chat.completion.chunk", created, model)

        def usage(done_tokens: int) -> bytes:
            return b',"usage":' + orjson.dumps(
                {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done_tokens,
                 "completion_tokens": done_tokens, "completion_tokens_details": None}
            )

        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        first = head + orjson.dumps([role])
        if continuous:
            first += usage(0)
        yield None, first + b',"prompt_token_ids":null,"prompt_text":null}\n\n'
        for i in range(n):
            last = i == n - 1
            choice: dict = {"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None,
                            "finish_reason": finish_reason if last else None}
            if last:
                choice["stop_reason"] = None
            choice["token_ids"] = None
            out = head + orjson.dumps([choice])
            if continuous:
                out += usage(i + 1)
            if last and not include_usage:
                out += b',"system_fingerprint":' + orjson.dumps(self.fingerprint)
            yield (0.0 if i == 0 else None), out + b"}\n\n"
        if n == 0:  # the finish chunk carries an empty delta
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason,
                      "stop_reason": None, "token_ids": None}
            out = head + orjson.dumps([choice])
            if not include_usage:
                out += b',"system_fingerprint":' + orjson.dumps(self.fingerprint)
            yield 0.0, out + b"}\n\n"
        if include_usage:
            yield 0.0, self._usage_chunk(head, prompt_tokens, n)
        yield 0.0, _DONE

    def _usage_chunk(self, head: bytes, prompt_tokens: int, n: int) -> bytes:
        return (
            head
            + b'[],"usage":'
            + orjson.dumps({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n})
            + b',"system_fingerprint":'
            + orjson.dumps(self.fingerprint)
            + b"}\n\n"
        )

    def _completion_response(self, request_id, created, text, finish_reason, usage) -> dict:
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": self.model_names[0],
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": usage,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    def _chat_response(self, request_id, created, text, finish_reason, usage) -> dict:
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": self.model_names[0],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": None,
                        "audio": None,
                        "function_call": None,
                        "reasoning": None,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                    "stop_reason": None,
                    "token_ids": None,
                    "routed_experts": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": self.fingerprint,
            "usage": usage,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _read_json(receive) -> Any:
    try:
        return orjson.loads(await _read_body(receive))
    except orjson.JSONDecodeError:
        return None


async def _respond(send, status: int, body: bytes, headers: list) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _respond_json(send, status: int, payload: Any) -> None:
    await _respond(send, status, orjson.dumps(payload), _JSON_HEADERS)


def _chunk_head(request_id: str, obj: str, created: int, model: str) -> bytes:
    """`data: {"id":...,"object":...,"created":...,"model":...,"choices":` -- every stream chunk's start."""
    return (
        b'data: {"id":' + orjson.dumps(request_id) + b',"object":' + orjson.dumps(obj) + b',"created":'
        + str(created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":'
    )


def create_app(**kwargs: Any) -> FaultUpstream:
    return FaultUpstream(**kwargs)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", nargs="+", default=["fake-model"])
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--model-root", default=None, help="the `root` /v1/models reports")
    parser.add_argument("--system-fingerprint", default=DEFAULT_FINGERPRINT)
    parser.add_argument("--max-records", type=int, default=20_000)
    parser.add_argument("--skip-model-check", action="store_true", help="accept any `model` (else 404 as vLLM)")
    args = parser.parse_args(argv)

    app = FaultUpstream(
        served_model_names=args.served_model_name,
        max_model_len=args.max_model_len,
        model_root=args.model_root,
        system_fingerprint=args.system_fingerprint,
        max_records=args.max_records,
        check_model=not args.skip_model_check,
    )
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "h11"
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop=loop,
        http=http,
        lifespan="on",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_graceful_shutdown=1,  # hanging requests must not hold up the tests' SIGTERM
    )


if __name__ == "__main__":
    main()
