"""A fast HTTP/1.1 load generator for OpenAI-compatible chat/completions/responses endpoints, with JSON results.

Closed loop (``--mode closed --concurrency N``): N keep-alive connections, each sends its next request as
soon as the previous answer is complete. Open loop (``--mode open --rate R``): requests are due at fixed
(``--arrival uniform``) or Poisson (``--arrival poisson``) times whatever the target does; each goes out on
an idle keep-alive connection, or a new one (up to ``--max-connections``). Open-loop latency counts from
the time a request was *due*, so a slow target cannot hide behind a slow generator (no coordinated
omission); the service time from the actual send is reported too.

Speed: a minimal HTTP/1.1 client on ``asyncio.Protocol`` (uvloop when installed), request bytes built
once, no JSON parsing of answers except until a stream's first token. ``--workers K`` runs K processes
(concurrency and rate split between them) and merges their samples.

Self-saturation: the generator reports ``generator_saturated`` with its evidence: its CPU use
(``time.process_time()`` over wall time, per worker), its event-loop lag (a 5 ms ticker's lateness), and
in open loop the achieved send rate vs the target and the dispatch lag behind the schedule.

    python load_tests/loadgen.py --url http://127.0.0.1:8080 --model M --mode closed --concurrency 16 \\
        --duration 10 [--stream] [--max-tokens 16] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import random
import socket
import sys
import time
from array import array
from typing import Any
from urllib.parse import urlsplit

import orjson

CPU_SATURATION = 0.90  # a worker using >= 90% of a core is the bottleneck, or close to it
LOOP_LAG_P99_MS = 5.0
OPEN_RATE_SHORTFALL = 0.95
OPEN_DISPATCH_LAG_P99_MS = 10.0


class ResponseError(Exception):
    pass


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.reset()

    def reset(self) -> None:
        self.buf = bytearray()
        self.state = 0  # 0 head, 1 content-length body, 2 chunked size line, 3 chunk data, 4 trailer
        self.status = 0
        self.remaining = 0
        self.keep_alive = True
        self.body = bytearray()  # non-streamed body / SSE carry-over
        self.events = 0  # SSE data events, [DONE] excluded
        self.done_seen = False
        self.first_event_t = 0.0
        self.first_token_t = 0.0
        self.last_event_t = 0.0
        self.gaps: list[float] = []

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ResponseError("connection closed" if exc is None else f"connection lost: {exc}"))

    def send(self, data: bytes) -> asyncio.Future:
        self.reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def _finish(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        now = time.perf_counter()
        self.buf += data
        buf = self.buf
        while True:
            state = self.state
            if state == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                try:
                    self.status = int(head[9:12])
                except ValueError:
                    self._fail("bad status line")
                    return
                if b"\r\nconnection: close" in head:
                    self.keep_alive = False
                if b"\r\ntransfer-encoding: chunked" in head:
                    self.state = 2
                else:
                    pos = head.find(b"\r\ncontent-length:")
                    if pos < 0:
                        self._fail("no content-length and not chunked")
                        return
                    stop = head.find(b"\r\n", pos + 2)
                    self.remaining = int(head[pos + 17: stop if stop >= 0 else None])
                    self.state = 1
            elif state == 1:
                if len(buf) < self.remaining:
                    return
                self.body += buf[: self.remaining]
                del buf[: self.remaining]
                self.state = 0
                self._finish()
                return
            elif state == 2:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";")[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = 4
                else:
                    self.remaining = size
                    self.state = 3
            elif state == 3:
                if len(buf) < self.remaining + 2:
                    return
                piece = bytes(buf[: self.remaining])
                del buf[: self.remaining + 2]
                self.state = 2
                if self.stream and self.status == 200:
                    self._sse(piece, now)
                else:
                    self.body += piece
            else:  # trailer: expect the empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self.state = 0
                    self._finish()
                    return

    def _sse(self, piece: bytes, now: float) -> None:
        body = self.body
        body += piece
        start = 0
        while True:
            end = body.find(b"\n\n", start)
            if end < 0:
                break
            event = body[start:end]
            start = end + 2
            kind = b""
            if event.startswith(b"event: "):  # the Responses API: named events, no [DONE]
                newline = event.find(b"\n")
                kind, event = event[7:newline], event[newline + 1:]
                if kind in (b"response.completed", b"response.incomplete"):
                    self.done_seen = True
            if not event.startswith(b"data: "):
                continue
            if event == b"data: [DONE]":
                self.done_seen = True
                continue
            self.events += 1
            if self.last_event_t:
                self.gaps.append(now - self.last_event_t)
            else:
                self.first_event_t = now
            self.last_event_t = now
            if kind:
                if kind == b"response.output_text.delta" and not self.first_token_t:
                    self.first_token_t = now
                continue
            if not self.first_token_t:
                try:
                    choice = orjson.loads(bytes(event[6:]))["choices"]
                    if choice:
                        c = choice[0]
                        text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                        if text:
                            self.first_token_t = now
                except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
                    pass
        del body[:start]

    def _fail(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ResponseError(why))
        self.transport.close()


def build_request(url: str, model: str, api_key: str | None, endpoint: str, stream: bool, max_tokens: int,
                  extra: dict) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    base = parts.path.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    if endpoint == "chat":
        path = base + "/chat/completions"
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello to the benchmark."}]}
    elif endpoint == "responses":  # what the SDK sends: store (the default) and no stream options
        path = base + "/responses"
        body = {"model": model, "input": "Say hello to the benchmark.", "max_output_tokens": max_tokens}
    else:
        path = base + "/completions"
        body = {"model": model, "prompt": "Say hello to the benchmark."}
    if endpoint != "responses":
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        if endpoint != "responses":
            body["stream_options"] = {"include_usage": True}
    body.update(extra)
    data = orjson.dumps(body)
    head = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            f"accept: {'text/event-stream' if stream else 'application/json'}\r\n"
            + (f"authorization: Bearer {api_key}\r\n" if api_key else "")
            + f"content-length: {len(data)}\r\n\r\n")
    return host, port, head.encode() + data


class Samples:
    def __init__(self) -> None:
        self.latency = array("d")  # s, from due (open) or send (closed) to last byte
        self.service = array("d")  # s, from actual send to last byte
        self.ttft = array("d")
        self.first_event = array("d")
        self.gaps = array("d")
        self.events = array("l")
        self.dispatch_lag = array("d")
        self.loop_lag = array("d")
        self.ok = 0
        self.sent = 0
        self.errors: dict[str, int] = {}
        self.first_send = math.inf
        self.last_send = 0.0
        self.last_done = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _connect(host: str, port: int, stream: bool) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(stream), host, port)
    return conn


async def _one(conn: Conn, request: bytes, due: float, s: Samples, stream: bool, expect_events: int | None) -> bool:
    """Send one request on conn; record it. Returns whether conn can be reused."""
    sent = time.perf_counter()
    s.sent += 1
    if sent < s.first_send:
        s.first_send = sent
    s.last_send = sent
    try:
        await conn.send(request)
    except ResponseError as exc:
        s.error(f"transport: {exc}")
        return False
    except OSError as exc:
        s.error(f"transport: {type(exc).__name__}")
        return False
    end = time.perf_counter()
    s.last_done = end
    if conn.status != 200:
        s.error(f"http_{conn.status}")
        return conn.keep_alive and not conn.closed
    if stream:
        if not conn.done_seen:
            s.error("stream_without_done")
            return conn.keep_alive and not conn.closed
        if expect_events is not None and conn.events != expect_events:
            s.error("wrong_event_count")
        s.events.append(conn.events)
        if conn.first_token_t:
            s.ttft.append(conn.first_token_t - due)
        if conn.first_event_t:
            s.first_event.append(conn.first_event_t - due)
        s.gaps.extend(conn.gaps)
    s.ok += 1
    s.latency.append(end - due)
    s.service.append(end - sent)
    return conn.keep_alive and not conn.closed


async def _loop_lag_monitor(s: Samples, stop: asyncio.Event) -> None:
    period = 0.005
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(period)
        s.loop_lag.append(max(0.0, time.perf_counter() - t - period))


async def run_closed(a: argparse.Namespace, concurrency: int, requests: int | None, s: Samples) -> None:
    host, port, request = build_request(a.url, a.model, a.api_key, a.endpoint, a.stream, a.max_tokens, a.extra)
    deadline = time.perf_counter() + a.duration if requests is None else math.inf
    budget = [requests if requests is not None else -1]

    async def user() -> None:
        conn: Conn | None = None
        while True:
            if budget[0] == 0 or time.perf_counter() >= deadline:
                break
            if budget[0] > 0:
                budget[0] -= 1
            if conn is None or conn.closed:
                try:
                    conn = await _connect(host, port, a.stream)
                except OSError as exc:
                    s.error(f"connect: {type(exc).__name__}")
                    await asyncio.sleep(0.05)
                    continue
            if not await _one(conn, request, time.perf_counter(), s, a.stream, a.expect_events):
                conn.transport.close()
                conn = None
        if conn is not None:
            conn.transport.close()

    await asyncio.gather(*(user() for _ in range(concurrency)))


async def run_open(a: argparse.Namespace, rate: float, requests: int | None, max_conns: int, seed: int,
                   s: Samples) -> None:
    host, port, request = build_request(a.url, a.model, a.api_key, a.endpoint, a.stream, a.max_tokens, a.extra)
    rng = random.Random(seed)
    idle: list[Conn] = []
    open_count = [0]
    conn_free = asyncio.Condition()
    tasks: set[asyncio.Task] = set()

    async def fire(due: float) -> None:
        conn = None
        while conn is None:
            while idle:
                c = idle.pop()
                if not c.closed:
                    conn = c
                    break
            if conn is not None:
                break
            if open_count[0] < max_conns:
                open_count[0] += 1
                try:
                    conn = await _connect(host, port, a.stream)
                except OSError as exc:
                    open_count[0] -= 1
                    s.error(f"connect: {type(exc).__name__}")
                    return
                break
            async with conn_free:
                await conn_free.wait()
        reuse = await _one(conn, request, due, s, a.stream, a.expect_events)
        if reuse:
            idle.append(conn)
        else:
            conn.transport.close()
            open_count[0] -= 1
        async with conn_free:
            conn_free.notify()

    start = time.perf_counter() + 0.01
    end = start + a.duration if requests is None else math.inf
    due = start
    n = 0
    while (requests is None or n < requests) and due < end:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        s.dispatch_lag.append(max(0.0, time.perf_counter() - due))
        task = asyncio.ensure_future(fire(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        due += rng.expovariate(rate) if a.arrival == "poisson" else 1.0 / rate
    if tasks:
        await asyncio.gather(*list(tasks))
    for c in idle:
        c.transport.close()


def worker(a: argparse.Namespace, index: int, share: float, requests: int | None) -> dict:
    """Run this process's part of the load; return its raw samples and CPU use."""
    if not a.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    s = Samples()

    async def main() -> None:
        stop = asyncio.Event()
        monitor = asyncio.ensure_future(_loop_lag_monitor(s, stop))
        if a.mode == "closed":
            await run_closed(a, max(1, round(a.concurrency * share)), requests, s)
        else:
            await run_open(a, a.rate * share, requests, max(1, round(a.max_connections * share)),
                           a.seed + index, s)
        stop.set()
        await monitor

    wall0, cpu0 = time.perf_counter(), time.process_time()
    asyncio.run(main())
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"latency": s.latency.tobytes(), "service": s.service.tobytes(), "ttft": s.ttft.tobytes(),
            "first_event": s.first_event.tobytes(), "gaps": s.gaps.tobytes(), "events": s.events.tolist(),
            "dispatch_lag": s.dispatch_lag.tobytes(), "loop_lag": s.loop_lag.tobytes(), "ok": s.ok,
            "sent": s.sent, "errors": s.errors, "first_send": s.first_send, "last_send": s.last_send,
            "last_done": s.last_done, "wall_s": wall, "cpu_s": cpu}


