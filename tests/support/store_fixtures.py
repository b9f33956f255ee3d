"""Fixtures for tests/test_store_*.py: every test runs once on SQLite and once on a real PostgreSQL (a
session-wide cluster of tests/support/postgres.py, a fresh database per test). Import them by name:
`from tests.support.store_fixtures import db_url, pg_cluster  # noqa: F401`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import migrate
from gateway.store.database import Database
from gateway.store.ledger import LedgerRow
from tests.support.postgres import PostgresCluster, bin_dir


def need_initdb() -> None:
    if bin_dir() is None:
        pytest.skip("PostgreSQL's initdb is not installed (not on PATH nor in /usr/lib/postgresql/*/bin): "
                    "`make postgres` installs it")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    need_initdb()
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """GATEWAY_DATABASE_URL of an empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    return request.getfixturevalue("pg_cluster").create_database()


async def migrated(url: str, data_dir: Path) -> Database:
    db = Database.from_settings(url, data_dir)
    await migrate.upgrade(db)
    return db


def request_id(i: int) -> str:
    """The i-th request id, as the gateway makes them (32 hex digits)."""
    return f"{i:032x}"


def row(i: int = 0, *, when: float | None = None, tenant: str = "acme", key_id: str = "k1", model: str = "llama-2-7b-chat",
        license_: str = "llama2", commercial_use: str = "conditional", environment: str = "production",
        attestations: tuple[str, ...] = ("llama2-under-700m-mau",), endpoint: str = "chat", tokens: tuple[int, int] = (10, 5),
        source: str = "engine", status: int = 200) -> LedgerRow:
    return LedgerRow(request_id=request_id(i), time=time.time() if when is None else when, tenant=tenant, key_id=key_id,
                     model_requested=model, model_served=model, license=license_, commercial_use=commercial_use,
                     environment=environment, attestations=attestations, endpoint=endpoint,
                     input_tokens=tokens[0], output_tokens=tokens[1], usage_source=source, status=status,
                     latency_ms=12.5)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """GATEWAY_DATABASE_URL of an empty database for a module's gateways (shared by them, as replicas
    share one): SQLite, then a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db')}/gateway.db"
    return request.getfixturevalue("pg_cluster").create_database()


def dim(tenant: str, key_id: str, model: str, license_: str, **extra: str) -> dict:
    """A usage_dims row (what a ledger row's repeated fields are)."""
    return {"tenant": tenant, "key_id": key_id, "model_requested": model, "model_served": model,
            "license": license_, "commercial_use": extra.get("commercial_use", "yes"),
            "environment": extra.get("environment", "research"), "attestations": "[]",
            "endpoint": extra.get("endpoint", "completions"), "usage_source": "engine"}


async def seed_rollups(url: str, data_dir: Path, width: str,
                       rows: list[tuple[int, dict, tuple[int, ...]]]) -> None:
    """Write rollup rows (bucket start, dimension, (input, output, requests[, errors])) straight into a
    migrated database: usage the gateway would have recorded, without running the requests."""
    from gateway.store.dims import Dimensions
    from gateway.store.schema import ROLLUPS, USAGE_DIM_COLUMNS, usage_dims

    db = await migrated(url, data_dir)
    try:
        dims = Dimensions(db, usage_dims, USAGE_DIM_COLUMNS)
        known = await dims.ids([tuple(d[c] for c in USAGE_DIM_COLUMNS) for _, d, _ in rows])
        async with db.writing() as conn:
            await conn.execute(ROLLUPS[width].insert(), [
                {"bucket_start": start, "dim_id": known[tuple(d[c] for c in USAGE_DIM_COLUMNS)],
                 "requests": values[2], "errors": values[3] if len(values) > 3 else 0, "input_tokens": values[0],
                 "output_tokens": values[1], "gateway_counted": 0}
                for start, d, values in rows])
    finally:
        await db.dispose()
