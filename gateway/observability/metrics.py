"""Prometheus metrics (`GET /metrics`), all prefixed `gateway_`.

Label values are bounded: models come from the registry (a name a client made up counts as
`unknown`), backends from the registry (an engine pod of a `discovery: dns` backend is
`<backend>@<address>`; a pod's series go when it does), tenants from the tenants file (the label can be
turned off: GATEWAY_METRICS_TENANT_LABEL=false makes every tenant label "-", through `Metrics.tenant`),
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


class WriterCounts(Protocol):
    """One batching writer of the database store (gateway.store.batches.BatchWriter)."""

    written_rows: int
    spooled_rows: int
    dropped_rows: int
    rejected_rows: int
    waiting_rows: int
    spool_bytes: int
    healthy: bool


class StoreCounts(Protocol):
    """What the database store exposes (gateway.store.store.Store)."""

    writers: dict[str, WriterCounts]
    healthy: bool
    durable: bool
    outages: int


class _StoreCollector:
    """The database store's writers, read at scrape time (the request path pays nothing for them)."""

    def __init__(self) -> None:
        self.store: StoreCounts | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.store)

    @staticmethod
    def _families(store: StoreCounts | None) -> Iterator[Metric]:
        writers = store.writers if store is not None else {}
        for name, kind, help_, attr in (
                ("gateway_store_rows_written", CounterMetricFamily, "Rows written to the database", "written_rows"),
                ("gateway_store_rows_spooled", CounterMetricFamily,
                 "Rows that waited in the local spool because the database was not writable", "spooled_rows"),
                ("gateway_store_rows_dropped", CounterMetricFamily,
                 "Rows lost: neither the database nor the spool could take them", "dropped_rows"),
                ("gateway_store_rows_rejected", CounterMetricFamily,
                 "Rows the database refused for their content (set aside in spool/rejected)", "rejected_rows"),
                ("gateway_store_rows_waiting", GaugeMetricFamily,
                 "Rows recorded, not yet in the database (memory and spool)", "waiting_rows"),
                ("gateway_store_spool_bytes", GaugeMetricFamily, "Bytes in the local spool", "spool_bytes")):
            family = kind(name, help_, labels=["writer"])
            for writer, counts in writers.items():
                family.add_metric([writer], getattr(counts, attr))
            yield family
        yield CounterMetricFamily("gateway_store_outages", "Database outages (each logged once)",
                                  value=store.outages if store is not None else 0)
        yield GaugeMetricFamily("gateway_store_healthy",
                                "1 while the database takes the ledger and decisions, 0 during an outage",
                                value=1 if store is None or store.healthy else 0)
        yield GaugeMetricFamily("gateway_store_durable",
                                "0 while records can be neither written to the database nor spooled",
                                value=1 if store is None or store.durable else 0)


class Metrics:
    def __init__(self, tenant_label: bool = True) -> None:
        """`tenant_label`: GATEWAY_METRICS_TENANT_LABEL; off, every tenant label reads "-" (`tenant()`)."""
        self.tenant_label = tenant_label
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
        self.inflight = Gauge("gateway_backend_inflight_requests", "Requests in flight per backend (engine pod)",
                              ["backend"], registry=r)
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
        self._store = _StoreCollector()
        r.register(self._store)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: prometheus-client's labels() takes a lock and ~1.5 µs on this
        machine, and a request needs about seven children. Label values are bounded (registry ids, tenants,
        statuses), so is this cache; children are never removed."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def forget_backend(self, upstream_id: str) -> None:
        """Drop the per-backend series of an upstream that is gone (an engine pod replaced by a rollout):
        pod addresses change with every rollout, and their series must not pile up nor stay at their
        last value (a gone pod's `backend_up` 0 would page someone for ever)."""
        for metric in (self.inflight, self.backend_up, self.ejections):
            self._children.pop((metric, (upstream_id,)), None)
            try:
                metric.remove(upstream_id)
            except KeyError:
                pass

    def tenant(self, name: str) -> str:
        """The value of a `tenant` label: the name, or "-" when tenant labels are off."""
        return name if self.tenant_label else "-"

    def rejected(self, tenant: str, limit: str) -> None:
        """Count one request refused by a rate limit or quota (gateway_rate_limit_rejections_total)."""
        self.child(self.rate_limited, self.tenant(tenant), limit).inc()

    def license_token_counters(self, license_: str, tenant: str) -> tuple:
        """The (input, output) children of gateway_license_tokens_total."""
        return (self.child(self.license_tokens, license_, "input", tenant),
                self.child(self.license_tokens, license_, "output", tenant))

    def watch_audit(self, audit: AuditCounts) -> None:
        """Export this audit trail's counts (gateway_audit_*)."""
        self._audit.audit = audit

    def watch_store(self, store: StoreCounts) -> None:
        """Export the database store's counts (gateway_store_*)."""
        self._store.store = store

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
