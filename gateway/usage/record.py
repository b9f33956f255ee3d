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
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import orjson

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


def recorder(state: "GatewayState", caller: "Caller", requested: "Model", model: "Model", call: "UpstreamCall",
             request_id: str, started: float) -> Callable[["Outcome"], Awaitable[None]]:
    """The Outcome callback that writes the usage record, counts the tokens and exports them."""
    license_ = state.snapshot.registry.licenses.get(model.license)
    commercial = license_.commercial_use.value if license_ is not None else "unknown"
    tenant = caller.tenant
    tokens_in, tokens_out = state.metrics.license_token_counters(
        model.license, tenant.name if state.settings.metrics_tenant_label else "-")

    async def record(outcome: "Outcome") -> None:
        prompt, completion, source = tokens(outcome, call)
        now = time.monotonic()
        watch = outcome.watch
        ttft = watch.first_event_at - started if watch is not None and watch.first_event_at else None
        line = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "type": "usage", "request_id": request_id, "tenant": tenant.name, "key_id": caller.key_id,
            "environment": tenant.environment.value, "model_requested": requested.id, "model_served": model.id,
            "license": model.license, "commercial_use": commercial, "attestations": sorted(tenant.attestations),
            "backend": outcome.backend_id, "fallback": outcome.fell_back, "stream": call.stream,
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "usage_source": source, "status": status(outcome), "duration_ms": round((now - started) * 1000, 1),
            "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
        }
        state.audit.record_line(orjson.dumps(line).decode())
        state.usage.add(time.time(), tenant.name, caller.key_id, model.id, model.license, prompt, completion)
        if prompt:
            tokens_in.inc(prompt)
        if completion:
            tokens_out.inc(completion)

    return record
