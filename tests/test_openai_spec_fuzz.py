"""OpenAI's published spec as a fuzzer: schemathesis against the gateway in front of real llama.cpp.

The module starts its own llama.cpp (SmolLM2, as `make run` does) and gateway (the deploy/local
overlay), then runs the schemathesis CLI on chat completions, completions, responses (create, retrieve,
delete, input_items), models and models/{model} twice: once in its default mode (valid and invalid
requests), once with `stream: true` forced on valid requests. What must hold for every request: no
status >= 500, every error in OpenAI's `{"error": {message, type, param, code}}` envelope, every
streamed event a valid chunk (or `[DONE]`; for /responses a valid event of OpenAI's stream); and
afterwards the engine is still healthy and was never ejected.

tests/openai_spec/hooks.py adapts the spec (served model id, error responses, SSE chunks, token caps).
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import LOCAL_MODEL, ROOT, smollm2_gguf
from tests.support.processes import Server, free_port, start_server

pytestmark = pytest.mark.llamacpp

SPEC = Path(__file__).parent / "openai_spec" / "openai-openapi.yaml"
KEY = "sk-test-fuzz-admin"
SEED = 20250101
BACKEND_ID = "llamacpp-smollm2-local"  # the deploy/local overlay's backend
# Cases per operation and phase; the coverage phase adds its own (schema-derived) cases on top.
MAX_EXAMPLES = 60
REQUEST_TIMEOUT_S = 30
PASS_TIMEOUT_S = 420  # a pass takes ~2-3 min here when the machine is quiet

# Include filters of different kinds are ORed by schemathesis, so the operations are selected by path
# and the two other methods on those paths (GET /chat/completions, DELETE /models/{model}) are excluded
# by operation id. (/responses/{id}/cancel, /compact and /input_tokens are not served: not selected.)
SELECT_ALL = ["--include-path-regex",
              r"^/(chat/completions|completions|models|models/\{model\}|responses|responses/\{response_id\}"
              r"|responses/\{response_id\}/input_items)$",
              "--exclude-operation-id", "listChatCompletions", "--exclude-operation-id", "deleteModel"]
SELECT_GENERATION = ["--include-path-regex", r"^/(chat/completions|completions|responses)$",
                     "--exclude-operation-id", "listChatCompletions"]

# Checks, and why the others are off:
# - not_a_server_error: no 5xx (502 and 503 included), whatever the request.
# - status_code_conformance: only documented statuses (the hooks document 200 and the OpenAI error
#   statuses, all with the spec's ErrorResponse).
# - content_type_conformance: JSON bodies, SSE streams where the spec (as hooked) says so.
# - response_schema_conformance: 200 bodies, each SSE event, and every error envelope.
# Off: negative_data_rejection and positive_data_acceptance judge which requests are accepted, a
# policy question, not how they are answered: the gateway reads null as "absent" where the spec has
# no null and does not deep-validate OpenAI-only fields (`prediction`), and it refuses spec-valid
# requests a llama.cpp backend cannot serve (n > 1, tools, json_schema output, token-id prompts)
# with a 400. missing_required_header, ignored_auth, unsupported_method, allow_header_conformance,
# response_headers_conformance: auth and HTTP-method semantics, not what this module is about.
# use_after_free, ensure_resource_availability, object_level_authorization: stateful checks for
# APIs that create resources; this one creates none.
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("fuzz-logs")
    port = free_port()
    # As deploy/local/run.sh: the context length the registry entry declares (8192).
    llama = start_server("llama-cpp", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
        "--model_alias", "smollm2-local", "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", "2", "--n_ctx", "8192", "--interrupt_requests", "false"], port, "/v1/models", logs)
    gateway = None
    try:
        local = yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())
        (backend,) = [b for b in local["models"][0]["backends"] if b["id"] == BACKEND_ID]
        backend["url"] = llama.url
        overlay = logs / "registry-overlay.yaml"
        overlay.write_text(yaml.safe_dump(local))
        tenants = logs / "tenants.yaml"
        tenants.write_text(yaml.safe_dump({"tenants": [{
            "name": "fuzz", "environment": "development", "admin": True,
            "api_key_hashes": [hash_key(KEY)]}]}))
        gateway_port = free_port()
        argv = [sys.executable, "-m", "gateway", "serve", "--port", str(gateway_port)]
        gateway = start_server("gateway", argv, gateway_port, "/ready", logs, {
            "GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{overlay}",
            "GATEWAY_TENANTS": str(tenants), "GATEWAY_AUDIT_SINK": str(logs / "audit.jsonl")})
        llama.wait_ready(120)
        gateway.wait_ready(60)
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        llama.stop()


@dataclass
class Problem:
    operation: str  # "POST /chat/completions"
    status: int | None  # None: no response (timeout, connection reset)
    what: str  # the failed checks' titles, or what this module found itself
    detail: str  # the first line of the first check's message
    request: Any
    response: str

    @property
    def key(self) -> tuple[str, str, str]:
        """What tells one bug from another: where, which status, and which error message (numbers
        masked: an engine's errors differ by field, not by value) or else which schema violation."""
        shape = _error_message_shape(self.response) or re.sub(r"\d+", "#", self.detail)[:150]
        return self.operation, str(self.status), shape


@dataclass
class PassResult:
    name: str
    exit_code: int | None  # None: killed after PASS_TIMEOUT_S
    cases: int | None = None
    problems: list[Problem] = field(default_factory=list)
    output_tail: str = ""

    @property
    def failed(self) -> bool:
        return self.exit_code != 0 or bool(self.problems)


def run_pass(name: str, gateway: Server, workdir: Path, args: list[str], env: dict[str, str]) -> PassResult:
    ndjson, report = workdir / f"{name}.ndjson", workdir / f"{name}.json"
    # The default of 20 events per stream would cut n=2 streams short (and skip the `[DONE]`).
    config = workdir / "schemathesis.toml"
    config.write_text("max-stream-events = 200\n")
    argv = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", str(SPEC),
            "--url", f"{gateway.url}/v1", "--header", f"Authorization: Bearer {KEY}",
            "--checks", CHECKS, "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES),
            # Every failing case, not only the first per operation: the report lists them all.
            "--continue-on-failure",
            # 8 tokens take well under a second; a request this slow is a runaway generation.
            "--request-timeout", str(REQUEST_TIMEOUT_S),
            "--workers", "1", "--generation-database", "none", "--output-sanitize", "false", "--no-color",
            "--report", "ndjson,json", "--report-ndjson-path", str(ndjson), "--report-json-path", str(report),
            *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.openai_spec.hooks",
           "FUZZ_SERVED_MODEL": LOCAL_MODEL, **env}
    # cwd: schemathesis keeps a crash cache (.schemathesis/) in the working directory.
    with subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        try:
            output, _ = proc.communicate(timeout=PASS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    result = PassResult(name, None if proc.returncode < 0 else proc.returncode, output_tail=output[-3000:])
    if report.exists() and report.stat().st_size:  # empty when the pass was killed before its end
        result.cases = json.loads(report.read_text())["test_cases"]["generated"]
    if ndjson.exists():  # written as the run goes: partial when the pass was killed
        result.problems = problems_in(ndjson)
    return result


def problems_in(ndjson: Path) -> list[Problem]:
    """Every failed check, and every response this module rejects itself, from schemathesis' events."""
    problems = []
    for line in ndjson.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if not event:
            continue
        recorder = event["recorder"]
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            response = interaction.get("response") or {}
            status = response.get("status_code")
            text = _decode_text(response.get("content"))
            checks = recorder.get("checks", {}).get(case_id, [])
            failures = [check["failure_info"]["failure"] for check in checks if check["status"] == "failure"]
            what = [failure["title"] for failure in failures]
            # Held here too, whatever schemathesis checked (it validates no body of an undocumented status).
            if status is None:
                what.append("No response (timeout or connection error)")
            elif status >= 500 and not failures:
                what.append(f"Server error {status}")
            if status is not None and status >= 400 and not _is_openai_error(text):
                what.append("Error body is not OpenAI's {error: {message, type, param, code}}")
            if what:
                detail = _first_line(failures[0]) if failures else ""
                problems.append(Problem(f"{case['method']} {case['path']}", status, "; ".join(what), detail,
                                        _decode(interaction["request"].get("body")), text))
    return problems


def _decode(body: Any) -> Any:
    if isinstance(body, dict) and "$base64" in body:
        raw = base64.b64decode(body["$base64"])
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")
    return body


def _decode_text(content: Any) -> str:
    if isinstance(content, dict) and "$base64" in content:
        return base64.b64decode(content["$base64"]).decode(errors="replace")
    return "" if content is None else str(content)


def _first_line(failure: dict) -> str:
    message = (failure.get("message") or "").strip().splitlines()
    return message[0][:300] if message else ""


def _is_openai_error(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if not isinstance(error, dict):
        return False
    return (isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and all(key in error and (error[key] is None or isinstance(error[key], str))
                    for key in ("param", "code")))


def _error_message_shape(text: str) -> str:
    """The start of the error message (of a JSON body or of a stream's first event), numbers masked."""
    try:
        message = str(json.loads(text.removeprefix("data:").strip().splitlines()[0])["error"]["message"])
    except (ValueError, KeyError, TypeError, IndexError):
        return ""
    return re.sub(r"\d+", "#", message)[:150]


def summarize(result: PassResult) -> str:
    """One entry per distinct problem, with the shortest request that shows it."""
    groups: dict[tuple[str, str, str], list[Problem]] = {}
    for problem in result.problems:
        groups.setdefault(problem.key, []).append(problem)
    ran = f"killed after {PASS_TIMEOUT_S}s" if result.exit_code is None else f"exit {result.exit_code}"
    lines = [f"== {result.name}: {result.cases} cases, schemathesis {ran}, {len(result.problems)} failing "
             f"responses, {len(groups)} distinct"]
    for (operation, status, _), found in sorted(groups.items()):
        example = min(found, key=lambda p: len(json.dumps(p.request, default=str)))
        lines += [f"- {operation} -> {status}: {example.what} (x{len(found)})",
                  *([f"    detail:   {example.detail}"] if example.detail else []),
                  f"    request:  {json.dumps(example.request, default=str)[:800]}",
                  f"    response: {example.response[:400]!r}"]
    if result.exit_code != 0 and not groups:  # failed without a failing response: say why
        lines.append(f"schemathesis output (tail):\n{result.output_tail}")
    return "\n".join(lines)


def test_gateway_holds_openai_spec_under_fuzzing(fuzz_gateway: Server, tmp_path: Path) -> None:
    results = [
        # Valid and invalid requests (schemathesis' default mode), examples + coverage + fuzzing.
        run_pass("default-mode", fuzz_gateway, tmp_path, SELECT_ALL, {}),
        # Schemathesis rarely sets `stream: true`; forced here, on valid requests only.
        run_pass("forced-stream", fuzz_gateway, tmp_path, [*SELECT_GENERATION, "--mode", "positive"],
                 {"FUZZ_FORCE_STREAM": "1"}),
    ]
    headers = {"authorization": f"Bearer {KEY}"}
    backends = httpx.get(f"{fuzz_gateway.url}/admin/backends", headers=headers, timeout=10)
    backends.raise_for_status()
    rows = backends.json()["data"]
    (engine,) = [row for row in rows if row["id"] == BACKEND_ID]
    # /admin/backends says how the engine is now (a success resets its ejection count); the
    # metrics counter says whether it was ejected at any time during the run.
    metrics = httpx.get(f"{fuzz_gateway.url}/metrics", headers=headers, timeout=10)
    metrics.raise_for_status()
    assert "gateway_backend_ejections_total" in metrics.text, "the ejection counter is gone from /metrics"
    ejected = re.search(rf'^gateway_backend_ejections_total{{backend="{BACKEND_ID}"}} (\S+)$',
                        metrics.text, re.M)
    ejections = float(ejected.group(1)) if ejected else 0.0  # no sample yet: never ejected
    report = [summarize(result) for result in results]
    engine_ok = engine["healthy"] and not engine["ejected"] and ejections == 0
    if not engine_ok:
        report.append(f"== engine hurt by the fuzzing: ejected {ejections:.0f} times during the run; "
                      f"now {engine}")
    if any(result.failed for result in results) or not engine_ok:
        pytest.fail("\n".join(report), pytrace=False)
    print("\n".join(report))
