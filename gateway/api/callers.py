"""Who is calling an API route: the bearer key's caller, or one an in-process client vouched for.

The console (gateway/console/) calls these routes in-process, as a client, for a signed-in session. It
holds no API key after sign-in (the session store keeps the tenant and key id, never the secret), so it
puts the session's caller into the ASGI scope, under `extensions[VOUCHED_CALLER]`
(gateway/tenancy/vouched.py, below both the API and the console). Nothing a remote
client sends can set that entry: servers build the scope from the connection, and the HTTP headers stay
headers. A route that takes callers of either kind asks `request_caller` instead of `authenticate`.
"""

from __future__ import annotations

from fastapi import Request

from gateway.tenancy.auth import authenticate
from gateway.tenancy.tenants import Caller
from gateway.tenancy.vouched import VOUCHED_CALLER


def request_caller(request: Request, authorization: str | None) -> Caller:
    vouched = (request.scope.get("extensions") or {}).get(VOUCHED_CALLER)
    if isinstance(vouched, Caller):
        return vouched
    state = request.app.state.gateway
    identify = getattr(state, "caller", None)  # with the database's keys too, where the state has them
    return identify(authorization) if identify is not None else authenticate(authorization, state.snapshot.tenants)
