"""`gateway db upgrade` and `gateway db status`: wiring only; the work is gateway.store.migrate."""

from __future__ import annotations

import argparse
import asyncio
import sys

from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.settings import get_settings

if TYPE_CHECKING:  # imported when run: SQLAlchemy and Alembic cost every other command ~0.3 s
    from gateway.store.database import Database


def add_parser(commands: argparse._SubParsersAction) -> None:
    db = commands.add_parser("db", help="the database: apply migrations, show the schema revision")
    db.add_argument("action", choices=["upgrade", "status"])


def run(args: argparse.Namespace) -> int:
    from gateway.store.database import Database

    settings = get_settings()
    try:
        database = Database.from_settings(settings.database_url, settings.data_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    return asyncio.run(_run(args.action, database))


async def _run(action: str, db: "Database") -> int:
    from gateway.store import migrate

    try:
        if action == "upgrade":
            before, after = await migrate.upgrade(db)
            print(f"{db.display_url}: schema {before or '(empty)'} -> {after}" if before != after
                  else f"{db.display_url}: schema {after}, up to date")
            return 0
        found = await migrate.check(db)
        state = "up to date" if found.up_to_date else "needs `gateway db upgrade`"
        print(f"{db.display_url}: schema {found.current or '(empty)'}, this gateway's newest {found.head}: {state}")
        return 0 if found.up_to_date else 1
    except migrate.SchemaTooNew as exc:
        print(exc, file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"{db.display_url}: cannot connect ({exc})", file=sys.stderr)
        return 1
    except Exception as exc:  # the driver's own errors (refused login, missing database...)
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{db.display_url}: {message}", file=sys.stderr)
        return 1
    finally:
        await db.dispose()
