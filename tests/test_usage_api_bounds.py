"""The usage API as a hostile tenant would use it, against a real gateway on a real redis-server and the
usage ledger in a real database (SQLite, then PostgreSQL): its own per-tenant limits (429 past them,
other tenants unaffected), bounded pages that add up to the right totals when followed, strictly parsed
parameters; and, on the same gateway (tenant labels off), metrics that name no tenant, rate-limit
rejections included."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.tenancy.tenants import hash_key
from tests.conftest import ROOT
from tests.support.processes import Server, free_port, start_redis, start_server
from tests.support.store_fixtures import dim, module_db_url, pg_cluster, seed_rollups  # noqa: F401

ADMIN_KEY, HEAVY_KEY, SPAM_KEY, SLOW_KEY, STRICT_KEY = (
    "sk-test-bounds-admin", "sk-test-bounds-heavy", "sk-test-bounds-spam", "sk-test-bounds-slow",
    "sk-test-bounds-strict")
RPM_KEY, QUOTA_KEY = "sk-test-bounds-rpm", "sk-test-bounds-quota"
TENANTS = ["bounds-admin-secret", "bounds-heavy-secret", "bounds-spam-secret", "bounds-slow-secret",
           "bounds-strict-secret", "bounds-rpm-secret", "bounds-quota-secret"]
USAGE_RPM, MAX_ROWS = 20, 20
MINUTE = int(time.time()) // 60 * 60
FIRST, BUCKETS = MINUTE - 40 * 60, 30  # the stored usage: 30 minute buckets, 40 to 11 minutes ago
URL = "/v1/organization/usage/completions"


def _stored_rows(i: int) -> list[tuple[list[str], tuple[int, int, int]]]:
    """Bucket i's rollup rows: 1 to 4 keys of the heavy tenant and one of the strict tenant."""
    rows = [(["bounds-heavy-secret", f"key{k}", "falcon-7b", "apache-2.0"], (10 * i + k, i + 1, k + 1))
            for k in range(i % 4 + 1)]
    return rows + [(["bounds-strict-secret", "keyS", "falcon-7b", "apache-2.0"], (1, 1, 1))]


@pytest.fixture(scope="module")
def redis_port(log_dir: Path, module_db_url: str) -> Iterator[int]:  # a fresh Redis for each database
    server, _ = start_redis("bounds-redis", log_dir)
    yield int(server.url.rsplit(":", 1)[1])
    server.stop()


