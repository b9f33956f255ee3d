"""State that survives: the rendered Redis (password, AOF, TLS with the redis-tls component) and the
rendered PostgreSQL (the dev overlay's single instance; the CloudNativePG Cluster's settings on a local
PostgreSQL) run as local processes, sandboxed as their pods (tests/support/sandbox.py), and are
restarted the two ways a pod goes: deleted (SIGTERM, or PostgreSQL's preStop fast shutdown) and killed
(SIGKILL: a node lost). A tenant's quota written through the gateway's own quota code, and rows in the
database, are all still there.

Not covered until the store package ([3/7]) is merged: the gateway's own ledger in PostgreSQL across a
restart (the rows here are written with psql)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from gateway.admission.quota import Quotas
from gateway.admission.quota_redis import RedisQuotas
from tests.support import sandbox
from tests.support.deploy import ROOT, build, objects
from tests.support.local_cluster import Cluster
from tests.support.processes import Server, start_server


@pytest.fixture
def scratch() -> Iterator[Path]:
    why = sandbox.available()
    if why:
        pytest.skip(f"sandboxed containers: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-state-", dir="/var/tmp"))
    tmp.chmod(0o755)
    yield tmp
    subprocess.run(["rm", "-rf", str(tmp)], check=False)


def _workload(docs: list[dict], name: str) -> dict:
    return next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == name)


def _wait_port(port: int, server: Server, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name}: nothing on {port}:\n{server.log_tail()}")


_PODS: list[Pod] = []


@pytest.fixture(autouse=True)
def _stop_pods() -> Iterator[None]:
    """Whatever pod a test left running (its last start) is stopped after it, failed or not."""
    yield
    while _PODS:
        pod = _PODS.pop()
        if pod.server is not None:
            pod.server.stop()


class Pod:
    """One rendered container as a local process that can be deleted, killed and started again on the
    same volumes (a StatefulSet pod's replacement gets its claim back)."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        _PODS.append(self)
        self.cluster, self.name = cluster, name
        self.workload = cluster.workload(name)
        (self.container,) = self.workload["spec"]["template"]["spec"]["containers"]
        self.port = cluster.local_port[name]
        self.server: Server | None = None

    def start(self) -> Server:
        argv, env = self.cluster.argv_env(self.workload, self.container, sandboxed=True)
        self.env = env
        self.server = start_server(f"{self.name}-{time.monotonic_ns()}", argv, self.port, "", self.cluster.tmp, env,
                                   inherit_env=False)
        _wait_port(self.port, self.server)
        return self.server

    def stop(self, sig: int) -> None:
        assert self.server is not None
        os.kill(self.server.process.pid, sig)
        assert self.server.process.wait(60) in (0, -sig, 128 + sig), self.server.log_tail()


def _quota_used(url: str, tenant: str, spend: int | None = None) -> int:
    async def run() -> int:
        quotas = RedisQuotas(url, fail_closed=True)
        try:
            if spend is not None:
                grant = await quotas.admit(tenant, Quotas(tokens_per_day=10_000), reserve=spend + 100)
                await grant.finish(spend)  # what the engine reported
            return (await quotas.periods(tenant)).day_used
        finally:
            await quotas.close()
    return asyncio.run(run())


def _gateway_redis_url(cluster: Cluster) -> str:
    gateway = cluster.workload("gateway")
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    return cluster.env(gateway, container, cluster.mounts(gateway, container))["GATEWAY_REDIS_URL"]


def test_redis_needs_its_password_and_loses_no_quota_when_deleted_or_killed(scratch: Path) -> None:
    """Why: Redis had no auth and no persistence, yet held every tenant's quota and usage counters."""
    cluster = Cluster(objects("dev"), scratch)
    pod = Pod(cluster, "redis")
    pod.start()
    url = _gateway_redis_url(cluster)  # the gateway's own URL, with the password from the Secret
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=pod.port).ping()
    assert _quota_used(url, "tenant-a", spend=250) == 250
    pod.stop(signal.SIGTERM)  # a deleted pod: redis-server writes and fsyncs its AOF, then exits
    pod.start()
    assert _quota_used(url, "tenant-a") == 250
    assert _quota_used(url, "tenant-a", spend=50) == 300
    time.sleep(1.5)  # appendfsync everysec: what a killed node may lose is the last second only
    pod.stop(signal.SIGKILL)
    pod.start()
    assert _quota_used(url, "tenant-a") == 300
    assert (cluster.tmp / "redis" / "data").glob("appendonlydir/*.aof")


