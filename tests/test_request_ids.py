"""Request ids through a real gateway in front of real llama.cpp, with the official SDK: the audit and
usage records are keyed by the gateway's own id, whatever the client sends (a tenant must not reuse
another request's id), and the client's id is kept beside it and echoed as OpenAI does."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import LOCAL_MODEL, ROOT
from tests.support.processes import Server, free_port, start_server

pytestmark = pytest.mark.llamacpp

KEY = "sk-test-request-ids"
HELLO = [{"role": "user", "content": "hello"}]
GATEWAY_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def gateway(llama_cpp: Server, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("request-ids")
    model = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())["models"][0]
    model["backends"][0]["url"] = llama_cpp.url
    (tmp / "overlay.yaml").write_text(yaml.safe_dump({"models": [model]}))
    (tmp / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"name": "ids-team", "environment": "research", "api_key_hashes": [hash_key(KEY)]}]}))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp / 'overlay.yaml'}",
           "GATEWAY_TENANTS": str(tmp / "tenants.yaml"), "GATEWAY_AUDIT_SINK": str(tmp / "audit.jsonl")}
    server = start_server("ids-gateway", [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port,
                          "/ready", log_dir, env)
    server.wait_ready(60)
    server.audit_path = tmp / "audit.jsonl"  # type: ignore[attr-defined]
    yield server
    server.stop()


def _chat(gateway: Server, headers: dict[str, str]) -> httpx.Headers:
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0)
    raw = api.chat.completions.with_raw_response.create(model=LOCAL_MODEL, messages=HELLO, max_tokens=2,
                                                        extra_headers=headers)
    raw.parse()
    return raw.headers


def _records(gateway: Server, request_id: str, count: int = 2) -> list[dict]:
    """The decision and usage records of one request id (they reach the file in batches)."""
    deadline = time.monotonic() + 10
    while True:
        path: Path = gateway.audit_path  # type: ignore[attr-defined]
        lines = path.read_text().splitlines() if path.exists() else []
        found = [r for r in map(json.loads, lines) if r["request_id"] == request_id]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_a_clients_request_id_never_becomes_the_audit_or_usage_id(gateway: Server) -> None:
    first = _chat(gateway, {"x-request-id": "someone-elses-id"})
    second = _chat(gateway, {"x-request-id": "someone-elses-id"})  # reused, as a tenant could
    ids = [first["x-request-id"], second["x-request-id"]]
    assert all(GATEWAY_ID.fullmatch(i) for i in ids) and ids[0] != ids[1]
    assert first["x-client-request-id"] == second["x-client-request-id"] == "someone-elses-id"
    for request_id in ids:
        records = _records(gateway, request_id)
        assert sorted(r.get("type", "decision") for r in records) == ["decision", "usage"]
    assert _records(gateway, "someone-elses-id", 1) == []


def test_the_clients_id_is_kept_beside_the_gateways_and_echoed(gateway: Server) -> None:
    headers = _chat(gateway, {"x-client-request-id": "trace-42/a b"})
    request_id = headers["x-request-id"]
    assert GATEWAY_ID.fullmatch(request_id) and headers["x-client-request-id"] == "trace-42/a b"
    records = _records(gateway, request_id)
    assert [r.get("client_request_id") for r in records] == ["trace-42/a b", "trace-42/a b"]  # decision, usage
    access = [json.loads(line.split("gateway.access: ", 1)[1]) for line in gateway.log_lines_with(request_id)
              if "gateway.access: " in line]
    assert [(a["request_id"], a["client_request_id"], a["path"]) for a in access] == [
        (request_id, "trace-42/a b", "/v1/chat/completions")]


@pytest.mark.parametrize("value", ["é-not-ascii".encode(), b"x" * 513, b"tab\there"])
def test_an_unusable_client_id_is_dropped_not_altered(gateway: Server, value: bytes) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers=[(b"authorization", f"Bearer {KEY}".encode()),
                                                               (b"x-client-request-id", value)])
    assert response.status_code == 200 and GATEWAY_ID.fullmatch(response.headers["x-request-id"])
    assert "x-client-request-id" not in response.headers


def test_openais_header_wins_over_a_legacy_x_request_id(gateway: Server) -> None:
    response = httpx.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {KEY}",
                                                              "x-request-id": "legacy", "x-client-request-id": "mine"})
    assert response.headers["x-client-request-id"] == "mine"
    assert GATEWAY_ID.fullmatch(response.headers["x-request-id"])
