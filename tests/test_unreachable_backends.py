"""Backends that cannot be reached are visible: logged once at start-up with their URL, named with their
URL in the 503, told apart as permanent (a host name that does not resolve, nothing listening for long:
no Retry-After, `x-should-retry: false`, so the SDK does not retry) or transient (Retry-After), and
marked in `/v1/models`. Real llama.cpp serves the one reachable model; the others point at a `.invalid`
host name (RFC 6761: never resolves), a closed port, or nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.backends.upstream import Unreachable, UpstreamUnavailable, looks_lasting
from gateway.routing.fleet import Fleet
from tests.conftest import ROOT
from tests.support.processes import Server, free_port, start_server

pytestmark = pytest.mark.llamacpp

DEV_KEY, PROD_KEY = "sk-gw-local-dev", "sk-gw-local-prod"
ADMIN = {"authorization": f"Bearer {DEV_KEY}"}
LASTING_AFTER_S = 6  # GATEWAY_UNREACHABLE_LASTING_AFTER_S of the gateway under test
NOT_DEPLOYED_URL = "http://not-deployed.invalid:8000"


def _backend(backend_id: str, url: str) -> dict:
    return {"id": backend_id, "engine": "vllm", "engine_version": "0.32.0", "url": url, "role": "primary"}


@pytest.fixture(scope="module")
def registry_file(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Server) -> Path:
    """A registry of the few models used here (the licenses and entries of model_registry.yaml), so the
    only host name probed is the `.invalid` one: the ~70 Kubernetes names of the full registry, probed
    every 0.3 s, are more lookups than a test machine's DNS server answers promptly."""
    shipped = yaml.safe_load((ROOT / "model_registry.yaml").read_text())
    entries = {m["id"]: m for m in shipped["models"]}
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())["models"][0]
    local["backends"][0]["url"] = llama_cpp.url
    models = [local]
    for model_id, backends in (("falcon-7b-instruct", [_backend("not-deployed", NOT_DEPLOYED_URL)]),
                               ("llama-2-7b-chat", [_backend("closed-port", f"http://127.0.0.1:{free_port()}")]),
                               ("llama-2-13b-chat", []), ("flan-t5-small", []), ("alpaca-7b", [])):
        models.append({**entries[model_id], "backends": backends})
    path = tmp_path_factory.mktemp("unreachable") / "registry.yaml"
    path.write_text(yaml.safe_dump({"licenses": shipped["licenses"], "models": models}))
    return path


@pytest.fixture(scope="module")
def gateway(registry_file: Path, log_dir: Path) -> Iterator[Server]:
    port = free_port()
    env = {"GATEWAY_REGISTRY": str(registry_file),
           "GATEWAY_TENANTS": str(ROOT / "deploy/local/tenants.yaml"),
           "GATEWAY_AUDIT_SINK": str(log_dir / "unreachable-audit.jsonl"),
           "GATEWAY_HEALTH_PROBE_INTERVAL_S": "0.3", "GATEWAY_UNREACHABLE_LASTING_AFTER_S": str(LASTING_AFTER_S)}
    server = start_server("gateway-unreachable", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                          port, "/ready", log_dir, env)
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


def _client(gateway: Server, key: str = DEV_KEY, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, **kwargs)


def _backends(gateway: Server) -> dict[str, dict]:
    return {row["id"]: row for row in httpx.get(gateway.url + "/admin/backends", headers=ADMIN).json()["data"]}


def _wait_for(condition, timeout_s: float = 20) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_start_up_logs_each_unreachable_backend_once_with_its_url(gateway: Server) -> None:
    _wait_for(lambda: all(_backends(gateway)[b]["probe_failure"] for b in ("closed-port", "not-deployed")))
    time.sleep(1.5)  # five more probes of each: still one line each
    lines = gateway.log_lines_with("fails its health probe")
    not_deployed = [line for line in lines if "not-deployed" in line]
    closed = [line for line in lines if "closed-port" in line]
    assert len(not_deployed) == 1 and NOT_DEPLOYED_URL in not_deployed[0] and "falcon-7b-instruct" in not_deployed[0]
    assert len(closed) == 1 and "connection refused" in closed[0] and "llama-2-7b-chat" in closed[0]
    assert not [line for line in lines if "llamacpp-smollm2-local" in line]


def test_a_host_name_that_does_not_resolve_is_a_permanent_503_the_sdk_does_not_retry(gateway: Server) -> None:
    _wait_for(lambda: "does not resolve" in (_backends(gateway)["not-deployed"]["probe_failure"] or ""))
    for _ in range(5):
        sent = []
        http = httpx.Client(event_hooks={"request": [sent.append]})
        client = _client(gateway, max_retries=2, http_client=http)  # the SDK's default retries
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="falcon-7b-instruct", messages=[{"role": "user", "content": "hi"}])
        # A DNS server that timed out (not one that said "no such name") is a passing failure, and
        # reported so (the SDK then retries): only then is the question asked again.
        if "DNS lookup" not in caught.value.response.json()["error"]["message"]:
            break
    assert len(sent) == 1  # x-should-retry: false, so none of the two retries
    response = caught.value.response
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (503, "backend_unreachable")
    assert response.headers["x-should-retry"] == "false" and "retry-after" not in response.headers
    assert "`not-deployed`" in error["message"] and NOT_DEPLOYED_URL in error["message"]
    assert "does not resolve" in error["message"] and "Retrying will not help" in error["message"]


