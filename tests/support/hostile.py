"""Helpers for tests that attack the gateway: a real redis-server, a gateway against fault upstreams,
raw-socket HTTP (slow uploads, hang-ups at a chosen moment), Redis inspection, RSS and metrics readers.

Raw sockets, not an HTTP client, where the attack is the transport itself: an HTTP client would finish
the upload, retry, or pool the connection, and the test must control exactly when bytes go out and
when the socket closes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.admission.redis_keys import tenant_prefix
from tests.support.processes import Server, free_port, start_redis, start_server, wait_for_port  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[2]


# ---- processes ----------------------------------------------------------------------------------


def start_fault_upstream(name: str, log_dir: Path, served: str = "fault-model") -> Server:
    port = free_port()
    return start_server(name, [sys.executable, "-m", "tests.support.fault_upstream", "--port", str(port),
                               "--served-model-name", served], port, "/health", log_dir)


def fault_mode(server: Server, **body: object) -> None:
    httpx.post(server.url + "/control/mode", json=body, timeout=10).raise_for_status()


def fault_records(server: Server) -> list[dict]:
    return httpx.get(server.url + "/control/requests", timeout=30).json()


def fault_reset(server: Server) -> None:
    httpx.post(server.url + "/control/reset", timeout=10).raise_for_status()


def start_gateway(name: str, config_dir: Path, log_dir: Path, models: list[dict], tenants: list[dict],
                  env: dict[str, str]) -> Server:
    """A gateway process on the ten-model registry plus `models` as an overlay, with `tenants`."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "overlay.yaml").write_text(yaml.safe_dump({"models": models}))
    (config_dir / "tenants.yaml").write_text(yaml.safe_dump({"tenants": tenants}))
    port = free_port()
    full_env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{config_dir / 'overlay.yaml'}",
                "GATEWAY_TENANTS": str(config_dir / "tenants.yaml"),
                "GATEWAY_AUDIT_SINK": str(config_dir / "audit.jsonl"), **env}
    server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port,
                          "/ready", log_dir, full_env)
    server.wait_ready(60)
    return server


def fault_backend(backend_id: str, server: Server, role: str, **extra: object) -> dict:
    return {"id": backend_id, "engine": "vllm", "engine_version": "0.32.0", "url": server.url, "role": role,
            "served_model_name": "fault-model", **extra}


# ---- gateway state ------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def backends_report(gateway: Server, admin_key: str) -> dict[str, dict]:
    response = httpx.get(gateway.url + "/admin/backends", headers={"authorization": f"Bearer {admin_key}"},
                         timeout=30)
    response.raise_for_status()
    return {row["id"]: row for row in response.json()["data"]}


def inflight_metric(gateway: Server, admin_key: str) -> dict[str, float]:
    """gateway_backend_inflight_requests by backend."""
    response = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {admin_key}"}, timeout=30)
    response.raise_for_status()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name == "gateway_backend_inflight_requests":
            for sample in family.samples:
                values[sample.labels["backend"]] = sample.value
    return values


def limiter_keys(tenant: str) -> dict[str, str]:
    prefix = tenant_prefix(tenant)
    return {part: f"{prefix}:{part}" for part in ("req", "tok", "toksum", "inf")}


@dataclass
class Quiet:
    """What the gateway looked like once every request had ended."""

    report: dict[str, dict]
    inflight: dict[str, float]
    redis_inflight: dict[str, int] = field(default_factory=dict)


def wait_until_quiet(gateway: Server, admin_key: str, redis_client, tenants: list[str],
                     timeout_s: float = 15) -> Quiet:
    """Poll until no backend has outstanding requests, the in-flight gauge is 0 everywhere and no tenant
    has an in-flight entry in Redis; return the last observation either way (the caller asserts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = backends_report(gateway, admin_key)
        inflight = inflight_metric(gateway, admin_key)
        redis_inflight = {t: int(redis_client.zcard(limiter_keys(t)["inf"])) for t in tenants}
        quiet = Quiet(report, inflight, redis_inflight)
        if (all(row["outstanding"] == 0 for row in report.values()) and all(v == 0 for v in inflight.values())
                and all(v == 0 for v in redis_inflight.values())):
            return quiet
        if time.monotonic() > deadline:
            return quiet
        time.sleep(0.1)


# ---- raw HTTP -----------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int | None  # None: the connection ended before a status line
    headers: dict[str, str]
    body: bytes
    elapsed_s: float


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def raw_exchange(port: int, head: bytes, body_parts: list[bytes], *, timeout_s: float = 30.0) -> RawResponse:
    """Send `head`, then each body part, and read one response (a Content-Length or chunked body) without
    ever closing the sending side. For slow uploads: send less than the body announced (Content-Length, or
    chunks without the last one) and wait for the server to give up."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(head)
            for part in body_parts:
                writer.write(part)
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    break  # the server answered early and closed: read what it said
            return await _read_response(reader, started)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def _read_response(reader: asyncio.StreamReader, started: float) -> RawResponse:
    try:
        status_line = await reader.readline()
    except (ConnectionError, OSError):
        status_line = b""
    if not status_line:
        return RawResponse(None, {}, b"", time.monotonic() - started)
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    try:
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                body += await reader.readexactly(size)
                await reader.readline()
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    return RawResponse(status, headers, body, time.monotonic() - started)


async def hang_up_after(port: int, head: bytes, body: bytes, *, events: int = 0, after_s: float = 0.0,
                        abort: bool = False, timeout_s: float = 30.0) -> tuple[bytes, float]:
    """Send a complete request, then close the socket once `events` SSE events (``data:`` lines) of the
    response arrived (0: without waiting for any) and `after_s` more seconds passed: with a FIN, or with
    `abort` an immediate close. Returns what was read and the time (time.time()) the socket was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            while received.count(b"data:") < events:
                data = await reader.read(65536)
                if not data:
                    break
                received += data
        if after_s:
            await asyncio.sleep(after_s)
    finally:
        if abort:
            writer.transport.abort()
        else:
            writer.close()
    return received, time.time()