@pytest.fixture(scope="module")
def database(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The ledger's rollups as replicas would have written them: 30 minute buckets."""
    rows = [(FIRST + 60 * i, dim(*key), values) for i in range(BUCKETS) for key, values in _stored_rows(i)]
    asyncio.run(seed_rollups(module_db_url, tmp_path_factory.mktemp("seed"), "1m", rows))
    return module_db_url


@pytest.fixture(scope="module")
def gateway(redis_port: int, database: str, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("usage-bounds")
    (tmp / "overlay.yaml").write_text(yaml.safe_dump({"models": [
        {"id": "falcon-7b", "backends": [{"id": "bounds-closed-port", "engine": "vllm", "engine_version": "0.32.0",
                                          "url": f"http://127.0.0.1:{free_port()}", "role": "primary"}]}]}))

    def tenant(name: str, key: str, **extra: object) -> dict:
        return {"name": name, "environment": "research", "api_key_hashes": [hash_key(key)], **extra}

    (tmp / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        tenant("bounds-admin-secret", ADMIN_KEY, admin=True), tenant("bounds-heavy-secret", HEAVY_KEY),
        tenant("bounds-spam-secret", SPAM_KEY), tenant("bounds-slow-secret", SLOW_KEY),
        tenant("bounds-strict-secret", STRICT_KEY), tenant("bounds-rpm-secret", RPM_KEY, limits={"rpm": 1}),
        tenant("bounds-quota-secret", QUOTA_KEY, limits={"tokens_per_day": 5}),
    ]}))
    port = free_port()
    env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp / 'overlay.yaml'}",
           "GATEWAY_TENANTS": str(tmp / "tenants.yaml"), "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "GATEWAY_AUDIT_SINK": str(tmp / "audit.jsonl"), "GATEWAY_METRICS_TENANT_LABEL": "false",
           "GATEWAY_USAGE_API_RPM": str(USAGE_RPM), "GATEWAY_USAGE_API_MAX_CONCURRENT": "1",
           "GATEWAY_USAGE_API_MAX_ROWS": str(MAX_ROWS), "GATEWAY_DATABASE_URL": database}
    server = start_server("bounds-gateway", [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                          port, "/ready", log_dir, env)
    server.wait_ready(60)
    yield server
    server.stop()


def _get(gateway: Server, key: str, params: object) -> httpx.Response:
    return httpx.get(gateway.url + URL, params=params, headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_a_tenant_past_its_usage_api_rate_gets_openais_429_and_others_do_not(gateway: Server) -> None:
    query = {"start_time": MINUTE - 3600, "bucket_width": "1m", "limit": 1440}
    answers = [_get(gateway, SPAM_KEY, query) for _ in range(USAGE_RPM + 3)]
    assert [a.status_code for a in answers] == [200] * USAGE_RPM + [429] * 3
    refused = answers[-1]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "usage API" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert _get(gateway, HEAVY_KEY, query).status_code == 200  # another tenant: its own budget


@contextmanager
def _ledger_locked(url: str) -> Iterator[None]:
    """The ledger table locked by someone else: a replica's write of its last rows (which the usage API
    waits for, for at most 2 s, before it reads) waits too."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=10)
        conn.execute("BEGIN IMMEDIATE")  # the database's one write lock; readers go on (WAL)
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import asyncpg

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(url))
    transaction = conn.transaction()
    loop.run_until_complete(transaction.start())
    loop.run_until_complete(conn.execute("LOCK TABLE usage_ledger IN EXCLUSIVE MODE"))
    try:
        yield
    finally:
        loop.run_until_complete(transaction.rollback())
        loop.run_until_complete(conn.close())
        loop.close()


def test_a_tenant_gets_one_usage_call_at_a_time(gateway: Server, database: str) -> None:
    query = {"start_time": MINUTE - 3600, "bucket_width": "1m", "limit": 60}
    slow: list[httpx.Response] = []
    with _ledger_locked(database):
        # A request of the tenant (refused by the closed port: still a ledger row) waits to be written.
        httpx.post(gateway.url + "/v1/completions", json={"model": "falcon-7b", "prompt": "x", "max_tokens": 1},
                   headers={"authorization": f"Bearer {SLOW_KEY}"})
        first = threading.Thread(target=lambda: slow.append(_get(gateway, SLOW_KEY, query)))
        first.start()
        time.sleep(0.5)  # the first call waits for that write
        second = _get(gateway, SLOW_KEY, query)
        first.join()
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "1 calls at a time" in second.json()["error"]["message"]
    assert slow[0].status_code == 200
    assert _get(gateway, SLOW_KEY, query).status_code == 200  # the slot is free again


def _pages(gateway: Server, key: str, params: dict) -> list[dict]:
    pages = [_get(gateway, key, params).json()]
    while pages[-1]["has_more"]:
        assert len(pages) < BUCKETS + 1, "a page must make progress"
        pages.append(_get(gateway, key, {**params, "page": pages[-1]["next_page"]}).json())
    return pages


def test_a_page_reads_a_bounded_number_of_rows_and_pages_add_up(gateway: Server) -> None:
    query = {"start_time": FIRST, "end_time": FIRST + 60 * BUCKETS, "bucket_width": "1m", "limit": 1440,
             "group_by": "project_id"}
    pages = _pages(gateway, ADMIN_KEY, query)
    assert len(pages) > 3  # 30 buckets of 2 tenants (+ 1 each: 90) do not fit in 20 results per call
    starts = [bucket["start_time"] for page in pages for bucket in page["data"]]
    assert starts == [FIRST + 60 * i for i in range(BUCKETS)]  # no bucket lost, none twice
    for page in pages:  # the bound counts results (the rows grouped by group_by), a bucket one more
        cost = sum(1 + len(b["results"]) for b in page["data"])
        assert cost <= MAX_ROWS or len(page["data"]) == 1
        assert page["has_more"] == (page is not pages[-1])
    totals: dict[str, list[int]] = {}
    for page in pages:
        for bucket in page["data"]:
            for result in bucket["results"]:
                row = totals.setdefault(result["project_id"], [0, 0, 0])
                for j, name in enumerate(("input_tokens", "output_tokens", "num_model_requests")):
                    row[j] += result[name]
    expected: dict[str, list[int]] = {}
    for i in range(BUCKETS):
        for key, values in _stored_rows(i):
            row = expected.setdefault(key[0], [0, 0, 0])
            for j in range(3):
                row[j] += values[j]
    assert totals == expected
    # A tenant's own view pages the same way and sums to its own totals only.
    own = _pages(gateway, HEAVY_KEY, query)
    assert {r["project_id"] for p in own for b in p["data"] for r in b["results"]} == {"bounds-heavy-secret"}
    assert sum(r["num_model_requests"] for p in own for b in p["data"] for r in b["results"]) == (
        expected["bounds-heavy-secret"][2])
    # batch=true: no request here is a batch one; batch=false: every request
    batches = _get(gateway, ADMIN_KEY, {**query, "batch": "true"}).json()
    assert len(batches["data"]) == BUCKETS and not any(b["results"] for b in batches["data"])
    assert _get(gateway, ADMIN_KEY, {**query, "batch": "false"}).json()["data"] == pages[0]["data"]


@pytest.mark.parametrize(("params", "param"), [
    ([("start_time", "1000"), ("page", "²")], "page"),  # a digit to str.isdigit(), not to int()
    ([("start_time", "1000"), ("page", "9" * 5000)], "page"),  # past int()'s 4,300-digit limit
    ([("start_time", "١٠٠٠")], "start_time"),  # Arabic-Indic digits: int() takes them
    ([("start_time", "1_000")], "start_time"),
    ([("start_time", "+1000")], "start_time"),
    ([("start_time", "1000"), ("limit", " 5")], "limit"),
    ([("start_time", "1000"), ("limit", "")], "limit"),
    ([("start_time", "1000"), ("batch", "zzz")], "batch"),
    ([("start_time", "1000"), ("foo", "1")], "foo"),
    ([("start_time", "1000"), ("start_time", "2000")], "start_time"),
    ([("start_time", "1000"), ("user_ids", "user-1")], "user_ids"),
])
def test_usage_api_parameters_are_parsed_strictly(gateway: Server, params: list, param: str) -> None:
    logged = len(gateway.log_text())
    response = _get(gateway, STRICT_KEY, params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    time.sleep(0.2)  # log lines leave in batches
    assert "Traceback" not in gateway.log_text()[logged:]


def test_no_metric_names_a_tenant_when_the_label_is_off(gateway: Server) -> None:
    body = {"model": "falcon-7b", "prompt": "hello", "max_tokens": 16}
    for _ in range(2):  # rpm 1: the second is refused (the first reaches no engine: a 503)
        last = httpx.post(gateway.url + "/v1/completions", json=body, headers={"authorization": f"Bearer {RPM_KEY}"})
    assert last.status_code == 429 and last.json()["error"]["code"] == "rate_limit_exceeded"
    quota = httpx.post(gateway.url + "/v1/completions", json=body, headers={"authorization": f"Bearer {QUOTA_KEY}"})
    assert quota.status_code == 429 and quota.json()["error"]["code"] == "insufficient_quota"
    for _ in range(USAGE_RPM + 1):  # the usage API's own limit counts too
        _get(gateway, RPM_KEY, {"start_time": MINUTE})
    text = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    for name in TENANTS:
        assert name not in text, [line for line in text.splitlines() if name in line]
    rejections = [line for line in text.splitlines() if line.startswith("gateway_rate_limit_rejections_total{")]
    assert all('tenant="-"' in line for line in rejections)
    assert {line.split('limit="')[1].split('"')[0] for line in rejections} >= {"requests", "quota", "usage_api"}

