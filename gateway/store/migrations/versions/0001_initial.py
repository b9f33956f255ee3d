"""The first schema: usage ledger and rollups, API keys and admin events, policy decisions, stored
responses, console sessions. Revision ids are numbers, so a newer database can be told apart from an unknown one.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_USAGE_DIMS = ("tenant", "key_id", "model_requested", "model_served", "license", "commercial_use",
               "environment", "attestations", "endpoint", "usage_source")
_DECISION_DIMS = ("tenant", "key_id", "model_requested", "model_served", "license", "decision", "rule")


def _text(*names: str) -> list[sa.Column]:
    return [sa.Column(name, sa.Text, nullable=False) for name in names]


def _rollup(name: str) -> None:
    op.create_table(
        name,
        sa.Column("bucket_start", sa.BigInteger, primary_key=True),
        sa.Column("dim_id", sa.Integer, primary_key=True),
        *(sa.Column(c, sa.BigInteger, nullable=False)
          for c in ("requests", "errors", "input_tokens", "output_tokens", "gateway_counted")),
    )


def upgrade() -> None:
    op.create_table("usage_dims", sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    *_text(*_USAGE_DIMS), sa.UniqueConstraint(*_USAGE_DIMS, name="uq_usage_dims"))
    op.create_table(
        "usage_ledger",
        sa.Column("time_ms", sa.BigInteger, nullable=False),
        sa.Column("dim_id", sa.Integer, nullable=False),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Integer, nullable=False),
        sa.Column("status", sa.SmallInteger, nullable=False),
        sa.Column("request_id", sa.Uuid(as_uuid=False), primary_key=True),
    )
    op.create_index("ix_usage_ledger_time", "usage_ledger", ["time_ms"], postgresql_using="brin")
    for name in ("usage_1m", "usage_1h", "usage_1d"):
        _rollup(name)

    op.create_table(
        "api_keys",
        sa.Column("key_hash", sa.Text, primary_key=True),
        sa.Column("id", sa.Text, nullable=False, unique=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        *(sa.Column(c, sa.BigInteger) for c in ("expires_at", "revoked_at", "last_used_at")),
        *(sa.Column(c, sa.Text) for c in ("created_by", "revoked_by", "rotated_from", "replaced_by")),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_api_keys_version", "api_keys", ["version"])
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant", "created_at", "id"])
    versions = op.create_table("store_versions", sa.Column("name", sa.Text, primary_key=True),
                               sa.Column("version", sa.BigInteger, nullable=False))
    op.bulk_insert(versions, [{"name": "api_keys", "version": 0}])
    op.create_table(
        "admin_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at_ms", sa.BigInteger, nullable=False),
        sa.Column("admin_key_id", sa.Text),
        *_text("action", "tenant", "key_id", "detail"),
    )
    op.create_index("ix_admin_events_at", "admin_events", ["at_ms"])

    op.create_table("decision_dims", sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    *_text(*_DECISION_DIMS), sa.UniqueConstraint(*_DECISION_DIMS, name="uq_decision_dims"))
    op.create_table(
        "policy_decisions",
        sa.Column("time_ms", sa.BigInteger, nullable=False),
        sa.Column("dim_id", sa.Integer, nullable=False),
        sa.Column("request_id", sa.Uuid(as_uuid=False), primary_key=True),
    )
    op.create_index("ix_policy_decisions_time", "policy_decisions", ["time_ms"], postgresql_using="brin")
    op.create_index("ix_policy_decisions_dim_time", "policy_decisions", ["dim_id", "time_ms"])

    op.create_table(
        "responses",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("previous_response_id", sa.Text),
        sa.Column("response", sa.Text),
        sa.Column("deleted_at", sa.BigInteger),
    )
    op.create_index("ix_responses_expires", "responses", ["expires_at"],
                    postgresql_where=sa.text("response IS NOT NULL"), sqlite_where=sa.text("response IS NOT NULL"))
    op.create_table(
        "response_input_items",
        sa.Column("response_id", sa.Text, primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("item", sa.Text, nullable=False),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.Text, primary_key=True),
        *_text("tenant", "key_id"),
        sa.Column("is_admin", sa.SmallInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_console_sessions_expires", "console_sessions", ["expires_at"])
    # For people reading the ledger with psql/sqlite3: the rows with their dimensions.
    op.execute("CREATE VIEW usage_records AS SELECT l.request_id, l.time_ms, "
               + ", ".join(f"d.{c}" for c in _USAGE_DIMS)
               + ", l.input_tokens, l.output_tokens, l.status, l.latency_ms "
               "FROM usage_ledger l JOIN usage_dims d ON d.id = l.dim_id")


def downgrade() -> None:
    op.execute("DROP VIEW usage_records")
    for name in ("console_sessions", "response_input_items", "responses", "policy_decisions", "decision_dims", "admin_events",
                 "store_versions", "api_keys", "usage_1d", "usage_1h", "usage_1m", "usage_ledger", "usage_dims"):
        op.drop_table(name)
