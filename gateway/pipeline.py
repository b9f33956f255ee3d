"""The request path, composed in one place:

    request -> auth (tenant) -> policy -> prompt preparation -> rate limit -> routing -> backend -> response

Each step lives in its own package; this module only wires them in that order.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable

import aiohttp
from pydantic import BaseModel
from starlette.responses import Response

from gateway.backends.dispatch import Attempts, ClientWatch, Outcome, OutcomeCallback, dispatch
from gateway.backends.requests import EnginePayloads
from gateway.errors import ClientGone, GatewayError, license_forbidden, model_not_found, no_backend_available
from gateway.lifecycle import LIFECYCLE
from gateway.observability.audit import AuditRecord, AuditTrail
from gateway.observability.metrics import Metrics
from gateway.observability.record import RequestRecord
from gateway.observability.request_context import RequestContext
from gateway.policy.decide import Decision, Verdict
from gateway.prompts.context import ensure_prompt_fits
from gateway.prompts.prepare import UpstreamCall, prepare_chat, prepare_completion
from gateway.registry import Model
from gateway.routing.budget import RetryBudget
from gateway.routing.fleet import Fleet
from gateway.routing.picker import RoutingHints, RoutingPolicy, backends_in_try_order
from gateway.routing.report import no_ready_pods, unusable_backends
from gateway.settings import Settings
from gateway.snapshot import Snapshot
from gateway.admission.holds import Hold, Holds
from gateway.admission.quota import LocalQuotas, QuotaExceeded, QuotaUnavailable
from gateway.admission.ratelimit import Admission, RateLimited, RateLimiter, RateLimitUnavailable
from gateway.store.decisions import DecisionRow
from gateway.tenancy.auth import authenticate
from gateway.tenancy.extras import require_allowed_extras
from gateway.tenancy.tenants import Caller, Environment
from gateway.usage.record import UsageRecorder
from gateway.wire.protocol import ChatCompletionRequest, CompletionRequest
from gateway.wire.validation import parse_request

if TYPE_CHECKING:
    from gateway.store.store import Store


_AUDITED_ENVIRONMENTS = (Environment.PRODUCTION, Environment.STAGING)


@dataclass
class GatewayState:
    settings: Settings
    client: aiohttp.ClientSession
    snapshot: Snapshot
    limiter: RateLimiter
    audit: AuditTrail
    store: "Store"  # the database: ledger, decisions, keys (gateway/store/store.py)
    usage: UsageRecorder  # writes each finished request's usage record (audit line, ledger row, metrics)
    metrics: Metrics = field(default_factory=Metrics)
    fleet: Fleet = field(default_factory=Fleet)
    budget: RetryBudget = field(default_factory=RetryBudget)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    quotas: Any = field(default_factory=LocalQuotas)  # LocalQuotas | RedisQuotas (gateway/admission/quota.py)
    responses: Any = None  # a ResponseStore (gateway/responses/store.py): the database's
    holds: Holds = field(default_factory=Holds)  # each tenant's open requests here, uploads included

    def caller(self, authorization: str | None) -> Caller:
        """Who is calling (401 otherwise): a key of the tenants file, else a live key of the database."""
        return authenticate(authorization, self.snapshot.tenants, self.store.keys)


@dataclass(frozen=True)
class Endpoint:
    name: str  # the endpoint tag of metrics, usage records, the ledger and audit: chat | completions | responses
    schema: type[BaseModel]
    prepare: Callable[[Model, Any, int | None], UpstreamCall]


CHAT = Endpoint("chat", ChatCompletionRequest, prepare_chat)
COMPLETIONS = Endpoint("completions", CompletionRequest, prepare_completion)


def identify(state: GatewayState, authorization: str | None) -> Caller:
    """The first step, before the body is even read: who is calling (401 otherwise)."""
    if LIFECYCLE.draining:
        raise GatewayError(503, "The gateway is shutting down; retry on another replica.",
                           type="service_unavailable_error", code="shutting_down",
                           headers={"Retry-After": "1"})
    return state.caller(authorization)


def hold(state: GatewayState, caller: Caller) -> Hold | None:
    """The second step, still before the body: the request counts against its tenant's concurrency on
    this replica from now on (429 at once past it). Released when its outcome is reported."""
    try:
        return state.holds.take(caller.tenant.name, caller.tenant.limits.max_concurrent)
    except GatewayError:
        state.metrics.rejected(caller.tenant.name, "concurrency")
        raise


async def serve(state: GatewayState, endpoint: Endpoint, caller: Caller, raw: bytes,
                context: RequestContext, client_gone: ClientWatch | None = None,
                held: Hold | None = None, request: BaseModel | None = None) -> Response:
    """`held`: the caller's hold (`hold()`); it passes to the request's outcome once there is one, and the
    caller releases it when this raises before (releasing is idempotent). `request`: the body already
    parsed (a bridge translated it: gateway/responses), instead of `raw`."""
    record = RequestRecord(state.metrics, state.settings.metrics_tenant_label, time.monotonic(),
                           endpoint=endpoint.name)
    record.tenant = caller.tenant.name
    try:
        response = await _serve(state, endpoint, caller, raw, context, record, client_gone, held, request)
    except GatewayError as exc:
        record.finished(exc.status)
        raise
    except ClientGone:
        record.finished(499)  # nginx's "client closed request"
        raise
    record.responded(response)
    return response


async def _serve(state: GatewayState, endpoint: Endpoint, caller: Caller, raw: bytes, context: RequestContext,
                 record: RequestRecord, client_gone: ClientWatch | None, held: Hold | None,
                 request: BaseModel | None = None) -> Response:
    snapshot = state.snapshot  # one consistent configuration for the whole request
    caller = snapshot.current(caller)  # a reload during the upload: judged by the new rules, or a 401
    body = parse_request(raw, endpoint.schema) if request is None else request
    require_allowed_extras(body, caller.tenant)
    requested = snapshot.registry.model(body.model)
    if requested is None:
        raise snapshot.missing(body.model, caller.tenant)
    decision = snapshot.decide(caller.tenant, requested)
    if not _audit(state, context, caller, requested, decision, endpoint.name) and _audit_required(state, caller):
        raise GatewayError(503, "The audit trail or the usage ledger cannot be written right now, and this "
                           f"gateway serves {caller.tenant.environment.value} tenants only with those records. "
                           "Retry shortly.",
                           type="service_unavailable_error", code="audit_unavailable",
                           headers={"Retry-After": str(state.settings.retry_after_s)})
    model = _served_model(snapshot, requested, decision)
    record.model = model.id
    call = endpoint.prepare(model, body, caller.tenant.default_max_tokens or model.default_max_tokens)
    payloads = EnginePayloads(call, model.id, model.context_length)
    payloads.require_some(backend.engine for backend in model.backends)  # a 400 before it costs a slot
    reserve = call.reservation(model.context_length)
    admission = await _admit(state, caller, reserve)  # counts, answered or not
    headers = dict(admission.headers)
    if decision.verdict is Verdict.SUBSTITUTE:
        headers["x-gateway-substituted-from"] = requested.id
    limited = caller.tenant.limits.any or bool(caller.tenant.quotas)
    outcome = Outcome(releases=[_reconcile(admission, call, reserve)] if limited else [], on_done=[record.outcome])
    if state.settings.usage_records:
        outcome.on_done.append(state.usage.recorder(snapshot, snapshot is state.snapshot, caller, requested, model,
                                                    call, endpoint.name, context.request_id, record.started,
                                                    context.client_request_id))
    LIFECYCLE.enter()
    outcome.on_done.append(_leave)
    if held is not None:  # with the limiter's slot, before the answer: a client's next request finds it free
        outcome.releases.append(held.release)
    try:
        upstreams = _route(state, snapshot, model, call)
        await ensure_prompt_fits(model, call, upstreams[0].count_tokens)
        state.budget.deposit()
        return await dispatch(upstreams, payloads, model.id, headers, outcome, _attempts(state, context),
                              state.settings.retry_after_s, client_gone)
    except BaseException as exc:
        # Shielded: a cancelled request (the client went away) must still free its slot and reservation.
        await asyncio.shield(_abandon(admission, outcome, exc))
        raise


async def _abandon(admission: Admission, outcome: Outcome, exc: BaseException) -> None:
    """A request that got no answer. Refused (a client error, no backend, overload) or broken off by the
    engine: its reservation is released. A generation that outlived its timeout, or whose client left
    while the engine worked on it, keeps it: the engine spent those tokens."""
    refused = isinstance(exc, GatewayError) and exc.code != "generation_timeout"
    if outcome.status is None:  # for the usage record
        outcome.status = (exc.status if isinstance(exc, GatewayError)
                          else 499 if isinstance(exc, (ClientGone, asyncio.CancelledError)) else 500)
    try:
        await admission.finish(0 if refused else None)
    finally:
        await outcome.done()


def _leave(_: Outcome) -> None:
    LIFECYCLE.leave()


def _served_model(snapshot: Snapshot, requested: Model, decision: Decision) -> Model:
    if decision.verdict is Verdict.ALLOW:
        return requested
    if decision.verdict is Verdict.SUBSTITUTE and decision.served_model:
        return snapshot.registry.models[decision.served_model]
    if decision.hidden:
        raise model_not_found(requested.id)
    raise license_forbidden(decision.reason)


def _route(state: GatewayState, snapshot: Snapshot, model: Model, call: UpstreamCall) -> list:
    if LIFECYCLE.inflight > state.settings.inflight_cap:  # this request is counted already
        raise _overloaded(state, "the gateway is at its limit of requests in flight")
    prefix = (call.prompt_text or "")[: state.settings.affinity_prefix_chars] or None
    hints = RoutingHints(prompt_prefix=prefix, session=call.session)
    backends = snapshot.upstreams.endpoints(model)  # each engine pod of a `discovery: dns` backend
    order = backends_in_try_order(backends, state.fleet, hints, state.routing)
    if order:
        return [snapshot.upstreams[b.id] for b in order]
    if backends and any(b.max_concurrency is not None and state.fleet.state(b.id).healthy
                        and state.fleet.state(b.id).outstanding >= b.max_concurrency for b in backends):
        raise _overloaded(state, f"every backend of `{model.id}` is at its concurrency limit")
    failures = (unusable_backends(backends, state.fleet, state.settings.unreachable_lasting_after_s) if backends
                else no_ready_pods(model.backends))
    raise no_backend_available(model.id, failures, state.settings.retry_after_s)


def _overloaded(state: GatewayState, why: str) -> GatewayError:
    return GatewayError(429, f"The engines are overloaded ({why}). Retry shortly.", type="rate_limit_error",
                        code="engine_overloaded", headers={"Retry-After": str(state.settings.retry_after_s)})


def _attempts(state: GatewayState, context: RequestContext) -> Attempts:
    def started(backend_id: str) -> None:
        state.fleet.started(backend_id)
        state.metrics.child(state.metrics.inflight, backend_id).inc()

    def finished(backend_id: str, ok: bool) -> None:
        state.fleet.finished(backend_id, ok)
        state.metrics.child(state.metrics.inflight, backend_id).dec()

    def released(backend_id: str) -> None:
        state.fleet.released(backend_id)
        state.metrics.child(state.metrics.inflight, backend_id).dec()

    def waited(seconds: float) -> None:
        context.upstream_s += seconds

    return Attempts(
        max_attempts=state.settings.max_attempts,
        may_retry=state.budget.try_spend,
        started=started,
        finished=finished,
        released=released,
        waited=waited,
        probe_verdict=state.fleet.probe_verdict,
        lasting_after_s=state.settings.unreachable_lasting_after_s,
    )


def _audit_required(state: GatewayState, caller: Caller) -> bool:
    """GATEWAY_AUDIT_FAIL_CLOSED: production and staging requests are served only with a trail."""
    return state.settings.audit_fail_closed and caller.tenant.environment in _AUDITED_ENVIRONMENTS


def _audit(state: GatewayState, context: RequestContext, caller: Caller, model: Model, decision: Decision,
           endpoint: str) -> bool:
    """Record the decision (audit trail and database); False when the trail refused it or cannot currently
    be written, or the database's records can be neither written nor spooled."""
    request_id, client_request_id = context.request_id, context.client_request_id
    tenant = caller.tenant.name
    if decision.hidden:  # answered as a missing model (404 either way): nothing may tell that it exists
        state.audit.record(AuditRecord(
            request_id=request_id, tenant=tenant, key_id=caller.key_id, model_requested=model.id,
            model_served=None, license="", decision="not_found", rule="not-found",
            client_request_id=client_request_id, endpoint=endpoint))
        state.store.decisions.record(DecisionRow(request_id, time.time(), tenant, caller.key_id, model.id, None,
                                                 "", "not_found", "not-found"))
        return True
    verdict = decision.verdict.value
    state.metrics.child(state.metrics.policy, verdict, model.license).inc()
    state.store.decisions.record(DecisionRow(request_id, time.time(), tenant, caller.key_id, model.id,
                                             decision.served_model, model.license, verdict, decision.rule))
    return state.audit.record(AuditRecord(
        request_id=request_id, tenant=tenant, key_id=caller.key_id, model_requested=model.id,
        model_served=decision.served_model, license=model.license, decision=verdict,
        rule=decision.rule, client_request_id=client_request_id, endpoint=endpoint,
    )) and state.audit.healthy and state.store.durable


