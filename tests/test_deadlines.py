"""gateway.deadlines: the request path's coarse timeouts behave as asyncio's (never early, cancellable,
TimeoutError only for their own expiry), on uvloop as the server runs them."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from gateway import deadlines
from gateway.deadlines import RESOLUTION_S


def run(coroutine):
    return uvloop.run(coroutine)


def test_a_timeout_fires_after_its_delay_never_before() -> None:
    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with deadlines.timeout(0.2):
                await asyncio.sleep(5)
        return time.monotonic() - started

    waited = run(main())
    assert 0.2 <= waited < 0.2 + RESOLUTION_S + 0.2


def test_a_block_that_finishes_in_time_is_not_cancelled_later() -> None:
    async def main() -> str:
        with deadlines.timeout(0.1):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # past the deadline: nothing may cancel the task now
        return "done"

    assert run(main()) == "done"


def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def main() -> None:
        async def victim() -> None:
            with deadlines.timeout(10):
                await asyncio.sleep(5)

        task = asyncio.get_running_loop().create_task(victim())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_call_later_runs_once_and_cancel_disarms() -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        timers = deadlines.for_loop()
        timers.call_later(0.05, lambda: fired.append("kept"))
        dropped = timers.call_later(0.05, lambda: fired.append("dropped"))
        dropped.cancel()
        dropped.cancel()  # idempotent
        await asyncio.sleep(0.3)
        return fired

    assert run(main()) == ["kept"]


def test_many_deadlines_with_different_delays_fire_in_order() -> None:
    async def main() -> list[float]:
        timers = deadlines.for_loop()
        fired: list[float] = []
        for delay in (0.3, 0.1, 0.2, 0.0):
            timers.call_later(delay, lambda delay=delay: fired.append(delay))
        await asyncio.sleep(0.6)
        return fired

    assert run(main()) == [0.0, 0.1, 0.2, 0.3]


def test_the_tick_stops_when_nothing_is_armed() -> None:
    async def main() -> bool:
        timers = deadlines.for_loop()
        timers.call_later(0.01, lambda: None).cancel()
        await asyncio.sleep(3 * RESOLUTION_S)
        return timers._ticking  # an idle gateway wakes for nothing

    assert run(main()) is False


def test_audit_timestamps_read_as_datetime_writes_them() -> None:
    from datetime import datetime, timezone

    from gateway.observability.timestamps import utc_now_iso

    before = datetime.now(timezone.utc)
    stamp = utc_now_iso()
    after = datetime.now(timezone.utc)
    parsed = datetime.fromisoformat(stamp)
    assert len(stamp) == len(before.isoformat(timespec="milliseconds"))
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= parsed <= after


def test_log_lines_keep_the_standard_time_format() -> None:
    import logging

    from gateway.observability.lines import SecondCachedFormatter

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    cached, standard = SecondCachedFormatter(fmt), logging.Formatter(fmt)
    for created in (1_700_000_000.123, 1_700_000_000.999, 1_700_000_001.0, 1_700_003_601.5):
        record = logging.LogRecord("gateway.access", logging.INFO, "", 0, "hello", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert cached.format(record) == standard.format(record)
