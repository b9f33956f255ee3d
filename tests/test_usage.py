"""Usage records and quotas without engines: quota periods (local, and the Redis script's calendar), the
usage record's token source and status, what one record writes (audit line, ledger row, metrics), local
quotas seeded from the ledger, quotas reseeded when Redis lost them, and `gateway usage report` over audit
files."""

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
from gateway.admission.quota import (DAY_S, LocalQuotas, QuotaExceeded, Quotas, QuotaUnavailable, month_number,
                                     month_reset)
from gateway.admission.quota_lua import PERIODS_LUA
from gateway.admission.ratelimit import Limits
from gateway.admission.ratelimit_lua import LUA_HELPERS as _LUA_HELPERS
from gateway.admission.ratelimit_redis import RedisRateLimiter
from gateway.admission.redis_keys import tenant_prefix
from gateway.observability.metrics import Metrics
from gateway.registry import load_registry
from gateway.tenancy.auth import ANONYMOUS
from gateway.tenancy.tenants import Caller
from gateway.usage.record import UsageRecorder, status, tokens
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


REGISTRY = load_registry([Path(__file__).resolve().parents[1] / "model_registry.yaml"])


class _Lines:
    def __init__(self) -> None:
        self.lines: list[dict] = []

    def record_line(self, line: str) -> bool:
        self.lines.append(json.loads(line))
        return True


def test_one_usage_record_is_an_audit_line_a_ledger_row_and_metrics() -> None:
    lines, rows, metrics = _Lines(), [], Metrics()
    recorder = UsageRecorder(lines, SimpleNamespace(record=rows.append), metrics)
    snapshot = SimpleNamespace(registry=REGISTRY)
    model = REGISTRY.models["llama-2-7b-chat"]
    caller = Caller(ANONYMOUS.tenant, "abcd1234")
    call = SimpleNamespace(prompt_bound=9, stream=False)
    for endpoint in ("chat", "completions"):
        record = recorder.recorder(snapshot, True, caller, model, model, call, endpoint, "0" * 31 + "1", 0.0, "mine")
        record(_outcome(usage={"prompt_tokens": 3, "completion_tokens": 4}, status=200, backend_id="b",
                        fell_back=False))
    assert [line["endpoint"] for line in lines.lines] == ["chat", "completions"]
    assert lines.lines[0]["client_request_id"] == "mine" and lines.lines[0]["total_tokens"] == 7
    row = rows[0]
    assert (row.request_id, row.tenant, row.key_id, row.model_served, row.license, row.commercial_use,
            row.environment, row.endpoint, row.input_tokens, row.output_tokens, row.usage_source, row.status) == (
        "0" * 31 + "1", "anonymous", "abcd1234", "llama-2-7b-chat", "llama2", "conditional", "development", "chat",
        3, 4, "engine", 200)
    assert rows[1].endpoint == "completions" and row.latency_ms > 0
    exported = metrics.render()[0].decode()
    assert 'gateway_license_tokens_total{direction="input",license="llama2",tenant="anonymous"} 6.0' in exported
    # A snapshot that is no longer the current one is not cached: the next current one starts afresh.
    recorder.recorder(SimpleNamespace(registry=REGISTRY), False, caller, model, model, call, "chat", "x", 0.0)
    assert recorder._snapshot is snapshot  # noqa: SLF001


def test_local_quotas_wait_for_the_ledger_then_continue_from_it() -> None:
    now = _at("2026-12-02T10:00:00")
    day = int(now // DAY_S)
    waiting = LocalQuotas(clock=lambda: now, ready=False)
    with pytest.raises(QuotaUnavailable):
        waiting.admit_now("t", Quotas(tokens_per_day=1000), 10)
    waiting.seed({"t": (day, 900, month_number(day), 950), "gone": (day - 40, 5, month_number(day) - 1, 5)})
    with pytest.raises(QuotaExceeded):
        waiting.admit_now("t", Quotas(tokens_per_day=1000), 101)  # 900 used today: 100 left
    waiting.admit_now("t", Quotas(tokens_per_day=1000), 100)
    periods = asyncio.run(waiting.periods("gone"))
    assert periods.day_used == periods.month_used == 0  # another period: nothing carried over
    # The operator's choice: admitted from zero until the ledger answers.
    LocalQuotas(clock=lambda: now, ready=False, admit_unready=True).admit_now("t", Quotas(tokens_per_day=1000), 10)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server missing")
def test_a_quota_redis_lost_is_reloaded_from_the_ledger_once_by_either_replica() -> None:
    port = free_port()
    process = start_redis(port)
    reads: list[str] = []

    async def used(tenant: str) -> tuple[int, int, int, int]:
        reads.append(tenant)
        await asyncio.sleep(0.05)  # both replicas read the ledger at once
        day = int(datetime.now(timezone.utc).timestamp() // DAY_S)
        return day, 700, month_number(day), 6000

    async def down(tenant: str) -> tuple[int, int, int, int]:
        raise OSError("the database is down too")

    async def run() -> None:
        url = f"redis://127.0.0.1:{port}/0"
        a, b = RedisRateLimiter(url, quota_used=used), RedisRateLimiter(url, quota_used=used)
        quotas = Quotas(tokens_per_day=1000, tokens_per_month=10_000)
        first = await asyncio.gather(a.admit("t", Limits(), 100, quotas), b.admit("t", Limits(), 100, quotas))
        client = redis.Redis(port=port, decode_responses=True)
        stored = client.hgetall(f"{tenant_prefix('t')}:quota")
        assert (int(stored["du"]), int(stored["mu"])) == (900, 6200)  # seeded once, then both reservations
        assert sorted(r.headers["x-gateway-quota-remaining-tokens"] for r in first) == ["100", "200"]
        with pytest.raises(QuotaExceeded):
            await a.admit("t", Limits(), 101, quotas)
        assert len(reads) == 2  # each replica read once; the second seed was a no-op
        # Neither Redis nor the ledger knows a tenant: refused, or from zero where the operator chose it.
        blind = RedisRateLimiter(url, quota_used=down)
        with pytest.raises(QuotaUnavailable):
            await blind.admit("u", Limits(), 10, quotas)
        trusting = RedisRateLimiter(url, quota_used=down, admit_unknown_quotas=True)
        assert (await trusting.admit("u", Limits(), 10, quotas)).headers["x-gateway-quota-remaining-tokens"] == "990"
        # Without a ledger (quota_used None) a lost hash restarts from zero, as before.
        client.delete(f"{tenant_prefix('t')}:quota")
        plain = RedisRateLimiter(url)
        assert (await plain.admit("t", Limits(), 10, quotas)).headers["x-gateway-quota-remaining-tokens"] == "990"
        for limiter in (a, b, blind, trusting, plain):
            await limiter.close()
        client.close()

    try:
        asyncio.run(run())
    finally:
        process.terminate()
        process.wait()


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
