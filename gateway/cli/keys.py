"""`gateway keys ...`: API keys. `new` prints a key and the hash line for the tenants file (nothing else
is touched); `create`, `list`, `revoke` and `rotate` work on the keys kept in the database (the one
GATEWAY_DATABASE_URL names, or the embedded SQLite file in GATEWAY_DATA_DIR), directly, as the admin API
does; every change is an admin event whose actor is "cli". Replicas see a change within 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson

from gateway.cli import config
from gateway.errors import ConfigError, GatewayError
from gateway.settings import get_settings
from gateway.tenancy.tenants import load_tenants, new_key

ACTOR = "cli"


def add_parser(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="API keys: make one for the tenants file, or manage the database's")
    actions = keys.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="print a new key and the hash line for the tenants file")
    new.add_argument("--tenant", required=True)
    create = _with_tenants(actions.add_parser("create", help="a new key in the database (shown once)"))
    create.add_argument("--tenant", required=True, help="a tenant of the tenants file")
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument("--expires-at", help="unix seconds or ISO time (UTC by default); default: never")
    listing = actions.add_parser("list", help="the database's keys (no secrets)")
    listing.add_argument("--tenant")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--after", help="the last id of the previous page")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    revoke = actions.add_parser("revoke", help="refuse a key from now on, on every replica")
    revoke.add_argument("id")
    rotate = actions.add_parser("rotate", help="a new key for the same tenant; the old one works a grace period")
    rotate.add_argument("id")
    rotate.add_argument("--grace-seconds", type=int, default=0)


def _with_tenants(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--tenants", type=Path, help="tenants file; default: GATEWAY_TENANTS, else make run's")
    sub.add_argument("--registry", action="append", help="registry files (to check the tenants file)")
    return sub


def run(args: argparse.Namespace) -> int:
    if args.action == "new":
        key, key_hash = new_key()
        print(f"API key for tenant '{args.tenant}' (shown once, store it now):\n  {key}")
        print(f"Add this line under the tenant's api_key_hashes in the tenants file:\n  - \"{key_hash}\"")
        return 0
    try:
        if args.action == "create":
            _check_tenant(args)
        return asyncio.run(_run(args))
    except (ConfigError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"gateway keys {args.action}: {exc.message}", file=sys.stderr)
        return 2


def _check_tenant(args: argparse.Namespace) -> None:
    """A database key belongs to a tenant of the tenants file: refuse one the file does not declare."""
    from gateway.registry import load_registry

    files = config.resolve(args.registry, args.tenants)
    if files.tenants is None:
        raise ValueError("gateway keys create: needs the tenants file its tenant is in: --tenants FILE or "
                         "GATEWAY_TENANTS")
    tenants = load_tenants(files.tenants, load_registry(files.registry))
    if args.tenant not in tenants.tenants:
        raise ValueError(f"unknown tenant {args.tenant!r}; {files.tenants} has: {', '.join(tenants.tenants)}")


def _expiry(text: str | None) -> int | None:
    if text is None:
        return None
    from gateway.usage.report import parse_time

    try:
        return int(parse_time(text).timestamp())
    except ValueError:
        raise ValueError(f"bad --expires-at {text!r}: unix seconds or an ISO time") from None


async def _run(args: argparse.Namespace) -> int:
    from gateway.store.database import Database
    from gateway.store.keys import KeyStore

    settings = get_settings()
    db = Database.from_settings(settings.database_url, settings.data_dir)  # DatabaseUrlError: a ConfigError
    keys = KeyStore(db)
    try:
        return await _act(args, keys)
    except GatewayError:
        raise
    except Exception as exc:  # the driver's own errors: refused login, no such database, unreachable
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{db.display_url}: {message} (is the schema there? `gateway db upgrade`)", file=sys.stderr)
        return 1
    finally:
        await db.dispose()


async def _act(args: argparse.Namespace, keys) -> int:  # type: ignore[no-untyped-def]
    if args.action == "create":
        made = await keys.create(args.tenant, args.name, _expiry(args.expires_at), by=ACTOR)
        print(f"API key {made.record.id} for tenant '{made.record.tenant}' (shown once, store it now):\n  {made.key}")
        return 0
    if args.action == "list":
        records = await keys.list(args.tenant, args.limit, args.after)
        if args.format == "json":
            print(orjson.dumps([record.public() for record in records], option=orjson.OPT_INDENT_2).decode())
        else:
            print(_table(records))
        return 0
    if args.action == "revoke":
        record = await keys.revoke(args.id, by=ACTOR)
        if record is None:
            print(f"no key {args.id!r} in the database (keys of the tenants file are changed there)",
                  file=sys.stderr)
            return 2
        print(f"revoked {record.id} (tenant '{record.tenant}'): refused on every replica within 2 s")
        return 0
    made = await keys.rotate(args.id, args.grace_seconds, by=ACTOR)
    if made is None:
        print(f"no key {args.id!r} in the database", file=sys.stderr)
        return 2
    print(f"API key {made.record.id} replaces {args.id} for tenant '{made.record.tenant}' (shown once, store it "
          f"now):\n  {made.key}\n{args.id} stays valid for {args.grace_seconds} s")
    return 0


def _when(seconds: int | None) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if seconds else "-"


def _table(records) -> str:  # type: ignore[no-untyped-def]
    if not records:
        return "no keys in the database"
    rows = [("id", "tenant", "name", "created", "expires", "last used", "revoked")]
    rows += [(r.id, r.tenant, r.name or "-", _when(r.created_at), _when(r.expires_at), _when(r.last_used_at),
              _when(r.revoked_at)) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
