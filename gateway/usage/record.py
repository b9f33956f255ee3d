"""The usage record of one finished request: one `"type": "usage"` line in the audit trail, beside the
decision record of the same request id, one row in the usage ledger (gateway/store/ledger.py: what the
usage API, `gateway usage report` and quota reloads read), and the tokens in the metrics.

Written once the answer is complete (an `Outcome` callback): success, error and a client gone mid-stream
alike. Tokens are the engine's own `usage` where it reported one (`usage_source: "engine"`); llama.cpp
streams carry none, so the gateway counts them (`"gateway"`: its tokenizer call for the prompt, one token
per content event); a stream that broke off before any usage is `"gateway_estimate"` (prompt estimate +
events seen); no answer at all is `"none"` with zero tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.observability.timestamps import utc_now_iso
from gateway.store.ledger import LedgerRow

if TYPE_CHECKING:
    from gateway.backends.dispatch import Outcome
    from gateway.observability.metrics import Metrics
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
        return max(0, call.prompt_bound), watch.events, "gateway_estimate"
    return 0, 0, "none"


def _int(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def status(outcome: "Outcome") -> int:
    if outcome.status is not None:
        return outcome.status
    watch = outcome.watch
    if watch is None:
        return 200
    if watch.failure is not None or watch.engine_error is not None:
        return 502
    return 200 if watch.completed else 499  # nginx's "client closed request": gone mid-stream


class Lines(Protocol):
    """Where usage lines go: the audit trail (gateway/observability/audit.py)."""

    def record_line(self, line: str) -> bool: ...


class Rows(Protocol):
    """Where ledger rows go: `Ledger.record` (a list append)."""

    def record(self, row: LedgerRow) -> None: ...


_Static = tuple[str, tuple, Any, Any]  # audit JSON fields, ledger fields, input and output token counters


class UsageRecorder:
    """Writes usage records into what it is handed: the audit trail's lines, the ledger's rows (None: no
    ledger) and the metrics.

    The parts of a record that depend only on the configuration, per (tenant, key, requested model, served
    model), are made once, not per request (building and encoding the whole record per request was ~10 %
    of the gateway's request-path CPU): the audit line's JSON fields, the ledger row's fields and the
    token counters. Cached for the current snapshot only, dropped when it changes; bounded by it
    (tenants x keys x models)."""

    def __init__(self, lines: Lines, rows: Rows | None, metrics: "Metrics") -> None:
        self._lines = lines
        self._rows = rows
        self._metrics = metrics
        self._snapshot: object = None
        self._static: dict[tuple[str, str, str, str], _Static] = {}

    def recorder(self, snapshot: Any, current: bool, caller: "Caller", requested: "Model", model: "Model",
                 call: "UpstreamCall", endpoint: str, request_id: str, started: float,
                 client_request_id: str | None = None) -> Callable[["Outcome"], None]:
        """The Outcome callback that writes the request's usage record. `snapshot`: the one the request was
        judged against; `current`: whether it is still the gateway's current one (a request judged against
        an older one, a reload while it was admitted, must not seed the cache that later requests read).
        `request_id` is the gateway's (the decision record's); `client_request_id` the client's, if any.
        `started`: time.monotonic() when the request arrived; `endpoint`: chat | completions | responses."""
        fields, ledger_fields, tokens_in, tokens_out = self._cached(snapshot, current, caller, requested, model)
        lines, rows = self._lines, self._rows

        def record(outcome: "Outcome") -> None:
            prompt, completion, source = tokens(outcome, call)
            now = time.monotonic()
            watch = outcome.watch
            ttft = watch.first_event_at - started if watch is not None and watch.first_event_at else None
            code = status(outcome)
            duration_ms = (now - started) * 1000
            varying = orjson.dumps({
                "request_id": request_id, "client_request_id": client_request_id, "backend": outcome.backend_id,
                "fallback": outcome.fell_back, "endpoint": endpoint,
                "stream": call.stream, "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion, "usage_source": source, "status": code,
                "duration_ms": round(duration_ms, 1), "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
            }).decode()
            lines.record_line(f'{{"time":"{utc_now_iso()}",{fields},{varying[1:]}')
            if rows is not None:
                rows.record(LedgerRow(request_id, time.time(), *ledger_fields, endpoint, prompt, completion, source,
                                      code, duration_ms))
            if prompt:
                tokens_in.inc(prompt)
            if completion:
                tokens_out.inc(completion)

        return record

    def _cached(self, snapshot: Any, current: bool, caller: "Caller", requested: "Model", model: "Model") -> _Static:
        if snapshot is not self._snapshot:
            if not current:
                return self._build(snapshot, caller, requested, model)
            self._snapshot, self._static = snapshot, {}
        key = (caller.tenant.name, caller.key_id, requested.id, model.id)
        found = self._static.get(key)
        if found is None:
            found = self._static[key] = self._build(snapshot, caller, requested, model)
        return found

    def _build(self, snapshot: Any, caller: "Caller", requested: "Model", model: "Model") -> _Static:
        tenant = caller.tenant
        license_ = snapshot.registry.licenses.get(model.license)
        commercial_use = license_.commercial_use.value if license_ is not None else "unknown"
        attestations = tuple(sorted(tenant.attestations))
        fields = orjson.dumps({
            "type": "usage", "tenant": tenant.name, "key_id": caller.key_id,
            "environment": tenant.environment.value, "model_requested": requested.id, "model_served": model.id,
            "license": model.license, "commercial_use": commercial_use, "attestations": list(attestations),
        }).decode()[1:-1]
        ledger_fields = (tenant.name, caller.key_id, requested.id, model.id, model.license, commercial_use,
                         tenant.environment.value, attestations)
        metrics = self._metrics
        return (fields, ledger_fields, *metrics.license_token_counters(model.license, metrics.tenant(tenant.name)))
