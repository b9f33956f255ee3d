"""uvicorn, with a drain before exit: SIGTERM first turns `/ready` to 503 and refuses new requests,
waits for the requests and streams in flight (at most the drain timeout), then lets uvicorn stop."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from gateway.lifecycle import LIFECYCLE

log = logging.getLogger("gateway.lifecycle")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if LIFECYCLE.draining or self._loop is None:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        LIFECYCLE.draining = True
        log.info("draining: %d requests in flight, waiting up to %.0fs", LIFECYCLE.inflight, self._drain_timeout_s)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit(sig, frame)))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        finished = await LIFECYCLE.drain(self._drain_timeout_s)
        if finished:
            log.info("drained: every request in flight finished")
        else:
            log.warning("drain timeout: %d requests cut off", LIFECYCLE.inflight)
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured SIGTERM after shutdown, so the process would die "by signal";
        # a completed drain is a clean exit (status 0), which is what a rolling update expects.
        self._captured_signals.clear()
