"""Two real gateway processes on one real redis-server and one database (SQLite, then PostgreSQL), in
front of the mock vLLM: a tenant's daily token quota holds exactly across both, usage records add up to
the quota's count and to the usage API's totals (read from the ledger by either replica).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_client
import yaml

from gateway.admission.redis_keys import tenant_prefix
from gateway.tenancy.tenants import hash_key
from tests.conftest import LLAMA2_CONDITIONS, ROOT
from tests.support.processes import Server, free_port, start_redis, start_server
from tests.support.store_fixtures import module_db_url, pg_cluster  # noqa: F401

MODEL = "llama-2-7b-chat"
MOCK_MODEL = "mock-model"
QUOTA_KEY, ADMIN_KEY, OTHER_KEY = "sk-test-quota-key", "sk-test-usage-admin", "sk-test-usage-other"
QUOTA = 10_000
BODY = {"model": MODEL, "prompt": "count the tokens of this prompt please", "max_tokens": 16}


@pytest.fixture(scope="module")
def redis_port(log_dir: Path, module_db_url: str) -> Iterator[int]:  # a fresh Redis for each database
    server, _ = start_redis("usage-redis", log_dir)
    yield int(server.url.rsplit(":", 1)[1])
    server.stop()


@pytest.fixture(scope="module")
def gateways(redis_port: int, module_db_url: str, log_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    tmp = tmp_path_factory.mktemp("usage-replicas")
    port = free_port()
    mock = start_server("usage-mock", [sys.executable, str(ROOT / "load_tests" / "mock_upstream.py"), "--port",
                                       str(port), "--served-model-name", MOCK_MODEL], port, "/health", log_dir)
    mock.wait_ready(20)
    (tmp / "overlay.yaml").write_text(yaml.safe_dump({"models": [
        {"id": MODEL, "backends": [{"id": "usage-mock-0", "engine": "vllm", "engine_version": "0.32.0",
                                    "url": mock.url, "role": "primary", "served_model_name": MOCK_MODEL}]}]}))
    (tmp / "tenants.yaml").write_text(yaml.safe_dump({"tenants": [
        {"name": "quota-team", "environment": "production", "api_key_hashes": [hash_key(QUOTA_KEY)],
         "attestations": LLAMA2_CONDITIONS, "limits": {"tokens_per_day": QUOTA}},
        {"name": "usage-admin", "environment": "research", "api_key_hashes": [hash_key(ADMIN_KEY)], "admin": True},
        {"name": "other-team", "environment": "research", "api_key_hashes": [hash_key(OTHER_KEY)]},
    ]}))
    servers = []
    for name in ("usage-gw-a", "usage-gw-b", "usage-gw-local"):
        gw_port = free_port()
        env = {"GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{tmp / 'overlay.yaml'}",
               "GATEWAY_TENANTS": str(tmp / "tenants.yaml"), "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "GATEWAY_AUDIT_SINK": str(tmp / f"{name}-audit.jsonl"), "GATEWAY_DATABASE_URL": module_db_url}
        if name == "usage-gw-local":  # no Redis: quotas in the process; its own embedded database
            del env["GATEWAY_REDIS_URL"], env["GATEWAY_DATABASE_URL"]
        server = start_server(name, [sys.executable, "-m", "gateway", "serve", "--port", str(gw_port)], gw_port,
                              "/ready", log_dir, env)
        server.wait_ready(60)
        servers.append(server)
    servers[0].audit_files = [tmp / "usage-gw-a-audit.jsonl", tmp / "usage-gw-b-audit.jsonl"]  # type: ignore[attr-defined]
    yield servers
    for server in servers:
        server.stop()
    mock.stop()


def _usage_records(files: list[Path], tenant: str) -> list[dict]:
    records = []
    for path in files:
        if path.exists():
            records += [r for r in map(json.loads, path.read_text().splitlines())
                        if r.get("type") == "usage" and r["tenant"] == tenant]
    return records


async def _burst(urls: list[str], count: int, concurrency: int = 24) -> list[httpx.Response]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int) -> httpx.Response:
            async with semaphore:
                return await client.post(urls[i % len(urls)] + "/v1/completions", json=BODY,
                                         headers={"authorization": f"Bearer {QUOTA_KEY}"})
        return await asyncio.gather(*(one(i) for i in range(count)))


def test_daily_quota_is_exact_across_two_replicas(gateways: list[Server], redis_port: int) -> None:
    urls = [g.url for g in gateways[:2]]
    store = redis_client.Redis(port=redis_port)
    store.config_resetstat()
    responses = asyncio.run(_burst(urls, 700))
    stats = {k: v for k, v in store.info("commandstats").items() if k.startswith("cmdstat_eval")}
    # Redis has no quota hash for the tenant yet: the first admissions say so (at most the burst's 24 at
    # once), each replica reloads the tenant's use from the ledger (one seed script) and they admit again.
    scripts = sum(v["calls"] - v.get("failed_calls", 0) for v in stats.values()) - (24 + 2)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    ok = [r for r in responses if r.status_code == 200]
    assert ok and statuses[429], statuses
    # Rate limits and quota in one script: one round trip to admit, one to reconcile, one for a refusal.
    assert scripts <= 2 * len(ok) + statuses[429], (stats, statuses)
    assert int(ok[0].headers["x-gateway-quota-remaining-tokens"]) >= 0
    # Past the burst: one more request must be refused iff its reservation no longer fits.
    refusal = asyncio.run(_burst(urls, 1, 1))[0]
    assert refusal.status_code == 429
    error = refusal.json()["error"]
    assert error["code"] == error["type"] == "insufficient_quota"
    assert "tokens_per_day: 10000 tokens" in error["message"] and "resets at" in error["message"]
    assert refusal.headers["x-gateway-quota-exceeded"] == "tokens_per_day"
    reserve = int(error["message"].split("this request reserves ")[1].split(")")[0])
    time.sleep(0.5)  # the audit lines reach the files in batches
    records = _usage_records(gateways[0].audit_files, "quota-team")  # type: ignore[attr-defined]
    assert len(records) == len(ok) and all(r["status"] == 200 and r["usage_source"] == "engine" for r in records)
    charged = sum(r["total_tokens"] for r in records)
    assert sum(r.json()["usage"]["total_tokens"] for r in ok) == charged  # the engine's figure, exactly
    used = int(store.hget(f"{tenant_prefix('quota-team')}:quota", "du"))
    assert used == charged <= QUOTA  # every reservation reconciled to the engine's count
    assert QUOTA - charged < reserve  # nobody refused while a reservation still fitted
    print(f"quota exactness: {len(ok)} admitted, {statuses[429]} refused, {charged}/{QUOTA} tokens, "
          f"reservation {reserve}")

    now = int(time.time())  # the replica asked writes its own last ledger rows first; the other's take 1 s
    time.sleep(1.5)
    page = httpx.get(urls[1] + "/v1/organization/usage/completions",
                     params={"start_time": now - 86_400, "bucket_width": "1d", "group_by": ["project_id", "license"],
                             "project_ids": "quota-team", "limit": 2},
                     headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    results = [r for bucket in page["data"] for r in bucket["results"]]
    assert {(r["project_id"], r["license"]) for r in results} == {("quota-team", "llama2")}
    assert sum(r["input_tokens"] + r["output_tokens"] for r in results) == charged
    assert sum(r["num_model_requests"] for r in results) == len(records)
    assert page["gateway"]["counters"] == "database"
    assert page["gateway"]["quotas"]["quota-team"]["tokens_per_day"]["used"] == charged
    exported = {"input": 0.0, "output": 0.0}  # Prometheus: tokens by license and direction, both replicas
    for url in urls:
        for line in httpx.get(url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text.splitlines():
            if line.startswith("gateway_license_tokens_total{") and 'tenant="quota-team"' in line:
                assert 'license="llama2"' in line
                exported[line.split('direction="')[1].split('"')[0]] += float(line.rsplit(" ", 1)[1])
    assert exported["input"] == sum(r["prompt_tokens"] for r in records)
    assert exported["output"] == sum(r["completion_tokens"] for r in records)


def test_quota_without_redis_is_per_process(gateways: list[Server]) -> None:
    local = gateways[2].url
    responses = asyncio.run(_burst([local], 600, 8))
    ok = [r for r in responses if r.status_code == 200]
    assert ok and {r.status_code for r in responses} == {200, 429}
    charged = sum(r.json()["usage"]["total_tokens"] for r in ok)
    page = _get(local, QUOTA_KEY, start_time=int(time.time()) - 60, bucket_width="1m", limit=2).json()
    assert page["gateway"]["counters"] == "database"
    assert sum(r["input_tokens"] + r["output_tokens"] for b in page["data"] for r in b["results"]) == charged
    quota = page["gateway"]["quotas"]["quota-team"]["tokens_per_day"]
    assert quota["used"] == charged <= QUOTA and quota["remaining"] == QUOTA - charged


def _get(url: str, key: str, **params: object) -> httpx.Response:
    return httpx.get(url + "/v1/organization/usage/completions", params=params,
                     headers={"authorization": f"Bearer {key}"})


@pytest.mark.parametrize(("params", "status", "param"), [
    ({"start_time": 1000, "group_by": "color"}, 400, "group_by"),
    ({"start_time": 1000, "group_by": "user_id"}, 400, "group_by"),
    ({"start_time": 2000, "end_time": 1000}, 400, "end_time"),
    ({"start_time": 1000, "limit": 0}, 400, "limit"),
    ({"start_time": 1000, "bucket_width": "1h", "limit": 169}, 400, "limit"),
    ({"start_time": 1000, "bucket_width": "1w"}, 400, "bucket_width"),
    ({}, 400, "start_time"),
    ({"start_time": 1000, "project_ids": "quota-team"}, 403, "project_ids"),
])
def test_usage_api_bad_input_is_an_openai_error(gateways: list[Server], params: dict, status: int, param: str) -> None:
    response = _get(gateways[0].url, OTHER_KEY, **params)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] in {"invalid_request_error",
                                                                              "permission_error"}


def test_tenant_sees_only_its_own_usage(gateways: list[Server]) -> None:
    page = _get(gateways[0].url, OTHER_KEY, start_time=int(time.time()) - 3600, bucket_width="1h",
                group_by="project_id").json()
    assert all(r["project_id"] == "other-team" for b in page["data"] for r in b["results"])
    assert page["gateway"]["quotas"] == {}


def test_usage_api_matches_the_openai_spec(gateways: list[Server]) -> None:
    spec_path = ROOT / "tests" / "openai_spec" / "openai-openapi.yaml"
    if not spec_path.exists():
        pytest.skip("the OpenAI spec copy (tests/openai_spec) is not in this checkout")
    schemas = yaml.safe_load(spec_path.read_text())["components"]["schemas"]
    page = _get(gateways[0].url, ADMIN_KEY, start_time=int(time.time()) - 7200, bucket_width="1h",
                group_by=["model", "api_key_id", "project_id"], limit=3).json()
    _check(page, schemas["UsageResponse"], schemas)
    assert len(page["data"]) == 3 and page["has_more"] is False
    results = [r for b in page["data"] for r in b["results"]]
    assert results, "the quota test's usage should be visible to the admin"
    for result in results:
        _check(result, schemas["UsageCompletionsResult"], schemas)


def _check(value: object, schema: dict, schemas: dict) -> None:
    """The subset of JSON Schema the usage schemas use: $ref, type, enum, anyOf, required, items."""
    if "$ref" in schema:
        return _check(value, schemas[schema["$ref"].rsplit("/", 1)[1]], schemas)
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(value, dict) and "object" in value:  # the discriminator
            options = [o for o in options if "$ref" not in o or value["object"] in str(
                schemas[o["$ref"].rsplit("/", 1)[1]].get("properties", {}).get("object", {}).get("enum"))]
        errors = []
        for option in options:
            try:
                return _check(value, option, schemas)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{value!r} matches none of {errors}")
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool, "null": type(None)}
    if kind:
        assert isinstance(value, types[kind]) and not (kind == "integer" and isinstance(value, bool)), (value, kind)
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
    if kind == "object":
        for name in schema.get("required", []):
            assert name in value, f"missing {name}"
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _check(value[name], sub, schemas)
    if kind == "array":
        for item in value:
            _check(item, schema.get("items", {}), schemas)
    return None