async def _admit(state: GatewayState, caller: Caller, reserve: int) -> Admission:
    """Quotas (only for a tenant that has one) and rate limits; one Admission releases both. The Redis
    limiter checks both in one script (one round trip); otherwise quotas first, then rate limits."""
    quotas = caller.tenant.quotas
    if not quotas or getattr(state.limiter, "admits_quotas", False):
        return await _admit_rate(state, caller, reserve, quotas or None)
    try:
        grant = await state.quotas.admit(caller.tenant.name, quotas, reserve)
    except (QuotaExceeded, QuotaUnavailable) as exc:
        raise _quota_error(state, caller, exc) from None
    try:
        admission = await _admit_rate(state, caller, reserve)
    except BaseException:
        await asyncio.shield(grant.finish(0))  # refused (or cancelled): nothing was spent
        raise

    async def release(actual: int | None) -> None:
        try:
            await admission.finish(actual)
        finally:
            await grant.finish(actual)

    return Admission({**admission.headers, **grant.headers}, release)


def _quota_error(state: GatewayState, caller: Caller, exc: Exception) -> GatewayError:
    if isinstance(exc, QuotaExceeded):
        state.metrics.rejected(caller.tenant.name, "quota")
        return GatewayError(429, exc.message, type="insufficient_quota", code="insufficient_quota",
                            headers=exc.headers)
    return GatewayError(503, f"{exc} Token quotas cannot be checked right now; retry shortly.",
                        type="service_unavailable_error", code="rate_limiter_unavailable",
                        headers={"Retry-After": str(state.settings.retry_after_s)})


