"""The request path, composed in one place:

    request -> auth (tenant) -> policy -> prompt preparation -> routing -> rate limit -> backend -> response

Each step lives in its own package; this module only wires them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
from pydantic import BaseModel
from starlette.responses import Response

from gateway.api.protocol import ChatCompletionRequest, CompletionRequest
from gateway.api.validation import parse_body
from gateway.backends.dispatch import Outcome, dispatch
from gateway.errors import GatewayError, model_not_found
from gateway.observability.audit import AuditRecord, AuditTrail
from gateway.policy.decide import Decision, Verdict, decide
from gateway.prompts.context import ensure_prompt_fits
from gateway.prompts.prepare import UpstreamCall, prepare_chat, prepare_completion
from gateway.registry import Model
from gateway.routing.picker import backends_in_try_order
from gateway.settings import Settings
from gateway.snapshot import Snapshot
from gateway.tenancy.auth import authenticate
from gateway.tenancy.ratelimit import Admission, Limits, RateLimited, RateLimiter, RateLimitUnavailable
from gateway.tenancy.tenants import Caller

# Tokens reserved for a request that sets no max_tokens, until the real usage is known.
DEFAULT_COMPLETION_RESERVATION = 256


@dataclass
class GatewayState:
    settings: Settings
    client: httpx.AsyncClient
    snapshot: Snapshot
    limiter: RateLimiter
    audit: AuditTrail
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    schema: type[BaseModel]
    prepare: Callable[[Model, dict[str, Any]], UpstreamCall]


CHAT = Endpoint(ChatCompletionRequest, prepare_chat)
COMPLETIONS = Endpoint(CompletionRequest, prepare_completion)


async def serve(
    state: GatewayState, endpoint: Endpoint, authorization: str | None, raw: bytes, request_id: str
) -> Response:
    snapshot = state.snapshot  # one consistent configuration for the whole request
    caller = authenticate(authorization, snapshot.tenants)
    body = parse_body(raw, endpoint.schema)
    requested = snapshot.registry.model(body["model"])
    if requested is None:
        raise model_not_found(body["model"])
    decision = decide(caller.tenant, requested, snapshot.registry)
    _audit(state, request_id, caller, requested, decision, snapshot)
    model = _served_model(snapshot, requested, decision)
    call = endpoint.prepare(model, body)
    upstreams = [snapshot.upstreams[b.id] for b in backends_in_try_order(model.backends)]
    if upstreams:
        await ensure_prompt_fits(model, call, upstreams[0].count_tokens)
    admission = await _admit(state, caller, call)
    headers = dict(admission.headers)
    if decision.verdict is Verdict.SUBSTITUTE:
        headers["x-gateway-substituted-from"] = requested.id
    # Unlimited tenants need no reconciliation, so their answers are forwarded without being parsed.
    limited = caller.tenant.limits != Limits()
    outcome = Outcome(on_done=[_reconcile(admission, call)] if limited else [])
    try:
        return await dispatch(upstreams, call, model.id, headers, outcome, state.settings.retry_after_s)
    except BaseException:
        await admission.finish(None)
        raise


def _served_model(snapshot: Snapshot, requested: Model, decision: Decision) -> Model:
    if decision.verdict is Verdict.ALLOW:
        return requested
    if decision.verdict is Verdict.SUBSTITUTE and decision.served_model:
        return snapshot.registry.models[decision.served_model]
    if decision.hidden:
        raise model_not_found(requested.id)
    raise GatewayError(403, decision.reason, type="permission_error", param="model",
                       code="model_license_forbidden")


def _audit(state: GatewayState, request_id: str, caller: Caller, model: Model, decision: Decision,
           snapshot: Snapshot) -> None:
    state.audit.record(AuditRecord(
        request_id=request_id,
        tenant=caller.tenant.name,
        key_id=caller.key_id,
        model_requested=model.id,
        model_served=decision.served_model,
        license=model.license,
        decision=decision.verdict.value,
        rule=decision.rule,
    ))


async def _admit(state: GatewayState, caller: Caller, call: UpstreamCall) -> Admission:
    prompt_estimate = len(call.prompt_text or "") // 4
    reserve = prompt_estimate + (call.max_tokens or DEFAULT_COMPLETION_RESERVATION)
    try:
        return await state.limiter.admit(caller.tenant.name, caller.tenant.limits, reserve)
    except RateLimited as exc:
        raise GatewayError(429, exc.message, type="rate_limit_error", code="rate_limit_exceeded",
                           headers=exc.headers) from None
    except RateLimitUnavailable:
        raise GatewayError(503, "Rate limiting is unavailable and the gateway is set to fail closed.",
                           type="service_unavailable_error", code="rate_limiter_unavailable",
                           headers={"Retry-After": str(state.settings.retry_after_s)}) from None


def _reconcile(admission: Admission, call: UpstreamCall):
    prompt_estimate = len(call.prompt_text or "") // 4

    async def finish(outcome: Outcome) -> None:
        actual = outcome.total_tokens
        if actual is None and outcome.streamed_events:
            actual = prompt_estimate + outcome.streamed_events
        await admission.finish(actual)

    return finish
