"""Quotas that survive Redis (issue 20, item 4), with the usage ledger in a real database (SQLite, then
PostgreSQL), real redis-server processes and the fault upstream (vLLM's wire format, exact token counts).

Two gateways spend 60 % of a tenant's monthly quota; Redis is killed with SIGKILL and started again empty
on the same port; the tenant can then spend only the remaining 40 % (within one request's reservation):
the replicas reload its use from the ledger before its next admission. Without Redis, a restarted
gateway starts its quota counts from the ledger too.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.tenancy.tenants import hash_key
from tests.support.hostile import Server, fault_backend, start_fault_upstream, start_gateway
from tests.support.processes import free_port, start_redis
from tests.support.store_fixtures import module_db_url, pg_cluster  # noqa: F401

MODEL = "llama-2-7b"
LLAMA2 = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]
QUOTA = 10_000
KEY, LOCAL_KEY, ADMIN = "sk-test-ledger-quota", "sk-test-ledger-local", "sk-test-ledger-admin"
BODY = {"model": MODEL, "prompt": "spend it", "max_tokens": 97}  # the engine counts 3 + 97 = 100 tokens
TENANTS = [{"name": "metered", "environment": "production", "attestations": LLAMA2,
            "api_key_hashes": [hash_key(KEY)], "limits": {"tokens_per_month": QUOTA}},
           {"name": "metered-local", "environment": "production", "attestations": LLAMA2,  # the same, its own
            "api_key_hashes": [hash_key(LOCAL_KEY)], "limits": {"tokens_per_month": QUOTA}},
           {"name": "ops", "environment": "research", "api_key_hashes": [hash_key(ADMIN)], "admin": True}]


@pytest.fixture(scope="module")
def engine(log_dir: Path) -> Iterator[Server]:
    server = start_fault_upstream("fault-ledger-quota", log_dir)
    server.wait_ready(30)
    yield server
    server.stop()


def _models(engine: Server) -> list[dict]:
    return [{"id": MODEL, "backends": [fault_backend("fault-ledger-quota-0", engine, "primary")]}]


def _spend(gateways: list[Server], until_tokens: int | None = None, limit: int = 400,
           key: str = KEY) -> tuple[int, httpx.Response]:
    """Requests through the gateways in turn until `until_tokens` are spent, or until one is refused;
    returns the tokens the engine counted for the admitted ones and the last answer."""
    spent = 0
    for i in range(limit):
        reply = httpx.post(gateways[i % len(gateways)].url + "/v1/completions", json=BODY, timeout=30,
                           headers={"authorization": f"Bearer {key}"})
        if reply.status_code != 200:
            return spent, reply
        spent += reply.json()["usage"]["total_tokens"]
        if until_tokens is not None and spent >= until_tokens:
            return spent, reply
    raise AssertionError("the quota never refused")


def _reservation(refusal: httpx.Response) -> int:
    assert refusal.status_code == 429, refusal.text
    error = refusal.json()["error"]
    assert error["code"] == "insufficient_quota", error
    return int(re.search(r"this request reserves (\d+)", error["message"]).group(1))


def test_after_redis_restarts_empty_the_tenant_spends_only_what_is_left(engine: Server, module_db_url: str,
                                                                        log_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    redis, url = start_redis("redis-ledger-quota", log_dir, port)
    env = {"GATEWAY_REDIS_URL": url, "GATEWAY_DATABASE_URL": module_db_url}
    gateways = [start_gateway(f"gateway-ledger-quota-{i}", tmp_path / f"gw{i}", log_dir, _models(engine), TENANTS,
                              env) for i in range(2)]
    try:
        before, _ = _spend(gateways, until_tokens=QUOTA * 6 // 10)
        assert before == QUOTA * 6 // 10  # 60 requests of 100 tokens
        time.sleep(1.5)  # each replica's ledger rows are written within its flush interval (1 s)
        os.kill(redis.process.pid, signal.SIGKILL)
        redis.process.wait()
        redis, _ = start_redis("redis-ledger-quota-again", log_dir, port)  # empty: no persistence
        after, refusal = _spend(gateways)
        reserve = _reservation(refusal)
        print(f"spent {before} before the Redis restart, {after} after it (reservation {reserve})")
        assert after <= QUOTA - before  # not one fresh quota, not even part of one
        assert QUOTA - before - after < reserve  # and everything left could be spent: within one request
        for gateway in gateways:  # the refusal holds on both replicas
            again = httpx.post(gateway.url + "/v1/completions", json=BODY, headers={"authorization": f"Bearer {KEY}"})
            assert again.status_code == 429
        assert any(g.log_lines_with("reloaded from the ledger") for g in gateways)
    finally:
        for gateway in gateways:
            gateway.stop()
        redis.stop()


def test_without_redis_a_restarted_gateway_continues_from_the_ledger(engine: Server, module_db_url: str,
                                                                    log_dir: Path, tmp_path: Path) -> None:
    env = {"GATEWAY_DATABASE_URL": module_db_url}
    first = start_gateway("gateway-local-quota-a", tmp_path / "a", log_dir, _models(engine), TENANTS, env)
    try:
        before, _ = _spend([first], until_tokens=QUOTA * 6 // 10, key=LOCAL_KEY)
        assert before == QUOTA * 6 // 10
    finally:
        first.stop()  # SIGTERM: its last ledger rows are written before it exits
    second = start_gateway("gateway-local-quota-b", tmp_path / "b", log_dir, _models(engine), TENANTS, env)
    try:
        deadline = time.monotonic() + 20  # the seed is read just after start
        while True:
            page = httpx.get(second.url + "/v1/organization/usage/completions", params={"start_time": 0},
                             headers={"authorization": f"Bearer {ADMIN}"}).json()
            used = page["gateway"]["quotas"]["metered-local"]["tokens_per_month"]["used"]
            if used or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert used == before
        after, refusal = _spend([second], key=LOCAL_KEY)
        assert after <= QUOTA - before and QUOTA - before - after < _reservation(refusal)
    finally:
        second.stop()
