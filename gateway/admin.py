"""Hot reload of the registry and tenants files (SIGHUP or POST /admin/reload).

The new files are validated completely before anything changes; an invalid file keeps the running
configuration and the problems are reported (logged, and returned to the admin caller).
"""

from __future__ import annotations

import asyncio
import logging
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


async def reload_config(state: GatewayState) -> ReloadResult:
    try:
        # File reads and validation run off the event loop: requests keep flowing meanwhile.
        snapshot = await asyncio.to_thread(load_snapshot, state.settings, state.client)
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return ReloadResult(ok=False, problems=tuple(exc.problems))
    state.snapshot = snapshot  # one assignment: a request sees the old or the new snapshot, whole
    settle_garbage_collector()
    tenants = len(snapshot.tenants.tenants) if snapshot.tenants else 0
    log.info("reloaded: %d models, %d tenants", len(snapshot.registry.models), tenants)
    return ReloadResult(ok=True, models=len(snapshot.registry.models), tenants=tenants)
