"""The tables (SQLAlchemy Core), one schema for PostgreSQL and SQLite. Alembic's migrations create them
(gateway/store/migrations/versions/); a test checks that the two agree.

Sizes: a ledger row and a decision row hold numbers and the 16-byte request id (their primary key: one
of each per request); everything that repeats
(tenant, key id, models, license, environment, attestations, endpoint, usage source; a decision's verdict
and rule) lives once in a dimension table (`usage_dims`, `decision_dims`), bounded by the configuration.
Times are integers (unix milliseconds in row tables, unix seconds for buckets and keys): 8 bytes on
PostgreSQL, and no text dates on SQLite.

No foreign keys on the row tables: each one would lock the referenced dimension row per inserted row
(PostgreSQL's FOR KEY SHARE), and dimension rows are never deleted, so there is nothing to guard.
The ledger is idempotent on the request id, which the gateway always makes itself (the client's own id is
`client_request_id` in the audit trail, never a key here), so no tenant can have its requests
deduplicated away by reusing another request's id.
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Index, Integer, MetaData, SmallInteger, Table, Text,
                        UniqueConstraint, Uuid, text)

metadata = MetaData()

USAGE_DIM_COLUMNS = ("tenant", "key_id", "model_requested", "model_served", "license", "commercial_use",
                     "environment", "attestations", "endpoint", "usage_source")
DECISION_DIM_COLUMNS = ("tenant", "key_id", "model_requested", "model_served", "license", "decision", "rule")

usage_dims = Table(
    "usage_dims", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    *(Column(name, Text, nullable=False) for name in USAGE_DIM_COLUMNS),
    UniqueConstraint(*USAGE_DIM_COLUMNS, name="uq_usage_dims"),
)

# Column order is PostgreSQL's storage order: 8-byte, then 4-, 2-byte values, then the variable ones,
# so no alignment padding is stored.
usage_ledger = Table(
    "usage_ledger", metadata,
    Column("time_ms", BigInteger, nullable=False),
    Column("dim_id", Integer, nullable=False),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    Column("latency_ms", Integer, nullable=False),
    Column("status", SmallInteger, nullable=False),
    Column("request_id", Uuid(as_uuid=False), primary_key=True),  # gateway/store/ledger.py request_key()
    # A BRIN index on PostgreSQL: rows arrive in time order, so a few hundred bytes index millions of
    # rows for the time-range scans (retention, the report's partial hours). SQLite: a B-tree.
    Index("ix_usage_ledger_time", "time_ms", postgresql_using="brin"),
)


def _rollup(name: str) -> Table:
    return Table(
        name, metadata,
        Column("bucket_start", BigInteger, primary_key=True),  # unix seconds, a multiple of the width
        Column("dim_id", Integer, primary_key=True),
        Column("requests", BigInteger, nullable=False),
        Column("errors", BigInteger, nullable=False),  # status >= 400
        Column("input_tokens", BigInteger, nullable=False),
        Column("output_tokens", BigInteger, nullable=False),
        # Requests whose tokens the gateway counted (the engine reported none) and that had any.
        Column("gateway_counted", BigInteger, nullable=False),
    )


usage_1m = _rollup("usage_1m")
usage_1h = _rollup("usage_1h")
usage_1d = _rollup("usage_1d")
ROLLUPS = {"1m": usage_1m, "1h": usage_1h, "1d": usage_1d}

api_keys = Table(
    "api_keys", metadata,
    Column("key_hash", Text, primary_key=True),  # "sha256:<64 hex>", as the tenants file has them
    Column("id", Text, nullable=False, unique=True),  # first 8 hex of the hash
    Column("tenant", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),  # unix seconds, as are the other times here
    Column("expires_at", BigInteger),
    Column("revoked_at", BigInteger),
    Column("last_used_at", BigInteger),
    Column("created_by", Text),  # the admin key id that made it
    Column("revoked_by", Text),
    Column("rotated_from", Text),  # the id of the key this one replaced
    Column("replaced_by", Text),
    # The change counter's value when this row last changed: replicas reload only rows newer than
    # what they have (see keys.py). last_used_at updates don't bump it.
    Column("version", BigInteger, nullable=False),
    Index("ix_api_keys_version", "version"),
    Index("ix_api_keys_tenant", "tenant", "created_at", "id"),
)

# One row per kind of state replicas cache ("api_keys"): bumped in every transaction that changes it.
store_versions = Table(
    "store_versions", metadata,
    Column("name", Text, primary_key=True),
    Column("version", BigInteger, nullable=False),
)

admin_events = Table(
    "admin_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at_ms", BigInteger, nullable=False),
    Column("admin_key_id", Text),  # None: the CLI (whoever can reach the database)
    Column("action", Text, nullable=False),  # key.created, key.revoked, key.rotated
    Column("tenant", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("detail", Text, nullable=False),  # JSON
    Index("ix_admin_events_at", "at_ms"),
)

decision_dims = Table(
    "decision_dims", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    *(Column(name, Text, nullable=False) for name in DECISION_DIM_COLUMNS),  # model_served "" = none
    UniqueConstraint(*DECISION_DIM_COLUMNS, name="uq_decision_dims"),
)

policy_decisions = Table(
    "policy_decisions", metadata,
    Column("time_ms", BigInteger, nullable=False),
    Column("dim_id", Integer, nullable=False),
    Column("request_id", Uuid(as_uuid=False), primary_key=True),  # one decision per request, as the ledger's
    Index("ix_policy_decisions_time", "time_ms", postgresql_using="brin"),
    Index("ix_policy_decisions_dim_time", "dim_id", "time_ms"),
)

# Console sign-ins (gateway/store/sessions.py): the token's hash only, never the token.
console_sessions = Table(
    "console_sessions", metadata,
    Column("token_hash", Text, primary_key=True),  # "sha256:<hex>" of the session token
    Column("tenant", Text, nullable=False),
    Column("key_id", Text, nullable=False),  # the key the session was signed in with
    Column("is_admin", SmallInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),  # unix seconds
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_console_sessions_expires", "expires_at"),
)

responses = Table(
    "responses", metadata,
    Column("id", Text, primary_key=True),
    Column("tenant", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("previous_response_id", Text),
    Column("response", Text),  # JSON; NULL once expired or deleted (the row stays: a tombstone)
    Column("deleted_at", BigInteger),
    Index("ix_responses_expires", "expires_at", postgresql_where=text("response IS NOT NULL"),
          sqlite_where=text("response IS NOT NULL")),
)

response_input_items = Table(
    "response_input_items", metadata,
    Column("response_id", Text, primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("item", Text, nullable=False),  # JSON
)
