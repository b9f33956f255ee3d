"""The API keys an admin sees: those of the tenants file (read-only: the file is reviewed as code, changed
by a file edit and a reload) and those kept in the database (created, revoked and rotated through
`/admin/keys` or `gateway keys`), one list, without secrets or hashes.

The list is paged by key id: the file's keys first (by tenant, then id), then the database's (oldest
first); `after` is the `last_id` of the previous page, whichever part it ended in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.tenancy.tenants import TenantDirectory

MAX_PAGE = 100
_EMPTY = {"name": None, "created_at": None, "expires_at": None, "revoked_at": None, "last_used_at": None,
          "created_by": None, "rotated_from": None, "replaced_by": None}


class KeyRecords(Protocol):
    """The database's keys (gateway.store.keys.KeyStore)."""

    async def list(self, tenant: str | None = None, limit: int = 20, after: str | None = None) -> Sequence[Any]: ...


@dataclass(frozen=True)
class KeyPage:
    data: list[dict]
    has_more: bool
    last_id: str | None

    def body(self) -> dict:
        return {"object": "list", "data": self.data, "has_more": self.has_more, "last_id": self.last_id}


def public(record: Any) -> dict:
    """A database key as the API shows it (KeyRecord.public() and its object type)."""
    return {"object": "api_key", **record.public()}


def file_keys(directory: TenantDirectory | None, tenant: str | None = None) -> list[dict]:
    """The tenants file's keys (of one tenant, or all), as the API lists them."""
    if directory is None:
        return []
    found = sorted((caller.tenant.name, caller.key_id) for caller in directory.by_key_hash.values()
                   if tenant is None or caller.tenant.name == tenant)
    return [{"object": "api_key", "id": key_id, "tenant": name, **_EMPTY, "source": "file"} for name, key_id in found]


def is_file_key(directory: TenantDirectory | None, key_id: str) -> bool:
    return directory is not None and any(caller.key_id == key_id for caller in directory.by_key_hash.values())


async def list_keys(directory: TenantDirectory | None, records: KeyRecords, *, tenant: str | None, limit: int,
                    after: str | None) -> KeyPage:
    """One page of keys, file keys first. Bad `limit` or `after`: a 400."""
    if not 1 <= limit <= MAX_PAGE:
        raise GatewayError(400, f"`limit` must be between 1 and {MAX_PAGE}, not {limit}.", param="limit",
                           code="invalid_value")
    from_file = file_keys(directory, tenant)
    ids = [key["id"] for key in from_file]
    data: list[dict] = []
    database_after: str | None = None
    if after is None or after in ids:
        start = ids.index(after) + 1 if after is not None else 0
        data = from_file[start:start + limit]
        if start + limit < len(from_file):  # the page ends inside the file's keys
            return KeyPage(data, True, data[-1]["id"])
    else:
        database_after = after  # KeyStore.list answers a 400 for an id it does not have
    room = limit - len(data)
    rows = list(await records.list(tenant, room, database_after)) if room else []
    data += [public(row) for row in rows]
    if room and len(rows) < room:
        more = False
    else:  # full: is there one more after it?
        more = bool(await records.list(tenant, 1, rows[-1].id if rows else database_after))
    return KeyPage(data, more, data[-1]["id"] if data else None)
