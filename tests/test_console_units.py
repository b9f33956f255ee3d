"""The console's parts that need no server: sessions expire and end, the range picker means the buckets it
says, and the usage page's figures are the usage API's, summed across its pages."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from gateway.console.security import session_csrf
from gateway.console.series import BadQuery, UsageQuery, fetch
from gateway.console.sessions import MemorySessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_lives_until_its_expiry_and_no_longer() -> None:
    clock = Clock()
    store = MemorySessionStore(clock)

    async def scenario() -> None:
        token, expires_at = await store.create("prod-app", "abcd1234", False, 60)
        assert expires_at == clock.now + 60
        session = await store.get(token)
        assert session is not None
        assert (session.tenant, session.key_id, session.is_admin) == ("prod-app", "abcd1234", False)
        clock.now += 59.9
        assert await store.get(token) is not None
        clock.now += 0.1
        assert await store.get(token) is None

    asyncio.run(scenario())


def test_signing_out_ends_the_session_and_tokens_are_not_guessable() -> None:
    store = MemorySessionStore(Clock())

    async def scenario() -> None:
        first, _ = await store.create("a", "11111111", True, 3600)
        second, _ = await store.create("a", "11111111", True, 3600)
        assert first != second and len(first) >= 40
        await store.delete(first)
        assert await store.get(first) is None
        assert await store.get(second) is not None  # another browser's session of the same key stays
        assert await store.get(first[:-1] + ("A" if first[-1] != "A" else "B")) is None

    asyncio.run(scenario())


def test_the_store_is_bounded_and_drops_the_sessions_closest_to_expiry() -> None:
    clock = Clock()
    store = MemorySessionStore(clock, max_sessions=3)

    async def scenario() -> None:
        short, _ = await store.create("a", "1", False, 10)
        longer = [(await store.create("a", "1", False, 1000))[0] for _ in range(3)]
        assert await store.get(short) is None
        assert all([await store.get(t) is not None for t in longer])

    asyncio.run(scenario())


def test_csrf_tokens_differ_per_session() -> None:
    assert session_csrf("one") != session_csrf("two")
    assert session_csrf("one") == session_csrf("one")


NOW = datetime(2024, 5, 15, 13, 20, tzinfo=timezone.utc).timestamp()


def test_preset_ranges_are_whole_buckets_ending_with_the_current_one() -> None:
    day = UsageQuery.from_params({"range": "24h"}, NOW)
    assert day.width == "1h" and len(day.starts) == 24
    assert datetime.fromtimestamp(day.starts[-1], timezone.utc).hour == 13
    week = UsageQuery.from_params({"range": "7d"}, NOW)
    assert week.width == "1d" and len(week.starts) == 7
    assert datetime.fromtimestamp(week.starts[0], timezone.utc).day == 9


def test_a_custom_range_is_whole_utc_days_and_bounded() -> None:
    query = UsageQuery.from_params({"range": "custom", "from": "2024-05-01", "to": "2024-05-02"}, NOW)
    assert query.width == "1h" and len(query.starts) == 48
    longer = UsageQuery.from_params({"range": "custom", "from": "2024-04-01", "to": "2024-04-30"}, NOW)
    assert longer.width == "1d" and len(longer.starts) == 30
    for params in ({"range": "custom", "from": "2024-05-02", "to": "2024-05-01"},
                   {"range": "custom", "from": "2023-01-01", "to": "2024-05-01"},
                   {"range": "custom", "from": "May 1", "to": "2024-05-01"},
                   {"range": "year"}, {"group": "colour"}):
        with pytest.raises(BadQuery):
            UsageQuery.from_params(params, NOW)


def test_the_figures_are_the_usage_apis_summed_across_its_pages() -> None:
    query = UsageQuery.from_params({"range": "24h", "group": "tenant", "license": "llama2"}, NOW)
    first, second = query.starts[0], query.starts[1]
    pages = {
        None: {"data": [{"start_time": first, "results": [
            {"project_id": "a", "license": "llama2", "num_model_requests": 2, "input_tokens": 10, "output_tokens": 5},
            {"project_id": "a", "license": "mit", "num_model_requests": 9, "input_tokens": 900, "output_tokens": 9}]}],
            "has_more": True, "next_page": str(second)},
        str(second): {"data": [{"start_time": second, "results": [
            {"project_id": "a", "license": "llama2", "num_model_requests": 1, "input_tokens": 3, "output_tokens": 4},
            {"project_id": "b", "license": "llama2", "num_model_requests": 1, "input_tokens": 1, "output_tokens": 1}]}],
            "has_more": False, "next_page": None},
    }
    asked = []

    async def get(path: str, params) -> dict:
        params = dict(params)
        asked.append(params)
        return pages[params.get("page")]

    series = asyncio.run(fetch(get, query))
    assert asked[0]["group_by"] == "project_id,license" and asked[1]["page"] == str(second)
    assert series.totals() == [
        {"group": "a", "requests": 3, "input_tokens": 13, "output_tokens": 9, "total_tokens": 22},
        {"group": "b", "requests": 1, "input_tokens": 1, "output_tokens": 1, "total_tokens": 2}]
    chart = series.chart()
    assert len(chart["labels"]) == 24
    assert {d["label"]: sum(d["data"]) for d in chart["datasets"]} == {"a": 22, "b": 2}
    lines = series.csv().splitlines()
    assert lines[0] == "bucket_start,bucket_end,tenant,requests,input_tokens,output_tokens,total_tokens"
    assert len(lines) == 4 and lines[-1].endswith(",b,1,1,1,2")
