"""Alembic's environment for the gateway's store. Always run through gateway.store.migrate.upgrade(), which
hands over a connection that already holds the migration lock."""

from __future__ import annotations

from alembic import context

from gateway.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the gateway's migrations with `gateway db upgrade`, not the alembic command")

# render_as_batch: SQLite alters a table by copying it; Alembic's batch mode does that for later migrations.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
