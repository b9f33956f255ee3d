"""The console at scale: how long each page takes to render with 50 tenants, 10,000 API keys and a million
usage ledger rows (issue 23's target: under 300 ms a page, median and p95 are printed).

    python load_tests/bench_console.py                               # SQLite in a temp dir
    python load_tests/bench_console.py --database-url postgresql://user@host:5432/db
    python load_tests/bench_console.py --tenants 50 --keys 10000 --rows 1000000 --repeats 20

With the database store (gateway/store, issue 20) the keys are rows of `api_keys` and the ledger's million
rows (over 30 days, 50 tenants x 4 keys x 10 models) are made in SQL, with their hour and day rollups, as
load_tests/bench_ledger.py makes them; the gateway is then started on that database. Without it (a
gateway before issue 20), the 10,000 keys go into the tenants file as hashes, there is no ledger, and the
pages that need one (keys, decisions) are skipped: the line for each says so.

The gateway runs with no engines (the pages read configuration, counters and the database, never a
model); the console is signed in once, as an admin, and each page is fetched `--repeats` times in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.registry import load_registry  # noqa: E402
from gateway.tenancy.tenants import hash_key, key_id  # noqa: E402

ADMIN_KEY = "sk-bench-console-admin"
TARGET_MS = 300.0
DAY = 86400
KEYS_PER_DIM_TENANT, MODELS = 4, 10  # ledger dimensions: 50 tenants x 4 keys x 10 models = 2,000
ENVIRONMENTS = ("production", "staging", "development", "research")
HAS_STORE = importlib.util.find_spec("gateway.store") is not None


def tenants_document(tenants: int, keys: int, registry, in_file: bool) -> tuple[dict, list[tuple[str, str]]]:
    """`tenants` tenants (one of them the admin), and `keys` keys spread over them: (tenant, key hash)."""
    conditions = sorted(c.id for lic in registry.licenses.values() for c in lic.conditions)
    families = sorted({m.family for m in registry.models.values()})
    spread = [(f"tenant-{n % tenants:02d}", hash_key(f"sk-bench-key-{n}")) for n in range(keys)]
    document = []
    for n in range(tenants):
        name = f"tenant-{n:02d}"
        spec: dict = {"name": name, "environment": ENVIRONMENTS[n % 4],
                      "attestations": conditions[: n % (len(conditions) + 1)], "substitutions": n % 3 == 0,
                      "limits": {"rpm": 600, "tpm": 200_000, "max_concurrent": 16},
                      "api_key_hashes": [hash_key(ADMIN_KEY)] if n == 0 else [hash_key(f"sk-bench-tenant-{n}")]}
        if n % 5 == 1:
            spec["allow_models"] = [f"{families[n % len(families)]}*"]
        if n % 2 == 0:
            spec["limits"].update(tokens_per_day=10_000_000, tokens_per_month=200_000_000)
        if n == 0:
            spec["admin"] = True
        if in_file:
            spec["api_key_hashes"] += [h for t, h in spread if t == name]
        document.append(spec)
    return {"tenants": document}, spread


async def seed_database(url: str | None, data_dir: Path, spread: list[tuple[str, str]], rows: int,
                        tenants: int, registry) -> None:
    from sqlalchemy import inspect, text

    from gateway.store import migrate
    from gateway.store.database import Database
    from gateway.store.schema import api_keys, store_versions, usage_dims

    db = Database.from_settings(url, data_dir)
    await migrate.upgrade(db)
    now = int(time.time())
    began = time.perf_counter()
    async with db.writing() as conn:
        await conn.execute(api_keys.insert(), [
            {"key_hash": h, "id": key_id(h), "tenant": t, "name": f"bench-{n}", "created_at": now - n,
             "version": 1} for n, (t, h) in enumerate(spread)])
        await conn.execute(store_versions.update().where(store_versions.c.name == "api_keys").values(version=1))
    print(f"  {len(spread):,} keys in api_keys ({time.perf_counter() - began:.1f} s)", flush=True)
    models = list(registry.models.values())[:MODELS]
    dims = [{"tenant": f"tenant-{t:02d}", "key_id": f"{t * 16 + k:08x}", "model_requested": m.id,
             "model_served": m.id, "license": m.license,
             "commercial_use": registry.license_of(m).commercial_use.value, "environment": ENVIRONMENTS[t % 4],
             "attestations": "[]", "endpoint": "chat", "usage_source": "engine"}
            for t in range(tenants) for k in range(KEYS_PER_DIM_TENANT) for m in models]
    async with db.writing() as conn:
        await conn.execute(usage_dims.insert(), dims)
    start_ms, step_ms = (now - 30 * DAY) * 1000, 30 * DAY * 1000 // rows
    uuid = "printf('%032x', g)" if db.is_sqlite else "lpad(to_hex(g), 32, '0')::uuid"
    async with db.reading() as conn:
        columns = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("usage_ledger")})
    # The row's key: its own uuid `id` beside a text request id, or the request id itself as the uuid.
    keys = ("id, request_id", f"{uuid}, 'bench-' || g") if "id" in columns else ("request_id", uuid)
    began = time.perf_counter()
    async with db.writing() as conn:  # g a bigint: g * 7919 passes PostgreSQL's integer
        await conn.execute(text(
            "INSERT INTO usage_ledger (time_ms, dim_id, input_tokens, output_tokens, latency_ms, status, "
            f"{keys[0]}) WITH RECURSIVE s(g) AS (SELECT CAST(1 AS BIGINT) UNION ALL SELECT g + 1 FROM s WHERE g < {rows}) "
            f"SELECT {start_ms} + g * {step_ms}, 1 + (g * 7919) % {len(dims)}, 20 + g % 500, 5 + g % 300, "
            f"50 + g % 2000, CASE WHEN g % 20 = 0 THEN 429 ELSE 200 END, {keys[1]} FROM s"))
    print(f"  {rows:,} ledger rows ({time.perf_counter() - began:.1f} s)", flush=True)
    for name, size, since in (("usage_1d", DAY, 0), ("usage_1h", 3600, 0), ("usage_1m", 60, (now - 2 * DAY) * 1000)):
        async with db.writing() as conn:
            await conn.execute(text(
                f"INSERT INTO {name} SELECT time_ms / {size * 1000} * {size}, dim_id, count(*), "
                "sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), sum(input_tokens), sum(output_tokens), 0 "
                f"FROM usage_ledger WHERE time_ms >= {since} GROUP BY 1, 2"))
    print("  rollups built", flush=True)
    await db.dispose()


def sign_in(http: httpx.Client) -> None:
    form = http.get("/console/sign-in")
    token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
    answer = http.post("/console/sign-in", data={"key": ADMIN_KEY, "csrf_token": token})
    assert answer.status_code == 303 and answer.headers["location"].endswith("/console/overview"), answer.text


def pages(has_store: bool) -> list[tuple[str, str | None]]:
    """(path, why it is skipped or None)."""
    no_store = None if has_store else "needs the database store (issue 20)"
    return [("/console/overview", None), ("/console/models", None), ("/console/models?q=llama", None),
            ("/console/policy", None), ("/console/policy?tenant=tenant-03", None), ("/console/tenants", None),
            ("/console/tenants?after=tenant-19", None), ("/console/usage?range=24h&group=tenant", None),
            ("/console/usage?range=7d&group=model", None), ("/console/usage?range=30d&group=license", None),
            ("/console/usage.csv?range=30d&group=tenant", None),
            ("/console/keys", no_store), ("/console/keys?tenant=tenant-07", no_store),
            ("/console/decisions", no_store)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--database-url", help="PostgreSQL (libpq URL); default: SQLite in a temp dir")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    registry = load_registry([ROOT / "model_registry.yaml"])
    document, spread = tenants_document(args.tenants, args.keys, registry, in_file=not HAS_STORE)
    (work / "tenants.yaml").write_text(yaml.safe_dump(document))
    env = {"GATEWAY_REGISTRY": str(ROOT / "model_registry.yaml"), "GATEWAY_TENANTS": str(work / "tenants.yaml"),
           "GATEWAY_AUDIT_SINK": str(work / "audit.jsonl"), "GATEWAY_LOG_LEVEL": "warning",
           # The usage API's own rate limit (60 a minute per tenant) would refuse the repeats, not measure them.
           "GATEWAY_USAGE_API_RPM": "100000", "GATEWAY_DATA_DIR": str(work / "data"), "PYTHONPATH": str(ROOT)}
    print(f"{args.tenants} tenants, {args.keys:,} keys ({'database' if HAS_STORE else 'tenants file'}), "
          f"{args.rows if HAS_STORE else 0:,} ledger rows", flush=True)
    if HAS_STORE:
        if args.database_url:
            env["GATEWAY_DATABASE_URL"] = args.database_url
        asyncio.run(seed_database(args.database_url, work / "data", spread, args.rows, args.tenants, registry))
    else:
        print("  no database store in this gateway (issue 20): keys in the tenants file, no ledger", flush=True)
    port = _free_port()
    import os

    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=open(work / "gw.log", "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit(f"the gateway did not start: {(work / 'gw.log').read_text()[-2000:]}")
            time.sleep(0.5)
        return _measure(base, args.repeats, HAS_STORE)
    finally:
        gateway.terminate()
        gateway.wait(30)


def _measure(base: str, repeats: int, has_store: bool) -> int:
    failed = 0
    with httpx.Client(base_url=base, timeout=60) as http:
        sign_in(http)
        for path, skipped in pages(has_store):
            if skipped:
                print(f"{path:48s} skipped: {skipped}")
                continue
            took = []
            status = 0
            for _ in range(repeats):
                began = time.perf_counter()
                answer = http.get(path)
                took.append((time.perf_counter() - began) * 1000)
                status = answer.status_code
            took.sort()
            median, p95 = statistics.median(took), took[min(len(took) - 1, int(0.95 * len(took)))]
            ok = status == 200 and p95 < TARGET_MS
            failed += not ok
            print(f"{path:48s} {status}  median {median:6.1f} ms  p95 {p95:6.1f} ms  worst {took[-1]:6.1f} ms  "
                  f"{len(answer.content) / 1024:6.0f} KiB  {'ok' if ok else 'OVER ' + str(int(TARGET_MS)) + ' ms'}")
    return 1 if failed else 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
