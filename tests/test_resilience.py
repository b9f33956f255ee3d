"""The gateway under faults a real engine won't show on demand: hangs, crashes mid-stream, garbage, 503s.

Two fault-injecting upstreams (vLLM's exact wire format) stand in for engines: A and B. Model
`redpajama-incite-base-3b` has A as primary and B as CPU fallback (so retries are deterministic);
`redpajama-incite-instruct-3b` has A only. Each test gets a fresh gateway with 1 s timeouts.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.tenancy.tenants import hash_key
from tests.conftest import ROOT
from tests.support.processes import Server, free_port, start_server

WITH_FALLBACK = "redpajama-incite-base-3b"
SINGLE = "redpajama-incite-instruct-3b"
CAPPED = "redpajama-incite-chat-3b"  # one backend with max_concurrency 1
ADMIN_KEY = "sk-test-resilience-admin"


@pytest.fixture(scope="module")
def faults(log_dir: Path) -> Iterator[dict[str, Server]]:
    servers = {}
    for name in ("a", "b"):
        port = free_port()
        servers[name] = start_server(f"fault-{name}", [sys.executable, "-m", "tests.support.fault_upstream",
                                                       "--port", str(port), "--served-model-name", "fault-model"],
                                     port, "/health", log_dir)
    for server in servers.values():
        server.wait_ready(30)
    yield servers
    for server in servers.values():
        server.stop()


def mode(server: Server, **body: object) -> None:
    httpx.post(server.url + "/control/mode", json=body).raise_for_status()


def requests_seen(server: Server) -> list[dict]:
    return httpx.get(server.url + "/control/requests").json()


@pytest.fixture
def gateway(faults: dict[str, Server], log_dir: Path, tmp_path: Path) -> Iterator[Server]:
    yield from _gateway(faults, log_dir, tmp_path, {})


def _gateway(faults: dict[str, Server], log_dir: Path, tmp_path: Path, extra_env: dict[str, str]) -> Iterator[Server]:
    for server in faults.values():
        httpx.post(server.url + "/control/reset").raise_for_status()
    def backend(name: str, role: str, suffix: str = "") -> dict:
        return {"id": f"fault-{name}{suffix}", "engine": "vllm", "engine_version": "0.32.0", "url": faults[name].url,
                "role": role, "served_model_name": "fault-model"}

    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump({"models": [
        {"id": WITH_FALLBACK, "backends": [backend("a", "primary"), backend("b", "fallback")]},
        {"id": SINGLE, "backends": [backend("a", "primary", "-single")]},
        {"id": CAPPED, "backends": [{**backend("b", "primary", "-capped"), "max_concurrency": 1}]},
    ]}))
    (tmp_path / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"name": "ops", "environment": "research", "admin": True, "api_key_hashes": [hash_key(ADMIN_KEY)]}]}))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp_path / 'overlay.yaml'}",
           "GATEWAY_TENANTS": str(tmp_path / "tenants.yaml"), "GATEWAY_AUDIT_SINK": str(tmp_path / "audit.jsonl"),
           "GATEWAY_PRIMARY_FIRST_BYTE_TIMEOUT_S": "1", "GATEWAY_PRIMARY_IDLE_TIMEOUT_S": "1",
           "GATEWAY_FALLBACK_FIRST_BYTE_TIMEOUT_S": "1", "GATEWAY_FALLBACK_IDLE_TIMEOUT_S": "1",
           "GATEWAY_PRIMARY_GENERATION_TIMEOUT_S": "3", "GATEWAY_FALLBACK_GENERATION_TIMEOUT_S": "3",
           "GATEWAY_HEALTH_PROBE_INTERVAL_S": "0.5", "GATEWAY_DRAIN_TIMEOUT_S": "20", **extra_env}
    server = start_server(f"gateway-resilience-{port}", [sys.executable, "-m", "gateway", "serve", "--port",
                                                         str(port)], port, "/ready", log_dir, env)
    server.wait_ready(60)
    yield server
    server.stop()


def client(gateway: Server, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=timeout)


def test_stream_hang_before_headers_is_retried_on_another_backend(gateway: Server, faults: dict[str, Server]) -> None:
    """Engines send a stream's headers at once: none within the first-byte timeout is a stuck engine."""
    mode(faults["a"], mode="hang_before_headers")
    started = time.monotonic()
    raw = client(gateway).completions.with_raw_response.create(model=WITH_FALLBACK, prompt="hi", max_tokens=3,
                                                                stream=True)
    assert raw.headers["x-gateway-backend"] == "fault-b" and raw.headers["x-gateway-fallback"] == "cpu"
    text = "".join(chunk.choices[0].text for chunk in raw.parse() if chunk.choices)
    assert text == " tok0 tok1 tok2"
    assert 0.9 < time.monotonic() - started < 5


