"""A fast stand-in for a vLLM 0.32 OpenAI server, for load tests: it must never be the bottleneck.

It speaks vLLM 0.32.0's wire format (the same field sets and order as ``tests/support/fault_upstream.py``,
which mirrors captured samples): ``chatcmpl-``/``cmpl-`` ids, ``system_fingerprint``, the chat role
chunk, the empty-text first completion chunk, the usage chunk when ``stream_options.include_usage``,
``data: {json}\\n\\n`` framing sent as HTTP/1.1 chunked transfer encoding, ``data: [DONE]``.

Built for speed: a plain ``asyncio.Protocol`` HTTP/1.1 keep-alive server on uvloop (when installed),
response bytes assembled from cached templates, orjson for the one parse of each request body, no
per-request logging, delays scheduled with ``loop.call_later`` (no task per request).

Run::

    python load_tests/mock_upstream.py --port 9000 [--served-model-name mock-model]
        [--chunks N] [--ttft-ms T] [--inter-chunk-ms D] [--skip-model-check]

Endpoints: ``GET /health`` (200, empty body), ``GET /version``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``.

Generated tokens: token ``i`` is the text ``" tok{i}"``. Their number is ``chunks`` (default: the request's
``max_tokens``/``max_completion_tokens``, else 16), capped at ``max_tokens`` like a real engine.
Per-request overrides in the body (extra fields pass through the gateway to the engine):
``mock_chunks``, ``mock_ttft_ms``, ``mock_inter_chunk_ms`` (top level, or inside ``vllm_xargs``, which
the gateway forwards for tenants allowed it). A streamed answer's headers go out at once
and the first token waits ``ttft``; a non-streamed answer waits ``ttft + inter * (n - 1)``.
With zero delays a whole stream is written in one ``transport.write`` (one syscall).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from typing import Any

import orjson

VLLM_VERSION = "0.32.0"
FINGERPRINT = "vllm-0.32.0-d1da1118"
DONE = b"data: [DONE]\n\n"

_STATUS = {200: b"200 OK", 400: b"400 Bad Request", 404: b"404 Not Found", 405: b"405 Method Not Allowed",
           411: b"411 Length Required", 413: b"413 Payload Too Large"}
_ID_MARK = b"\x00ID\x00"
_CREATED_MARK = b"1234567890123"
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024


def _count_words(text: Any) -> int:
    if isinstance(text, str):
        return len(text.split())
    if isinstance(text, list):
        total = 0
        for item in text:
            if isinstance(item, dict):
                total += _count_words(item.get("text") or item.get("content") or "")
            elif isinstance(item, str):
                total += _count_words(item)
            else:
                total += 1
        return total
    return 0


def prompt_token_count(body: dict) -> int:
    """Like vLLM's /tokenize in the fault upstream: whitespace-separated words + 1 (BOS)."""
    if "messages" in body:
        messages = body.get("messages") or []
        return sum(_count_words(m.get("content")) for m in messages if isinstance(m, dict)) + 1
    return _count_words(body.get("prompt", "")) + 1


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Templates:
    """Response bytes with the request id and `created` cut out, cached per shape."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._json: dict[tuple, list[bytes]] = {}
        self._stream: dict[tuple, tuple[list[bytes], list[bytes]]] = {}

    # ---- non-streamed --------------------------------------------------------------------------

    def json_parts(self, chat: bool, n: int, finish: str, prompt_tokens: int) -> list[bytes]:
        key = (chat, n, finish, prompt_tokens)
        parts = self._json.get(key)
        if parts is None:
            text = "".join(f" tok{i}" for i in range(n))
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n,
                     "prompt_tokens_details": None, "completion_tokens_details": None}
            body = (self._chat_response if chat else self._completion_response)(text, finish, usage)
            raw = orjson.dumps(body).replace(b'"\\u0000ID\\u0000"', b'"' + _ID_MARK + b'"')
            before_id, after_id = raw.split(_ID_MARK)
            mid, tail = after_id.split(_CREATED_MARK)
            parts = [before_id, mid, tail]
            if len(self._json) < 4096:
                self._json[key] = parts
        return parts

    def _completion_response(self, text: str, finish: str, usage: dict) -> dict:
        return {
            "id": "\x00ID\x00", "object": "text_completion", "created": int(_CREATED_MARK), "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                         "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                         "routed_experts": None}],
            "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": usage,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }

    def _chat_response(self, text: str, finish: str, usage: dict) -> dict:
        return {
            "id": "\x00ID\x00", "object": "chat.completion", "created": int(_CREATED_MARK), "model": self.model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                                     "audio": None, "function_call": None, "reasoning": None},
                         "logprobs": None, "finish_reason": finish, "stop_reason": None, "token_ids": None,
                         "routed_experts": None}],
            "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": usage,
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }

    # ---- streamed ------------------------------------------------------------------------------

    def stream_tails(self, chat: bool, n: int, finish: str, prompt_tokens: int, include_usage: bool) -> list[bytes]:
        """Each SSE event's bytes after the per-request head (``data: {"id":..,"model":..,"choices":``);
        the final entry is ``DONE`` (no head)."""
        key = (chat, n, finish, prompt_tokens, include_usage)
        tails = self._stream.get(key)
        if tails is None:
            tails = self._chat_tails(n, finish, include_usage) if chat else self._completion_tails(n, finish, include_usage)
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
                tails.append(b'[],"usage":' + orjson.dumps(usage) + b',"system_fingerprint":'
                             + orjson.dumps(FINGERPRINT) + b"}\n\n")
            tails.append(DONE)
            if len(self._stream) < 4096:
                self._stream[key] = tails
        return tails

    def _completion_tails(self, n: int, finish: str, include_usage: bool) -> list[bytes]:
        def tail(text: str, fin: str | None, last: bool) -> bytes:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": fin, "stop_reason": None,
                      "prompt_token_ids": None, "token_ids": None}
            out = orjson.dumps([choice])
            if last and not include_usage:
                out += b',"system_fingerprint":' + orjson.dumps(FINGERPRINT)
            return out + b"}\n\n"

        tails = [tail("", None if n else finish, n == 0)]
        tails += [tail(f" tok{i}", finish if i == n - 1 else None, i == n - 1) for i in range(n)]
        return tails

    def _chat_tails(self, n: int, finish: str, include_usage: bool) -> list[bytes]:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        tails = [orjson.dumps([role]) + b',"prompt_token_ids":null,"prompt_text":null}\n\n']
        for i in range(n):
            last = i == n - 1
            choice: dict = {"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None,
                            "finish_reason": finish if last else None}
            if last:
                choice["stop_reason"] = None
            choice["token_ids"] = None
            out = orjson.dumps([choice])
            if last and not include_usage:
                out += b',"system_fingerprint":' + orjson.dumps(FINGERPRINT)
            tails.append(out + b"}\n\n")
        if n == 0:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                      "token_ids": None}
            out = orjson.dumps([choice])
            if not include_usage:
                out += b',"system_fingerprint":' + orjson.dumps(FINGERPRINT)
            tails.append(out + b"}\n\n")
        return tails


class Config:
    def __init__(self, model_names: list[str], chunks: int | None, ttft_s: float, inter_s: float,
                 check_model: bool, max_model_len: int) -> None:
        self.model_names = model_names
        self.model = model_names[0]
        self.chunks = chunks
        self.ttft_s = ttft_s
        self.inter_s = inter_s
        self.check_model = check_model
        self.templates = Templates(self.model)
        self.created = int(time.time())
        self.models_body = orjson.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
             "root": f"/models/{model_names[0]}", "parent": None, "max_model_len": max_model_len,
             "permission": [{"id": "modelperm-0123456789abcdef", "object": "model_permission",
                             "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                             "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                             "allow_fine_tuning": False, "organization": "*", "group": None,
                             "is_blocking": False}]}
            for name in model_names]})
        self.version_body = orjson.dumps({"version": VLLM_VERSION})
        self.counter = 0
        self.pid_hex = b"%08x" % (os.getpid() & 0xFFFFFFFF)
        self._created_sec = 0
        self._created_bytes = b""

    def next_id(self) -> bytes:
        self.counter += 1
        return self.pid_hex + b"%024x" % self.counter  # 32 hex digits, like vLLM's uuid hex

    def created_bytes(self) -> bytes:
        now = int(time.time())
        if now != self._created_sec:
            self._created_sec = now
            self._created_bytes = str(now).encode()
        return self._created_bytes


def _response(status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False) -> bytes:
    return (b"HTTP/1.1 " + _STATUS.get(status, b"%d Status" % status) + b"\r\ncontent-type: " + content_type
            + b"\r\ncontent-length: " + str(len(body)).encode() + (b"\r\nconnection: close" if close else b"")
            + b"\r\n\r\n" + body)


def _error(status: int, message: str, err_type: str, param: str | None = None) -> bytes:
    return _response(status, orjson.dumps({"error": {"message": message, "type": err_type, "param": param,
                                                     "code": status}}))


_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
             b"transfer-encoding: chunked\r\n\r\n")
_CHUNKED_END = b"0\r\n\r\n"


class MockProtocol(asyncio.Protocol):
    __slots__ = ("cfg", "transport", "buf", "busy", "closed", "timer", "loop")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a response is in progress (delayed): later pipelined requests wait
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self._process()

    def _process(self) -> None:
        while not self.busy and not self.closed:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fatal(413)
                return
            head = buf[:end]
            line_end = head.find(b"\r\n")
            request_line = head if line_end < 0 else head[:line_end]
            parts = request_line.split(b" ")
            if len(parts) != 3:
                self._fatal(400)
                return
            method, target = parts[0], parts[1]
            length = 0
            keep_alive = parts[2] != b"HTTP/1.0"
            lower = head.lower()
            pos = lower.find(b"\r\ncontent-length:")
            if pos >= 0:
                stop = lower.find(b"\r\n", pos + 2)
                try:
                    length = int(lower[pos + 17: stop if stop >= 0 else None])
                except ValueError:
                    self._fatal(400)
                    return
            elif b"\r\ntransfer-encoding:" in lower:
                self._fatal(411)
                return
            if length > _MAX_BODY:
                self._fatal(413)
                return
            if b"\r\nconnection: close" in lower:
                keep_alive = False
            body_start = end + 4
            if len(buf) < body_start + length:
                return
            body = buf[body_start: body_start + length]
            self.buf = buf[body_start + length:]
            q = target.find(b"?")
            path = target if q < 0 else target[:q]
            self._handle(method, path, body)
            if not keep_alive and not self.closed:
                if self.busy:
                    self.busy_close = True  # type: ignore[attr-defined]
                else:
                    self.transport.close()
                    self.closed = True
                return

    def _fatal(self, status: int) -> None:
        self.transport.write(_response(status, b"", close=True))
        self.transport.close()
        self.closed = True

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        cfg = self.cfg
        write = self.transport.write
        if path == b"/v1/chat/completions" or path == b"/v1/completions":
            if method != b"POST":
                write(_response(405, b'{"detail":"Method Not Allowed"}'))
                return
            self._generation(path == b"/v1/chat/completions", body)
        elif path == b"/health":
            write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif path == b"/v1/models":
            write(_response(200, cfg.models_body))
        elif path == b"/version":
            write(_response(200, cfg.version_body))
        else:
            write(_response(404, b'{"detail":"Not Found"}'))

    def _generation(self, chat: bool, raw: bytes) -> None:
        cfg = self.cfg
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self.transport.write(_error(400, "Invalid JSON body.", "BadRequestError"))
            return
        model = body.get("model")
        if cfg.check_model and model and model not in cfg.model_names:
            message = f"The model `{model}` does not exist. Valid aliases: {', '.join(cfg.model_names)}."
            self.transport.write(_error(404, message, "NotFoundError", "model"))
            return
        max_tokens = body.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        try:
            # Timing overrides, top level or (through the gateway, which forwards only known fields) in
            # vLLM's own per-request extension dict `vllm_xargs`.
            xargs = body.get("vllm_xargs")
            if isinstance(xargs, dict):
                body = {**body, **xargs}
            chunks = body.get("mock_chunks", cfg.chunks)
            n = int(chunks if chunks is not None else (max_tokens if max_tokens is not None else 16))
            if max_tokens is not None:
                n = min(n, int(max_tokens))
            n = max(n, 0)
            ttft = float(body["mock_ttft_ms"]) / 1000 if "mock_ttft_ms" in body else cfg.ttft_s
            inter = float(body["mock_inter_chunk_ms"]) / 1000 if "mock_inter_chunk_ms" in body else cfg.inter_s
        except (TypeError, ValueError):
            self.transport.write(_error(400, "bad mock_* or max_tokens value", "BadRequestError"))
            return
        finish = "length" if max_tokens is not None and n >= int(max_tokens) else "stop"
        prompt_tokens = prompt_token_count(body)
        rid = (b"chatcmpl-" if chat else b"cmpl-") + cfg.next_id()
        created = cfg.created_bytes()

        if not body.get("stream"):
            a, b, c = cfg.templates.json_parts(chat, n, finish, prompt_tokens)
            data = a + rid + b + created + c
            out = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                   + str(len(data)).encode() + b"\r\n\r\n" + data)
            delay = ttft + inter * max(n - 1, 0)
            if delay > 0:
                self.busy = True
                self.timer = self.loop.call_later(delay, self._finish_delayed, out)
            else:
                self.transport.write(out)
            return

        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        tails = cfg.templates.stream_tails(chat, n, finish, prompt_tokens, include_usage)
        head = (b'data: {"id":"' + rid + (b'","object":"chat.completion.chunk","created":' if chat
                                           else b'","object":"text_completion","created":')
                + created + b',"model":' + orjson.dumps(cfg.model) + b',"choices":')
        if ttft <= 0 and inter <= 0:
            pieces = [_SSE_HEAD]
            for tail in tails:
                event = tail if tail is DONE else head + tail
                pieces.append(b"%x\r\n" % len(event))
                pieces.append(event)
                pieces.append(b"\r\n")
            pieces.append(_CHUNKED_END)
            self.transport.write(b"".join(pieces))
            return
        # timed stream: headers now; the role/empty chunk and the first token after ttft, then one per `inter`
        self.transport.write(_SSE_HEAD)
        self.busy = True
        self.timer = self.loop.call_later(ttft, self._stream_step, head, tails, 0, inter)

    def _stream_step(self, head: bytes, tails: list[bytes], i: int, inter: float) -> None:
        self.timer = None
        if self.closed:
            return
        # tails: opening chunk, tokens (or chat's empty finish chunk), [usage], DONE. The opening chunk goes
        # with the first token; the usage chunk and DONE go at once after the last token.
        last_timed = len(tails) - 2 - (1 if tails[-2].startswith(b'[],"usage"') else 0)
        stop = min(i + (2 if i == 0 else 1), len(tails))
        if stop > last_timed:
            stop = len(tails)
        out = [_chunked(t if t is DONE else head + t) for t in tails[i:stop]]
        if stop >= len(tails):
            out.append(_CHUNKED_END)
            self.transport.write(b"".join(out))
            self._done()
            return
        self.transport.write(b"".join(out))
        self.timer = self.loop.call_later(inter, self._stream_step, head, tails, stop, inter)

    def _finish_delayed(self, out: bytes) -> None:
        self.timer = None
        if self.closed:
            return
        self.transport.write(out)
        self._done()

    def _done(self) -> None:
        self.busy = False
        if getattr(self, "busy_close", False):
            self.transport.close()
            self.closed = True
            return
        if self.buf:
            self._process()


async def serve(host: str, port: int, cfg: Config, ready_file: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: MockProtocol(cfg), host, port, backlog=4096, reuse_address=True)
    if ready_file:
        with open(ready_file, "w") as fh:
            fh.write(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", nargs="+", default=["mock-model"])
    parser.add_argument("--chunks", type=int, default=None, help="tokens per answer (default: max_tokens, else 16)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    parser.add_argument("--inter-chunk-ms", type=float, default=0.0, help="delay between tokens")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--skip-model-check", action="store_true", help="accept any `model` (else 404 as vLLM)")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    cfg = Config(args.served_model_name, args.chunks, args.ttft_ms / 1000, args.inter_chunk_ms / 1000,
                 not args.skip_model_check, args.max_model_len)
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    try:
        asyncio.run(serve(args.host, args.port, cfg))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
