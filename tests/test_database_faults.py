"""The database as a fault: a malformed GATEWAY_DATABASE_URL stops start-up naming the variable; a
database that cannot be reached (at start, and for a while) never turns a request into an error: rows
wait in the spool, health says degraded, a metric and one log line per outage, and the ledger catches
up when it answers; with GATEWAY_AUDIT_FAIL_CLOSED, production tenants get 503 while the records can be
neither written nor spooled, and research tenants are still served.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.tenancy.tenants import hash_key
from tests.support.hostile import Server, fault_backend, start_fault_upstream, start_gateway
from tests.support.postgres import PostgresCluster
from tests.support.processes import free_port
from tests.support.store_fixtures import need_initdb

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llama-2-7b-chat"
LLAMA2 = ["llama2-under-700m-mau", "llama2-no-improving-other-llms", "llama2-acceptable-use-policy"]
PROD, RESEARCH, ADMIN = "sk-test-fault-prod", "sk-test-fault-research", "sk-test-fault-admin"
TENANTS = [{"name": "prod", "environment": "production", "attestations": LLAMA2, "api_key_hashes": [hash_key(PROD)]},
           {"name": "lab", "environment": "research", "api_key_hashes": [hash_key(RESEARCH)]},
           {"name": "ops", "environment": "research", "api_key_hashes": [hash_key(ADMIN)], "admin": True}]


@pytest.fixture(scope="module")
def engine(log_dir: Path):  # type: ignore[no-untyped-def]
    server = start_fault_upstream("fault-dbfaults", log_dir)
    server.wait_ready(30)
    yield server
    server.stop()


def _gateway(name: str, engine: Server, tmp: Path, log_dir: Path, env: dict[str, str]) -> Server:
    models = [{"id": MODEL, "backends": [fault_backend(f"{name}-b", engine, "primary")]}]
    return start_gateway(name, tmp / name, log_dir, models, TENANTS, {"GATEWAY_DATA_DIR": str(tmp / f"{name}-data"),
                                                                      **env})


def _complete(gateway: Server, key: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                      headers={"authorization": f"Bearer {key}"}, timeout=30)


def _metrics(gateway: Server) -> dict[str, float]:
    text = httpx.get(gateway.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("gateway_store_"):
                label = sample.labels.get("writer")
                out[sample.name + (f"[{label}]" if label else "")] = sample.value
    return out


@pytest.mark.parametrize("url", ["postgresql://gw:hunter2@db.internal:54x2/gw", "mysql://gw:hunter2@db/gw",
                                 "sqlite:///:memory:"])
def test_a_malformed_database_url_stops_start_up_naming_the_variable(url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_DATABASE_URL": url, "GATEWAY_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert "GATEWAY_DATABASE_URL" in done.stderr and "hunter2" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_database_down_at_start_degrades_nothing_but_health_and_catches_up(engine: Server, tmp_path: Path,
                                                                            log_dir: Path) -> None:
    need_initdb()
    cluster = PostgresCluster()
    try:
        url = cluster.create_database()
        cluster.stop("immediate")
        gateway = _gateway("gw-db-down", engine, tmp_path, log_dir, {"GATEWAY_DATABASE_URL": url})
        try:
            ready = httpx.get(gateway.url + "/ready")
            assert ready.status_code == 200 and ready.json()["database"] == "degraded"
            answers = [_complete(gateway, key) for key in (PROD, RESEARCH) * 5]
            assert [a.status_code for a in answers] == [200] * 10
            time.sleep(1.5)  # a tick: the rows are in the spool
            seen = _metrics(gateway)
            assert seen["gateway_store_healthy"] == 0 and seen["gateway_store_outages_total"] == 1
            assert seen["gateway_store_rows_waiting[ledger]"] == 10
            assert list((tmp_path / "gw-db-down-data" / "spool" / "ledger").glob("*.batch"))
            usage = httpx.get(gateway.url + "/v1/organization/usage/completions", params={"start_time": 0},
                              headers={"authorization": f"Bearer {ADMIN}"})
            assert usage.status_code == 503 and usage.json()["error"]["type"] == "service_unavailable_error"
            assert len(gateway.log_lines_with("unreachable")) == 1  # one line per outage, not per retry
            cluster.start()
            deadline = time.monotonic() + 40
            while _metrics(gateway)["gateway_store_rows_waiting[ledger]"] or not _metrics(gateway)[
                    "gateway_store_healthy"]:
                assert time.monotonic() < deadline, gateway.log_tail()
                time.sleep(0.5)
            assert httpx.get(gateway.url + "/ready").json()["database"] == "ok"
            page = httpx.get(gateway.url + "/v1/organization/usage/completions",
                             params={"start_time": int(time.time()) - 3600, "bucket_width": "1h"},
                             headers={"authorization": f"Bearer {ADMIN}"}).json()
            assert sum(r["num_model_requests"] for b in page["data"] for r in b["results"]) == 10
            assert len(gateway.log_lines_with("reachable again")) == 1
        finally:
            gateway.stop()
    finally:
        cluster.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_fail_closed_refuses_production_while_nothing_can_be_recorded(kind: str, engine: Server, tmp_path: Path,
                                                                    log_dir: Path) -> None:
    (tmp_path / "not-a-directory").write_text("")
    url = (f"sqlite:///{tmp_path}/not-a-directory/gateway.db" if kind == "sqlite"
           else f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    spooled = _gateway(f"gw-spooled-{kind}", engine, tmp_path, log_dir,
                       {"GATEWAY_DATABASE_URL": url, "GATEWAY_AUDIT_FAIL_CLOSED": "true"})
    data = tmp_path / f"gw-nowhere-{kind}-data"
    data.mkdir()
    (data / "spool").write_text("a file where the spool directory should be")  # root ignores permissions
    nowhere = _gateway(f"gw-nowhere-{kind}", engine, tmp_path, log_dir,
                       {"GATEWAY_DATABASE_URL": url, "GATEWAY_AUDIT_FAIL_CLOSED": "true", "GATEWAY_DATA_DIR": str(data)})
    try:
        # The database is down but the spool takes the records: durable, so production is served.
        for _ in range(3):
            assert _complete(spooled, PROD).status_code == 200
            time.sleep(0.5)
        assert httpx.get(spooled.url + "/ready").json()["database"] == "degraded"
        # Nowhere to write: once the first tick fails, production is refused, research still served.
        assert _complete(nowhere, RESEARCH).status_code == 200
        deadline = time.monotonic() + 10
        while (reply := _complete(nowhere, PROD)).status_code == 200:
            assert time.monotonic() < deadline, "production kept being served with nothing recorded"
            time.sleep(0.2)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "audit_unavailable" and reply.headers["retry-after"]
        assert _complete(nowhere, RESEARCH).status_code == 200
        assert httpx.get(nowhere.url + "/ready").json()["database"] == "unavailable"
        assert _metrics(nowhere)["gateway_store_durable"] == 0
    finally:
        spooled.stop()
        nowhere.stop()