def test_a_long_non_streamed_generation_is_neither_retried_nor_blamed(gateway: Server,
                                                                       faults: dict[str, Server]) -> None:
    """Engines answer a non-streamed request when the generation is done: waiting is not a fault, and
    trying another backend would run the same generation twice."""
    mode(faults["a"], mode="hang_before_headers")
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).completions.create(model=WITH_FALLBACK, prompt="hi", max_tokens=3)
    assert caught.value.status_code == 504
    assert caught.value.response.json()["error"]["code"] == "generation_timeout"
    assert 0.9 < time.monotonic() - started < 5
    assert requests_seen(faults["b"]) == []  # not retried elsewhere
    report = httpx.get(gateway.url + "/admin/backends", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    a = next(row for row in report["data"] if row["id"] == "fault-a")
    assert a["consecutive_errors"] == 0 and not a["ejected"] and a["outstanding"] == 0


def test_a_slow_non_streamed_answer_within_its_generation_timeout_succeeds(gateway: Server,
                                                                            faults: dict[str, Server]) -> None:
    """Longer than the first-byte timeout (1 s here) is fine for a non-streamed answer."""
    mode(faults["a"], mode="normal", ttft_s=1.5)
    raw = client(gateway).completions.with_raw_response.create(model=SINGLE, prompt="hi", max_tokens=2)
    assert raw.parse().choices[0].text == " tok0 tok1"


def test_503_is_retried_and_repeated_failures_eject_the_backend(gateway: Server, faults: dict[str, Server]) -> None:
    mode(faults["a"], mode="status", status=503)
    for _ in range(3):
        raw = client(gateway).completions.with_raw_response.create(model=WITH_FALLBACK, prompt="hi", max_tokens=2)
        assert raw.headers["x-gateway-backend"] == "fault-b"
    report = httpx.get(gateway.url + "/admin/backends", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    a = next(row for row in report["data"] if row["id"] == "fault-a")
    assert a["ejected"] and a["ejections"] == 1
    before = len(requests_seen(faults["a"]))
    client(gateway).completions.create(model=WITH_FALLBACK, prompt="hi", max_tokens=2)
    assert len(requests_seen(faults["a"])) == before  # ejected: not even tried


@pytest.mark.parametrize(("fault", "code"), [("hang_mid_stream", "upstream_timeout"),
                                             ("close_mid_stream", "upstream_disconnected"),
                                             ("garbage", "upstream_malformed")])
def test_mid_stream_failure_is_an_error_event_never_a_quiet_end(gateway: Server, faults: dict[str, Server],
                                                                fault: str, code: str) -> None:
    mode(faults["a"], mode=fault, after=3)
    received = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        for chunk in client(gateway).completions.create(model=SINGLE, prompt="hi", max_tokens=10, stream=True):
            received.append(chunk)
    assert code in str(caught.value.body) or code in str(caught.value)
    assert time.monotonic() - started < 5
    if fault != "garbage":
        assert len(received) == 3  # what arrived before the failure was relayed as it came


def test_garbage_json_answer_is_a_502(gateway: Server, faults: dict[str, Server]) -> None:
    mode(faults["a"], mode="garbage")
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).completions.create(model=SINGLE, prompt="hi")
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["code"] == "upstream_malformed"


def test_client_disconnect_closes_the_upstream_at_once(gateway: Server, faults: dict[str, Server]) -> None:
    mode(faults["a"], mode="normal", inter_chunk_s=0.2)
    with httpx.stream("POST", gateway.url + "/v1/completions", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                      json={"model": SINGLE, "prompt": "hi", "max_tokens": 100, "stream": True}) as response:
        lines = response.iter_lines()
        while sum(1 for _ in [next(lines)] if _.startswith("data:")) == 0:
            pass
        closed_at = time.time()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        record = requests_seen(faults["a"])[-1]
        if record["disconnected"]:
            break
        time.sleep(0.05)
    assert record["disconnected"] and record["ended"] - closed_at < 1.0
    assert record["chunks_sent"] < 50  # generation stopped long before its 100 tokens


def test_a_client_that_leaves_before_the_answer_is_logged_as_499_not_500(gateway: Server,
                                                                         faults: dict[str, Server]) -> None:
    """nginx's "client closed request": the access log agrees with the metrics and the usage record
    instead of showing an operator a 500 the gateway never answered."""
    mode(faults["a"], mode="normal", ttft_s=1.5)
    client_id = f"leaves-early-{time.monotonic_ns()}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/completions", timeout=httpx.Timeout(10, read=0.3),
                   headers={"authorization": f"Bearer {ADMIN_KEY}", "x-client-request-id": client_id},
                   json={"model": SINGLE, "prompt": "hi", "max_tokens": 5})
    deadline = time.monotonic() + 5
    while not (access := [line for line in gateway.log_lines_with(client_id) if "gateway.access: " in line]):
        assert time.monotonic() < deadline, "no access log line for the request"
        time.sleep(0.05)
    assert json.loads(access[0].split("gateway.access: ", 1)[1])["status"] == 499


