"""The usage record of one finished request: one `"type": "usage"` line in the audit trail, beside the
decision record of the same request id, and the same figures added to the usage counters and metrics.

Written once the answer is complete (an `Outcome` callback): success, error and a client gone mid-stream
alike. Tokens are the engine's own `usage` where it reported one (`usage_source: "engine"`); llama.cpp
streams carry none, so the gateway counts them (`"gateway"`: its tokenizer call for the prompt, one token
per content event); a stream that broke off before any usage is `"gateway_estimate"` (prompt estimate +
events seen); no answer at all is `"none"` with zero tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.observability.timestamps import utc_now_iso

if TYPE_CHECKING:  # the pipeline imports this module
    from gateway.backends.dispatch import Outcome
    from gateway.pipeline import GatewayState
    from gateway.prompts.prepare import UpstreamCall
    from gateway.registry import Model
    from gateway.tenancy.tenants import Caller


def tokens(outcome: "Outcome", call: "UpstreamCall") -> tuple[int, int, str]:
    """(prompt, completion, source) of a finished request."""
    usage = outcome.usage if isinstance(outcome.usage, dict) else None
    watch = outcome.watch
    if usage:
        source = "gateway" if watch is not None and watch.usage_by_gateway else "engine"
        return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens")), source
    if watch is not None and watch.events:
        return max(0, call.prompt_estimate), watch.events, "gateway_estimate"
    return 0, 0, "none"


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def status(outcome: "Outcome") -> int:
    if outcome.status is not None:
        return outcome.status
    watch = outcome.watch
    if watch is None:
        return 200
    if watch.failure is not None:
        return 502
    return 200 if watch.completed else 499  # nginx's "client closed request": gone mid-stream


class UsageLines:
    """The parts of usage records that depend only on the configuration, per (tenant, key, requested model,
    served model): their JSON and their token counters, made once, not per request (building and
    encoding the whole record per request was ~10 % of the gateway's request-path CPU). Dropped when the
    configuration is reloaded; bounded by it (tenants x keys x models)."""

    def __init__(self) -> None:
        self._snapshot: object = None
        self._static: dict[tuple[str, str, str, str], tuple[str, Any, Any]] = {}

    def static(self, state: "GatewayState", caller: "Caller", requested: "Model", model: "Model") -> tuple[str, Any, Any]:
        if state.snapshot is not self._snapshot:
            self._snapshot, self._static = state.snapshot, {}
        tenant = caller.tenant
        key = (tenant.name, caller.key_id, requested.id, model.id)
        found = self._static.get(key)
        if found is None:
            license_ = state.snapshot.registry.licenses.get(model.license)
            fields = orjson.dumps({
                "type": "usage", "tenant": tenant.name, "key_id": caller.key_id,
                "environment": tenant.environment.value, "model_requested": requested.id, "model_served": model.id,
                "license": model.license,
                "commercial_use": license_.commercial_use.value if license_ is not None else "unknown",
                "attestations": sorted(tenant.attestations),
            }).decode()[1:-1]
            found = self._static[key] = (fields, *state.metrics.license_token_counters(
                model.license, tenant.name if state.settings.metrics_tenant_label else "-"))
        return found


def recorder(state: "GatewayState", caller: "Caller", requested: "Model", model: "Model", call: "UpstreamCall",
             request_id: str, started: float, endpoint: str = "chat") -> Callable[["Outcome"], None]:
    """The Outcome callback that writes the usage record, counts the tokens and exports them."""
    fields, tokens_in, tokens_out = state.usage_lines.static(state, caller, requested, model)

    def record(outcome: "Outcome") -> None:
        prompt, completion, source = tokens(outcome, call)
        now = time.monotonic()
        watch = outcome.watch
        ttft = watch.first_event_at - started if watch is not None and watch.first_event_at else None
        varying = orjson.dumps({
            "request_id": request_id, "endpoint": endpoint, "backend": outcome.backend_id, "fallback": outcome.fell_back,
            "stream": call.stream, "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "usage_source": source, "status": status(outcome),
            "duration_ms": round((now - started) * 1000, 1), "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
        }).decode()
        state.audit.record_line(f'{{"time":"{utc_now_iso()}",{fields},{varying[1:]}')
        state.usage.add(time.time(), caller.tenant.name, caller.key_id, model.id, model.license, prompt, completion)
        if prompt:
            tokens_in.inc(prompt)
        if completion:
            tokens_out.inc(completion)

    return record
