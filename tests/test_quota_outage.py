"""A Redis outage must not hand out fresh token quotas (issue 18, point 3).

Two gateways on one real redis-server in front of the fake vLLM. While Redis is unreachable (here: the
server stopped with SIGSTOP, a stall that fails every call with a timeout) each replica used to admit quota
tenants from an empty local count, and what they spent then never reached Redis. Now each replica continues
from the last totals it saw in Redis, refuses a quota tenant whose total it never saw (by default), and
writes what was spent back to Redis when it returns.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from gateway.admission.redis_keys import tenant_prefix
from gateway.tenancy.tenants import hash_key
from tests.support.hostile import Server, fault_backend, start_fault_upstream, start_gateway, start_redis

MODEL = "llama-2-7b"  # a base model: plain completions, Llama 2 license
QUOTA = 1000
LLAMA2 = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]
BODY = {"model": MODEL, "prompt": "spend", "max_tokens": 50}


def _key(name: str) -> str:
    return f"sk-test-outage-{name}"


def _tenant(name: str, **limits: int) -> dict:
    return {"name": name, "environment": "production", "attestations": LLAMA2,
            "api_key_hashes": [hash_key(_key(name))], "limits": limits}


TENANTS = [_tenant("near-limit", tokens_per_day=QUOTA), _tenant("big-spender", tokens_per_month=1_000_000),
           _tenant("never-seen", tokens_per_day=QUOTA),
           {"name": "ops", "environment": "research", "api_key_hashes": [hash_key(_key("ops"))], "admin": True}]


@dataclass
class Pair:
    gateways: list[Server]
    config_dirs: list[Path]
    redis: Server
    client: redis_lib.Redis


@pytest.fixture(scope="module")
def pair(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    engine = start_fault_upstream("fault-outage", log_dir)
    redis, url = start_redis("redis-outage", log_dir)
    servers: list[Server] = [engine, redis]
    try:
        engine.wait_ready(30)
        models = [{"id": MODEL, "backends": [fault_backend("fault-outage-0", engine, "primary")]}]
        dirs, gateways = [], []
        for index in range(2):
            config = tmp_path_factory.mktemp(f"outage-{index}")
            gateways.append(start_gateway(f"gateway-outage-{index}", config, log_dir, models, TENANTS,
                                          {"GATEWAY_REDIS_URL": url}))
            dirs.append(config)
        servers += gateways
        client = redis_lib.Redis.from_url(url, decode_responses=True)
        yield Pair(gateways, dirs, redis, client)
        client.close()
    finally:
        for server in reversed(servers):
            server.stop()


def _complete(gateway: Server, tenant: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/completions", json=BODY, timeout=30,
                      headers={"authorization": f"Bearer {_key(tenant)}"})


class Stalled:
    """redis-server stopped (SIGSTOP): connections stay open, every call times out."""

    def __init__(self, pair: Pair) -> None:
        self.pid = pair.redis.process.pid

    def __enter__(self) -> "Stalled":
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *_: object) -> None:
        os.kill(self.pid, signal.SIGCONT)
        # A replica whose circuit opened tries Redis again one probe interval (1 s) after its last failure.
        time.sleep(1.2)


def _day_used(pair: Pair, tenant: str) -> int:
    return int(pair.client.hget(f"{tenant_prefix(tenant)}:quota", "du") or 0)


def _month_used(pair: Pair, tenant: str) -> int:
    return int(pair.client.hget(f"{tenant_prefix(tenant)}:quota", "mu") or 0)


def _usage_tokens(pair: Pair, tenant: str, expected: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        records = [json.loads(line) for config in pair.config_dirs
                   for line in (config / "audit.jsonl").read_text().splitlines() if '"type":"usage"' in line]
        mine = [r for r in records if r["tenant"] == tenant]
        if len(mine) >= expected or time.monotonic() > deadline:
            return sum(r["total_tokens"] for r in mine)
        time.sleep(0.05)


def test_a_tenant_at_its_quota_stays_refused_while_redis_stalls(pair: Pair) -> None:
    admitted = 0
    for i in range(40):  # spend through both replicas until the quota refuses
        reply = _complete(pair.gateways[i % 2], "near-limit")
        if reply.status_code == 429:
            break
        assert reply.status_code == 200, reply.text
        admitted += 1
    assert 0 < admitted < 40
    for gateway in pair.gateways:  # each replica has now seen the tenant at (nearly) its quota
        assert _complete(gateway, "near-limit").status_code == 429
    used_before = _day_used(pair, "near-limit")
    with Stalled(pair):
        during = [_complete(gateway, "near-limit") for gateway in pair.gateways for _ in range(3)]
    for reply in during:
        assert reply.status_code == 429, reply.text
        assert reply.json()["error"]["code"] == "insufficient_quota"
    assert _day_used(pair, "near-limit") == used_before <= QUOTA


def test_a_quota_tenant_no_replica_has_seen_is_refused_during_the_outage(pair: Pair) -> None:
    with Stalled(pair):
        replies = [_complete(gateway, "never-seen") for gateway in pair.gateways]
    for reply in replies:
        assert reply.status_code == 503, reply.text
        assert "has not seen this tenant" in reply.json()["error"]["message"]
    assert _complete(pair.gateways[0], "never-seen").status_code == 200  # Redis is back


def test_what_was_spent_during_the_outage_is_written_back(pair: Pair) -> None:
    for gateway in pair.gateways:
        assert _complete(gateway, "big-spender").status_code == 200
    with Stalled(pair):
        during = [_complete(pair.gateways[i % 2], "big-spender") for i in range(6)]
    assert all(reply.status_code == 200 for reply in during), [r.text for r in during]
    # The next admission on each replica finds Redis back and writes its outage spend first.
    for gateway in pair.gateways:
        assert _complete(gateway, "big-spender").status_code == 200
    spent = _usage_tokens(pair, "big-spender", expected=10)
    deadline = time.monotonic() + 5
    while _month_used(pair, "big-spender") != spent and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _month_used(pair, "big-spender") == spent > 0
