"""Console sessions, kept on the server: the browser holds only a random token (an HttpOnly cookie).

A session names the tenant and key id it was signed in with, whether that key was an admin's, and when it
ends. It never holds the key itself. Signing out deletes it here, so a copied cookie is worthless after.

`SessionStore` is the interface the console uses; `MemorySessionStore` keeps sessions in this process (one
replica; a restart signs everyone out). The database store of the `wiring` branch has the same interface
and is what several replicas share: the console takes whichever it is given (`mount_console`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

MAX_SESSIONS = 10_000  # per process: sign-ins beyond it end the sessions closest to their expiry first


@dataclass(frozen=True)
class Session:
    tenant: str
    key_id: str
    is_admin: bool
    expires_at: float  # unix seconds


class SessionStore(Protocol):
    async def create(self, tenant: str, key_id: str, is_admin: bool, ttl_s: float) -> tuple[str, float]:
        """A new session: its token (for the cookie) and when it expires (unix seconds)."""

    async def get(self, token: str) -> Session | None:
        """The live session of this token; None when unknown, expired or deleted."""

    async def delete(self, token: str) -> None:
        """End the session (signing out); unknown tokens are ignored."""


def _digest(token: str) -> str:
    # Sessions are filed under the token's hash: what the store holds cannot be replayed as a cookie.
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class MemorySessionStore:
    def __init__(self, clock: Callable[[], float] = time.time, max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self._max = max_sessions
        self._sessions: dict[str, Session] = {}

    async def create(self, tenant: str, key_id: str, is_admin: bool, ttl_s: float) -> tuple[str, float]:
        now = self._clock()
        if len(self._sessions) >= self._max:
            self._sweep(now)
        while len(self._sessions) >= self._max:
            soonest = min(self._sessions, key=lambda digest: self._sessions[digest].expires_at)
            del self._sessions[soonest]
        token = secrets.token_urlsafe(32)
        expires_at = now + ttl_s
        self._sessions[_digest(token)] = Session(tenant, key_id, is_admin, expires_at)
        return token, expires_at

    async def get(self, token: str) -> Session | None:
        digest = _digest(token)
        session = self._sessions.get(digest)
        if session is None:
            return None
        if self._clock() >= session.expires_at:
            del self._sessions[digest]
            return None
        return session

    async def delete(self, token: str) -> None:
        self._sessions.pop(_digest(token), None)

    def _sweep(self, now: float) -> None:
        for digest in [d for d, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[digest]
