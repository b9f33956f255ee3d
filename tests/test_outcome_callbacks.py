"""Outcome callbacks (slot releases, limiter reconciliation, usage records, health reports) run once, in
order, and to the end even when the request's task is cancelled while one of them waits on I/O."""

from __future__ import annotations

import asyncio

from gateway.backends.dispatch import Outcome


def test_callbacks_run_in_order_and_finish_after_the_caller_is_cancelled() -> None:
    ran: list[str] = []
    release_started = asyncio.Event()

    async def slow_release(_: Outcome) -> None:  # a Redis round trip
        release_started.set()
        await asyncio.sleep(0.1)
        ran.append("release")

    outcome = Outcome(on_done=[lambda _: ran.append("metrics"), slow_release, lambda _: ran.append("leave")])

    async def main() -> None:
        request = asyncio.get_running_loop().create_task(outcome.done())
        await release_started.wait()
        request.cancel()  # the client went away while the limiter was being told
        try:
            await request
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert ran == ["metrics", "release", "leave"]


def test_callbacks_run_once() -> None:
    ran: list[str] = []
    outcome = Outcome(on_done=[lambda _: ran.append("once")])

    async def main() -> None:
        await outcome.done()
        await outcome.done()

    asyncio.run(main())
    assert ran == ["once"]


def test_releases_run_before_the_bookkeeping_and_only_once() -> None:
    ran: list[str] = []

    async def redis_release(_: Outcome) -> None:
        await asyncio.sleep(0)
        ran.append("release")

    outcome = Outcome(releases=[redis_release], on_done=[lambda _: ran.append("usage record")])

    async def main() -> None:
        await outcome.release()  # before a JSON answer is handed over
        ran.append("answer sent")
        await outcome.done()  # after it: the release is not run again

    asyncio.run(main())
    assert ran == ["release", "answer sent", "usage record"]


def test_bookkeeping_still_runs_when_the_caller_is_cancelled_during_a_release() -> None:
    """A request cancelled while its Redis release waits still leaves the in-flight count and writes its
    usage record (they come after the release)."""
    ran: list[str] = []
    release_started = asyncio.Event()

    async def redis_release(_: Outcome) -> None:
        release_started.set()
        await asyncio.sleep(0.1)
        ran.append("release")

    outcome = Outcome(releases=[redis_release], on_done=[lambda _: ran.append("usage record"),
                                                         lambda _: ran.append("leave")])

    async def main() -> None:
        request = asyncio.get_running_loop().create_task(outcome.done())
        await release_started.wait()
        request.cancel()
        try:
            await request
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert ran == ["release", "usage record", "leave"]
