"""The usage API sums by `group_by` in the database: a day of a ledger with more dimensions an hour than
GATEWAY_USAGE_API_MAX_ROWS comes back in one page when its groups fit, with each group's exact sums; pages
that do not fit still add up; a tenant's key sees its own figures only; `include_errors` adds the error
counts. In-process (the API's handler over the store's query), on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
import pytest
from starlette.datastructures import QueryParams

from gateway.admission.quota import LocalQuotas
from gateway.errors import GatewayError
from gateway.store import queries
from gateway.store.database import Database
from gateway.tenancy.auth import ANONYMOUS
from gateway.tenancy.tenants import Caller
from gateway.usage.api import completions
from tests.support.store_fixtures import db_url, dim, pg_cluster, seed_rollups  # noqa: F401

HOUR = 3600
FIRST = 1_767_225_600  # 2026-01-01T00:00Z: the day's first hour bucket
TENANTS, KEYS, MODELS = ("t-a", "t-b", "t-c"), 20, (("falcon-7b", "apache-2.0"), ("llama-2-7b-chat", "llama2"))
MAX_ROWS = 100  # below the 120 dimensions of each hour, above a day by tenant (24 x 3 + 24 = 96)
ADMIN = Caller(replace(ANONYMOUS.tenant, name="t-a", admin=True), "admin")
TENANT_B = Caller(replace(ANONYMOUS.tenant, name="t-b"), "kb")

Cell = tuple[int, str, str, str, str, tuple[int, int, int, int]]  # bucket, tenant, key, model, license, values


def _cells() -> list[Cell]:
    """Every hour of the day, one rollup row per (tenant, key, model): 3 x 20 x 2 = 120 an hour."""
    rng = random.Random(23)
    return [(FIRST + h * HOUR, tenant, f"{tenant}-k{k:02d}", model, license_,
             (rng.randint(0, 900), rng.randint(0, 300), (n := rng.randint(1, 40)), rng.randint(0, n)))
            for h in range(24) for tenant in TENANTS for k in range(KEYS) for model, license_ in MODELS]


class Ledger:
    """The UsageSource the gateway gives the API (Store.usage_page), minus the flush of its own rows."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.calls = 0

    async def usage_page(self, width: str, starts: Sequence[int], max_entries: int | None,
                         **filters: Iterable[str]) -> tuple[dict, int]:
        self.calls += 1
        return await queries.usage_page(self.db, width, starts, max_entries, **filters)  # type: ignore[arg-type]


def _expected(cells: list[Cell], groups: Sequence[str], tenant: str | None = None) -> dict:
    """{(bucket, project, key, model, license): [input, output, requests, errors]}, by brute force."""
    out: dict = {}
    for start, project, key, model, license_, values in cells:
        if tenant and project != tenant:
            continue
        named = {"project_id": project, "api_key_id": key, "model": model, "license": license_}
        group = (start, *(named[g] if g in groups else None for g in named))
        acc = out.setdefault(group, [0, 0, 0, 0])
        for i, value in enumerate(values):
            acc[i] += value
    return out


def _got(pages: list[dict], errors: bool = False) -> dict:
    out: dict = {}
    for page in pages:
        for bucket in page["data"]:
            for r in bucket["results"]:
                group = (bucket["start_time"], r["project_id"], r["api_key_id"], r["model"], r["license"])
                assert group not in out, f"{group} twice"
                out[group] = [r["input_tokens"], r["output_tokens"], r["num_model_requests"],
                              r["num_errors"] if errors else 0]
    return out


async def _pages(source: Ledger, caller: Caller, params: list[tuple[str, str]], max_rows: int) -> list[dict]:
    pages = [await completions(source, LocalQuotas(), {}, caller, QueryParams(params), max_rows)]
    while pages[-1]["has_more"]:
        assert len(pages) <= 24, "a page must make progress"
        pages.append(await completions(source, LocalQuotas(), {}, caller,
                                       QueryParams(params + [("page", pages[-1]["next_page"])]), max_rows))
    return pages


def test_a_day_by_tenant_is_one_page_with_each_groups_sums(db_url: str, tmp_path: Path) -> None:
    cells = _cells()
    day = [("start_time", str(FIRST)), ("end_time", str(FIRST + 24 * HOUR)), ("bucket_width", "1h"),
           ("limit", "24")]

    async def scenario() -> None:
        await seed_rollups(db_url, tmp_path, "1h", [(start, dim(t, k, m, lic), values)
                                                     for start, t, k, m, lic, values in cells])
        db = Database.from_settings(db_url, tmp_path)
        source = Ledger(db)
        try:
            # 120 dimensions an hour, bound 100: grouped by tenant the whole day is one call, 72 results.
            page = await completions(source, LocalQuotas(), {}, ADMIN,
                                     QueryParams(day + [("group_by", "project_id")]), MAX_ROWS)
            assert source.calls == 1 and page["has_more"] is False and page["next_page"] is None
            assert [b["start_time"] for b in page["data"]] == [FIRST + h * HOUR for h in range(24)]
            assert _got([page]) == {k: v[:3] + [0] for k, v in _expected(cells, ["project_id"]).items()}
            assert set(page["data"][0]["results"][0]) == {  # OpenAI's result, plus our license, as before
                "object", "input_tokens", "output_tokens", "input_cached_tokens", "input_audio_tokens",
                "output_audio_tokens", "num_model_requests", "project_id", "user_id", "api_key_id", "model",
                "batch", "license"}
            for groups in ([], ["model", "license"]):  # no group_by: one result a bucket
                asked = day + [("group_by", ",".join(groups))] if groups else day
                pages = await _pages(source, ADMIN, asked + [("include_errors", "true")], MAX_ROWS)
                assert len(pages) == 1 and _got(pages, errors=True) == _expected(cells, groups), groups
            # By key: 60 results an hour, so a page of one bucket (61) at a time, and they add up.
            by_key = day + [("group_by", "project_id,api_key_id")]
            pages = await _pages(source, ADMIN, by_key, MAX_ROWS)
            assert [len(p["data"]) for p in pages] == [1] * 24
            by_key_sums = _expected(cells, ["project_id", "api_key_id"])
            assert _got(pages) == {k: v[:3] + [0] for k, v in by_key_sums.items()}
            # A bound below one bucket's results: the page still holds that bucket, whole.
            assert _got(await _pages(source, ADMIN, by_key, 10)) == _got(pages)
            # Two buckets a page: 2 x 61 = 122 fit in 130, a third does not.
            assert [len(p["data"]) for p in await _pages(source, ADMIN, by_key, 130)] == [2] * 12
            # A tenant's key: its own figures only, even where the page does not group by tenant.
            by_model = day + [("group_by", "model"), ("include_errors", "true")]
            own = await _pages(source, TENANT_B, by_model, MAX_ROWS)
            assert len(own) == 1 and _got(own, errors=True) == _expected(cells, ["model"], tenant="t-b")
        finally:
            await db.dispose()

    asyncio.run(scenario())


def test_include_errors_is_true_or_false() -> None:
    params = QueryParams([("start_time", str(FIRST)), ("include_errors", "yes")])
    with pytest.raises(GatewayError) as refused:  # refused before anything is read
        asyncio.run(completions(Ledger(None), LocalQuotas(), {}, ADMIN, params))  # type: ignore[arg-type]
    assert refused.value.status == 400 and refused.value.param == "include_errors"
