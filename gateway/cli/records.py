"""What the CLI reads from the database: `gateway usage report` (the ledger; the default, or audit files
when some are named) and `gateway policy log` (the policy decisions, with the admin API's filters and
caps). Both read the database GATEWAY_DATABASE_URL names, or the embedded SQLite file in GATEWAY_DATA_DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import orjson

from gateway.errors import ConfigError, GatewayError
from gateway.settings import get_settings


def add_policy_log(policy: argparse._SubParsersAction) -> None:
    log = policy.add_parser("log", help="policy decisions from the database, newest first")
    log.add_argument("--request-id")
    log.add_argument("--tenant")
    log.add_argument("--model", help="requested or served")
    log.add_argument("--decision", choices=["allow", "deny", "substitute", "not_found"])
    log.add_argument("--since", help="unix seconds or ISO time (UTC by default); default: a day before --until")
    log.add_argument("--until", help="unix seconds or ISO time; default: now (at most 31 days after --since)")
    log.add_argument("--limit", type=int, default=50, help="decisions per page, at most 100")
    log.add_argument("--cursor", help="the next_cursor printed after the previous page")
    log.add_argument("--format", choices=["table", "json"], default="table")


def _times(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    from gateway.usage.report import parse_time

    try:
        return tuple(parse_time(t) if t else None for t in (args.since, args.until))  # type: ignore[return-value]
    except ValueError as exc:
        raise ValueError(f"bad --since/--until: {exc}") from None


def _with_database(job: Callable[[Any], Awaitable[int]]) -> int:
    from gateway.store.database import Database

    settings = get_settings()
    try:
        db = Database.from_settings(settings.database_url, settings.data_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1

    async def run() -> int:
        try:
            return await job(db)
        except GatewayError as exc:
            print(exc.message, file=sys.stderr)
            return 2
        except Exception as exc:  # unreachable, refused, no schema yet
            message = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"{db.display_url}: {message}", file=sys.stderr)
            return 1
        finally:
            await db.dispose()

    return asyncio.run(run())


def policy_log(args: argparse.Namespace) -> int:
    try:
        since, until = _times(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    async def job(db) -> int:  # type: ignore[no-untyped-def]
        from gateway.store.decisions import Decisions

        decisions = Decisions(db, get_settings().data_dir / "spool" / "decisions-cli")  # reads only
        page = await decisions.search(request_id=args.request_id, tenant=args.tenant, model=args.model,
                                      decision=args.decision, since=since.timestamp() if since else None,
                                      until=until.timestamp() if until else None, limit=args.limit,
                                      cursor=args.cursor)
        if args.format == "json":
            print(orjson.dumps({"data": page.data, "next_cursor": page.next_cursor},
                               option=orjson.OPT_INDENT_2).decode())
            return 0
        print(_decision_table(page.data))
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}")
        return 0

    return _with_database(job)


def _decision_table(items: list[dict]) -> str:
    if not items:
        return "no decisions match"
    rows = [("time", "request_id", "tenant", "key_id", "model_requested", "model_served", "license", "decision",
             "rule")]
    rows += [(datetime.fromtimestamp(i["time"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z",
              i["request_id"], i["tenant"], i["key_id"], i["model_requested"], i["model_served"] or "-",
              i["license"] or "-", i["decision"], i["rule"]) for i in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def usage_report(args: argparse.Namespace) -> int:
    """From the database (no files named: the default), else from the named audit files."""
    from gateway.usage.report import render

    try:
        since, until = _times(args)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2

    async def job(db) -> int:  # type: ignore[no-untyped-def]
        from gateway.store import queries

        report = await queries.report(db, since, until)
        print(f"usage from the database {db.display_url}", file=sys.stderr)
        print(render(report, args.format))  # type: ignore[arg-type]
        return 0

    return _with_database(job)
