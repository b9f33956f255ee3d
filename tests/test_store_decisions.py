"""Policy decisions in the database: written in batches, searched by request id, tenant, model, decision
and time, newest first, page by page with capped sizes and ranges; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.store.decisions import DecisionRow, Decisions
from tests.support.store_fixtures import db_url, migrated, pg_cluster, request_id  # noqa: F401


def _decision(i: int, now: float) -> DecisionRow:
    tenant = ("acme", "globex")[i % 2]
    verdict = ("allow", "deny", "substitute")[i % 3]
    served = None if verdict == "deny" else ("llama-2-7b-chat" if verdict == "allow" else "falcon-7b")
    return DecisionRow(request_id=request_id(i), time=now - 3600 + i, tenant=tenant, key_id="k1",
                       model_requested="llama-2-7b-chat", model_served=served, license="llama2",
                       decision=verdict, rule=f"rule-{verdict}")


def test_decisions_are_found_by_each_field_and_paged_newest_first(db_url: str, tmp_path: Path) -> None:
    now = time.time()
    rows = [_decision(i, now) for i in range(120)]
    again = DecisionRow(request_id(7), now - 10, "globex", "k9", "x", None, "", "not_found", "not-found")

    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        decisions = Decisions(db, tmp_path / "spool", interval_s=0.1)
        await decisions.start()
        try:
            for r in rows:
                decisions.record(r)
            assert await decisions.flush(10)
            decisions.record(again)  # the same request id in a later batch (a replay): ignored
            assert await decisions.flush(10)

            pages, cursor = [], None
            while True:
                page = await decisions.search(tenant="acme", limit=25, cursor=cursor)
                pages.append(page.data)
                cursor = page.next_cursor
                if cursor is None:
                    break
            found = [item for page in pages for item in page]
            assert [len(p) for p in pages] == [25, 25, 10]
            assert [item["request_id"] for item in found] == [request_id(i) for i in range(118, -1, -2)]
            assert all(item["tenant"] == "acme" for item in found)

            both = (await decisions.search(request_id=request_id(7))).data
            # One decision per request: the same request id recorded again (a replayed batch) counts once.
            assert [item["decision"] for item in both] == ["deny"]
            denied = (await decisions.search(decision="deny", limit=100)).data
            assert len(denied) == 40 and all(item["model_served"] is None for item in denied)
            falcon = (await decisions.search(model="falcon-7b", limit=100)).data
            assert len(falcon) == 40 and all(item["decision"] == "substitute" for item in falcon)
            window = (await decisions.search(since=now - 3600 + 10, until=now - 3600 + 20, limit=100)).data
            assert [item["request_id"] for item in window] == [request_id(i) for i in range(19, 9, -1)]

            for bad in ({"limit": 0}, {"limit": 101}, {"since": now - 40 * 86400}, {"cursor": "bm90LWEtY3Vyc29y"},
                        {"since": now, "until": now - 1}):
                with pytest.raises(GatewayError) as caught:
                    await decisions.search(**bad)
                assert caught.value.status == 400
        finally:
            await decisions.close()
            await db.dispose()

    asyncio.run(scenario())
