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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="a checkout of the gateway before the database")
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
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
