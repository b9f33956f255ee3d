"""Hot reload of the registry and tenants files (SIGHUP or POST /admin/reload).

The new files are validated completely before anything changes; an invalid file keeps the running
configuration and the problems are reported (logged, and returned to the admin caller).

Reloads run one at a time, in the order they were asked for (SIGHUP and POST alike): each reads the
files and swaps its snapshot in before the next one starts, so the last reload asked for is the one
that stays, and a slow reload of older files never lands over a newer one.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass

from gateway.pipeline import GatewayState
from gateway.errors import ConfigError
from gateway.lifecycle import settle_garbage_collector
from gateway.snapshot import load_snapshot

log = logging.getLogger("gateway.admin")


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    problems: tuple[str, ...] = ()
    models: int = 0
    tenants: int = 0

    def body(self) -> dict:
        if self.ok:
            return {"status": "reloaded", "models": self.models, "tenants": self.tenants}
        return {"error": {"message": "Reload refused; the running configuration is unchanged:\n"
                          + "\n".join(self.problems), "type": "invalid_request_error", "param": None,
                          "code": "invalid_configuration"}}


# One lock per event loop (asyncio locks are bound to the loop that first waits on them); FIFO, so
# reloads are applied in the order they started.
_RELOAD_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _reload_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _RELOAD_LOCKS.get(loop)
    if lock is None:
        lock = _RELOAD_LOCKS[loop] = asyncio.Lock()
    return lock


async def reload_config(state: GatewayState) -> ReloadResult:
    async with _reload_lock():
        return await _reload(state)


async def _reload(state: GatewayState) -> ReloadResult:
    try:
        # File reads and validation run off the event loop: requests keep flowing meanwhile.
        # The engine pods found so far stay known across the reload (no gap in per-pod routing).
        snapshot = await asyncio.to_thread(load_snapshot, state.settings, state.client,
                                           state.snapshot.upstreams.addresses)
    except ConfigError as exc:
        for problem in exc.problems:  # one line each, file named: greppable, and never a silent SIGHUP
            log.error("reload refused, keeping the running configuration: %s", problem)
        return ReloadResult(ok=False, problems=tuple(exc.problems))
    except Exception:
        log.exception("reload failed, keeping the running configuration")
        raise
    state.snapshot = snapshot  # one assignment: a request sees the old or the new snapshot, whole
    settle_garbage_collector()
    tenants = len(snapshot.tenants.tenants) if snapshot.tenants else 0
    log.info("reloaded: %d models, %d tenants", len(snapshot.registry.models), tenants)
    return ReloadResult(ok=True, models=len(snapshot.registry.models), tenants=tenants)
