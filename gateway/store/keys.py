"""API keys with a lifecycle (create, list, revoke, rotate), stored hashed, and the in-memory directory the
request path asks (`lookup`: a dict lookup and two time comparisons, no I/O).

Keys are hashed as the tenants file has them: "sha256:<hex>", id = the first 8 hex digits. The two
lines that do it are copied from gateway/tenancy/tenants.py (which imports the registry, pydantic and
YAML: too much for the bottom of the stack); tests/test_store_keys.py checks that they agree.

Replicas stay in sync through a change counter (`store_versions` row "api_keys"), bumped in the same
transaction as every key change, with the row's `version` set to the new value. `refresh()` reads that
one row (a primary-key lookup, cheap enough for every second) and reloads only rows newer than what it
has, so a key revoked on one replica is refused on every replica within a refresh interval plus a
query. Expiry (and a rotated key's grace period) needs no refresh: it is compared with the clock.
`touch(key_id)` records a use in a set; `last_used_at` is written for all of them every 60 s, coarse.
Every change is an admin event (who, when, what) in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson
from sqlalchemy import and_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.errors import GatewayError
from gateway.store.database import Database
from gateway.store.schema import admin_events, api_keys, store_versions

log = logging.getLogger("gateway.store")

KEY_PREFIX = "sk-gw-"
MAX_PAGE = 100
MAX_GRACE_S = 30 * 86400
MAX_NAME = 200
REFRESH_INTERVAL_S = 1.0
TOUCH_INTERVAL_S = 60.0


def hash_key(key: str) -> str:  # = gateway.tenancy.tenants.hash_key
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key_hash: str) -> str:  # = gateway.tenancy.tenants.key_id
    return key_hash.removeprefix("sha256:")[:8]


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    name: str
    key_hash: str
    created_at: int  # unix seconds
    expires_at: int | None
    revoked_at: int | None
    last_used_at: int | None
    created_by: str | None  # the admin key id; None: the CLI
    rotated_from: str | None
    replaced_by: str | None
    source: str = "database"

    def valid_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict:
        """As the admin API lists it: everything but the hash."""
        return {"id": self.id, "tenant": self.tenant, "name": self.name, "created_at": self.created_at,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at, "last_used_at": self.last_used_at,
                "created_by": self.created_by, "rotated_from": self.rotated_from, "replaced_by": self.replaced_by,
                "source": self.source}


@dataclass(frozen=True)
class NewKey:
    key: str  # the secret: shown once, never stored
    record: KeyRecord


def _bad(message: str, param: str, status: int = 400, code: str = "invalid_value") -> GatewayError:
    return GatewayError(status, message, param=param, code=code)


def _record(row) -> KeyRecord:  # type: ignore[no-untyped-def]
    m = row._mapping
    return KeyRecord(m["id"], m["tenant"], m["name"], m["key_hash"], m["created_at"], m["expires_at"],
                     m["revoked_at"], m["last_used_at"], m["created_by"], m["rotated_from"], m["replaced_by"])


class KeyStore:
    def __init__(self, db: Database, on_outage: Callable[[bool, str], None] | None = None) -> None:
        """`on_outage(down, reason)`: the database could not be read (True) and can again (False); without
        it those moments are logged here."""
        self._db = db
        self._on_outage = on_outage
        self._by_hash: dict[str, KeyRecord] = {}
        self._version = -1
        self._used: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._refresh_failing = False

    # -- the request path ---------------------------------------------------------------------------
    def lookup(self, key_hash: str) -> KeyRecord | None:
        """The live key with this hash, or None (unknown, revoked, expired, past its rotation grace)."""
        record = self._by_hash.get(key_hash)
        if record is None or record.revoked_at is not None:
            return None
        if record.expires_at is not None and time.time() >= record.expires_at:
            return None
        return record

    def touch(self, key_id: str) -> None:
        self._used.add(key_id)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, refresh_interval_s: float = REFRESH_INTERVAL_S,
                    touch_interval_s: float = TOUCH_INTERVAL_S) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the database is down: file keys work meanwhile; the loop retries
            self._failing(exc)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._every(refresh_interval_s, self.refresh)),
                       loop.create_task(self._every(touch_interval_s, self.write_last_used))]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.write_last_used()

    async def _every(self, interval: float, job) -> None:  # type: ignore[no-untyped-def]
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
                if self._refresh_failing:
                    self._refresh_failing = False
                    if self._on_outage is not None:
                        self._on_outage(False, "")
                    else:
                        log.warning("API keys: database readable again")
            except Exception as exc:  # keep the last directory: known keys keep working
                self._failing(exc)

    def _failing(self, exc: BaseException) -> None:
        if self._refresh_failing:
            return
        self._refresh_failing = True
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if self._on_outage is not None:
            self._on_outage(True, reason)
        else:
            log.error("API keys: cannot read the database (%s); serving the keys known so far", reason)

    async def refresh(self) -> bool:
        """Reload the keys changed since the last refresh; True when any did."""
        async with self._db.reading() as conn:
            version = (await conn.execute(select(store_versions.c.version)
                                          .where(store_versions.c.name == "api_keys"))).scalar_one()
            if version == self._version:
                return False
            rows = (await conn.execute(select(api_keys).where(api_keys.c.version > self._version))).all()
        by_hash = dict(self._by_hash)
        for row in rows:
            record = _record(row)
            by_hash[record.key_hash] = record
        self._by_hash, self._version = by_hash, version
        return True

    async def write_last_used(self) -> None:
        if not self._used:
            return
        used, self._used = self._used, set()
        try:
            async with self._db.writing() as conn:
                await conn.execute(update(api_keys).where(api_keys.c.id.in_(sorted(used)))
                                   .values(last_used_at=int(time.time())))
        except Exception:
            self._used |= used  # next time
            raise

    # -- admin operations ---------------------------------------------------------------------------
    async def create(self, tenant: str, name: str, expires_at: int | None = None, by: str | None = None,
                     *, rotated_from: str | None = None, _conn: AsyncConnection | None = None) -> NewKey:
        """A new key for `tenant` (which the caller checked exists in the tenants file)."""
        now = int(time.time())
        if not tenant:
            raise _bad("`tenant` is required.", "tenant")
        if len(name) > MAX_NAME:
            raise _bad(f"`name` is at most {MAX_NAME} characters.", "name")
        if expires_at is not None and expires_at <= now:
            raise _bad(f"`expires_at` ({expires_at}) must be in the future (unix seconds).", "expires_at")
        async with self._writing(_conn) as conn:
            version = await _bump(conn)
            while True:
                key = KEY_PREFIX + secrets.token_urlsafe(32)
                hashed = hash_key(key)
                ident = key_id(hashed)
                taken = (await conn.execute(select(api_keys.c.id).where(api_keys.c.id == ident))).first()
                if taken is None:  # ids are 32 bits: a clash is rare, and then we draw again
                    break
            values = {"key_hash": hashed, "id": ident, "tenant": tenant, "name": name, "created_at": now,
                      "expires_at": expires_at, "created_by": by, "rotated_from": rotated_from, "version": version}
            await conn.execute(api_keys.insert().values(**values))
            await _event(conn, by, "key.created", tenant, ident, {"name": name, "expires_at": expires_at,
                                                                   "rotated_from": rotated_from})
        record = KeyRecord(ident, tenant, name, hashed, now, expires_at, None, None, by, rotated_from, None)
        if _conn is None:
            self._remember(record, version)
        return NewKey(key, record)

    async def get(self, ident: str) -> KeyRecord | None:
        async with self._db.reading() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == ident))).first()
        return _record(row) if row is not None else None

    async def list(self, tenant: str | None = None, limit: int = 20, after: str | None = None) -> list[KeyRecord]:
        """Oldest first; `after`: the id of the last key of the previous page."""
        if not 1 <= limit <= MAX_PAGE:
            raise _bad(f"`limit` must be between 1 and {MAX_PAGE}, not {limit}.", "limit")
        c = api_keys.c
        query = select(api_keys).order_by(c.created_at, c.id).limit(limit)
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        async with self._db.reading() as conn:
            if after is not None:
                anchor = (await conn.execute(select(c.created_at, c.id).where(c.id == after))).first()
                if anchor is None:
                    raise _bad("`after` must be the id of a key of the previous page.", "after")
                query = query.where(tuple_(c.created_at, c.id) > tuple_(anchor[0], anchor[1]))
            rows = (await conn.execute(query)).all()
        return [_record(row) for row in rows]

    async def revoke(self, ident: str, by: str | None = None) -> KeyRecord | None:
        """None: no such key. Revoking a revoked key changes nothing and returns it."""
        now = int(time.time())
        async with self._db.writing() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == ident))).first()
            if row is None:
                return None
            record = _record(row)
            if record.revoked_at is not None:
                return record
            version = await _bump(conn)
            await conn.execute(update(api_keys).where(api_keys.c.id == ident)
                               .values(revoked_at=now, revoked_by=by, version=version))
            await _event(conn, by, "key.revoked", record.tenant, ident, {})
        record = replace(record, revoked_at=now)
        self._remember(record, version)
        return record

    async def rotate(self, ident: str, grace_seconds: int, by: str | None = None) -> NewKey | None:
        """A new key for the same tenant and name; the old one keeps working `grace_seconds` more (never
        longer than it would have anyway). None: no such key."""
        if not 0 <= grace_seconds <= MAX_GRACE_S:
            raise _bad(f"`grace_seconds` must be between 0 and {MAX_GRACE_S}, not {grace_seconds}.", "grace_seconds")
        now = int(time.time())
        async with self._db.writing() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == ident))).first()
            if row is None:
                return None
            old = _record(row)
            if not old.valid_at(now) or old.replaced_by is not None:
                what = "was already rotated" if old.replaced_by else "is revoked or expired"
                raise _bad(f"Key `{ident}` {what}; create a new one instead.", "id", 409, "key_not_rotatable")
            new = await self.create(old.tenant, old.name, old.expires_at, by, rotated_from=ident, _conn=conn)
            version = await _bump(conn)
            grace_end = math.ceil(time.time() + grace_seconds)  # at least the grace asked for, in whole seconds
            until = grace_end if old.expires_at is None else min(old.expires_at, grace_end)
            await conn.execute(update(api_keys).where(api_keys.c.id == ident)
                               .values(expires_at=until, replaced_by=new.record.id, version=version))
            await _event(conn, by, "key.rotated", old.tenant, ident, {"new_key_id": new.record.id,
                                                                     "grace_seconds": grace_seconds,
                                                                     "old_key_valid_until": until})
        self._remember(new.record, version)
        self._remember(replace(old, expires_at=until, replaced_by=new.record.id), version)
        return new

    def _remember(self, record: KeyRecord, version: int) -> None:
        """This replica sees its own change at once; the version stays, so the next refresh still
        loads whatever other replicas changed in between."""
        self._by_hash = {**self._by_hash, record.key_hash: record}

    @contextlib.asynccontextmanager
    async def _writing(self, conn: AsyncConnection | None):  # type: ignore[no-untyped-def]
        if conn is not None:
            yield conn
        else:
            async with self._db.writing() as fresh:
                yield fresh


async def _bump(conn: AsyncConnection) -> int:
    """The next value of the change counter; the row lock serialises key changes across replicas."""
    c = store_versions.c
    await conn.execute(update(store_versions).where(c.name == "api_keys").values(version=c.version + 1))
    return (await conn.execute(select(c.version).where(c.name == "api_keys"))).scalar_one()


async def _event(conn: AsyncConnection, by: str | None, action: str, tenant: str, ident: str, detail: dict) -> None:
    await conn.execute(admin_events.insert().values(at_ms=int(time.time() * 1000), admin_key_id=by, action=action,
                                                    tenant=tenant, key_id=ident,
                                                    detail=orjson.dumps(detail).decode()))


async def admin_log(db: Database, *, tenant: str | None = None, limit: int = 50,
                    before: int | None = None) -> list[dict]:
    """Admin events, newest first; `before`: the id of the last event of the previous page."""
    if not 1 <= limit <= MAX_PAGE:
        raise _bad(f"`limit` must be between 1 and {MAX_PAGE}, not {limit}.", "limit")
    c = admin_events.c
    query = select(admin_events).order_by(c.id.desc()).limit(limit)
    conditions = [c.tenant == tenant] if tenant is not None else []
    if before is not None:
        conditions.append(c.id < before)
    if conditions:
        query = query.where(and_(*conditions))
    async with db.reading() as conn:
        rows = (await conn.execute(query)).all()
    return [{**row._mapping, "detail": orjson.loads(row.detail)} for row in rows]