def _certificates(directory: Path) -> dict[str, str]:
    """What cert-manager would put in the redis-tls Secret: a CA, and a server certificate it signed
    (for the Service name and, here, 127.0.0.1)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "2", "-subj", "/CN=llm-gateway-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "tls.key",
            "-out", "tls.csr", "-subj", "/CN=redis")
    (directory / "san.ext").write_text("subjectAltName=DNS:redis.llm-gateway.svc.cluster.local,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "2", "-extfile", "san.ext")
    return {name: (directory / name).read_text() for name in ("ca.crt", "tls.crt", "tls.key")}


def test_redis_with_the_tls_component_speaks_only_tls_and_the_gateway_url_verifies_it(scratch: Path) -> None:
    (scratch / "pki").mkdir()
    docs = build(ROOT, scratch, "dev", ("deploy/components/redis-tls",))
    cluster = Cluster(docs, scratch, secrets={"redis-tls": _certificates(scratch / "pki")})
    pod = Pod(cluster, "redis")
    pod.start()
    url = _gateway_redis_url(cluster).replace("redis.llm-gateway.svc.cluster.local", "127.0.0.1")
    assert url.startswith("rediss://")
    with pytest.raises(redis.ConnectionError):  # plain TCP is refused
        redis.Redis(host="127.0.0.1", port=pod.port, password=cluster.secret("redis-auth")["password"],
                    socket_timeout=3).ping()
    assert _quota_used(url, "tenant-tls", spend=40) == 40
    pod.stop(signal.SIGTERM)
    pod.start()
    assert _quota_used(url, "tenant-tls") == 40


def _psql(url: str, sql: str) -> str:
    result = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-tAc", sql], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _wait_sql(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["psql", url, "-tAc", "select 1"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "PostgreSQL never took a connection"
        time.sleep(0.3)


def test_the_dev_postgresql_keeps_every_committed_row_across_deletion_and_a_kill(scratch: Path) -> None:
    """What to build 5: PostgreSQL for the ledger; dev gets a small single instance (postgres-single)."""
    cluster = Cluster(objects("dev"), scratch)
    pod = Pod(cluster, "postgres")
    pod.start()
    url = cluster.rewrite(cluster.secret("gateway-database")["url"], {})  # the gateway's GATEWAY_DATABASE_URL
    _wait_sql(url)
    _psql(url, "create table ledger (id serial primary key, tokens int not null); insert into ledger (tokens) values (7)")
    # A deleted pod: its preStop (a fast shutdown and checkpoint), as rendered, then the container exits.
    prestop = pod.container["lifecycle"]["preStop"]["exec"]["command"]
    argv, env = cluster.argv_env(pod.workload, {**pod.container, "command": prestop, "args": []}, sandboxed=True)
    assert subprocess.run(argv, env=env, capture_output=True, timeout=90).returncode == 0
    assert pod.server.process.wait(60) == 0
    pod.start()
    _wait_sql(url)
    assert _psql(url, "select sum(tokens) from ledger") == "7"
    _psql(url, "insert into ledger (tokens) values (5)")  # committed: synchronous_commit=on, fsync=on
    pod.stop(signal.SIGKILL)
    pod.start()
    _wait_sql(url)
    assert _psql(url, "select sum(tokens) from ledger") == "12"
    assert _psql(url, "show synchronous_commit") == "on" and _psql(url, "show fsync") == "on"


def test_the_cloudnative_pg_cluster_settings_run_and_keep_committed_rows(scratch: Path) -> None:
    """The prod Cluster's postgresql.parameters, as flags of a local PostgreSQL (each must be a setting
    PostgreSQL accepts), restarted by SIGKILL: committed rows survive."""
    (cluster_doc,) = [d for d in objects("prod") if d["kind"] == "Cluster"]
    parameters = cluster_doc["spec"]["postgresql"]["parameters"]
    dev = objects("dev")
    args = ["postgres", "-c", "listen_addresses=*", "-c", "port=5432",
            *[f for k, v in sorted(parameters.items()) for f in ("-c", f"{k}={v}")]]
    patched = yaml.safe_load(yaml.safe_dump(dev))
    _workload(patched, "postgres")["spec"]["template"]["spec"]["containers"][0]["args"] = args
    cluster = Cluster(patched, scratch)
    pod = Pod(cluster, "postgres")
    pod.start()
    url = cluster.rewrite(cluster.secret("gateway-database")["url"], {})
    _wait_sql(url)
    for key in parameters:  # accepted (a bad name or value stops the server) and in force
        assert _psql(url, f"select source from pg_settings where name = '{key}'") == "command line", key
    _psql(url, "create table usage_rows (n int); insert into usage_rows values (1), (2)")
    pod.stop(signal.SIGKILL)
    pod.start()
    _wait_sql(url)
    assert _psql(url, "select count(*) from usage_rows") == "2"
