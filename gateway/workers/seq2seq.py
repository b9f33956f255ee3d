"""Our OpenAI-compatible CPU server for seq2seq models (FLAN-T5): no vLLM version serves T5, and
llama.cpp's server cannot run its encoder.

    python -m gateway.workers.seq2seq --model DIR --served-model-name NAME --port P \
        [--host 127.0.0.1] [--max-concurrency 2] [--threads T] [--dtype float32|bfloat16] \
        [--max-new-tokens 512] [--prompt-format flan-t5] [--api-key KEY] [--shutdown-timeout S]

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or
not, vLLM's wire format), POST /tokenize (vLLM's). The model loads before the port opens, so /health
answering means ready. At most --max-concurrency generations run at once; beyond that a request gets
429 with Retry-After at once, never a queue that grows without bound. With --api-key (or the
WORKER_API_KEY variable) every route but /health wants `Authorization: Bearer KEY`, as vLLM's
--api-key: only the gateway may call it. On SIGTERM it stops taking connections and lets the
generations in flight finish for at most --shutdown-timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import torch
import transformers
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import GatewayError, model_not_found
from gateway.prompts.formats import FORMATS
from gateway.workers.seq2seq_engine import DTYPES, End, Engine, Generation
from gateway.workers.seq2seq_requests import Job, parse_chat, parse_completion
from gateway.workers.seq2seq_responses import DONE, Reply

log = logging.getLogger("gateway.workers.seq2seq")

RETRY_AFTER_S = 1  # a generation slot frees up within seconds on these small models


def create_app(engine: Engine, served_name: str, max_new_tokens: int = 512,
               prompt_format: str = "flan-t5") -> FastAPI:
    app = FastAPI(title="seq2seq worker", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [{
            "id": served_name, "object": "model", "created": created, "owned_by": "llm-gateway",
            "root": served_name, "parent": None, "max_model_len": engine.max_model_len}]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = await _json_object(request)
        if body.get("model") not in (None, served_name):
            raise model_not_found(str(body.get("model")))
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise GatewayError(400, "Invalid 'prompt': expected a string.", param="prompt", code="invalid_type")
        tokens = await asyncio.to_thread(engine.encode, prompt)
        return _json({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        # Tokenizing runs off the event loop: a huge prompt must not stall other clients' streams.
        job = await asyncio.to_thread(parse_completion, await request.body(), served_name, engine, max_new_tokens)
        return await _serve(engine, job, served_name, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        job = await asyncio.to_thread(parse_chat, await request.body(), served_name, engine, max_new_tokens,
                                      prompt_format)
        return await _serve(engine, job, served_name, request)

    _install_error_handlers(app)
    return app


async def _serve(engine: Engine, job: Job, served_name: str, request: Request) -> Response:
    generation = engine.try_start(job.prompts, job.n, job.params)
    if generation is None:
        raise GatewayError(
            429, f"The server is busy: all {engine.max_concurrency} generation slots are taken. "
            f"Retry after {RETRY_AFTER_S}s.", type="rate_limit_error", code="engine_overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)})
    rows = len(job.prompts) * job.n
    echo = [text for text in job.prompt_texts for _ in range(job.n)] if job.echo else None
    reply = Reply(job.chat, served_name, rows, sum(len(p) for p in job.prompts), echo)
    if job.stream:
        return _GenerationStream(generation, _stream(job, generation, reply), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    return await _collect(generation, reply, request.receive)


async def _collect(generation: Generation, reply: Reply, receive: Receive) -> Response:
    # Deltas arrive every step, so the wait below never idles long enough to notice a client that
    # hung up; a watcher on the ASGI channel does, and frees the slot at the next decoding step.
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, generation))
    try:
        while True:
            item = await generation.queue.get()
            if isinstance(item, End):
                if item.error is not None:
                    raise _internal(item.error)
                return _json(reply.body())
            for delta in item:
                reply.add(delta)
    finally:
        watcher.cancel()
        generation.cancel.set()  # no-op once generation ended; stops it if this task was cancelled


async def _cancel_on_disconnect(receive: Receive, generation: Generation) -> None:
    # The body has been read, so the next ASGI message can only be the client going away.
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel.set()


async def _stream(job: Job, generation: Generation, reply: Reply) -> AsyncIterator[bytes]:
    # A client disconnect cancels this generator (Starlette listens for http.disconnect): the
    # `finally` then sets the cancel flag, and `generate` stops at its next step.
    try:
        if job.chat:
            yield reply.role_chunks()
        while True:
            item = await generation.queue.get()
            if isinstance(item, End):
                if item.error is not None:  # as vLLM: an error event, then [DONE], no usage
                    yield reply.error_chunk(_internal(item.error)) + DONE
                    return
                break
            yield reply.chunks(item)
        if job.include_usage:
            yield reply.usage_chunk()
        yield DONE
    finally:
        generation.cancel.set()


class _GenerationStream(StreamingResponse):
    """Cancels its generation however the response ends, even if the body iterator never started
    (a client gone before the first chunk), which the iterator's own `finally` cannot see."""

    def __init__(self, generation: Generation, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.cancel.set()


def _internal(error: BaseException) -> GatewayError:
    return GatewayError(500, f"The model failed while generating ({type(error).__name__}).",
                        type="server_error", code="generation_failed")


async def _json_object(request: Request) -> dict[str, object]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    return body


def _json(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")


class RequireKey:
    """Pure ASGI: 401 (OpenAI's error shape) for any request but /health without the bearer key."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = GatewayError(401, "Missing or wrong API key.", code="invalid_api_key")
                await _json(error.body(), 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return _json(exc.body(), exc.status, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _json(GatewayError(exc.status_code, message, type=kind).body(), exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        error = GatewayError(500, "The worker had an internal error.", type="server_error")
        return _json(error.body(), 500)

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    # The docstring's first paragraph (its first line alone stops mid-sentence).
    description = " ".join(__doc__.split("\n\n", 1)[0].split())
    parser = argparse.ArgumentParser(prog="python -m gateway.workers.seq2seq", description=description)
    parser.add_argument("--model", required=True, type=Path, help="checkpoint directory (config, weights, tokenizer)")
    parser.add_argument("--served-model-name", required=True, help="the `model` clients must send")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-concurrency", type=int, default=2, help="generations at once; more get 429")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="never float16 for T5")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens accepted")
    parser.add_argument("--prompt-format", default="flan-t5", help="gateway prompt format id for chat")
    parser.add_argument("--api-key", default=os.environ.get("WORKER_API_KEY"),
                        help="required bearer key on every route but /health (default: $WORKER_API_KEY)")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="on SIGTERM, seconds the generations in flight may take to finish")
    args = parser.parse_args(argv)
    if args.max_concurrency < 1 or args.max_new_tokens < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--max-concurrency, --max-new-tokens and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.prompt_format not in FORMATS:
        raise SystemExit(f"unknown --prompt-format {args.prompt_format!r}; known: {', '.join(FORMATS)}")
    # The tokenizer runs on the event loop (short prompts): no Rust thread pool competing with torch.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()  # per-request generate() warnings would flood the log
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    engine = Engine(args.model, args.dtype, args.max_concurrency)
    engine.warm_up()
    log.info("loaded %s as %r in %.2fs (%s, %d torch threads, max input %d tokens)", args.model,
             args.served_model_name, time.monotonic() - started, args.dtype, torch.get_num_threads(),
             engine.max_model_len)
    app: ASGIApp = create_app(engine, args.served_model_name, args.max_new_tokens, args.prompt_format)
    if args.api_key:
        app = RequireKey(app, args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.shutdown_timeout)


if __name__ == "__main__":
    main()
