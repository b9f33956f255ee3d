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


def test_loadgen_on_the_responses_api(gateway: Server) -> None:
    """The bench's Responses scenarios: `--endpoint responses`, its named events, its terminal event."""
    result = loadgen("--url", gateway.url, "--model", MODEL, "--api-key", "sk-load-test", "--endpoint", "responses",
                     "--mode", "closed", "--concurrency", "8", "--requests", "40", "--max-tokens", "16")
    sane(result, 40)
    result = loadgen("--url", gateway.url, "--model", MODEL, "--api-key", "sk-load-test", "--endpoint", "responses",
                     "--mode", "closed", "--concurrency", "2", "--requests", "10", "--stream", "--max-tokens", "16",
                     "--expect-events", str(4 + 16 + 4))  # created .. content_part.added, deltas, the done events
    sane(result, 10)
    assert result["stream"]["ttft_ms"]["p50"] <= result["latency_ms"]["p50"]


def _bench_report():  # load_tests/ is not a package: load the module from its file
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "load_tests" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(rps: float, p50: float, p99: float, saturated: bool = False, errors: int = 0, chunks: float | None = None,
         ) -> dict:
    result = {"throughput_rps": rps, "latency_ms": {"p50": p50, "p90": p99, "p99": p99}, "ok": 100, "errors": errors,
              "generator_saturated": saturated}
    if chunks is not None:
        result["stream"] = {"chunks_per_s": chunks, "ttft_ms": {"p50": p50 / 2}, "first_event_ms": {"p50": 0.1}}
    return result


def test_bench_report_medians_table_checks_and_markdown(tmp_path: Path) -> None:
    """bench.py's pure half on canned loadgen JSON: no nginx or LiteLLM needed."""
    rep = _bench_report()
    s = rep.summarise([_run(100, 1, 3), _run(300, 2, 9, saturated=True), _run(200, 5, 4)])
    assert s["median"]["rps"] == 200 and s["median"]["p50"] == 2 and s["median"]["p99"] == 4  # per metric
    assert s["saturated"] is True and s["errors"] == 0

    def target(c1: tuple, best: float, stream: float, rss_peak_kb: int, **flags: bool) -> dict:
        return {"c1": rep.summarise([_run(*c1)]), "c64": rep.summarise([_run(best, 9, 20, **flags)]),
                "open_500": rep.summarise([_run(500, c1[1], c1[2] + 1)]),
                "stream_c16": rep.summarise([_run(10, 5, 9, chunks=stream)]),
                "streams": rep.summarise_rss([{"idle_kb": 50 * 1024, "peak_kb": rss_peak_kb, "peak_fds": 4000,
                                               "loadgen": _run(1, 1, 1)}], 2000)}

    results = {"direct": target((9000, 0.1, 0.2), 40000, 400000, 60 * 1024, saturated=True),
               "nginx": target((5000, 0.2, 0.4), 30000, 600000, 70 * 1024),
               "gateway": target((2000, 0.6, 2.0), 4000, 60000, 250 * 1024),
               "litellm": target((70, 12, 30), 300, 800, 450 * 1024, errors=2)}
    steps = [{"rate": 100.0, "ok": True}, {"rate": 150.0, "ok": False}]
    assert rep.sweep_verdict(steps) == (100.0, "=") and rep.sweep_verdict(steps[1:]) == (150.0, "<")
    results["gateway"]["sweep"] = {"steps": steps, "saturation_rps": 100.0, "bound": "=", "p99_bound_ms": 100}
    results["gateway"]["responses_c64"] = rep.summarise([_run(3800, 10, 22)])  # 0.95 of chat's 4,000
    results["gateway"]["responses_stream_c16"] = rep.summarise([_run(9, 5, 9, chunks=50000)])  # 0.83 of 60,000

    rows = rep.table_rows(results)
    assert rows[0] == ["metric", "direct", "nginx", "gateway", "litellm", "gateway/litellm", "gateway/nginx"]
    by_label = {r[0]: r for r in rows}
    assert by_label["c64: rps"][1:5] == ["40,000*", "30,000", "4,000", "300!"]  # saturated / errors marked
    assert by_label["c64: rps"][5:] == ["13.33x", "0.13x"]
    assert by_label["c1: added p50 ms vs direct"][3] == "0.50" and by_label["c1: added p50 ms vs direct"][1] == "-"
    assert by_label["slow streams: KB per stream"][3] == f"{200 * 1024 / 2000:.1f}"
    assert by_label["open-loop sweep: highest rate held"][3] == "100"
    text = rep.render_text(rows)
    assert "gateway/litellm" in text and "40,000*" in text

    verdicts = {c["check"]: c["pass"] for c in rep.checks(results)}
    assert verdicts["gateway saturation throughput / LiteLLM's (non-streamed)"] is True  # 4000 / 300
    assert verdicts["added latency, sequential p50"] is True and verdicts["added latency, sequential p99"] is True
    assert verdicts["streamed relay, SSE chunks/s (c16 x128)"] is True
    assert verdicts["gateway peak RSS with 2000 open streams"] is True
    assert verdicts["Responses / chat completions, non-streamed c64 rps"] is True
    assert verdicts["Responses / chat completions, streamed c16 x128 chunks/s"] is False
    assert by_label["responses c64: rps"][3] == "3,800" and by_label["responses c64: rps"][1] == "-"
    assert "PASS  Responses / chat completions, non-streamed c64 rps: 0.95 x (target >= 0.9)" in \
        rep.render_checks(rep.checks(results))
    # The chat runs alternated with the Responses ones are the ratio's base where the run has them.
    results["gateway"]["paired_c64"] = rep.summarise([_run(4500, 9, 20)])
    assert "FAIL  Responses / chat completions, non-streamed c64 rps: 0.84 x (target >= 0.9)" in \
        rep.render_checks(rep.checks(results))
    del results["gateway"]["paired_c64"]

    md = tmp_path / "BENCHMARKS.md"
    section = rep.markdown_section("now", "make bench", {"cores": 2}, rows, rep.checks(results), {}, "r.json", [])
    rep.update_benchmarks_md(md, section)
    first = md.read_text()
    assert first.startswith("# Benchmarks") and "## What mattered" in first and "| c64: rps |" in first
    md.write_text(first.replace("(to be written)", "hand-written analysis"))
    rep.update_benchmarks_md(md, "second run")
    second = md.read_text()
    assert "hand-written analysis" in second and "second run" in second and "| c64: rps |" not in second
