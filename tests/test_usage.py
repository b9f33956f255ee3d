"""Usage ledger and quotas without engines: quota periods (local, and the Redis script's calendar), the
usage record's token source and status, in-process counters, and `gateway usage report` over audit files."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from gateway.cli import main
from gateway.backends.relay import StreamWatch
from gateway.usage.counters import UsageCounters
from gateway.admission.quota import DAY_S, LocalQuotas, QuotaExceeded, Quotas, month_number, month_reset
from gateway.admission.quota_lua import PERIODS_LUA
from gateway.admission.ratelimit_lua import LUA_HELPERS as _LUA_HELPERS
from gateway.usage.record import status, tokens
from tests.support.processes import free_port
from tests.test_ratelimit import start_redis


def _at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def test_local_daily_quota_reserves_reconciles_and_resets_at_utc_midnight() -> None:
    now = [_at("2026-12-31T23:59:00")]
    quotas, q = Quotas(tokens_per_day=100, tokens_per_month=150), LocalQuotas(clock=lambda: now[0])
    grant = q.admit_now("t", quotas, 60)
    assert grant.headers["x-gateway-quota-remaining-tokens"] == "40"
    with pytest.raises(QuotaExceeded) as refused:
        q.admit_now("t", quotas, 41)
    assert "tokens_per_day: 100 tokens, 60 used, this request reserves 41" in refused.value.message
    assert "resets at 2027-01-01T00:00:00Z" in refused.value.message
    asyncio.run(grant.finish(30))  # the engine's count replaces the reservation
    q.admit_now("t", quotas, 70)  # 30 + 70 = 100: exactly the quota
    now[0] += 120  # a new day, and a new month
    assert asyncio.run(q.periods("t")).day_used == 0
    q.admit_now("t", quotas, 100)
    with pytest.raises(QuotaExceeded):
        q.admit_now("t", quotas, 1)


def test_local_monthly_quota_names_itself() -> None:
    now = [_at("2026-02-10T12:00:00")]
    q = LocalQuotas(clock=lambda: now[0])
    quotas = Quotas(tokens_per_month=50)
    q.admit_now("t", quotas, 50)
    now[0] += 3 * DAY_S  # the month's count survives the day change
    with pytest.raises(QuotaExceeded) as refused:
        q.admit_now("t", quotas, 1)
    assert "monthly" in refused.value.message and "2026-03-01T00:00:00Z" in refused.value.message
    assert refused.value.headers["x-gateway-quota-exceeded"] == "tokens_per_month"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing")
def test_redis_script_calendar_matches_python() -> None:
    port = free_port()
    process = start_redis(port)
    try:
        client = redis.Redis(port=port)
        script = (_LUA_HELPERS + PERIODS_LUA.replace("redis.call('TIME')", "{ARGV[1], '0'}")
                  + "local _, day, month = quota_periods(KEYS[1]) return {day, month}")
        for text in ("1970-01-01T00:00:00", "2024-02-29T23:59:59", "2024-03-01T00:00:00", "2026-12-31T23:59:59",
                     "2027-01-01T00:00:00", "2100-03-01T00:00:00", "2026-07-15T08:00:00"):
            seconds = int(_at(text))
            day, month = client.eval(script, 1, "k", seconds)
            assert day == seconds // DAY_S and month == month_number(seconds // DAY_S), text
        assert month_reset(month_number(int(_at("2026-12-05T00:00:00")) // DAY_S)).isoformat().startswith("2027-01-01")
    finally:
        process.terminate()
        process.wait()


def _outcome(**fields: object) -> SimpleNamespace:
    return SimpleNamespace(**{"usage": None, "watch": None, "status": None, **fields})


def test_usage_source_and_status() -> None:
    call = SimpleNamespace(prompt_bound=9)
    engine = _outcome(usage={"prompt_tokens": 3, "completion_tokens": 4}, status=200)
    assert tokens(engine, call) == (3, 4, "engine") and status(engine) == 200
    counted = _outcome(usage={"prompt_tokens": 3, "completion_tokens": 4},
                       watch=StreamWatch(0.0, usage_by_gateway=True, events=4, completed=True))
    assert tokens(counted, call) == (3, 4, "gateway") and status(counted) == 200
    gone = _outcome(watch=StreamWatch(0.0, events=2))
    assert tokens(gone, call) == (9, 2, "gateway_estimate") and status(gone) == 499
    broken = _outcome(watch=StreamWatch(0.0, failure="stalled"))
    assert tokens(broken, call) == (0, 0, "none") and status(broken) == 502
    refused = _outcome(watch=StreamWatch(0.0, events=3, engine_error="bad request mid-stream"))
    assert status(refused) == 502 and refused.watch.failure is None  # a 502, the backend not blamed


def test_process_counters_bucket_by_width() -> None:
    counters = UsageCounters()
    t = _at("2026-12-02T10:00:30")
    counters.add(t, "a", "k1", "m", "llama2", 5, 7)
    counters.add(t + 60, "a", "k1", "m", "llama2", 1, 1)
    minute = asyncio.run(counters.read("1m", [int(t) - 30, int(t) + 30]))
    assert list(minute.values()) == [{("a", "k1", "m", "llama2"): [5, 7, 1]}, {("a", "k1", "m", "llama2"): [1, 1, 1]}]
    day = asyncio.run(counters.read("1d", [int(_at("2026-12-02T00:00:00"))]))
    assert list(day.values()) == [{("a", "k1", "m", "llama2"): [6, 8, 2]}]


def _usage_line(request_id: str, tenant: str, license_: str, commercial: str, env: str = "production",
                **extra: object) -> str:
    return json.dumps({"time": "2026-12-02T07:40:00.000+00:00", "type": "usage", "request_id": request_id,
                       "tenant": tenant, "key_id": "abcd1234", "environment": env, "model_requested": "m",
                       "model_served": f"{license_}-model", "license": license_, "commercial_use": commercial,
                       "attestations": ["llama2-under-700m-mau"] if license_ == "llama2" else [],
                       "prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12, "usage_source": "engine",
                       "status": 200, **extra})


def test_usage_report_over_replicas_skips_corrupt_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join([
        json.dumps({"time": "2026-12-02T07:40:00+00:00", "request_id": "r1", "decision": "allow"}),
        _usage_line("r1", "prod-app", "llama2", "conditional"),
        "{\"time\": \"2026-12-02T07:41:00\", \"type\": \"usage\", \"tena",  # truncated by a crash
    ]) + "\n")
    b.write_bytes((_usage_line("r2", "prod-app", "llama2", "conditional", status=502) + "\n").encode()
                  + b"\xff\xfe garbage\n" + (_usage_line("r3", "lab", "apache-2.0", "yes", "research") + "\n").encode()
                  + (_usage_line("r4", "prod-app", "llama2", "conditional", time="2026-11-01T00:00:00Z") + "\n").encode())
    assert main(["usage", "report", str(a), str(b), "--since", "2026-12-01", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert f"{a}:3: truncated or not JSON; skipped" in captured.err and f"{b}:2:" in captured.err
    report = json.loads(captured.out)
    rows = {(r["tenant"], r["license"]): r for r in report["usage"]}
    assert rows[("prod-app", "llama2")]["requests"] == 2 and rows[("prod-app", "llama2")]["errors"] == 1
    assert rows[("prod-app", "llama2")]["total_tokens"] == 24 and rows[("lab", "apache-2.0")]["requests"] == 1
    assert report["conditional_licenses_in_production"] == [{
        "tenant": "prod-app", "license": "llama2", "models": ["llama2-model"],
        "attestations": ["llama2-under-700m-mau"], "requests": 2, "total_tokens": 24}]
    assert main(["usage", "report", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert "Conditional licenses in production:" in table and "llama2-under-700m-mau" in table
    assert main(["usage", "report", str(b), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("tenant,license,commercial_use,model,requests")


def test_redis_down_keeps_quotas_per_replica_or_fails_closed() -> None:
    from gateway.admission.ratelimit import Limits
    from gateway.admission.ratelimit_redis import RedisRateLimiter
    from gateway.admission.quota import QuotaUnavailable

    async def run() -> None:
        url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
        # A quota tenant this replica never saw in Redis has no known total: refused by default ...
        with pytest.raises(QuotaUnavailable):
            await RedisRateLimiter(url, connect_timeout_s=0.2).admit("t", Limits(), 60, Quotas(tokens_per_day=100))
        # ... or, where the operator chose it, counted from zero on this replica.
        open_limiter = RedisRateLimiter(url, connect_timeout_s=0.2, admit_unknown_quotas=True)
        admission = await open_limiter.admit("t", Limits(), 60, Quotas(tokens_per_day=100))
        assert admission.headers["x-gateway-quota-remaining-tokens"] == "40"
        with pytest.raises(QuotaExceeded):
            await open_limiter.admit("t", Limits(), 41, Quotas(tokens_per_day=100))
        await admission.finish(10)
        await open_limiter.admit("t", Limits(), 90, Quotas(tokens_per_day=100))  # reconciled: 10 + 90
        closed = RedisRateLimiter(url, fail_closed=True, connect_timeout_s=0.2)
        with pytest.raises(QuotaUnavailable):
            await closed.admit("t", Limits(), 1, Quotas(tokens_per_day=100))
        await open_limiter.close()
        await closed.close()

    asyncio.run(run())
