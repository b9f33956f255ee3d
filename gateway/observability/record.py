"""One request's metrics, recorded once whether it ends as an error, a JSON answer or a stream."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.responses import Response, StreamingResponse

from gateway.observability.metrics import Metrics


@dataclass
class RequestRecord:
    metrics: Metrics
    tenant_label: bool
    started: float
    tenant: str = "unauthenticated"
    model: str = "unknown"  # only registry ids ever replace this: label values stay bounded
    backend: str = "none"
    endpoint: str = "chat"
    _counted: bool = False
    _deferred: bool = False

    def finished(self, status: int) -> None:
        if self._counted:
            return
        self._counted = True
        tenant = self.tenant if self.tenant_label else "-"
        m = self.metrics
        m.child(m.requests, self.model, self.backend, str(status), tenant, self.endpoint).inc()
        m.child(m.duration, self.model).observe(time.monotonic() - self.started)

    def responded(self, response: Response) -> None:
        if isinstance(response, StreamingResponse) or getattr(response, "reports_when_sent", False):
            self._deferred = True  # counted when the outcome is reported (see `outcome`), with its backend
        else:
            self.finished(response.status_code)

    def outcome(self, outcome) -> None:  # gateway.backends.dispatch.Outcome
        self.backend = outcome.backend_id or "none"
        m, model = self.metrics, self.model
        if outcome.retries:
            m.child(m.retries, model).inc(outcome.retries)
        if outcome.fell_back:
            m.child(m.fallbacks, model).inc()
        usage = outcome.usage or {}
        if usage.get("prompt_tokens"):
            m.child(m.prompt_tokens, model).inc(usage["prompt_tokens"])
        if usage.get("completion_tokens"):
            m.child(m.completion_tokens, model).inc(usage["completion_tokens"])
        watch = outcome.watch
        if watch is not None:
            if watch.first_event_at is not None:
                m.child(m.ttft, model).observe(watch.first_event_at - self.started)
            gaps = m.child(m.inter_token, model)
            for gap in watch.gaps:
                gaps.observe(gap)
            if watch.events and not usage:
                m.child(m.completion_tokens, model).inc(watch.events)
            self.finished(watch.status)
        elif self._deferred:
            self.finished(outcome.status or 200)
