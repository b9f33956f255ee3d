"""Reload when a config file changes (GATEWAY_CONFIG_WATCH_S): the registry, tenants and deployed files.

On Kubernetes these are ConfigMap and Secret volumes. The kubelet updates such a mount in place (an
atomic swap of its `..data` link, about a minute after the object changed), so every replica sees a
new tenants Secret, an operator-made one included, with no `POST /admin/reload` and no rollout. What
is compared is the files' content, so the swap is seen whatever it does to timestamps. An invalid new
file is refused once (logged, the running configuration stays) and tried again when it changes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from gateway.admin import reload_config
from gateway.pipeline import GatewayState
from gateway.settings import Settings

log = logging.getLogger("gateway.config_watch")


def watched_files(settings: Settings) -> list[Path]:
    return [*settings.registry_paths, *(p for p in (settings.tenants, settings.deployed) if p is not None)]


def fingerprint(paths: list[Path]) -> tuple[bytes | None, ...]:
    """A digest of each file's bytes (None: unreadable right now)."""
    digests: list[bytes | None] = []
    for path in paths:
        try:
            digests.append(hashlib.blake2b(path.read_bytes(), digest_size=16).digest())
        except OSError:
            digests.append(None)
    return tuple(digests)


async def watch_config(state: GatewayState, interval_s: float) -> None:
    paths = watched_files(state.settings)
    last = await asyncio.to_thread(fingerprint, paths)  # file reads off the event loop
    while True:
        await asyncio.sleep(interval_s)
        try:
            now = await asyncio.to_thread(fingerprint, paths)
            if now == last:
                continue
            changed = [str(p) for p, a, b in zip(paths, last, now) if a != b]
            last = now
            if None in now:  # a file mid-swap or removed: wait for the next look
                continue
            log.info("config changed (%s): reloading", ", ".join(changed))
            await reload_config(state)  # logs its own result, refused or not
        except Exception:  # the watch must outlive any one failure
            log.exception("config watch failed; still watching")
