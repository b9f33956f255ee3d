"""Two real gateway processes share one real redis-server: a tenant's limit holds across both.

The model's backend is a closed port, so an admitted request ends as 503 and a refused one as 429:
the rate limiter runs before any backend is tried.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import ROOT, UNREACHABLE_MODEL
from tests.support.processes import Server, free_port, start_redis, start_server

KEY = "sk-test-replica-key"


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("replicas")
    (directory / "overlay.yaml").write_text(yaml.safe_dump({"models": [{"id": UNREACHABLE_MODEL, "backends": [{
        "id": "replica-test-closed", "engine": "vllm", "engine_version": "0.32.0",
        "url": f"http://127.0.0.1:{free_port()}", "role": "primary"}]}]}))
    (directory / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [{
        "name": "shared-team", "environment": "research", "api_key_hashes": [hash_key(KEY)],
        "limits": {"rpm": 100}}]}))
    return directory


@pytest.fixture(scope="module")
def redis(log_dir: Path) -> Iterator[Server]:
    server, _ = start_redis("redis", log_dir)
    yield server
    server.stop()


def _gateway(name: str, config_dir: Path, log_dir: Path, **env: str) -> Server:
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{config_dir / 'overlay.yaml'}",
           "GATEWAY_TENANTS": str(config_dir / "tenants.yaml"),
           "GATEWAY_AUDIT_SINK": str(log_dir / f"{name}-audit.jsonl"), **env}
    server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], port,
                          "/ready", log_dir, env)
    server.wait_ready(60)
    return server


async def _burst(urls: list[str], count: int) -> Counter:
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int) -> int:
            response = await client.post(urls[i % len(urls)] + "/v1/completions",
                                         headers={"authorization": f"Bearer {KEY}"},
                                         json={"model": UNREACHABLE_MODEL, "prompt": "hi", "max_tokens": 1})
            return response.status_code
        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


def test_100_rpm_is_exact_across_two_replicas(redis: Server, config_dir: Path, log_dir: Path) -> None:
    url = f"redis://127.0.0.1:{redis.url.rsplit(':', 1)[1]}/0"
    replicas = [_gateway(f"replica-{i}", config_dir, log_dir, GATEWAY_REDIS_URL=url) for i in range(2)]
    try:
        statuses = asyncio.run(_burst([r.url for r in replicas], 300))
    finally:
        for replica in replicas:
            replica.stop()
    assert statuses == Counter({503: 100, 429: 200})


def test_unreachable_redis_fails_open_by_default(config_dir: Path, log_dir: Path) -> None:
    gateway = _gateway("fail-open", config_dir, log_dir, GATEWAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        statuses = asyncio.run(_burst([gateway.url], 5))
        assert statuses == Counter({503: 5})  # admitted on local limits, then the closed backend
        assert gateway.log_lines_with("redis")  # the outage is logged
    finally:
        gateway.stop()


def test_unreachable_redis_fails_closed_when_set(config_dir: Path, log_dir: Path) -> None:
    gateway = _gateway("fail-closed", config_dir, log_dir, GATEWAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                       GATEWAY_RATELIMIT_FAIL_CLOSED="true")
    try:
        response = httpx.post(gateway.url + "/v1/completions", headers={"authorization": f"Bearer {KEY}"},
                              json={"model": UNREACHABLE_MODEL, "prompt": "hi"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "rate_limiter_unavailable"
    finally:
        gateway.stop()
