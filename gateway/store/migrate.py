"""Schema migrations (Alembic, shipped inside the package), applied under a lock so that replicas starting
at once take turns instead of racing: PostgreSQL `pg_advisory_lock` on the connection that migrates,
SQLite an exclusive `flock` on a file beside the database (SQLite is one machine's anyway).

A database whose revision this code does not know was migrated by a newer gateway: `upgrade` and
`check` refuse it with both revisions named, before touching anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.store.database import Database

# Any fixed 64-bit number; it names "the gateway's migration lock" among other advisory locks.
_PG_LOCK_KEY = 0x67617465_6D696772  # "gatemigr"
_SCRIPTS = "gateway.store:migrations"
log = logging.getLogger("gateway.store")
# Alembic logs its plugin set-up and context at INFO on every start; the gateway says what it did instead.
logging.getLogger("alembic").setLevel(logging.WARNING)


class SchemaTooNew(Exception):
    """The database's schema is newer than (or unknown to) this code."""

    def __init__(self, found: str, head: str) -> None:
        self.found, self.head = found, head
        newer = found.isdigit() and head.isdigit() and int(found) > int(head)
        what = "newer than" if newer else "unknown to"
        super().__init__(f"database schema revision {found} is {what} this gateway's (its newest is {head}): "
                         "it was migrated by a newer gateway version; run that version, or restore a "
                         "backup taken before its upgrade")


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None  # None: an empty database
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", _SCRIPTS)
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _known(revision: str) -> bool:
    scripts = ScriptDirectory.from_config(_config())
    return any(script.revision == revision for script in scripts.walk_revisions())


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def status(db: Database) -> SchemaStatus:
    async with db.reading() as conn:
        current = await conn.run_sync(_current)
    return SchemaStatus(current, head_revision())


async def check(db: Database) -> SchemaStatus:
    """Raise SchemaTooNew for a newer database; otherwise say where it stands."""
    found = await status(db)
    if found.current is not None and not _known(found.current):
        raise SchemaTooNew(found.current, found.head)
    return found


async def upgrade(db: Database) -> tuple[str | None, str]:
    """Apply the pending migrations; returns (revision before, revision after). Safe to run from many
    processes at once: they wait for each other's lock, and the later ones find nothing to do."""
    async with _locked(db) as conn:
        before = await conn.run_sync(_current)
        head = head_revision()
        if before is not None and not _known(before):
            raise SchemaTooNew(before, head)
        if before != head:
            await conn.run_sync(lambda sync: command.upgrade(_config(sync), "head"))
            await conn.commit()
            log.info("database %s: schema %s -> %s", db.display_url, before or "(empty)", head)
        return before, head


@contextlib.asynccontextmanager
async def _locked(db: Database) -> AsyncIterator[AsyncConnection]:
    if db.is_sqlite:
        with _file_lock(Path(db.url.database or "")):
            async with db.engine.connect() as conn:
                yield conn
        return
    async with db.engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        await conn.commit()  # the lock is the session's, not the transaction's: Alembic commits its own
        try:
            yield conn
        finally:
            await conn.rollback()
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            await conn.commit()


@contextlib.contextmanager
def _file_lock(database: Path) -> Iterator[None]:
    path = database.expanduser().resolve().with_name(database.name + ".migrate-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Blocking, but only at start-up and in `gateway db upgrade`, before the server takes requests.
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
