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
    _counted: bool = False
    _streaming: bool = False

    def finished(self, status: int) -> None:
        if self._counted:
            return
        self._counted = True
        tenant = self.tenant if self.tenant_label else "-"
        self.metrics.requests.labels(self.model, self.backend, str(status), tenant).inc()
        self.metrics.duration.labels(self.model).observe(time.monotonic() - self.started)

    def responded(self, response: Response) -> None:
        if isinstance(response, StreamingResponse):
            self._streaming = True  # counted when the stream ends (see `outcome`)
        else:
            self.finished(response.status_code)

    async def outcome(self, outcome) -> None:  # gateway.backends.dispatch.Outcome
        self.backend = outcome.backend_id or "none"
        m, model = self.metrics, self.model
        if outcome.retries:
            m.retries.labels(model).inc(outcome.retries)
        if outcome.fell_back:
            m.fallbacks.labels(model).inc()
        usage = outcome.usage or {}
        if usage.get("prompt_tokens"):
            m.prompt_tokens.labels(model).inc(usage["prompt_tokens"])
        if usage.get("completion_tokens"):
            m.completion_tokens.labels(model).inc(usage["completion_tokens"])
        watch = outcome.watch
        if watch is not None:
            if watch.first_event_at is not None:
                m.ttft.labels(model).observe(watch.first_event_at - self.started)
            gaps = m.inter_token.labels(model)
            for gap in watch.gaps:
                gaps.observe(gap)
            if watch.events and not usage:
                m.completion_tokens.labels(model).inc(watch.events)
            self.finished(200)
