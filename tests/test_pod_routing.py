"""Per-pod engine routing: one backend whose URL names a headless Service, three real engine processes
behind that name. The name resolves, through a DNS server standing in for cluster DNS
(tests/support/dns_server.py), to 127.0.0.2-4, each a llama.cpp server with SmolLM2 on the same port,
as pods of one StatefulSet would. The gateway finds every pod and caps, probes and routes each on its
own; pods that come and go (a rollout) come and go in routing too, with no restart and no API token.

Why (issue 22): an engine backend was a ClusterIP Service URL, so least-load, prefix affinity,
concurrency caps and ejection acted on a Service, not on the pods behind it."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.tenancy.tenants import hash_key
from tests.conftest import ROOT, smollm2_gguf
from tests.support.dns_server import DnsServer
from tests.support.processes import Server, free_port, start_server

pytestmark = pytest.mark.llamacpp
HOST = "smollm.llm-models.svc.cluster.local"
BACKEND = "llamacpp-smollm2-pods"
ENGINE_KEY = "sk-engine-test"
ADMIN = "sk-pods-admin"
PODS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def _port_free_on(addresses: tuple[str, ...]) -> int:
    while True:
        port = free_port()
        try:
            for address in addresses:
                with socket.socket() as sock:
                    sock.bind((address, port))
            return port
        except OSError:
            continue


def _engine(address: str, port: int, log_dir: Path) -> Server:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias", "smollm2-local",
            "--host", address, "--port", str(port), "--n_threads", "1", "--n_ctx", "512",
            "--interrupt_requests", "false", "--api_key", ENGINE_KEY]
    server = start_server(f"pod-{address}", argv, port, "/docs", log_dir)
    server.url = f"http://{address}:{port}"
    return server


class Pods:
    def __init__(self, dns: DnsServer, port: int, log_dir: Path) -> None:
        self.dns, self.port, self.log_dir = dns, port, log_dir
        self.engines: dict[str, Server] = {}

    def add(self, address: str) -> None:
        self.engines[address] = _engine(address, self.port, self.log_dir)
        self.engines[address].wait_ready(120)
        self.dns.set(HOST, sorted(self.engines))

    def remove(self, address: str) -> None:  # the pod leaves the DNS answer first, then stops
        self.dns.set(HOST, sorted(a for a in self.engines if a != address))
        self.engines.pop(address).stop()

    def served(self, address: str) -> int:
        return self.engines[address].log_text().count("POST /v1/chat/completions")


@pytest.fixture(scope="module")
def pods(log_dir: Path) -> Iterator[Pods]:
    dns = DnsServer()
    fleet = Pods(dns, _port_free_on((*PODS, "127.0.0.5")), log_dir)
    try:
        for address in PODS:
            fleet.add(address)
        yield fleet
    finally:
        for server in fleet.engines.values():
            server.stop()
        dns.close()


@pytest.fixture(scope="module")
def gateway(pods: Pods, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("pods")
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())["models"][0]
    local["backends"] = [{"id": BACKEND, "engine": "llama.cpp", "engine_version": "0.3.36", "role": "primary",
                          "url": f"http://{HOST}:{pods.port}", "served_model_name": "smollm2-local",
                          "max_concurrency": 1}]  # per pod: one generation at a time each
    (tmp / "overlay.yaml").write_text(yaml.safe_dump({"models": [local]}))
    (tmp / "deployed.yaml").write_text(yaml.safe_dump({"overlay": "test", "discovery": "dns", "backends": [BACKEND]}))
    (tmp / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"name": "ops", "environment": "research", "admin": True, "api_key_hashes": [hash_key(ADMIN)]}]}))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp / 'overlay.yaml'}",
           "GATEWAY_DEPLOYED": str(tmp / "deployed.yaml"), "GATEWAY_TENANTS": str(tmp / "tenants.yaml"),
           "GATEWAY_DNS_NAMESERVERS": pods.dns.address, "GATEWAY_DNS_REFRESH_S": "0.5",
           "GATEWAY_HEALTH_PROBE_INTERVAL_S": "0.5", "GATEWAY_ENGINE_API_KEY": ENGINE_KEY,
           "GATEWAY_AUDIT_SINK": str(tmp / "audit.jsonl")}
    server = start_server("gateway-pods", [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port,
                          "/ready", log_dir, env)
    server.wait_ready(60)
    yield server
    server.stop()


def _rows(gateway: Server) -> dict[str, dict]:
    report = httpx.get(gateway.url + "/admin/backends", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)
    return {row["address"]: row for row in report.json()["data"] if row["backend"] == BACKEND}


def _until(check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def _pods_up(gateway: Server) -> set[str]:
    metrics = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).text
    return {s.labels["backend"] for f in text_string_to_metric_families(metrics) if f.name == "gateway_backend_up"
            for s in f.samples if s.labels["backend"].startswith(BACKEND)}


def _client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=ADMIN, max_retries=0, timeout=120)


def _chat(gateway: Server, results: list, max_tokens: int = 24) -> None:
    try:
        answer = _client(gateway).chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=max_tokens)
        results.append(answer.usage.completion_tokens)
    except openai.APIStatusError as exc:
        results.append(exc.status_code)


def test_every_pod_behind_the_name_is_an_upstream_of_its_own(pods: Pods, gateway: Server) -> None:
    rows = _until(lambda: (r := _rows(gateway)) and set(r) == set(PODS) and r)
    assert set(rows) == set(PODS), rows
    for address, row in rows.items():
        assert row["id"] == f"{BACKEND}@{address}" and row["url"] == f"http://{address}:{pods.port}"
        assert row["healthy"] and row["max_concurrency"] == 1


def test_caps_and_load_apply_per_pod(pods: Pods, gateway: Server) -> None:
    """Three generations at once with a cap of one per pod: each pod takes one (a Service would have
    sent two to one engine); a fourth at that moment is refused, not queued behind a busy engine."""
    before = {address: pods.served(address) for address in PODS}
    results: list = []
    threads = [threading.Thread(target=_chat, args=(gateway, results, 48)) for _ in PODS]
    for thread in threads:
        thread.start()
    busy = _until(lambda: all(r["outstanding"] == 1 for r in _rows(gateway).values()), 30)
    assert busy, _rows(gateway)
    extra: list = []
    _chat(gateway, extra)
    for thread in threads:
        thread.join(120)
    assert extra == [429]
    assert len(results) == 3 and all(isinstance(r, int) and 0 < r <= 48 for r in results), results
    assert {address: pods.served(address) - before[address] for address in PODS} == {a: 1 for a in PODS}


def test_a_failing_pod_is_taken_out_alone_and_pods_follow_the_dns_answer(pods: Pods, gateway: Server) -> None:
    # A pod dies without leaving DNS (a crash): its probe fails, the others keep serving.
    victim = PODS[0]
    pods.engines[victim].stop()
    assert _until(lambda: not _rows(gateway)[victim]["healthy"]), _rows(gateway)
    results: list = []
    for _ in range(3):
        _chat(gateway, results, 4)
    assert all(isinstance(r, int) for r in results), results
    # The rollout goes on: the dead pod leaves the answer, a new one joins it.
    pods.engines.pop(victim)
    pods.dns.set(HOST, sorted(pods.engines))
    assert _until(lambda: victim not in _rows(gateway)), _rows(gateway)
    pods.add("127.0.0.5")
    assert _until(lambda: set(_rows(gateway)) == {*PODS[1:], "127.0.0.5"}), _rows(gateway)
    # A gone pod leaves no stale series behind (its last `backend_up 0` would page someone for ever).
    expected = {f"{BACKEND}@{a}" for a in (*PODS[1:], "127.0.0.5")}
    assert _until(lambda: _pods_up(gateway) == expected), _pods_up(gateway)
    before = pods.served("127.0.0.5")
    results = []
    threads = [threading.Thread(target=_chat, args=(gateway, results, 32)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(isinstance(r, int) for r in results), results
    assert pods.served("127.0.0.5") > before  # the new pod took its share
