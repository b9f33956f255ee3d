"""License policy end to end: real gateway, real engines, the official SDK with each tenant's key."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import (LIMITED_KEY, LOCAL_MODEL, PROD_KEY, RESEARCH_KEY, SUBST_KEY, client_for,
                            tenants_document)
from tests.support.processes import Server

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module", autouse=True)
def _engines_ready(vllm_fleet: dict[str, Server]) -> None:
    """vicuna-7b-v1.3/v1.5 are backed by the tiny vLLM Llama."""


def test_production_key_gets_a_license_denial_that_explains_itself(gateway: Server) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client_for(gateway, PROD_KEY).chat.completions.create(model="alpaca-7b", messages=HELLO)
    error = caught.value.response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("permission_error", "model_license_forbidden", "model")
    for fact in ("alpaca-7b", "cc-by-nc-4.0", "production", "development or research"):
        assert fact in error["message"]


def test_research_key_gets_text_from_a_real_engine(gateway: Server) -> None:
    completion = client_for(gateway, RESEARCH_KEY).chat.completions.create(
        model="vicuna-7b-v1.3", messages=HELLO, max_tokens=4, extra_body={"ignore_eos": True})
    assert completion.model == "vicuna-7b-v1.3" and completion.usage.completion_tokens == 4


def test_opted_in_production_key_is_served_the_commercial_twin(gateway: Server) -> None:
    raw = client_for(gateway, SUBST_KEY).chat.completions.with_raw_response.create(
        model="vicuna-7b-v1.3", messages=HELLO, max_tokens=3, extra_body={"ignore_eos": True})
    assert raw.headers["x-gateway-substituted-from"] == "vicuna-7b-v1.3"
    assert raw.parse().model == "vicuna-7b-v1.5"


def test_model_list_differs_by_tenant(gateway: Server) -> None:
    research = {m.id for m in client_for(gateway, RESEARCH_KEY).models.list()}
    production = {m.id for m in client_for(gateway, PROD_KEY).models.list()}
    assert "alpaca-7b" in research and "alpaca-7b" not in production
    assert "llama-2-7b-chat" not in production  # conditional license, nothing attested
    assert "falcon-7b" in production and production < research
    with pytest.raises(openai.PermissionDeniedError) as caught:  # as a chat with it: the 403 says why
        client_for(gateway, PROD_KEY).models.retrieve("alpaca-7b")
    assert caught.value.response.json()["error"]["code"] == "model_license_forbidden"


def test_audit_trail_records_each_decision(gateway: Server, log_dir: Path) -> None:
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client_for(gateway, PROD_KEY).completions.create(model="mpt-7b-chat", prompt="x",
                                                         extra_headers={"x-client-request-id": "audit-deny-1"})
    subst_raw = client_for(gateway, SUBST_KEY).completions.with_raw_response.create(
        model="vicuna-7b-v1.3", prompt="x", max_tokens=1, extra_headers={"x-request-id": "audit-subst-1"})
    # Records are keyed by the gateway's own id (the response's x-request-id), never by the client's.
    deny_id, subst_id = denied.value.response.headers["x-request-id"], subst_raw.headers["x-request-id"]
    records = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(records) < 2:
        lines = (log_dir / "audit.jsonl").read_text().splitlines()
        records = {r["request_id"]: r for r in map(json.loads, lines)  # decision records (usage: own test)
                   if r["request_id"] in {deny_id, subst_id} and r.get("type") != "usage"}
        time.sleep(0.1)
    deny, subst = records[deny_id], records[subst_id]
    assert deny | {"time": None} == {
        "time": None, "request_id": deny_id, "tenant": "prod-app", "key_id": hash_key(PROD_KEY)[7:15],
        "model_requested": "mpt-7b-chat", "model_served": None, "license": "cc-by-nc-sa-4.0",
        "decision": "deny", "rule": "non-commercial-license-in-production", "client_request_id": "audit-deny-1",
        "endpoint": "completions"}
    assert subst["client_request_id"] == "audit-subst-1"  # a legacy x-request-id is kept as the client's
    assert (subst["decision"], subst["model_served"], subst["rule"]) == (
        "substitute", "vicuna-7b-v1.5", "substitute-commercial-twin")


def test_rate_limit_is_a_429_with_openai_headers(gateway: Server) -> None:
    limited = client_for(gateway, LIMITED_KEY)
    first = limited.completions.with_raw_response.create(model=LOCAL_MODEL, prompt="a", max_tokens=1)
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    for _ in range(2):
        limited.completions.create(model=LOCAL_MODEL, prompt="a", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        limited.completions.create(model=LOCAL_MODEL, prompt="a", max_tokens=1)
    response = caught.value.response
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


def _tenants_path(gateway: Server) -> Path:
    return _env_path(gateway, "GATEWAY_TENANTS")


def _env_path(gateway: Server, name: str) -> Path:
    with open(f"/proc/{gateway.process.pid}/environ", "rb") as handle:
        entries = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    return Path(entries[name.encode()].decode())


def _reload(gateway: Server, key: str) -> httpx.Response:
    return httpx.post(gateway.url + "/admin/reload", headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_reload_needs_an_admin_key(gateway: Server) -> None:
    response = _reload(gateway, PROD_KEY)
    assert response.status_code == 403 and response.json()["error"]["code"] == "admin_required"


def test_invalid_tenants_file_is_refused_and_the_old_one_kept(gateway: Server) -> None:
    path = _tenants_path(gateway)
    good = path.read_text()
    broken = tenants_document()
    broken["tenants"][1]["environment"] = "prod"
    try:
        path.write_text(yaml.safe_dump(broken))
        response = _reload(gateway, RESEARCH_KEY)
        assert response.status_code == 400
        assert "tenant 'prod-app': field 'environment'" in response.json()["error"]["message"]
        assert client_for(gateway, PROD_KEY).models.list().data  # still served by the old config
    finally:
        path.write_text(good)


def test_sighup_reloads_a_new_key(gateway: Server) -> None:
    path = _tenants_path(gateway)
    good = path.read_text()
    document = tenants_document()
    document["tenants"][0]["api_key_hashes"].append(hash_key("sk-test-fresh-key"))
    try:
        path.write_text(yaml.safe_dump(document))
        os.kill(gateway.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if httpx.get(gateway.url + "/v1/models", headers={"authorization": "Bearer sk-test-fresh-key"}).status_code == 200:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the new key never worked after SIGHUP")
    finally:
        path.write_text(good)
        assert _reload(gateway, RESEARCH_KEY).status_code == 200