def _worker_entry(args: tuple) -> dict:
    return worker(*args)


def pct(values: array | list, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    out = {}
    for q in qs:
        k = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
        out[f"p{q:g}"] = round(ordered[k] * 1000, 3)
    out["mean"] = round(sum(ordered) / len(ordered) * 1000, 3)
    out["max"] = round(ordered[-1] * 1000, 3)
    return out


def merge(a: argparse.Namespace, parts: list[dict]) -> dict:
    def cat(key: str) -> array:
        out = array("d")
        for p in parts:
            out.frombytes(p[key])
        return out

    latency, ttft, gaps = cat("latency"), cat("ttft"), cat("gaps")
    events = [e for p in parts for e in p["events"]]
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    sent = sum(p["sent"] for p in parts)
    ok = sum(p["ok"] for p in parts)
    first_send = min(p["first_send"] for p in parts) if sent else 0.0
    last_done = max(p["last_done"] for p in parts) if sent else 0.0
    last_send = max(p["last_send"] for p in parts) if sent else 0.0
    span = max(last_done - first_send, 1e-9)
    dispatch_lag, loop_lag = cat("dispatch_lag"), cat("loop_lag")
    cpu_util = [round(p["cpu_s"] / max(p["wall_s"], 1e-9), 3) for p in parts]
    cpu_ms_per_req = round(sum(p["cpu_s"] for p in parts) / max(sent, 1) * 1000, 4)
    loop_lag_pct = pct(loop_lag)
    reasons = []
    if max(cpu_util, default=0) >= CPU_SATURATION:
        reasons.append(f"a worker used {max(cpu_util):.0%} of a core (>= {CPU_SATURATION:.0%})")
    if loop_lag_pct and loop_lag_pct["p99"] > LOOP_LAG_P99_MS:
        reasons.append(f"event-loop lag p99 {loop_lag_pct['p99']} ms > {LOOP_LAG_P99_MS} ms")
    result: dict[str, Any] = {
        "target": {"url": a.url, "model": a.model, "endpoint": a.endpoint, "stream": a.stream,
                   "max_tokens": a.max_tokens, "extra_body": a.extra},
        "mode": a.mode, "workers": a.workers,
        "concurrency": a.concurrency if a.mode == "closed" else None,
        "rate_target": a.rate if a.mode == "open" else None,
        "arrival": a.arrival if a.mode == "open" else None,
        "requests": sent, "ok": ok, "errors": sum(errors.values()), "error_kinds": errors,
        "duration_s": round(span, 4),
        "throughput_rps": round(ok / span, 2),
        "latency_ms": pct(latency),
        "service_ms": pct(cat("service")),
    }
    if a.stream:
        total_events = sum(events)
        result["stream"] = {
            "ttft_ms": pct(ttft), "first_event_ms": pct(cat("first_event")), "inter_chunk_ms": pct(gaps),
            "events_total": total_events, "events_per_request_min": min(events, default=0),
            "events_per_request_max": max(events, default=0), "chunks_per_s": round(total_events / span, 1),
        }
    evidence: dict[str, Any] = {"cpu_utilisation_per_worker": cpu_util, "cpu_ms_per_request": cpu_ms_per_req,
                                "loop_lag_ms": loop_lag_pct}
    if a.mode == "open":
        send_span = max(last_send - first_send, 1e-9)
        achieved = (sent - 1) / send_span if sent > 1 else 0.0
        lag = pct(dispatch_lag)
        evidence["achieved_send_rate"] = round(achieved, 2)
        evidence["dispatch_lag_ms"] = lag
        if sent > 1 and achieved < OPEN_RATE_SHORTFALL * a.rate:
            reasons.append(f"sent {achieved:.0f}/s < {OPEN_RATE_SHORTFALL:.0%} of target {a.rate:g}/s")
        if lag and lag["p99"] > OPEN_DISPATCH_LAG_P99_MS:
            reasons.append(f"dispatch lag p99 {lag['p99']} ms > {OPEN_DISPATCH_LAG_P99_MS} ms")
    evidence["reasons"] = reasons
    result["generator_saturated"] = bool(reasons)
    result["generator"] = evidence
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080 (…/v1 is added)")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=("chat", "completions", "responses"), default="chat")
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--rate", type=float, default=100.0, help="open loop: requests/s")
    p.add_argument("--arrival", choices=("poisson", "uniform"), default="poisson")
    p.add_argument("--max-connections", type=int, default=1024, help="open loop: connection cap")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, default=None, help="seconds of load (default 10)")
    g.add_argument("--requests", type=int, default=None, help="exact number of requests")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds of unrecorded load first (closed loop)")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--extra-body", default="{}", help="JSON merged into each request body (e.g. mock_chunks)")
    p.add_argument("--expect-events", type=int, default=None, help="count a stream with another count an error")
    p.add_argument("--workers", type=int, default=1, help="processes; load is split between them")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON here (else stdout)")
    a = p.parse_args(argv)
    if a.duration is None and a.requests is None:
        a.duration = 10.0
    a.extra = orjson.loads(a.extra_body)
    return a


