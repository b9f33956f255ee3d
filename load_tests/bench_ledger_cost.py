"""What the usage ledger, the decision rows and the database key checks cost the gateway (issue 20, item 8:
at most 5 % of `make bench`'s c64 throughput): this tree's gateway against the same gateway before the
database was wired in (`--before DIR`: a checkout of that code, e.g. `git worktree add /tmp/before main`),
on the fast mock engine, closed loop, 64 concurrent, non-streamed chat.

Two figures per configuration: requests per second, and the gateway's CPU time per request (utime + stime
of its process, ledger writer threads included, from /proc, divided by the requests it answered). On a
busy machine the second is the steadier one: other processes change how long a request waits for the CPU,
much less how much CPU it takes. Runs alternate so that drift hits every configuration alike; medians of
the repeats are compared.

    python load_tests/bench_ledger_cost.py --before /tmp/before [--duration 6 --repeats 3]
    python load_tests/bench_ledger_cost.py --micro [--rows 20000]

`--micro` measures the added work itself, in this process, as CPU time (time.process_time, every thread:
the SQLite writer's included), which load on the machine barely changes: per request, what the request
path does more (a ledger row and a decision row appended, the durability check, a database key's lookup
and touch), and what the background writers spend per row (encoding, spool file with fsync, one
transaction per batch into the embedded SQLite file, rollups included), for batches of `--batch` rows (a
second's worth at ~1,000 requests/s).

Configurations: `before` (a tenants-file key; no database), `after` (the same key; ledger and decisions in
the embedded SQLite file), `after, database key` (a key made with `gateway keys create`, looked up in the
database's keys in memory, its use touched).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_targets as bt  # noqa: E402

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (all threads)


def _gateway(procs: bt.Procs, tmp: Path, mock_url: str, name: str, source: Path, key: str | None) -> bt.Target:
    d = tmp / name
    d.mkdir()
    env = bt.gateway_files(d, {bt.GATEWAY_MODEL: {"id": "mock-0", "url": mock_url,
                                                  "served_model_name": bt.MOCK_MODEL}})
    env.update(PYTHONPATH=str(source), GATEWAY_DATA_DIR=str(d / "data"))
    api_key = bt.BENCH_KEY
    if key == "database":  # made in this gateway's database before it starts
        subprocess.run([sys.executable, "-m", "gateway", "db", "upgrade"], env={**os.environ, **env},
                       capture_output=True, check=True, cwd=d)
        made = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--tenant", "bench"],
                              env={**os.environ, **env}, capture_output=True, text=True, check=True, cwd=d)
        api_key = made.stdout.split()[-1]
    port = bt.free_port()
    proc = procs.start(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], env=env, cwd=d)
    bt.wait_http(f"http://127.0.0.1:{port}/ready", proc, 60)
    return bt.Target(name, f"http://127.0.0.1:{port}", bt.GATEWAY_MODEL, api_key, proc, {})


def _run(t: bt.Target, duration: float, concurrency: int) -> tuple[float, float]:
    """(requests per second, gateway CPU microseconds per request)."""
    cpu = _cpu_s(t.proc.pid)
    done = subprocess.run([sys.executable, str(LOADGEN), "--url", t.url, "--model", t.model, "--api-key", t.api_key,
                           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "0"],
                          capture_output=True, timeout=120 + duration, check=True)
    used = _cpu_s(t.proc.pid) - cpu
    result = json.loads(done.stdout)
    assert not result.get("errors"), result.get("error_kinds")
    requests = result["ok"]
    return float(result["throughput_rps"]), used / requests * 1e6


async def _micro(rows: int, batch: int) -> dict[str, float]:
    from gateway.registry import load_registry
    from gateway.settings import Settings
    from gateway.store.decisions import DecisionRow
    from gateway.store.ledger import LedgerRow
    from gateway.store.store import Store
    from gateway.tenancy.auth import authenticate
    from gateway.tenancy.tenants import load_tenants

    with tempfile.TemporaryDirectory(prefix="bench-ledger-micro-") as raw:
        tmp = Path(raw)
        env = bt.gateway_files(tmp, {bt.GATEWAY_MODEL: {"id": "m", "url": "http://127.0.0.1:1",
                                                        "served_model_name": "m"}})
        registry = load_registry([Path(p) for p in env["GATEWAY_REGISTRY"].split(",")])
        tenants = load_tenants(Path(env["GATEWAY_TENANTS"]), registry)
        store = await Store.open(Settings(data_dir=tmp / "data", database_url=None))
        made = await store.keys.create("bench", "micro")
        attestations = ("a", "b", "c")
        out: dict[str, float] = {}

        def per_call(job, n: int) -> float:  # type: ignore[no-untyped-def]
            began = time.process_time()
            for i in range(n):
                job(i)
            return (time.process_time() - began) / n * 1e6

        sink: list = []
        out["ledger_row_us"] = per_call(lambda i: sink.append(LedgerRow(
            f"{i:032x}", 1.0, "bench", "k1", "m", "m", "llama2", "conditional", "production", attestations, "chat",
            9, 16, "engine", 200, 12.5)), rows)
        out["decision_row_us"] = per_call(lambda i: sink.append(DecisionRow(
            f"{i:032x}", 1.0, "bench", "k1", "m", "m", "llama2", "allow", "rule")), rows)
        out["durable_check_us"] = per_call(lambda i: store.durable, rows)
        file_header, db_header = f"Bearer {bt.BENCH_KEY}", f"Bearer {made.key}"
        file_us = per_call(lambda i: authenticate(file_header, tenants, store.keys), rows)
        db_us = per_call(lambda i: authenticate(db_header, tenants, store.keys), rows)
        out["file_key_auth_us"], out["database_key_auth_us"] = file_us, db_us
        sink.clear()
        began = time.process_time()
        for first in range(0, rows, batch):
            for i in range(first, min(rows, first + batch)):
                store.ledger.record(LedgerRow(f"{i:032x}", time.time(), "bench", "k1", "m", "m", "llama2",
                                              "conditional", "production", attestations, "chat", 9, 16, "engine",
                                              200, 12.5))
                store.decisions.record(DecisionRow(f"{i:032x}", time.time(), "bench", "k1", "m", "m", "llama2",
                                                   "allow", "rule"))
            assert await store.ledger.flush(60) and await store.decisions.flush(60)
        out["background_per_request_us"] = (time.process_time() - began) / rows * 1e6
        await store.close()
        return out


def micro(rows: int, batch: int) -> int:
    import asyncio

    from gateway.lifecycle import settle_garbage_collector

    settle_garbage_collector()  # the gateway's collector settings (gateway/lifecycle.py)
    found = asyncio.run(_micro(rows, batch))
    path = found["ledger_row_us"] + found["decision_row_us"] + found["durable_check_us"]
    keys = found["database_key_auth_us"] - found["file_key_auth_us"]
    print(f"request path: ledger row {found['ledger_row_us']:.2f} us + decision row {found['decision_row_us']:.2f} "
          f"us + durability check {found['durable_check_us']:.2f} us = {path:.2f} us; a database key's lookup "
          f"{found['database_key_auth_us']:.2f} us vs a file key's {found['file_key_auth_us']:.2f} us "
          f"({keys:+.2f} us); writers in the background: {found['background_per_request_us']:.1f} us CPU per "
          f"request (ledger + decision, batches of {batch})", flush=True)
    print(json.dumps({k: round(v, 2) for k, v in found.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="a checkout of the gateway before the database")
    p.add_argument("--micro", action="store_true", help="the added work alone, as CPU time in this process")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
    if a.micro:
        return micro(a.rows, a.batch)
    if a.before is None:
        p.error("--before DIR (or --micro)")
    with tempfile.TemporaryDirectory(prefix="bench-ledger-cost-") as raw:
        tmp = Path(raw)
        procs = bt.Procs(tmp, None)
        try:
            mock = bt.start_mock(procs, sys.executable, None)
            targets = {"before": _gateway(procs, tmp, mock.url, "before", a.before.resolve(), None),
                       "after": _gateway(procs, tmp, mock.url, "after", bt.ROOT, None),
                       "after, database key": _gateway(procs, tmp, mock.url, "after-dbkey", bt.ROOT, "database")}
            for target in targets.values():  # warm up: imports, caches, the first ledger batches
                _run(target, 1.5, a.concurrency)
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for _ in range(a.repeats):
                for name, target in targets.items():
                    runs[name].append(_run(target, a.duration, a.concurrency))
                    time.sleep(0.5)
            out = {}
            for name, results in runs.items():
                rps = statistics.median(r for r, _ in results)
                cpu = statistics.median(c for _, c in results)
                out[name] = {"rps": round(rps), "cpu_us_per_request": round(cpu, 1), "runs": results}
            base = out["before"]
            for name in ("after", "after, database key"):
                mine = out[name]
                mine["rps_cost_percent"] = round((1 - mine["rps"] / base["rps"]) * 100, 1)
                mine["cpu_cost_percent"] = round((mine["cpu_us_per_request"] / base["cpu_us_per_request"] - 1) * 100, 1)
                print(f"{name}: {mine['rps']:,} rps vs {base['rps']:,} before ({mine['rps_cost_percent']:+.1f} % "
                      f"cost); CPU {mine['cpu_us_per_request']} vs {base['cpu_us_per_request']} us/request "
                      f"({mine['cpu_cost_percent']:+.1f} %) (target: at most 5 %)", flush=True)
            print(json.dumps(out))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
