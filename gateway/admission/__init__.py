"""Admission: whether a tenant's request may start now. Rate limits (requests and tokens per minute,
concurrency) and token quotas (per UTC day and month), in this process or shared by every replica in
Redis (the Lua scripts beside them), and the holds that count a tenant's open uploads.

Bottom of the stack: it imports nothing of the gateway but `gateway.errors`. What it needs from above
(a tenant's use so far, from the ledger, to reseed a quota that Redis lost) it is handed as a callable.
"""
