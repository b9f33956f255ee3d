"""The load-test harness itself (load_tests/), on a tiny scenario, so that it cannot silently break.

A fast mock engine (load_tests/mock_upstream.py) and a gateway in front of it (open access, one model
overlaid onto the mock); load_tests/loadgen.py runs a few requests against each, and its JSON is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.support.processes import Server, free_port, start_server

MODEL = "llama-2-7b-chat"  # native chat template: chat is forwarded as chat, as-is
MOCK_MODEL = "mock-model"
LOADGEN = ROOT / "load_tests" / "loadgen.py"


@pytest.fixture(scope="module")
def mock(log_dir: Path) -> Iterator[Server]:
    port = free_port()
    server = start_server("load-mock", [sys.executable, str(ROOT / "load_tests" / "mock_upstream.py"), "--port",
                                        str(port), "--served-model-name", MOCK_MODEL], port, "/health", log_dir)
    server.wait_ready(20)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(mock: Server, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("load-harness")
    (tmp / "overlay.yaml").write_text(yaml.safe_dump({"models": [
        {"id": MODEL, "backends": [{"id": "mock-0", "engine": "vllm", "engine_version": "0.32.0", "url": mock.url,
                                    "role": "primary", "served_model_name": MOCK_MODEL}]}]}))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp / 'overlay.yaml'}",
           "GATEWAY_AUDIT_SINK": str(tmp / "audit.jsonl")}
    server = start_server(f"gateway-load-{port}", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                          port, "/ready", log_dir, env)
    server.wait_ready(30)
    yield server
    server.stop()


def loadgen(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(LOADGEN), *args], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


def sane(result: dict, requests: int) -> None:
    assert result["requests"] == requests and result["ok"] == requests
    assert result["errors"] == 0, result["error_kinds"]
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert result["throughput_rps"] > 0
    assert isinstance(result["generator_saturated"], bool)
    assert result["generator"]["cpu_ms_per_request"] > 0


def test_loadgen_direct_to_mock(mock: Server) -> None:
    result = loadgen("--url", mock.url, "--model", MOCK_MODEL, "--mode", "closed", "--concurrency", "4",
                     "--requests", "40")
    sane(result, 40)
    # open loop, streamed, with the mock's per-request timing: 4 tokens, 20 ms to the first, 2 ms apart
    result = loadgen("--url", mock.url, "--model", MOCK_MODEL, "--mode", "open", "--rate", "50", "--arrival",
                     "uniform", "--requests", "10", "--stream", "--max-tokens", "4",
                     "--extra-body", '{"mock_ttft_ms": 20, "mock_inter_chunk_ms": 2}')
    sane(result, 10)
    stream = result["stream"]
    assert stream["events_per_request_min"] == stream["events_per_request_max"] == 4 + 2  # role, 4, usage
    assert 19 <= stream["ttft_ms"]["p50"] < 200
    assert result["latency_ms"]["p50"] >= 20 + 3 * 2 - 1
    assert result["generator"]["achieved_send_rate"] > 0 and result["generator"]["dispatch_lag_ms"] is not None


def test_loadgen_through_the_gateway(gateway: Server, mock: Server) -> None:
    reply = httpx.post(gateway.url + "/v1/chat/completions", headers={"authorization": "Bearer sk-any"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == " tok0 tok1 tok2"

    result = loadgen("--url", gateway.url, "--model", MODEL, "--api-key", "sk-load-test", "--mode", "closed",
                     "--concurrency", "8", "--requests", "50", "--max-tokens", "8")
    sane(result, 50)

    result = loadgen("--url", gateway.url, "--model", MODEL, "--api-key", "sk-load-test", "--mode", "closed",
                     "--concurrency", "2", "--requests", "10", "--stream", "--max-tokens", "16",
                     "--expect-events", str(16 + 2))
    sane(result, 10)
    stream = result["stream"]
    assert stream["events_total"] == 10 * 18
    assert stream["ttft_ms"]["p50"] <= result["latency_ms"]["p50"]
    assert stream["inter_chunk_ms"]["p50"] <= stream["inter_chunk_ms"]["p99"]
