"""The database wired into the gateway: two real gateway processes on one database (SQLite, then a real
PostgreSQL), in front of the fault upstream (vLLM's wire format): usage records become ledger rows that
the usage API and `gateway usage report` read; policy decisions are searchable; API keys are created,
listed, revoked and rotated through the admin API and the CLI, and a revoked or expired key is refused by
every replica within 2 s, without a reload.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import text

from gateway.store.database import Database
from gateway.tenancy.tenants import hash_key
from tests.support.hostile import Server, fault_backend, start_fault_upstream, start_gateway
from tests.support.store_fixtures import module_db_url, pg_cluster  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llama-2-7b-chat"
LLAMA2 = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]
KEYS = {"acme": "sk-test-db-acme", "beta": "sk-test-db-beta", "ops": "sk-test-db-ops", "gone": "sk-test-db-gone"}
PROPAGATION_S = 2.0  # the bound: refused on every replica within 2 s


def _tenants(with_gone: bool = True) -> list[dict]:
    def tenant(name: str, environment: str, **extra: object) -> dict:
        return {"name": name, "environment": environment, "api_key_hashes": [hash_key(KEYS[name])], **extra}

    listed = [tenant("acme", "production", attestations=LLAMA2), tenant("beta", "research"),
              tenant("ops", "research", admin=True)]
    return listed + ([tenant("gone", "research")] if with_gone else [])


@dataclass
class Pair:
    gateways: list[Server]
    configs: list[Path]
    url: str  # the database's
    data_dir: Path

    def post(self, i: int, path: str, key: str, body: dict | None = None) -> httpx.Response:
        return httpx.post(self.gateways[i].url + path, json=body, timeout=30,
                          headers={"authorization": f"Bearer {key}"})

    def get(self, i: int, path: str, key: str, **params: object) -> httpx.Response:
        return httpx.get(self.gateways[i].url + path, params=params, timeout=30,
                         headers={"authorization": f"Bearer {key}"})

    def complete(self, i: int, key: str, path: str = "/v1/completions") -> httpx.Response:
        body = ({"model": MODEL, "prompt": "count me", "max_tokens": 7} if path == "/v1/completions"
                else {"model": MODEL, "messages": [{"role": "user", "content": "count me"}], "max_tokens": 5})
        return self.post(i, path, key, body)


@pytest.fixture(scope="module")
def pair(module_db_url: str, log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    engine = start_fault_upstream("fault-db", log_dir)
    servers = [engine]
    try:
        engine.wait_ready(30)
        models = [{"id": MODEL, "backends": [fault_backend("fault-db-0", engine, "primary")]}]
        configs = [tmp_path_factory.mktemp(f"db-gw-{i}") for i in range(2)]
        gateways = [start_gateway(f"gateway-db-{i}", configs[i], log_dir, models, _tenants(),
                                  {"GATEWAY_DATABASE_URL": module_db_url}) for i in range(2)]
        servers += gateways
        yield Pair(gateways, configs, module_db_url, tmp_path_factory.mktemp("db-cli"))
    finally:
        for server in reversed(servers):
            server.stop()


async def _sql(url: str, data_dir: Path, query: str, **params: object) -> list[tuple]:
    db = Database.from_settings(url, data_dir)
    try:
        async with db.reading() as conn:
            return [tuple(row) for row in (await conn.execute(text(query), params)).all()]
    finally:
        await db.dispose()


def _until(condition, timeout_s: float, step_s: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Seconds until `condition()` held; fails past the timeout."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout_s, f"not within {timeout_s} s"
        time.sleep(step_s)
    return time.monotonic() - began


def test_usage_lands_in_the_ledger_and_either_replica_reads_it(pair: Pair) -> None:
    start = int(time.time()) // 60 * 60
    answers = [pair.complete(0, KEYS["beta"]), pair.complete(1, KEYS["beta"], "/v1/chat/completions"),
               pair.post(0, "/v1/completions", KEYS["beta"], {"model": MODEL, "prompt": "x", "max_tokens": 3}),
               httpx.post(pair.gateways[1].url + "/v1/completions", timeout=30,
                          json={"model": MODEL, "prompt": "count me", "max_tokens": 7},
                          headers={"authorization": f"Bearer {KEYS['beta']}", "x-request-id": "mine-1"})]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    tokens = sum(a.json()["usage"]["total_tokens"] for a in answers)
    time.sleep(1.5)  # the other replica's rows: written within its flush interval (1 s)
    page = pair.get(0, "/v1/organization/usage/completions", KEYS["beta"], start_time=start, bucket_width="1m",
                    group_by="model").json()
    assert page["gateway"]["counters"] == "database"
    results = [r for bucket in page["data"] for r in bucket["results"]]
    assert sum(r["input_tokens"] + r["output_tokens"] for r in results) == tokens
    assert sum(r["num_model_requests"] for r in results) == len(answers)
    # One ledger row per request, keyed by the gateway's own request id (never the client's), with its endpoint.
    rows = asyncio.run(_sql(pair.url, pair.data_dir, "SELECT request_id, endpoint, input_tokens + output_tokens "
                            "FROM usage_records WHERE tenant = 'beta'"))
    by_id = {str(rid).replace("-", ""): (endpoint, n) for rid, endpoint, n in rows}
    for answer in answers:
        rid = answer.headers["x-request-id"]
        assert by_id[rid][1] == answer.json()["usage"]["total_tokens"]
    assert by_id[answers[1].headers["x-request-id"]][0] == "chat"
    assert {by_id[a.headers["x-request-id"]][0] for a in answers if a is not answers[1]} == {"completions"}
    assert answers[3].headers["x-client-request-id"] == "mine-1" and "mine-1" not in by_id


def test_decisions_are_searchable_by_admins_and_by_their_own_tenant(pair: Pair) -> None:
    mine = pair.complete(1, KEYS["acme"])
    assert mine.status_code == 200
    rid = mine.headers["x-request-id"]
    time.sleep(1.5)  # the other replica writes its decisions within its flush interval (1 s)
    found = pair.get(0, "/admin/decisions", KEYS["ops"], request_id=rid).json()
    assert [(d["request_id"], d["tenant"], d["decision"], d["model_served"], d["license"]) for d in found["data"]] \
        == [(rid, "acme", "allow", MODEL, "llama2")]
    own = pair.get(0, "/admin/decisions", KEYS["acme"]).json()["data"]  # a tenant's key: its own decisions
    assert own and {d["tenant"] for d in own} == {"acme"}
    refused = pair.get(0, "/admin/decisions", KEYS["acme"], tenant="beta")
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    for _ in range(3):
        pair.complete(0, KEYS["beta"])
    first = pair.get(1, "/admin/decisions", KEYS["ops"], tenant="beta", limit=2).json()
    second = pair.get(1, "/admin/decisions", KEYS["ops"], tenant="beta", limit=2, cursor=first["next_cursor"]).json()
    assert len(first["data"]) == 2 and first["next_cursor"] and second["data"]
    assert not {d["request_id"] for d in first["data"]} & {d["request_id"] for d in second["data"]}
    assert first["data"][0]["time"] >= first["data"][1]["time"] >= second["data"][0]["time"]  # newest first
    now = int(time.time())
    for params, param in [({"limit": 101}, "limit"), ({"since": now - 40 * 86400, "until": now}, "since"),
                          ({"decision": "maybe"}, "decision"), ({"colour": "red"}, "colour"),
                          ({"since": "yesterday"}, "since"), ({"cursor": "not-a-cursor"}, "cursor")]:
        bad = pair.get(0, "/admin/decisions", KEYS["ops"], **params)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text


def test_a_key_made_on_one_replica_works_on_both_and_its_revocation_within_2s(pair: Pair) -> None:
    made = pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "beta", "name": "ci"})
    assert made.status_code == 201, made.text
    key = made.json()
    assert set(key) >= {"id", "key", "tenant", "name", "created_at", "expires_at"} and key["tenant"] == "beta"
    assert pair.complete(0, key["key"]).status_code == 200
    _until(lambda: pair.complete(1, key["key"]).status_code == 200, PROPAGATION_S)
    listed = pair.get(1, "/admin/keys", KEYS["beta"]).json()  # a tenant's own key may list its keys
    assert {(k["id"], k["source"]) for k in listed["data"]} == {(key["id"], "database"),
                                                               (hash_key(KEYS["beta"])[7:15], "file")}
    assert all("key" not in k and "key_hash" not in k for k in listed["data"]) and listed["has_more"] is False
    assert pair.get(1, "/admin/keys", KEYS["beta"], tenant="acme").status_code == 403
    revoked = pair.post(1, f"/admin/keys/{key['id']}/revoke", KEYS["ops"])
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    took = _until(lambda: pair.complete(0, key["key"]).status_code == 401, PROPAGATION_S)
    print(f"revocation seen by the other replica after {took:.2f} s")
    assert pair.complete(1, key["key"]).status_code == 401


def test_an_expired_key_and_a_rotated_ones_grace(pair: Pair) -> None:
    soon = pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "beta", "expires_at": int(time.time()) + 3}).json()
    _until(lambda: pair.complete(1, soon["key"]).status_code == 200, PROPAGATION_S)
    _until(lambda: pair.complete(1, soon["key"]).status_code == 401, 3 + PROPAGATION_S)
    assert pair.complete(0, soon["key"]).status_code == 401
    old = pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "beta", "name": "rotating"}).json()
    new = pair.post(0, f"/admin/keys/{old['id']}/rotate", KEYS["ops"], {"grace_seconds": 3})
    assert new.status_code == 201 and new.json()["rotated_from"] == old["id"] and new.json()["key"] != old["key"]
    _until(lambda: pair.complete(1, new.json()["key"]).status_code == 200, PROPAGATION_S)
    assert pair.complete(1, old["key"]).status_code == 200  # within its grace
    _until(lambda: pair.complete(1, old["key"]).status_code == 401, 3 + PROPAGATION_S)
    assert pair.complete(0, new.json()["key"]).status_code == 200


def test_admin_key_changes_are_checked_and_recorded(pair: Pair) -> None:
    file_key = hash_key(KEYS["acme"])[7:15]
    cases = [(pair.post(0, f"/admin/keys/{file_key}/revoke", KEYS["ops"]), 409, "key_read_only"),
             (pair.post(0, "/admin/keys/0000ffff/revoke", KEYS["ops"]), 404, "key_not_found"),
             (pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "nobody"}), 400, "unknown_tenant"),
             (pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "beta", "expires_at": "soon"}), 400, "invalid_type"),
             (pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "beta", "expires_at": 5}), 400, "invalid_value"),
             (pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "beta", "scope": "all"}), 400, "unknown_parameter"),
             (pair.post(0, "/admin/keys", KEYS["beta"], {"tenant": "beta"}), 403, "admin_required"),
             (pair.get(0, "/admin/keys", KEYS["ops"], limit=101), 400, "invalid_value"),
             (pair.get(0, "/admin/keys", KEYS["ops"], after="nope"), 400, "invalid_value")]
    for reply, status, code in cases:
        assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), reply.text
    made = pair.post(1, "/admin/keys", KEYS["ops"], {"tenant": "beta", "name": "audited"}).json()
    pair.post(1, f"/admin/keys/{made['id']}/rotate", KEYS["ops"], {"grace_seconds": 0})
    events = asyncio.run(_sql(pair.url, pair.data_dir, "SELECT action, admin_key_id, at_ms FROM admin_events "
                              "WHERE key_id = :id ORDER BY id", id=made["id"]))
    ops = hash_key(KEYS["ops"])[7:15]
    assert [(action, by) for action, by, _ in events] == [("key.created", ops), ("key.rotated", ops)]
    assert all(abs(at / 1000 - time.time()) < 60 for _, _, at in events)
    # Paging through every key: each once, file keys first.
    seen: list[tuple[str, str]] = []
    after = None
    while True:
        page = pair.get(0, "/admin/keys", KEYS["ops"], limit=2, **({"after": after} if after else {})).json()
        seen += [(k["id"], k["source"]) for k in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    ids = [ident for ident, _ in seen]
    assert len(ids) == len(set(ids)), seen
    sources = [source for _, source in seen]
    assert sources == sorted(sources, key=lambda s: s != "file")  # the file's keys first
    assert {hash_key(k)[7:15] for k in KEYS.values()} <= set(ids) and made["id"] in ids


def _cli(pair: Pair, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_DATABASE_URL": pair.url,
           "GATEWAY_TENANTS": str(pair.configs[0] / "tenants.yaml"),
           "GATEWAY_REGISTRY": f"{ROOT / 'model_registry.yaml'},{pair.configs[0] / 'overlay.yaml'}",
           "GATEWAY_DATA_DIR": str(pair.data_dir)}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env,
                          cwd=pair.data_dir, timeout=120)


def test_the_cli_manages_the_same_keys(pair: Pair) -> None:
    created = _cli(pair, "keys", "create", "--tenant", "beta", "--name", "from-cli")
    assert created.returncode == 0, created.stderr
    key = created.stdout.split()[-1]
    ident = created.stdout.split()[2]
    _until(lambda: pair.complete(1, key).status_code == 200, PROPAGATION_S)
    listed = _cli(pair, "keys", "list", "--tenant", "beta", "--format", "json")
    assert ident in {k["id"] for k in json.loads(listed.stdout)}
    assert _cli(pair, "keys", "create", "--tenant", "nobody").returncode == 1
    rotated = _cli(pair, "keys", "rotate", ident, "--grace-seconds", "0")
    assert rotated.returncode == 0, rotated.stderr
    _until(lambda: pair.complete(0, key).status_code == 401, PROPAGATION_S)
    new_key = rotated.stdout.split("\n")[1].strip()
    _until(lambda: pair.complete(0, new_key).status_code == 200, PROPAGATION_S)
    new_id = rotated.stdout.split()[2]
    assert _cli(pair, "keys", "revoke", new_id).returncode == 0
    _until(lambda: pair.complete(1, new_key).status_code == 401, PROPAGATION_S)
    actors = asyncio.run(_sql(pair.url, pair.data_dir, "SELECT DISTINCT admin_key_id FROM admin_events "
                              "WHERE key_id IN (:a, :b)", a=ident, b=new_id))
    assert actors == [("cli",)]
    new = _cli(pair, "keys", "new", "--tenant", "beta")  # the tenants file's kind: a key and its hash line
    assert new.returncode == 0 and "sk-gw-" in new.stdout and "sha256:" in new.stdout


def test_the_cli_reports_usage_and_decisions_from_the_database(pair: Pair) -> None:
    assert pair.complete(0, KEYS["acme"]).status_code == 200
    time.sleep(1.5)
    report = _cli(pair, "usage", "report", "--format", "json")
    assert report.returncode == 0, report.stderr
    usage = json.loads(report.stdout)
    acme = [row for row in usage["usage"] if row["tenant"] == "acme"]
    api = pair.get(0, "/v1/organization/usage/completions", KEYS["ops"], start_time=int(time.time()) - 2 * 86400,
                   bucket_width="1d", limit=3, project_ids="acme").json()
    api_tokens = sum(r["input_tokens"] + r["output_tokens"] for b in api["data"] for r in b["results"])
    assert acme and sum(r["requests"] for r in acme) >= 2
    assert sum(r["total_tokens"] for r in acme) == api_tokens
    cond = {(c["tenant"], c["license"]) for c in usage["conditional_licenses_in_production"]}
    assert ("acme", "llama2") in cond
    log = _cli(pair, "policy", "log", "--tenant", "acme", "--format", "json")
    assert log.returncode == 0, log.stderr
    assert {d["tenant"] for d in json.loads(log.stdout)["data"]} == {"acme"}
    assert _cli(pair, "policy", "log", "--since", "2020-01-01", "--until", "2020-03-01").returncode == 2


def test_a_database_key_whose_tenant_left_the_file_is_refused(pair: Pair) -> None:
    made = pair.post(0, "/admin/keys", KEYS["ops"], {"tenant": "gone"}).json()
    _until(lambda: pair.complete(1, made["key"]).status_code == 200, PROPAGATION_S)
    for i, config in enumerate(pair.configs):
        (config / "tenants.yaml").write_text(yaml.safe_dump({"tenants": _tenants(with_gone=False)}))
        assert pair.post(i, "/admin/reload", KEYS["ops"]).status_code == 200
    assert [pair.complete(i, made["key"]).status_code for i in range(2)] == [401, 401]
