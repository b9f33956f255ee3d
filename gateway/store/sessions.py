"""Console sessions, server-side: a sign-in with an API key becomes a random token (the console's cookie);
the database keeps only the token's SHA-256, the tenant, the key id it was signed in with, whether that
key is an admin's, and when it expires. Every replica sharing the database honours every session, and a
session deleted (sign-out) on one replica is gone on all of them at once: `get` reads the database
(the console is off the request path, so this is the one store read that is not served from memory).

    token, expires_at = await sessions.create("acme", "1a2b3c4d", is_admin=False, ttl_s=8 * 3600)
    session = await sessions.get(token)      # None: unknown, expired or deleted
    await sessions.delete(token)             # sign-out
    await sessions.purge_expired()           # the store's retention pass runs it hourly
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, select

from gateway.store.database import Database
from gateway.store.schema import console_sessions

MAX_TTL_S = 7 * 86400
TOKEN_BYTES = 32  # secrets.token_urlsafe: 43 characters, 256 bits


@dataclass(frozen=True)
class Session:
    tenant: str
    key_id: str
    is_admin: bool
    created_at: int  # unix seconds
    expires_at: int


def _hash(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SessionStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, tenant: str, key_id: str, is_admin: bool, ttl_s: int) -> tuple[str, int]:
        """A new session; returns (token, expires_at). The token is shown once: only its hash is kept."""
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be between 1 and {MAX_TTL_S}, not {ttl_s}")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = int(time.time())
        expires_at = now + int(ttl_s)
        async with self._db.writing() as conn:
            await conn.execute(console_sessions.insert().values(
                token_hash=_hash(token), tenant=tenant, key_id=key_id, is_admin=1 if is_admin else 0,
                created_at=now, expires_at=expires_at))
        return token, expires_at

    async def get(self, token: str) -> Session | None:
        """The live session of this token; None when unknown, expired or deleted."""
        if not token or len(token) > 256:
            return None
        c = console_sessions.c
        async with self._db.reading() as conn:
            row = (await conn.execute(select(console_sessions).where(c.token_hash == _hash(token)))).first()
        if row is None or time.time() >= row.expires_at:
            return None
        return Session(row.tenant, row.key_id, bool(row.is_admin), row.created_at, row.expires_at)

    async def delete(self, token: str) -> bool:
        """Sign-out; False when there was no such session."""
        async with self._db.writing() as conn:
            done = await conn.execute(delete(console_sessions).where(console_sessions.c.token_hash == _hash(token)))
        return bool(done.rowcount)

    async def delete_for_key(self, key_id: str) -> int:
        """Every session signed in with this key (e.g. once the key is revoked); how many."""
        async with self._db.writing() as conn:
            done = await conn.execute(delete(console_sessions).where(console_sessions.c.key_id == key_id))
        return done.rowcount or 0

    async def purge_expired(self, now: float | None = None, batch: int = 5000) -> int:
        """Delete expired sessions, `batch` per transaction; how many."""
        now = time.time() if now is None else now
        c = console_sessions.c
        total = 0
        while True:
            async with self._db.writing() as conn:
                oldest = select(c.token_hash).where(c.expires_at <= int(now)).limit(batch)
                done = await conn.execute(delete(console_sessions).where(c.token_hash.in_(oldest)))
            count = done.rowcount or 0
            total += count
            if count < batch:
                return total
