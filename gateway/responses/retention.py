"""Expired stored responses lose their content: a background task purges them in batches.

`get()` already reads an expired response as missing; the purge is what frees the space (and, in the SQL
store, what makes the content unrecoverable). A failing purge is logged and tried again next round.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.responses.store import ResponseStore

log = logging.getLogger("gateway.responses")

PURGE_BATCH = 5000


async def purge_periodically(store: ResponseStore, interval_s: float, batch: int = PURGE_BATCH) -> None:
    """Run until cancelled: every `interval_s`, purge batches until one comes back short."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            while await store.purge_expired(int(time.time()), batch) >= batch:
                await asyncio.sleep(0)  # other requests between batches
        except Exception:
            log.exception("purging expired stored responses failed; retrying in %.0f s", interval_s)
