"""API keys in the database: lifecycle, the in-memory directory kept in sync across replicas (two store
instances on one database), admin events; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.errors import GatewayError
from gateway.store import keys as store_keys
from gateway.store.keys import KeyStore, admin_log
from gateway.tenancy import tenants
from tests.support.store_fixtures import db_url, migrated, pg_cluster  # noqa: F401


def test_hashes_and_ids_are_the_tenants_files() -> None:
    key = "sk-gw-" + "x" * 43
    assert store_keys.hash_key(key) == tenants.hash_key(key)
    assert store_keys.key_id(tenants.hash_key(key)) == tenants.key_id(tenants.hash_key(key))
    assert store_keys.KEY_PREFIX == tenants.KEY_PREFIX


async def _until(condition, timeout_s: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "not within the time allowed"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_revoked_and_expired_keys_are_refused_on_another_replica_within_2s(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db_a, db_b = await migrated(db_url, tmp_path), await migrated(db_url, tmp_path)
        a, b = KeyStore(db_a), KeyStore(db_b)
        await a.start()
        await b.start()
        try:
            made = await a.create("acme", "ci", by="adm00001")
            hashed = tenants.hash_key(made.key)
            assert made.key.startswith("sk-gw-") and made.record.id == tenants.key_id(hashed)
            assert a.lookup(hashed) is not None  # its own replica: at once
            await _until(lambda: b.lookup(hashed) is not None, 2.0)
            assert b.lookup(hashed).tenant == "acme"

            await a.revoke(made.record.id, by="adm00001")
            assert a.lookup(hashed) is None
            await _until(lambda: b.lookup(hashed) is None, 2.0)

            soon = await a.create("acme", "short", expires_at=int(time.time()) + 4)
            short_hash = tenants.hash_key(soon.key)
            await _until(lambda: b.lookup(short_hash) is not None, 2.0)
            expires_in = soon.record.expires_at - time.time()
            waited = await _until(lambda: b.lookup(short_hash) is None, 6.0)  # by the clock, no refresh needed
            assert waited >= expires_in - 0.1
            assert b.lookup(tenants.hash_key("sk-gw-never-made")) is None
        finally:
            await a.close()
            await b.close()
            await db_a.dispose()
            await db_b.dispose()

    asyncio.run(scenario())


def test_rotation_keeps_the_old_key_for_its_grace_only(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db_a, db_b = await migrated(db_url, tmp_path), await migrated(db_url, tmp_path)
        a, b = KeyStore(db_a), KeyStore(db_b)
        await a.start()
        await b.start()
        try:
            old = await a.create("acme", "deploy")
            await _until(lambda: b.lookup(tenants.hash_key(old.key)) is not None, 2.0)
            new = await a.rotate(old.record.id, grace_seconds=5, by="adm00001")
            assert new is not None and new.key != old.key and new.record.rotated_from == old.record.id
            old_hash, new_hash = tenants.hash_key(old.key), tenants.hash_key(new.key)
            await _until(lambda: b.lookup(new_hash) is not None, 2.0)
            assert b.lookup(old_hash) is not None  # the grace period
            waited = await _until(lambda: b.lookup(old_hash) is None, 8.0)
            assert waited >= 2.0  # it lasted (5 s from the rotation, minus the wait for the new key)
            assert b.lookup(new_hash) is not None
            with pytest.raises(GatewayError) as twice:
                await a.rotate(old.record.id, grace_seconds=0)
            assert twice.value.status == 409
            assert await a.rotate("00000000", grace_seconds=0) is None
            with pytest.raises(GatewayError):
                await a.rotate(new.record.id, grace_seconds=-1)
        finally:
            await a.close()
            await b.close()
            await db_a.dispose()
            await db_b.dispose()

    asyncio.run(scenario())


def test_listing_pages_without_secrets_and_every_change_is_an_admin_event(db_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        db = await migrated(db_url, tmp_path)
        store = KeyStore(db)
        await store.start(touch_interval_s=0.1)
        try:
            made = [await store.create("acme", f"key-{i}", by="adm00001") for i in range(5)]
            await store.create("globex", "theirs")
            first = await store.list("acme", limit=2)
            second = await store.list("acme", limit=2, after=first[-1].id)
            third = await store.list("acme", limit=2, after=second[-1].id)
            listed = [k.id for k in first + second + third]
            assert sorted(listed) == sorted(m.record.id for m in made) and len(third) == 1
            public = first[0].public()
            assert "key_hash" not in public and public["source"] == "database"
            assert not any(m.key in str(public) for m in made)
            with pytest.raises(GatewayError) as too_many:
                await store.list("acme", limit=101)
            assert too_many.value.status == 400 and too_many.value.param == "limit"

            store.touch(made[0].record.id)
            await asyncio.sleep(0.4)
            used = await store.get(made[0].record.id)
            assert used is not None and used.last_used_at is not None and abs(used.last_used_at - time.time()) < 5

            await store.revoke(made[1].record.id, by="adm00002")
            await store.rotate(made[2].record.id, grace_seconds=60, by="adm00003")
            events = await admin_log(db, tenant="acme")
            actions = [(e["action"], e["key_id"], e["admin_key_id"]) for e in events]
            assert ("key.revoked", made[1].record.id, "adm00002") in actions
            assert ("key.rotated", made[2].record.id, "adm00003") in actions
            assert sum(a == "key.created" for a, _, _ in actions) == 6  # five, and the rotation's new key
            assert all(e["at_ms"] > 0 for e in events)
            with pytest.raises(GatewayError):
                await store.create("acme", "late", expires_at=int(time.time()) - 1)
        finally:
            await store.close()
            await db.dispose()

    asyncio.run(scenario())