def run(a: argparse.Namespace) -> dict:
    if a.warmup > 0:
        saved = (a.duration, a.requests)
        a.duration, a.requests = a.warmup, None
        worker(a, 0, 1.0, None) if a.workers == 1 else _pool(a)
        a.duration, a.requests = saved
    parts = [worker(a, 0, 1.0, a.requests)] if a.workers == 1 else _pool(a)
    return merge(a, parts)


def _pool(a: argparse.Namespace) -> list[dict]:
    k = a.workers
    shares = [1.0 / k] * k
    reqs: list[int | None] = [None] * k
    if a.requests is not None:
        base, extra = divmod(a.requests, k)
        reqs = [base + (1 if i < extra else 0) for i in range(k)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(k) as pool:
        return pool.map(_worker_entry, [(a, i, shares[i], reqs[i]) for i in range(k)])


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    result = run(a)
    data = orjson.dumps(result, option=orjson.OPT_INDENT_2)
    if a.out:
        with open(a.out, "wb") as fh:
            fh.write(data + b"\n")
    else:
        sys.stdout.buffer.write(data + b"\n")
    summary = (f"{result['requests']} requests, {result['errors']} errors, {result['throughput_rps']} rps, "
               f"p50 {result['latency_ms'] and result['latency_ms']['p50']} ms, "
               f"p99 {result['latency_ms'] and result['latency_ms']['p99']} ms, "
               f"generator_saturated={result['generator_saturated']}")
    print(summary, file=sys.stderr)


if __name__ == "__main__":
    main()