def test_connection_refused_is_transient_at_first_then_permanent(gateway: Server, registry_file: Path) -> None:
    # A backend new to this gateway (added by a reload), so its refusals start now.
    document = yaml.safe_load(registry_file.read_text())
    url = f"http://127.0.0.1:{free_port()}"
    next(m for m in document["models"] if m["id"] == "llama-2-13b-chat")["backends"] = [_backend("refused-late", url)]
    registry_file.write_text(yaml.safe_dump(document))
    assert httpx.post(gateway.url + "/admin/reload", headers=ADMIN).json()["status"] == "reloaded"
    client = _client(gateway, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="llama-2-13b-chat", prompt="hi", max_tokens=1)
    response = caught.value.response
    assert response.json()["error"]["code"] == "backend_unavailable"
    assert int(response.headers["retry-after"]) > 0
    assert "`refused-late`" in response.json()["error"]["message"] and url in response.json()["error"]["message"]
    assert "connection refused" in response.json()["error"]["message"]

    _wait_for(lambda: (_backends(gateway)["refused-late"]["failing_for_s"] or 0) >= LASTING_AFTER_S + 0.5)
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="llama-2-13b-chat", prompt="hi", max_tokens=1)
    response = caught.value.response
    assert response.json()["error"]["code"] == "backend_unreachable"
    assert "retry-after" not in response.headers and response.headers["x-should-retry"] == "false"
    assert url in response.json()["error"]["message"]


def test_a_model_without_backends_is_a_permanent_503(gateway: Server) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        _client(gateway, max_retries=0).completions.create(model="flan-t5-small", prompt="hi", max_tokens=1)
    error = caught.value.response.json()["error"]
    assert error["code"] == "backend_unreachable" and "configures no backend" in error["message"]


def test_models_say_which_can_be_served_here(gateway: Server) -> None:
    def availability() -> dict[str, str]:
        return {m.id: m.model_dump()["availability"] for m in _client(gateway).models.list()}

    _wait_for(lambda: availability()["falcon-7b-instruct"] == "unreachable")
    seen = availability()
    assert seen["smollm2-135m-instruct"] == "ready"
    assert seen["flan-t5-small"] == "no_backends"
    assert _client(gateway).models.retrieve("falcon-7b-instruct").model_dump()["availability"] == "unreachable"


def test_admin_backends_names_the_model_clients_use(gateway: Server) -> None:
    local = _backends(gateway)["llamacpp-smollm2-local"]
    assert (local["model"], local["served_model_name"]) == ("smollm2-135m-instruct", "smollm2-local")
    assert local["healthy"] and local["probe_failure"] is None
    missing = _backends(gateway)["not-deployed"]
    assert missing["url"] == NOT_DEPLOYED_URL and "does not resolve" in missing["probe_failure"]


def test_retrieving_a_license_denied_model_is_the_403_its_chat_gets(gateway: Server) -> None:
    client = _client(gateway, PROD_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as retrieved:
        client.models.retrieve("alpaca-7b")
    with pytest.raises(openai.PermissionDeniedError) as chatted:
        client.chat.completions.create(model="alpaca-7b", messages=[{"role": "user", "content": "hi"}])
    assert retrieved.value.response.json() == chatted.value.response.json()
    assert retrieved.value.response.json()["error"]["code"] == "model_license_forbidden"


def test_a_dns_server_that_fails_to_answer_does_not_make_a_missing_name_exist() -> None:
    clock = [100.0]
    fleet = Fleet(clock=lambda: clock[0])
    missing = UpstreamUnavailable("b", "its host name does not resolve", url="http://x.invalid",
                                  kind=Unreachable.UNRESOLVABLE)
    fleet.probed("b", missing)
    clock[0] += 5
    fleet.probed("b", UpstreamUnavailable("b", "the DNS lookup failed", kind=Unreachable.LOOKUP_FAILED))
    fleet.probed("b", UpstreamUnavailable("b", "no answer to the health probe within 2 s", timed_out=True))
    verdict = fleet.probe_verdict("b")
    assert verdict is not None and verdict.failure is missing and verdict.failing_for_s == 5
    # The request's own lookup timed out: still the missing name the probes found, so no retry helps.
    assert looks_lasting(Unreachable.LOOKUP_FAILED, verdict, lasting_after_s=60)
    assert not looks_lasting(Unreachable.LOOKUP_FAILED, None, lasting_after_s=60)
    fleet.probed("b", None)  # deployed after all
    assert fleet.probe_verdict("b") is None and fleet.state("b").healthy


def test_refused_connections_look_lasting_only_after_the_set_time() -> None:
    clock = [0.0]
    fleet = Fleet(clock=lambda: clock[0])
    fleet.probed("b", UpstreamUnavailable("b", "connection refused", kind=Unreachable.REFUSED))
    clock[0] = 59
    assert not looks_lasting(Unreachable.REFUSED, fleet.probe_verdict("b"), lasting_after_s=60)
    clock[0] = 61
    assert looks_lasting(Unreachable.REFUSED, fleet.probe_verdict("b"), lasting_after_s=60)
    assert not looks_lasting(Unreachable.OTHER, fleet.probe_verdict("b"), lasting_after_s=60)
