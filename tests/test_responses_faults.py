"""`/v1/responses` when things break after the answer started, which real engines and stores do not do on
demand: an engine cut off or failing mid-stream (the fault-injecting fake of tests/support/fault_upstream.py,
vLLM 0.32's exact wire format), and a response store that cannot save.

What must hold: the client gets a whole event stream that ends in `response.failed` with the reason (never
a torn stream, never a `response.completed` for a response that could not be stored), and the gateway's
own bookkeeping (usage record, in-flight count) runs as for any chat.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import ROOT
from tests.support.processes import Server, free_port, start_server
from tests.support.responses import sse

KEY = "sk-test-responses-faults"
CHAT_MODEL = "llama-2-7b-chat"  # native template: the engine's chat endpoint
RENDERED_MODEL = "vicuna-7b-v1.5"  # rendered by the gateway: the engine's completions endpoint


def _overlay(upstream: Server, path: Path) -> None:
    path.write_text(yaml.safe_dump({"models": [
        {"id": model, "backends": [{"id": f"fault-{model}", "engine": "vllm", "engine_version": "0.32.0",
                                    "url": upstream.url, "role": "primary", "served_model_name": "fault-model"}]}
        for model in (CHAT_MODEL, RENDERED_MODEL)]}))


@pytest.fixture(scope="module")
def upstream(log_dir: Path) -> Iterator[Server]:
    port = free_port()
    server = start_server("fault-responses", [sys.executable, "-m", "tests.support.fault_upstream", "--port",
                                              str(port), "--served-model-name", "fault-model"],
                          port, "/health", log_dir)
    server.wait_ready(30)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: Server, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("responses-faults")
    _overlay(upstream, workdir / "overlay.yaml")
    (workdir / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"name": "ops", "environment": "research", "admin": True, "api_key_hashes": [hash_key(KEY)]}]}))
    port = free_port()
    server = start_server("gateway-responses-faults", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                          port, "/ready", log_dir, {
                              "GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{workdir / 'overlay.yaml'}",
                              "GATEWAY_TENANTS": str(workdir / "tenants.yaml"),
                              "GATEWAY_AUDIT_SINK": str(workdir / "audit.jsonl"),
                              "GATEWAY_PRIMARY_IDLE_TIMEOUT_S": "1",
                              # every test here breaks streams on purpose: no ejection between them
                              "GATEWAY_OUTLIER_CONSECUTIVE_ERRORS": "1000"})
    server.wait_ready(60)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _reset(upstream: Server) -> Iterator[None]:
    httpx.post(upstream.url + "/control/reset").raise_for_status()
    yield
    httpx.post(upstream.url + "/control/reset").raise_for_status()


def _mode(upstream: Server, **body: object) -> None:
    httpx.post(upstream.url + "/control/mode", json=body).raise_for_status()


def _stream(gateway: Server, model: str) -> list[tuple[str, dict]]:
    with httpx.stream("POST", gateway.url + "/v1/responses", headers={"authorization": f"Bearer {KEY}"},
                      json={"model": model, "input": "hi", "max_output_tokens": 16, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        return sse(response.read().decode())  # read whole: a torn stream would raise here


@pytest.mark.parametrize(("model", "fault", "reason"), [
    *[(model, fault, reason) for model in (CHAT_MODEL, RENDERED_MODEL) for fault, reason in (
        ({"mode": "close_mid_stream", "after": 3}, "disconnected in the middle of the answer"),
        ({"mode": "hang_mid_stream", "after": 3}, "stopped sending in the middle of the answer"))],
    # vLLM's own in-stream error event, on both paths (the rendered one goes through ChatFromCompletion)
    *[(model, {"mode": "error_mid_stream", "after": 3, "message": "EngineCore died"}, "EngineCore died")
      for model in (CHAT_MODEL, RENDERED_MODEL)],
])
def test_a_failure_after_the_first_byte_ends_in_response_failed(gateway: Server, upstream: Server, model: str,
                                                               fault: dict, reason: str) -> None:
    _mode(upstream, **fault)
    events = _stream(gateway, model)
    kinds = [kind for kind, _ in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.failed" and "response.completed" not in kinds
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    failed = events[-1][1]["response"]
    assert failed["id"] == events[0][1]["response"]["id"] and failed["status"] == "failed"
    assert failed["error"]["code"] == "server_error" and reason in failed["error"]["message"]
    partial = "".join(data["delta"] for kind, data in events if kind == "response.output_text.delta")
    assert partial.strip().startswith("tok0") and failed["output"][0]["content"][0]["text"] == partial
    stored = httpx.get(f"{gateway.url}/v1/responses/{failed['id']}", headers={"authorization": f"Bearer {KEY}"})
    assert stored.json()["status"] == "failed"  # what the client was told, retrievable


def test_the_stream_helper_and_the_agents_sdk_see_the_failure(gateway: Server, upstream: Server) -> None:
    from agents import Agent, OpenAIResponsesModel, Runner, set_tracing_disabled
    from agents.exceptions import ModelBehaviorError

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    _mode(upstream, mode="close_mid_stream", after=2)
    with client.responses.stream(model=CHAT_MODEL, input="hi") as stream:
        kinds = [event.type for event in stream]
        with pytest.raises(RuntimeError, match="response.completed"):
            stream.get_final_response()
    assert kinds[-1] == "response.failed"

    set_tracing_disabled(True)
    agent = Agent(name="a", model=OpenAIResponsesModel(
        model=CHAT_MODEL, openai_client=openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)))

    async def run_streamed() -> None:
        _mode(upstream, mode="close_mid_stream", after=2)
        result = Runner.run_streamed(agent, "hi")
        async for _ in result.stream_events():
            pass

    with pytest.raises(ModelBehaviorError, match="response.failed"):
        asyncio.run(run_streamed())


class _DownStore:
    """A response store whose database is unreachable: every call fails, as a real client's would."""

    def expect(self) -> None:
        return None

    async def save(self, item, expires_at, expected=None):  # noqa: ANN001
        raise ConnectionRefusedError("database unreachable")

    async def get(self, tenant, response_id):  # noqa: ANN001
        raise ConnectionRefusedError("database unreachable")

    async def delete(self, tenant, response_id):  # noqa: ANN001
        raise ConnectionRefusedError("database unreachable")

    async def purge_expired(self, now, batch=5000):  # noqa: ANN001
        raise ConnectionRefusedError("database unreachable")


