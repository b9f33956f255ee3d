"""A policy change applied by reload while a request is still uploading its body (issue 18, point 1).

The gateway identifies the caller from the headers, before the body arrives. A reload between the headers
and the body used to judge the request with the *old* tenant against the new snapshot, and to cache that
decision in the new snapshot for every later request: a slow upload per model kept revoked permissions
alive. Here every kind of policy change is applied mid-upload, on one replica and on two (sharing Redis),
and the mid-upload request, every later request, the audit trail and the usage records must all follow
the new rules.
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
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import LLAMA2_CONDITIONS
from tests.support.hostile import (Server, fault_backend, request_head, start_fault_upstream, start_gateway,
                                   start_redis)

ADMIN_KEY = "sk-test-reload-admin"
KEY = "sk-test-reload-tenant"
TENANT = "shifting-team"
CHAT = "llama-2-7b-chat"  # conditional license (Llama 2): production needs the attestations
TWIN_FROM, TWIN_TO = "vicuna-13b-v1.3", "vicuna-13b-v1.5"  # non-commercial -> its commercial twin


def _tenant(**fields: object) -> dict:
    return {"name": TENANT, "api_key_hashes": [hash_key(KEY)], **fields}


ADMIN = {"name": "ops", "environment": "research", "api_key_hashes": [hash_key(ADMIN_KEY)], "admin": True}


@dataclass(frozen=True)
class Change:
    """A tenant before and after the reload, the model asked for, and what the new rules answer."""

    before: dict
    after: dict
    model: str
    status: int  # the new rules' answer
    code: str | None = None
    served: str | None = None  # for a 200: the model that must answer
    decision: str = "deny"  # the audit decision the new rules record
    environment: str | None = None  # the usage record's environment under the new rules


CHANGES = {
    "deny_models": Change(_tenant(environment="research"),
                          _tenant(environment="research", deny_models=[CHAT]), CHAT, 404, "model_not_found",
                          decision="not_found"),
    "allow_models": Change(_tenant(environment="research"),
                           _tenant(environment="research", allow_models=["vicuna-*"]), CHAT, 404,
                           "model_not_found", decision="not_found"),
    "environment": Change(_tenant(environment="research"), _tenant(environment="production"), CHAT, 403,
                          "model_license_forbidden"),
    "attestations": Change(_tenant(environment="production", attestations=LLAMA2_CONDITIONS),
                           _tenant(environment="production", attestations=LLAMA2_CONDITIONS[:2]), CHAT, 403,
                           "model_license_forbidden"),
    # The twin (Vicuna v1.5) is Llama 2 based: substitution needs the Llama 2 attestations as well.
    "substitutions_off": Change(_tenant(environment="production", substitutions=True, attestations=LLAMA2_CONDITIONS),
                                _tenant(environment="production", attestations=LLAMA2_CONDITIONS), TWIN_FROM, 403,
                                "model_license_forbidden"),
    "substitutions_on": Change(_tenant(environment="production", attestations=LLAMA2_CONDITIONS),
                               _tenant(environment="production", substitutions=True, attestations=LLAMA2_CONDITIONS),
                               TWIN_FROM, 200, served=TWIN_TO, decision="substitute", environment="production"),
    "granted": Change(_tenant(environment="production"),
                      _tenant(environment="production", attestations=LLAMA2_CONDITIONS), CHAT, 200, served=CHAT,
                      decision="allow", environment="production"),
}


@dataclass
class Replicas:
    gateways: list[Server]
    config_dirs: list[Path]


@pytest.fixture(scope="module", params=[1, 2], ids=["one-replica", "two-replicas"])
def replicas(request: pytest.FixtureRequest, log_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    count = request.param
    engine = start_fault_upstream(f"fault-reload-{count}", log_dir)
    servers: list[Server] = [engine]
    try:
        engine.wait_ready(30)
        env: dict[str, str] = {"GATEWAY_BODY_READ_TIMEOUT_S": "30"}
        if count > 1:
            redis, url = start_redis(f"redis-reload-{count}", log_dir)
            servers.append(redis)
            env["GATEWAY_REDIS_URL"] = url
        models = [{"id": model, "backends": [fault_backend(f"fault-{model}", engine, "primary",
                                                           shared_with_other_licenses=True)]}
                  for model in (CHAT, TWIN_FROM, TWIN_TO)]
        dirs, gateways = [], []
        for index in range(count):
            config = tmp_path_factory.mktemp(f"reload-{count}-{index}")
            gateway = start_gateway(f"gateway-reload-{count}-{index}", config, log_dir, models,
                                    [CHANGES["deny_models"].before, ADMIN], env)
            servers.append(gateway)
            dirs.append(config)
            gateways.append(gateway)
        yield Replicas(gateways, dirs)
    finally:
        for server in reversed(servers):
            server.stop()


def _reload(replicas: Replicas, tenant: dict) -> None:
    for gateway, config in zip(replicas.gateways, replicas.config_dirs):
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [tenant, ADMIN]}))
        response = httpx.post(gateway.url + "/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                              timeout=30)
        assert response.status_code == 200, response.text


def _body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "which rules apply?"}],
                       "max_tokens": 4}).encode()


def _chat(gateway: Server, model: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", content=_body(model), timeout=30,
                      headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})


async def _upload_across_reload(gateway: Server, model: str, reload) -> tuple[int, dict[str, str], bytes]:
    """Headers and half the body, then the reload, then the rest: the request was identified before the
    reload and judged after it."""
    body = _body(model)
    port = int(gateway.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = request_head("POST", "/v1/chat/completions", {
            "authorization": f"Bearer {KEY}", "content-type": "application/json", "content-length": str(len(body))})
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.3)  # the gateway has identified the caller and waits for the body
        await asyncio.to_thread(reload)
        writer.write(body[len(body) // 2:])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        content = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, content
    finally:
        writer.close()


def _records(config: Path, request_id: str, kind: str, timeout_s: float = 5.0) -> list[dict]:
    """The audit lines of one request (decision: no "type"; usage: "type": "usage"); written in batches."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in (config / "audit.jsonl").read_text().splitlines() if line.strip()]
        found = [r for r in lines if r.get("request_id") == request_id
                 and (r.get("type") == "usage") == (kind == "usage")]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _check(change: Change, status: int, headers: dict[str, str], content: bytes, config: Path) -> None:
    assert status == change.status, content[:300]
    answer = json.loads(content)
    if change.status == 200:
        assert answer["model"] == change.served
    else:
        assert answer["error"]["code"] == change.code, answer
    request_id = headers["x-request-id"]
    decisions = _records(config, request_id, "decision")
    assert [d["decision"] for d in decisions] == [change.decision], decisions
    if change.status == 200:
        usage = _records(config, request_id, "usage")
        assert usage and usage[0]["environment"] == change.environment, usage
        assert usage[0]["attestations"] == sorted(change.after.get("attestations", [])), usage


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_reload_during_the_upload_applies_to_that_request_and_every_later_one(replicas: Replicas,
                                                                                 name: str) -> None:
    change = CHANGES[name]
    _reload(replicas, change.before)
    # Under the old rules the model answers the other way round (so the change is what flips it).
    before = _chat(replicas.gateways[0], change.model)
    assert (before.status_code == 200) != (change.status == 200), before.text[:300]
    # Warm every replica's decision cache under the old rules: a stale entry is what used to survive.
    for gateway in replicas.gateways:
        _chat(gateway, change.model)

    target, config = replicas.gateways[-1], replicas.config_dirs[-1]
    status, headers, content = asyncio.run(
        _upload_across_reload(target, change.model, lambda: _reload(replicas, change.after)))
    _check(change, status, headers, content, config)

    for gateway, config in zip(replicas.gateways, replicas.config_dirs):
        for _ in range(2):  # the first later request, and the one after it (a cached decision)
            later = _chat(gateway, change.model)
            _check(change, later.status_code, dict(later.headers), later.content, config)
    models = httpx.get(replicas.gateways[0].url + "/v1/models", headers={"authorization": f"Bearer {KEY}"},
                       timeout=30).json()["data"]
    assert (change.model in {m["id"] for m in models}) == (change.status == 200)


def test_a_key_removed_during_the_upload_is_refused(replicas: Replicas) -> None:
    _reload(replicas, CHANGES["deny_models"].before)
    gone = {**CHANGES["deny_models"].before, "api_key_hashes": [hash_key("sk-test-reload-replacement")]}
    status, _, content = asyncio.run(
        _upload_across_reload(replicas.gateways[-1], CHAT, lambda: _reload(replicas, gone)))
    assert status == 401 and json.loads(content)["error"]["code"] == "invalid_api_key"
