"""Who is calling an API route: the bearer key's caller, or one an in-process client vouched for.

The console (gateway/console/) calls these routes in-process, as a client, for a signed-in session. It
holds no API key after sign-in (the session store keeps the tenant and key id, never the secret), so it
puts the session's caller into the ASGI scope, under `extensions[VOUCHED_CALLER]`. Nothing a remote
client sends can set that entry: servers build the scope from the connection, and the HTTP headers stay
headers. A route that takes callers of either kind asks `request_caller` instead of `authenticate`.
"""

from __future__ import annotations

from fastapi import Request

from gateway.tenancy.auth import ANONYMOUS, authenticate
from gateway.tenancy.tenants import Caller

VOUCHED_CALLER = "gateway.vouched_caller"


def request_caller(request: Request, authorization: str | None) -> Caller:
    vouched = (request.scope.get("extensions") or {}).get(VOUCHED_CALLER)
    if isinstance(vouched, Caller):
        return vouched
    return authenticate(authorization, request.app.state.gateway.snapshot.tenants)


async def live_caller(state, tenant: str, key_id: str) -> Caller | None:  # state: gateway.pipeline.GatewayState
    """The caller of a key known by its id, as the current configuration has it; None when that key no
    longer lets anyone in (removed from the tenants file, or its tenant gone). A console session is
    checked with this on every page, so it ends with its key and is judged by the tenant's current rules.

    Keys of the database (the `wiring` branch) are to be checked here too, beside the file's."""
    directory = state.snapshot.tenants
    if directory is None:  # open access: the one anonymous caller
        return ANONYMOUS if (tenant, key_id) == (ANONYMOUS.tenant.name, ANONYMOUS.key_id) else None
    for caller in directory.by_key_hash.values():
        if caller.key_id == key_id and caller.tenant.name == tenant:
            return caller
    return None
