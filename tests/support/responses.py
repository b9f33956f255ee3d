"""For the Responses API tests: a gateway in front of the session's llama.cpp (no vLLM needed), and the
event stream as it arrived on the wire."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.conftest import ROOT, tenants_document
from tests.support.processes import Server, free_port, start_server

# The session's llama.cpp runs with --n_ctx 2048: the registry entry says so here, so that the gateway's
# context check (which covers a whole stored conversation) is the one that answers.
LLAMA_CPP_CONTEXT = 2048


def llama_cpp_gateway(llama_cpp: Server, log_dir: Path, workdir: Path, name: str,
                      env: dict[str, str] | None = None) -> Iterator[Server]:
    local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())
    model = local["models"][0]
    model["context_length"] = LLAMA_CPP_CONTEXT
    model["backends"] = [{**model["backends"][0], "url": llama_cpp.url}]
    (workdir / "overlay.yaml").write_text(yaml.safe_dump(local))
    (workdir / "tenants.yaml").write_text(yaml.safe_dump(tenants_document()))
    port = free_port()
    server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port, "/ready",
                          log_dir, {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{workdir / 'overlay.yaml'}",
                                    "GATEWAY_TENANTS": str(workdir / "tenants.yaml"),
                                    "GATEWAY_AUDIT_SINK": str(workdir / "audit.jsonl"),
                                    "GATEWAY_HEALTH_PROBE_INTERVAL_S": "1", **(env or {})})
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


def sse(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event, checking OpenAI's framing: `event:` then `data:`, one each."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        data = json.loads(lines[1][len("data: "):])
        assert data["type"] == lines[0][len("event: "):], block
        events.append((data["type"], data))
    return events