def test_a_full_backend_means_429_engine_overloaded(gateway: Server, faults: dict[str, Server]) -> None:
    mode(faults["b"], mode="normal", inter_chunk_s=0.1)
    with httpx.stream("POST", gateway.url + "/v1/completions", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                      json={"model": CAPPED, "prompt": "hi", "max_tokens": 20, "stream": True}) as first:
        assert first.status_code == 200
        second = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                            json={"model": CAPPED, "prompt": "hi", "max_tokens": 1})
        assert second.status_code == 429 and second.json()["error"]["code"] == "engine_overloaded"
        assert int(second.headers["retry-after"]) >= 1
        first.read()
    after = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                       json={"model": CAPPED, "prompt": "hi", "max_tokens": 1})
    assert after.status_code == 200  # the slot came back when the stream ended


@pytest.fixture
def small_pool_gateway(faults: dict[str, Server], log_dir: Path, tmp_path: Path) -> Iterator[Server]:
    yield from _gateway(faults, log_dir, tmp_path, {"GATEWAY_POOL_MAX_CONNECTIONS": "66"})  # 64 kept for probes


def test_a_full_upstream_pool_is_backpressure_not_a_backend_fault(small_pool_gateway: Server,
                                                                   faults: dict[str, Server]) -> None:
    """Two connections for requests: the third request in flight is a 429, never a wait for a connection
    that times out and is blamed on a healthy engine."""
    mode(faults["a"], mode="normal", ttft_s=1.0)
    url, auth = small_pool_gateway.url + "/v1/completions", {"authorization": f"Bearer {ADMIN_KEY}"}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: httpx.post(url, headers=auth, timeout=30,
                                                     json={"model": SINGLE, "prompt": "hi", "max_tokens": 2}),
                                range(6)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 429}, statuses
    assert all(a.json()["error"]["code"] == "engine_overloaded" for a in answers if a.status_code == 429)
    report = httpx.get(small_pool_gateway.url + "/admin/backends", headers=auth).json()["data"]
    single = next(row for row in report if row["id"] == "fault-a-single")
    assert single["consecutive_errors"] == 0 and not single["ejected"] and single["outstanding"] == 0


