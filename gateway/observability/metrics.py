"""Prometheus metrics (`GET /metrics`), all prefixed `gateway_`.

Label values are bounded: models come from the registry (a name a client made up counts as
`unknown`), backends from the registry, tenants from the tenants file (label can be turned off),
statuses are HTTP codes. No request ids or free text ever become labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class AuditCounts(Protocol):
    """What the audit trail exposes (`gateway.observability.audit.AuditTrail`)."""

    healthy: bool
    write_errors: int
    dropped: int
    pending: int


class _AuditCollector:
    """The audit trail's counts, read at scrape time: the record path pays nothing for them."""

    def __init__(self) -> None:
        self.audit: AuditCounts | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.audit)

    @staticmethod
    def _families(audit: AuditCounts | None) -> Iterator[Metric]:
        yield CounterMetricFamily("gateway_audit_write_errors",
                                  "Failed audit write or reopen attempts (each retry counts)",
                                  value=audit.write_errors if audit is not None else 0)
        yield CounterMetricFamily("gateway_audit_records_dropped",
                                  "Audit records never written: refused for a full backlog, or given up at exit",
                                  value=audit.dropped if audit is not None else 0)
        yield GaugeMetricFamily("gateway_audit_pending_records", "Audit records accepted, not yet written",
                                value=audit.pending if audit is not None else 0)
        yield GaugeMetricFamily("gateway_audit_healthy",
                                "1 while audit records are written, 0 while writes fail or records are refused",
                                value=1 if audit is None or audit.healthy else 0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests", "Requests answered",
                                ["model", "backend", "status", "tenant", "endpoint"], registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "Time from request to last byte",
                                  ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time from request to first streamed event",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("gateway_inter_token_latency_seconds",
                                     "Gap between the engine's stream writes (events arriving together count once)",
                                     ["model"], buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens (engine usage)", ["model"], registry=r)
        self.completion_tokens = Counter("gateway_completion_tokens", "Completion tokens (engine usage)",
                                         ["model"], registry=r)
        self.license_tokens = Counter("gateway_license_tokens", "Tokens by license and direction (input/output)",
                                      ["license", "direction", "tenant"], registry=r)
        self.inflight = Gauge("gateway_backend_inflight_requests", "Requests in flight per backend", ["backend"],
                              registry=r)
        self.backend_up = Gauge("gateway_backend_up", "1 if the backend's last health probe passed", ["backend"],
                                registry=r)
        self.retries = Counter("gateway_retries", "Requests retried on another backend", ["model"], registry=r)
        self.fallbacks = Counter("gateway_fallbacks", "Requests served by a CPU fallback", ["model"], registry=r)
        self.ejections = Counter("gateway_backend_ejections", "Backends ejected by outlier detection",
                                 ["backend"], registry=r)
        self.policy = Counter("gateway_policy_decisions", "License policy decisions", ["decision", "license"],
                              registry=r)
        self.rate_limited = Counter("gateway_rate_limit_rejections", "Requests refused by a rate limit",
                                    ["tenant", "limit"], registry=r)
        self.ratelimit_backend_up = Gauge("gateway_ratelimit_redis_up",
                                          "1 if Redis-shared rate limiting works, 0 when on local fallback",
                                          registry=r)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._audit = _AuditCollector()
        r.register(self._audit)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus-client's labels() takes a lock and ~1.5 µs on this
        machine, and a request needs about seven children. Label values are bounded (registry ids, tenants,
        statuses), so is this cache; children are never removed."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def license_token_counters(self, license_: str, tenant: str) -> tuple:
        """The (input, output) children of gateway_license_tokens_total."""
        return (self.child(self.license_tokens, license_, "input", tenant),
                self.child(self.license_tokens, license_, "output", tenant))

    def watch_audit(self, audit: AuditCounts) -> None:
        """Export this audit trail's counts (gateway_audit_*)."""
        self._audit.audit = audit

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
