"""Process settings, from `GATEWAY_*` environment variables (pydantic-settings). Bottom of the stack."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    """Where the embedded database and the ledger's spool live when GATEWAY_DATA_DIR is unset: the XDG
    data directory, so the same gateway finds its ledger whichever directory it was started from and
    never writes a database into a source checkout. Kubernetes sets GATEWAY_DATA_DIR to a volume."""
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]) / "llm-gateway"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # an arbitrary container uid with no HOME and no passwd entry
        return Path("data")
    return home / ".local" / "share" / "llm-gateway" if home.is_absolute() else Path("data")


POOL_HEADROOM = 64  # upstream connections beyond max_inflight: health probes and tokenizer calls


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_file=None, extra="ignore")

    # Comma-separated registry files, applied in order: the ten-model registry first, then overlays.
    registry: str = "model_registry.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"

    # Timeouts by backend role; a registry model may override them (`timeouts:`).
    # GPU engines answer fast; a CPU fallback may take long before its first token and between tokens.
    primary_connect_timeout_s: float = Field(default=2.0, gt=0)
    primary_first_byte_timeout_s: float = Field(default=60.0, gt=0)
    primary_idle_timeout_s: float = Field(default=30.0, gt=0)
    primary_total_timeout_s: float = Field(default=600.0, gt=0)
    # Non-streamed: engines send headers only when the answer is complete, so the wait is the generation.
    primary_generation_timeout_s: float = Field(default=600.0, gt=0)
    fallback_connect_timeout_s: float = Field(default=2.0, gt=0)
    fallback_first_byte_timeout_s: float = Field(default=180.0, gt=0)
    fallback_idle_timeout_s: float = Field(default=60.0, gt=0)
    fallback_total_timeout_s: float = Field(default=1800.0, gt=0)
    fallback_generation_timeout_s: float = Field(default=1800.0, gt=0)

    # Retries happen only before the first byte reached the client, on another backend.
    max_attempts: int = Field(default=3, ge=1)
    # Retries may add at most this fraction of extra load (a token bucket), so a sick fleet isn't hammered.
    retry_budget_ratio: float = Field(default=0.2, ge=0)
    # Requests in flight through this gateway at most; beyond it: 429 engine_overloaded.
    max_inflight: int = Field(default=4096, gt=0)

    health_probe_interval_s: float = Field(default=5.0, gt=0)
    # A backend whose probes have found nothing listening for this long is reported as down for good:
    # its 503 says so, without Retry-After and with `x-should-retry: false` (a host name that does not
    # resolve is reported so at once).
    unreachable_lasting_after_s: float = Field(default=60.0, ge=0)
    outlier_consecutive_errors: int = Field(default=3, ge=1)
    outlier_base_cooldown_s: float = Field(default=5.0, gt=0)
    prefix_affinity: bool = False
    session_affinity: bool = False
    affinity_prefix_chars: int = Field(default=256, gt=0)
    affinity_load_factor: float = Field(default=2.0, ge=1)
    # On SIGTERM: stop taking requests, let in-flight ones finish for at most this long, then exit.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # Tenant names as a metrics label (bounded by the tenants file; turn off for very many tenants).
    metrics_tenant_label: bool = True
    # /metrics needs an admin key (Prometheus: a bearer token) unless this is set (e.g. a scrape port
    # that only the monitoring namespace can reach).
    metrics_public: bool = False
    # The web console at /console (gateway/console/): off the request path; false removes its routes.
    console: bool = True
    # A console session lasts this long after sign-in (the cookie's expiry and the server's alike).
    console_session_ttl_s: int = Field(default=8 * 3600, gt=0)
    # Upstream connections at most; unset: max_inflight plus room for probes and tokenizer calls, so a
    # request never waits for a pooled connection (the in-flight cap answers 429 first).
    pool_max_connections: int | None = Field(default=None, gt=0)
    retry_after_s: int = Field(default=5, ge=1)
    # Request bodies: at most this many bytes (413 beyond), read within this many seconds (408 beyond).
    # 4 MiB is ~1M tokens of text, far beyond any context here; a parse of it stays in the tens of MB.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    body_read_timeout_s: float = Field(default=30.0, gt=0)
    # ... and a body that declares its length must arrive within grace + length / rate (at most the
    # timeout above): 300 bytes get ~5 s, not 30.
    body_read_grace_s: float = Field(default=5.0, gt=0)
    body_read_min_bytes_per_s: int = Field(default=64 * 1024, gt=0)
    # JSON objects and arrays in one body at most: `[{},{},...]` costs ~30x its size to parse.
    max_json_containers: int = Field(default=20_000, gt=0)
    # Items (commas) in one body at most: longer than any token-id prompt a context here takes.
    max_json_items: int = Field(default=100_000, gt=0)
    # A connection must complete its request headers within this many seconds (uvicorn itself times out
    # only idle keep-alive connections, so half-sent requests would hold connection slots for ever).
    header_timeout_s: float = Field(default=10.0, gt=0)
    # Open client connections at most (uvicorn answers 503 beyond); idle keep-alive closed after this.
    max_connections: int = Field(default=10_000, gt=0)
    keepalive_timeout_s: float = Field(default=30.0, gt=0)

    # Tenants file; unset = open access (any bearer token is one anonymous development tenant), which
    # `gateway serve` allows on a loopback address only, unless this is set.
    tenants: Path | None = None
    allow_open_access: bool = False
    # Where audit records go: "stdout", or a file path (JSON lines, appended).
    audit_sink: str = "stdout"
    # Audit records accepted but not yet written, at most; beyond it a record is refused, counted in
    # gateway_audit_records_dropped_total, and the trail is unhealthy (never blocks the event loop).
    audit_max_pending: int = Field(default=100_000, ge=1)
    # When the audit trail is unhealthy (writes failing, or records refused for a full backlog), or the
    # database's records (ledger, decisions) can be neither written nor spooled: keep serving (default;
    # failures are counted and logged) or refuse production/staging requests with 503 until it recovers,
    # so that no request is served without its records.
    audit_fail_closed: bool = False
    # At shutdown (after the drain), how long to keep retrying failed audit writes before giving up.
    audit_flush_timeout_s: float = Field(default=5.0, ge=0)
    # Shared rate-limit state across replicas; unset = limits per process.
    redis_url: str | None = None
    # When Redis is unreachable: keep serving on local limits (default) or refuse with 503.
    ratelimit_fail_closed: bool = False
    # While Redis is unreachable, token quotas continue on each replica from the last totals it saw in
    # Redis (and what was spent is written back when it returns). A quota tenant this replica has seen no
    # total for is refused with 503 ("refuse"), or admitted from zero ("admit": an outage may then grant
    # it up to one more quota per replica).
    quota_outage_unknown_tenants: Literal["refuse", "admit"] = "refuse"
    # GET /v1/organization/usage/completions, per tenant and replica: requests per minute, calls at once
    # (429 rate_limit_exceeded beyond), and results (rollups summed by group_by, one per bucket x group)
    # one call may answer (a page stops early beyond, with has_more and next_page). It reads the
    # database, not engines: its own limits, not the tenant's.
    usage_api_rpm: int = Field(default=60, gt=0)
    usage_api_max_concurrent: int = Field(default=2, gt=0)
    usage_api_max_rows: int = Field(default=2_000, gt=0)
    # A usage record per finished request (audit trail and usage ledger) and tokens-by-license metrics.
    # Off only to measure what they cost (load_tests/bench_usage.py); quotas apply either way.
    usage_records: bool = True
    # The database (usage ledger, API keys, policy decisions, stored responses): libpq's
    # `postgresql://user:password@host:port/db` (shared by replicas) or `sqlite:///path`; unset: an
    # SQLite file in data_dir (one replica, no server).
    database_url: str | None = None
    # This replica's own files: the embedded database (when database_url is unset) and the ledger's spool.
    data_dir: Path = Field(default_factory=_default_data_dir)
    # Ledger and decision rows wait in memory at most this long before they are made durable (spool, then
    # database): what a `kill -9` can lose.
    store_flush_interval_s: float = Field(default=1.0, gt=0)
    # Ledger rows and policy decisions are kept this many days (the hourly and daily rollups 400 days).
    ledger_retention_days: int = Field(default=90, ge=1)

    # Kubernetes. The deployed view (`gateway deploy render` writes it per overlay): only these backends,
    # and the models that have one, exist for this gateway; unset: every registry backend.
    deployed: Path | None = None
    # Backends with `discovery: dns`: how often their host is resolved again (each address one upstream),
    # and which name servers to ask ("ip" or "ip:port", comma-separated; unset: the system's resolv.conf).
    dns_refresh_s: float = Field(default=5.0, gt=0)
    dns_nameservers: str = ""
    # Sent as `Authorization: Bearer` to every engine (vLLM --api-key, llama.cpp --api_key, the seq2seq
    # worker's --api-key): engines refuse callers that bypass the gateway's license checks.
    engine_api_key: str | None = None
    # Reload when the registry, tenants or deployed file changes (checked every this many seconds; a
    # Kubernetes Secret or ConfigMap mount is updated in place); 0: only on SIGHUP or POST /admin/reload.
    config_watch_s: float = Field(default=0.0, ge=0)

    # Stored responses (/v1/responses with `store`, OpenAI's default): kept this long (30 days, as OpenAI),
    # then their content is purged every `responses_purge_interval_s`. A `previous_response_id` chain is
    # followed for at most `responses_max_chain` responses. The in-memory store (the default until a
    # database store is configured) holds at most `responses_memory_capacity`, dropping the oldest.
    responses_retention_s: int = Field(default=30 * 24 * 3600, gt=0)
    responses_purge_interval_s: float = Field(default=300.0, gt=0)
    responses_max_chain: int = Field(default=100, ge=1)
    responses_memory_capacity: int = Field(default=10_000, ge=1)

    @property
    def pool_size(self) -> int:
        return self.pool_max_connections or self.max_inflight + POOL_HEADROOM

    @property
    def inflight_cap(self) -> int:
        """Requests in flight at most: max_inflight, or fewer when the pool was set smaller."""
        return min(self.max_inflight, max(1, self.pool_size - POOL_HEADROOM))

    @property
    def nameservers(self) -> list[str]:
        return [part.strip() for part in self.dns_nameservers.split(",") if part.strip()]

    @property
    def registry_paths(self) -> list[Path]:
        return [Path(part.strip()) for part in self.registry.split(",") if part.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
