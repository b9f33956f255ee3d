"""What the gateway knows about one HTTP request across layers: its ids and where its time went."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestContext:
    request_id: str  # always the gateway's own: audit and usage records are keyed by it
    client_request_id: str | None = None  # the client's id for the request (x-client-request-id), if any
    started: float = field(default_factory=time.perf_counter)
    upstream_s: float = 0.0  # time spent waiting on engines (headers; the whole body when not streamed)

    def overhead_ms(self) -> float:
        """Time spent in the gateway itself so far: everything but the wait on engines."""
        return (time.perf_counter() - self.started - self.upstream_s) * 1000