async def _admit_rate(state: GatewayState, caller: Caller, reserve: int, quotas=None) -> Admission:
    try:
        if quotas:
            return await state.limiter.admit(caller.tenant.name, caller.tenant.limits, reserve, quotas)
        return await state.limiter.admit(caller.tenant.name, caller.tenant.limits, reserve)
    except (QuotaExceeded, QuotaUnavailable) as exc:
        raise _quota_error(state, caller, exc) from None
    except RateLimited as exc:
        state.metrics.rejected(caller.tenant.name, exc.limit)
        raise GatewayError(429, exc.message, type="rate_limit_error", code="rate_limit_exceeded",
                           headers=exc.headers) from None
    except RateLimitUnavailable:
        raise GatewayError(503, "Rate limiting is unavailable and the gateway is set to fail closed.",
                           type="service_unavailable_error", code="rate_limiter_unavailable",
                           headers={"Retry-After": str(state.settings.retry_after_s)}) from None


def _reconcile(admission: Admission, call: UpstreamCall, reserved: int) -> OutcomeCallback:
    def finish(outcome: Outcome) -> Awaitable[None] | None:
        actual = outcome.total_tokens
        if actual is None and outcome.watch is not None and outcome.watch.events:
            # Broken off before the engine's usage: charged by the prompt's bound, never beyond the reservation.
            actual = min(reserved, call.prompt_bound + outcome.watch.events)
        return admission.settle(actual)  # what is left to await where the limiter needs I/O (Redis)

    return finish