def test_sigterm_lets_20_open_streams_finish_then_exits_0(gateway: Server, faults: dict[str, Server]) -> None:
    mode(faults["a"], mode="normal", inter_chunk_s=0.1)
    results: list[list[str] | Exception] = []

    def one_stream() -> None:
        try:
            chunks = client(gateway, timeout=30).completions.create(model=SINGLE, prompt="hi", max_tokens=20,
                                                                    stream=True)
            results.append([c.choices[0].text for c in chunks if c.choices])
        except Exception as exc:  # recorded, asserted below
            results.append(exc)

    threads = [threading.Thread(target=one_stream) for _ in range(20)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(requests_seen(faults["a"])) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    assert httpx.get(gateway.url + "/ready").status_code == 503
    refused = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {ADMIN_KEY}"},
                         json={"model": SINGLE, "prompt": "late"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    for thread in threads:
        thread.join(30)
    assert gateway.process.wait(30) == 0
    assert len(results) == 20 and all(isinstance(r, list) and len(r) >= 20 for r in results), results


def _metrics_text(gateway: Server) -> str:
    return httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text


def test_metrics_count_what_was_sent(gateway: Server, faults: dict[str, Server]) -> None:
    api = client(gateway)
    for _ in range(4):
        api.completions.create(model=SINGLE, prompt="hi", max_tokens=2)
    list(api.completions.create(model=SINGLE, prompt="hi", max_tokens=5, stream=True))
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="made-up-model-name", prompt="hi")
    families = {f.name: f for f in text_string_to_metric_families(_metrics_text(gateway))}
    requests = {(s.labels["model"], s.labels["status"]): s.value
                for s in families["gateway_requests"].samples if s.name == "gateway_requests_total"}
    assert requests[(SINGLE, "200")] == 5 and requests[("unknown", "404")] == 1
    assert not any("made-up" in str(s.labels) for f in families.values() for s in f.samples)
    decisions = {s.labels["decision"]: s.value for s in families["gateway_policy_decisions"].samples
                 if s.name == "gateway_policy_decisions_total"}
    assert decisions["allow"] == 5
    ttft = [s for s in families["gateway_time_to_first_token_seconds"].samples
            if s.name.endswith("_count") and s.labels["model"] == SINGLE]
    assert ttft[0].value == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the prober's first round may still be going
        families = {f.name: f for f in text_string_to_metric_families(_metrics_text(gateway))}
        up = {s.labels["backend"]: s.value for s in families["gateway_backend_up"].samples}
        if "fault-a-single" in up:
            break
        time.sleep(0.2)
    assert up["fault-a-single"] == 1


def test_overhead_header_counts_the_gateway_not_the_engine(gateway: Server, faults: dict[str, Server]) -> None:
    """`x-gateway-overhead-ms` on every response: the engine's 0.5 s before its answer is not in it."""
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    mode(faults["a"], mode="normal", ttft_s=0.5)
    started = time.monotonic()
    answer = httpx.post(gateway.url + "/v1/completions", headers=headers,
                        json={"model": SINGLE, "prompt": "hi", "max_tokens": 2}, timeout=10)
    took_ms = (time.monotonic() - started) * 1000
    assert answer.status_code == 200 and took_ms >= 500
    assert 0 < float(answer.headers["x-gateway-overhead-ms"]) < 100
    with httpx.stream("POST", gateway.url + "/v1/completions", headers=headers, timeout=10,
                      json={"model": SINGLE, "prompt": "hi", "max_tokens": 2, "stream": True}) as streamed:
        assert 0 < float(streamed.headers["x-gateway-overhead-ms"]) < 100
        assert "data: [DONE]" in streamed.read().decode()
    denied = httpx.post(gateway.url + "/v1/completions", headers={"authorization": "Bearer sk-wrong"},
                        json={"model": SINGLE, "prompt": "hi"})
    listed = httpx.get(gateway.url + "/v1/models", headers=headers)
    for response in (denied, listed):
        assert float(response.headers["x-gateway-overhead-ms"]) >= 0
