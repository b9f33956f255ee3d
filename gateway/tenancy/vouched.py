"""A caller vouched for in-process, and whether a signed-in session's key still lets anyone in.

The console (gateway/console/) is a client of the API that holds no key after sign-in: it checks its
session's key with `live_caller` on every page and hands the API that caller in the ASGI scope, under
`extensions[VOUCHED_CALLER]` (gateway/api/callers.py reads it). Here, below both, so that neither imports
the other.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.tenancy.auth import ANONYMOUS
from gateway.tenancy.tenants import Caller

VOUCHED_CALLER = "gateway.vouched_caller"


async def live_caller(state: Any, tenant: str, key_id: str) -> Caller | None:
    """The caller of a key known by its id, as the current configuration has it; None when that key no
    longer lets anyone in (removed from the tenants file, or its tenant gone). A console session is
    checked with this on every page, so it ends with its key and is judged by the tenant's current rules.

    A key of the database (issue 20's key lifecycle, where the gateway has one as `state.store`) is read
    there: one primary-key lookup per console page, off the request path."""
    directory = state.snapshot.tenants
    if directory is None:  # open access: the one anonymous caller
        return ANONYMOUS if (tenant, key_id) == (ANONYMOUS.tenant.name, ANONYMOUS.key_id) else None
    for caller in directory.by_key_hash.values():
        if caller.key_id == key_id and caller.tenant.name == tenant:
            return caller
    keys = getattr(getattr(state, "store", None), "keys", None)
    found = directory.tenants.get(tenant)
    if keys is None or found is None:
        return None
    record = await keys.get(key_id)
    if record is None or record.tenant != tenant or not record.valid_at(time.time()):
        return None
    return Caller(found, key_id, record.key_hash)
