"""The database URL, the migrations and `gateway db`: on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from gateway.cli import main
from gateway.settings import Settings, get_settings
from gateway.store import migrate
from gateway.store.database import Database
from gateway.store.schema import metadata
from gateway.store.store import Store
from gateway.store.url import DatabaseUrlError, sqlalchemy_url
from tests.support.store_fixtures import db_url, migrated, pg_cluster  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`gateway ARGS...` in this process (a subprocess pays seconds of imports) with these variables."""

    def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            code = main(list(args))
        finally:
            get_settings.cache_clear()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


@pytest.mark.parametrize("raw, problem", [
    ("mysql://admin:hunter2@db:3306/gw", "unknown scheme 'mysql'"),
    ("postgresql://admin:hunter2@db:54x2/gw", "port must be a number"),
    ("postgresql://admin:hunter2@/gw", "no host"),
    ("postgresql://admin:hunter2@db:5432", "no database name"),
    ("postgresql://admin:hun/ter2@db:5432/gw", "percent-encode"),
    ("postgresql://admin:hunter2@db/gw?sslmode=sometimes", "sslmode must be one of"),
    ("postgresql://admin@db/gw?password=hunter2&target_session_attrs=any", "unsupported parameter"),
    ("sqlite://", "needs a file path"),
    ("sqlite:///:memory:", "in-memory"),
    ("db.example.com:5432", "unknown scheme (none)"),
])
def test_a_malformed_url_names_the_variable_and_hides_the_password(raw: str, problem: str) -> None:
    with pytest.raises(DatabaseUrlError) as caught:
        sqlalchemy_url(raw, Path("/data"))
    message = str(caught.value)
    assert "GATEWAY_DATABASE_URL" in message and problem in message
    assert "hunter2" not in message and "hun/ter2" not in message and "ter2" not in message


def test_libpq_urls_become_asyncpg_urls_and_unset_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    url = sqlalchemy_url("postgres://gw:p%40ss@db.internal:6543/ledger?sslmode=require", tmp_path)
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == \
        ("postgresql+asyncpg", "gw", "p@ss", "db.internal", 6543, "ledger")
    assert dict(url.query) == {"ssl": "require"}
    assert sqlalchemy_url(None, tmp_path).database == str(tmp_path / "gateway.db")
    assert sqlalchemy_url("sqlite:////var/lib/gw/x.db", tmp_path).database == "/var/lib/gw/x.db"
    assert Settings(_env_file=None).data_dir.name == "llm-gateway"  # the XDG default when unset


def test_the_cli_refuses_a_malformed_url_by_the_variables_name(tmp_path: Path, gateway) -> None:
    done = gateway("db", "upgrade", env={"GATEWAY_DATABASE_URL": "postgresql://gw:hunter2@db:port/x",
                                          "GATEWAY_DATA_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert "GATEWAY_DATABASE_URL" in done.stderr and "hunter2" not in done.stderr + done.stdout


def test_migrations_create_what_schema_py_declares(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> list:
        db = await migrated(db_url, tmp_path)
        try:
            async with db.reading() as conn:
                return await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), metadata))
        finally:
            await db.dispose()

    assert asyncio.run(scenario()) == []


def test_two_processes_migrating_at_once_take_turns(db_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.support.store_worker", "migrate", db_url,
                               str(tmp_path / f"replica{i}"), str(tmp_path / "barrier"), "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = sorted(out.strip() for out, _ in outputs)
    head = migrate.head_revision()
    # One applied them; the other waited for its lock, then found the schema already at head.
    assert lines == sorted([f"migrated None {head}", f"migrated {head} {head}"]), outputs


def test_a_database_newer_than_the_code_is_refused_naming_both_revisions(db_url: str, tmp_path: Path, gateway) -> None:
    async def make_newer() -> None:
        db = await migrated(db_url, tmp_path)
        async with db.writing() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0042'"))
        await db.dispose()

    asyncio.run(make_newer())
    head = migrate.head_revision()

    async def upgrade() -> None:
        db = Database.from_settings(db_url, tmp_path)
        try:
            await migrate.upgrade(db)
        finally:
            await db.dispose()

    with pytest.raises(migrate.SchemaTooNew) as caught:
        asyncio.run(upgrade())
    assert "0042" in str(caught.value) and head in str(caught.value) and "newer" in str(caught.value)

    settings = Settings(_env_file=None, database_url=db_url, data_dir=tmp_path)
    with pytest.raises(migrate.SchemaTooNew):
        asyncio.run(Store.open(settings))

    for action in ("upgrade", "status"):
        done = gateway("db", action, env={"GATEWAY_DATABASE_URL": db_url, "GATEWAY_DATA_DIR": str(tmp_path)})
        assert done.returncode == 1 and "0042" in done.stderr and head in done.stderr, done


def test_gateway_db_upgrade_then_status(db_url: str, tmp_path: Path, gateway) -> None:
    env = {"GATEWAY_DATABASE_URL": db_url, "GATEWAY_DATA_DIR": str(tmp_path)}
    before = gateway("db", "status", env=env)
    assert before.returncode == 1 and "needs `gateway db upgrade`" in before.stdout
    first = gateway("db", "upgrade", env=env)
    assert first.returncode == 0 and "(empty) -> 0001" in first.stdout, first
    again = gateway("db", "upgrade", env=env)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert gateway("db", "status", env=env).returncode == 0


def test_the_store_imports_nothing_of_the_gateway_above_it() -> None:
    import ast

    allowed = ("gateway.store", "gateway.errors", "gateway.settings")
    found = []
    for path in sorted((ROOT / "gateway" / "store").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {name}" for name in names
                      if name.startswith("gateway") and not name.startswith(allowed)]
    assert found == []
