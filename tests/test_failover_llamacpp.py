"""GPU->CPU failover with real engines: two llama.cpp replicas of SmolLM2 as primaries, a third as the
CPU fallback. `kill -9` a replica during a burst, then every primary, then bring one back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import LOCAL_MODEL, ROOT, smollm2_gguf
from tests.support.processes import Server, free_port, start_server

AUTH = {"authorization": "Bearer sk-anything"}  # open access: this gateway has no tenants file


def _llama(name: str, port: int, log_dir: Path) -> Server:
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias",
            "smollm2-local", "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "512",
            "--interrupt_requests", "false"]
    return start_server(name, argv, port, "/v1/models", log_dir)


@pytest.fixture(scope="module")
def fleet(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    servers = {name: _llama(f"failover-{name}", free_port(), log_dir) for name in ("r1", "r2", "cpu")}
    for server in servers.values():
        server.wait_ready(120)
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def gateway(fleet: dict[str, Server], log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    def backend(name: str, role: str) -> dict:
        return {"id": f"llamacpp-{name}", "engine": "llama.cpp", "engine_version": "0.3.36", "url": fleet[name].url,
                "role": role, "served_model_name": "smollm2-local"}

    overlay = tmp_path_factory.mktemp("failover") / "overlay.yaml"
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())["models"][0]
    local["backends"] = [backend("r1", "primary"), backend("r2", "primary"), backend("cpu", "fallback")]
    overlay.write_text(yaml.safe_dump({"models": [local]}))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{overlay}", "GATEWAY_AUDIT_SINK": os.devnull,
           "GATEWAY_HEALTH_PROBE_INTERVAL_S": "0.5", "GATEWAY_OUTLIER_BASE_COOLDOWN_S": "1",
           "GATEWAY_OUTLIER_CONSECUTIVE_ERRORS": "2"}
    server = start_server("gateway-failover", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                          port, "/ready", log_dir, env)
    server.wait_ready(60)
    yield server
    server.stop()


def _complete(gateway: Server) -> tuple[int, str, float]:
    response = httpx.post(gateway.url + "/v1/completions", headers=AUTH, timeout=60,
                          json={"model": LOCAL_MODEL, "prompt": "Hello", "max_tokens": 1})
    return response.status_code, response.headers.get("x-gateway-backend", ""), time.monotonic()


def test_kill_9_during_a_burst_of_200_loses_nothing(gateway: Server, fleet: dict[str, Server]) -> None:
    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()
    todo = iter(range(200))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            outcome = _complete(gateway)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    while len(results) < 50:
        time.sleep(0.01)
    killed_at = time.monotonic()
    os.kill(fleet["r1"].process.pid, signal.SIGKILL)
    for thread in threads:
        thread.join(120)
    assert len(results) == 200
    assert [status for status, _, _ in results if status != 200] == []
    served_elsewhere = min(t for _, backend, t in results if t > killed_at and backend != "llamacpp-r1")
    print(f"\nfailover: first request served elsewhere {1000 * (served_elsewhere - killed_at):.0f} ms after kill -9")
    assert {backend for _, backend, t in results if t > killed_at + 2} <= {"llamacpp-r2", "llamacpp-cpu"}


def test_with_every_primary_dead_the_cpu_fallback_serves(gateway: Server, fleet: dict[str, Server]) -> None:
    fleet["r2"].process.send_signal(signal.SIGKILL)
    fleet["r2"].process.wait(10)
    for _ in range(5):
        response = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                              json={"model": LOCAL_MODEL, "max_tokens": 2,
                                    "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200
        assert response.headers["x-gateway-backend"] == "llamacpp-cpu"
        assert response.headers["x-gateway-fallback"] == "cpu"


def test_a_restarted_replica_is_readmitted_after_its_cooldown(gateway: Server, fleet: dict[str, Server],
                                                              log_dir: Path) -> None:
    port = int(fleet["r1"].url.rsplit(":", 1)[1])
    fleet["r1"].process.wait(10)
    fleet["r1"] = _llama("failover-r1-restarted", port, log_dir)
    fleet["r1"].wait_ready(120)
    restarted = time.monotonic()
    deadline = restarted + 30
    while time.monotonic() < deadline:
        status, backend, _ = _complete(gateway)
        assert status == 200
        if backend == "llamacpp-r1":
            break
        time.sleep(0.2)
    else:
        pytest.fail("the restarted replica never got traffic back")
    print(f"\nre-admitted {time.monotonic() - restarted:.1f} s after the replica was ready again")
