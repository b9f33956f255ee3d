"""The web console at /console: sign in with an API key, then see models, the policy matrix, tenants,
keys, usage and policy decisions, as the API shows them to that key.

It is a client of the gateway's admin and usage APIs (in-process ASGI calls, `inprocess.py`), never a
second reading of the gateway's state, so the page and the API cannot disagree. It is mounted beside the
API, off the request path: generation never passes through it, and GATEWAY_CONSOLE=false removes it.

    mount_console(app, settings)                 # gateway/api/app.py
    app.state.console_sessions = store           # optional, at start-up: a shared SessionStore (the
                                                 # database's); otherwise sessions live in this process
"""

from __future__ import annotations

from typing import Any

from gateway.console.sessions import MemorySessionStore, Session, SessionStore

__all__ = ["MemorySessionStore", "Session", "SessionStore", "mount_console"]


def mount_console(app: Any, settings: Any, sessions: SessionStore | None = None) -> None:
    """Mount the console on a FastAPI app at /console (nothing when `settings.console` is off)."""
    if not settings.console:
        return
    from gateway.console.app import Console, build

    app.mount("/console", build(Console(app, settings, sessions)))