def test_a_response_that_cannot_be_stored_is_never_acknowledged(upstream: Server, tmp_path: Path) -> None:
    """In-process (the store is swapped for one that is down): the JSON answer is a 503, the stream ends in
    response.failed; `store: false` still works; the answer's bookkeeping runs either way."""
    from gateway.api.app import create_app
    from gateway.lifecycle import LIFECYCLE
    from gateway.settings import Settings

    _overlay(upstream, tmp_path / "overlay.yaml")
    settings = Settings(registry=f"{ROOT / 'model_registry.yaml'},{tmp_path / 'overlay.yaml'}", tenants=None,
                        audit_sink=str(tmp_path / "audit.jsonl"), health_probe_interval_s=3600, redis_url=None)

    async def run() -> None:
        app = create_app(settings)
        inbox: asyncio.Queue = asyncio.Queue()
        outbox: asyncio.Queue = asyncio.Queue()
        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                           inbox.get, outbox.put))
        await inbox.put({"type": "lifespan.startup"})
        assert (await asyncio.wait_for(outbox.get(), 30))["type"] == "lifespan.startup.complete"
        state = app.app.app.state.gateway
        state.responses = _DownStore()
        body = {"model": CHAT_MODEL, "input": "hi", "max_output_tokens": 16}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                     headers={"authorization": "Bearer anything"}, timeout=30) as http:
            answer = await http.post("/v1/responses", json=body)
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "store_unavailable"
            streamed = sse((await http.post("/v1/responses", json={**body, "stream": True})).text)
            assert streamed[-1][0] == "response.failed" and "could not be stored" in \
                streamed[-1][1]["response"]["error"]["message"]
            unstored = await http.post("/v1/responses", json={**body, "store": False})
            assert unstored.status_code == 200 and unstored.json()["store"] is False  # answered, kept nowhere
            for unreadable in (await http.post("/v1/responses", json={**body, "previous_response_id": "resp_1"}),
                               await http.get("/v1/responses/resp_1"), await http.delete("/v1/responses/resp_1")):
                assert unreadable.status_code == 503 and unreadable.json()["error"]["code"] == "store_unavailable"
        assert LIFECYCLE.inflight == 0  # every answer was reported, the refused ones included
        state.audit.wait_written(5)
        usage = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()
                 if '"type":"usage"' in line]
        assert [record["endpoint"] for record in usage] == ["responses"] * 3
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(outbox.get(), 30))["type"] == "lifespan.shutdown.complete"
        await lifespan

    asyncio.run(run())
