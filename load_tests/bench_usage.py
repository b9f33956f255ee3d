"""The cost of the usage ledger and of quotas: the gateway's throughput with usage records (and token
quotas) on, vs off, on the fast mock engine (closed loop, 64 concurrent, non-streamed chat). `make bench`
prints its lines after the main benchmark; alone: `python load_tests/bench_usage.py [--duration 8
--repeats 5]`.

Configurations, each per process and, when `redis-server` is installed, with GATEWAY_REDIS_URL (rate
limits and quotas in Redis; the usage ledger in the embedded database either way):
- off: GATEWAY_USAGE_RECORDS=false, a tenant without quotas (keys and decisions as always);
- before ledger: usage records on, without the ledger's rows (gateway_before_ledger.py): the usage line in
  the audit trail and the token metrics, as the gateway had them before the database;
- ledger: usage records on (also the ledger row of every request, written to the database each second);
- ledger+quotas: also daily and monthly token quotas that never bind (a reservation and a
  reconciliation per request: with Redis, a round trip each).
Pinned as `make bench` pins: the gateway alone on the first core, everything else on the second. Besides
requests per second, the gateway's CPU time per answered request (/proc, every thread) is compared: on a
shared box the steadier figure. Runs alternate between the configurations so drift on the machine hits
all alike; the median of the repeats is compared. Issue 20's cost bound (5 %) is the ledger's: ledger
against before ledger. The whole usage record (ledger against off) and quotas are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_targets as bt  # noqa: E402

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"


BEFORE_LEDGER = Path(__file__).resolve().parent / "gateway_before_ledger.py"
# name: (usage records, ledger rows, quotas)
CONFIGS = {"off": (False, False, False), "before ledger": (True, False, False), "ledger": (True, True, False),
           "ledger+quotas": (True, True, True)}
# (configuration, what it is compared with, the bound it is held to, if any)
COSTS = [("ledger", "before ledger", 5.0), ("ledger", "off", None), ("ledger+quotas", "off", None)]


def _gateway(procs: bt.Procs, tmp: Path, mock_url: str, name: str, records: bool, ledger: bool, quotas: bool,
             redis_url: str | None, core: int | None) -> bt.Target:
    d = tmp / name
    d.mkdir()
    env = bt.gateway_files(d, {bt.GATEWAY_MODEL: {"id": "mock-0", "url": mock_url,
                                                  "served_model_name": bt.MOCK_MODEL}})
    tenants = yaml.safe_load(Path(env["GATEWAY_TENANTS"]).read_text())
    if quotas:
        tenants["tenants"][0]["limits"].update(tokens_per_day=10**15, tokens_per_month=10**15)
    Path(env["GATEWAY_TENANTS"]).write_text(yaml.safe_dump(tenants))
    env["GATEWAY_USAGE_RECORDS"] = "true" if records else "false"
    env["GATEWAY_DATA_DIR"] = str(d / "data")  # its own embedded database and spool
    env["GATEWAY_METRICS_PUBLIC"] = "true"  # _answered reads the request counter
    if redis_url:
        env["GATEWAY_REDIS_URL"] = redis_url
    port = bt.free_port()
    entry = [str(BEFORE_LEDGER)] if records and not ledger else ["-m", "gateway"]
    proc = procs.start(name, [sys.executable, *entry, "serve", "--port", str(port)], env=env, core=core)
    bt.wait_http(f"http://127.0.0.1:{port}/ready", proc, 60)
    return bt.Target(name, f"http://127.0.0.1:{port}", bt.GATEWAY_MODEL, bt.BENCH_KEY, proc, {})


def _cpu_s(pid: int) -> float:
    """The process's CPU seconds so far (user + system, all its threads: SQLite's writer thread included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answered(t: bt.Target) -> float:
    """Requests the gateway has answered so far (its own counter, warm-up included)."""
    text = urllib.request.urlopen(t.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gateway_requests_total{"))


def _run(t: bt.Target, duration: float, concurrency: int) -> tuple[float, float]:
    """(rps, gateway CPU microseconds per answered request) of one closed-loop run."""
    cpu, answered = _cpu_s(t.proc.popen.pid), _answered(t)
    done = subprocess.run([sys.executable, str(LOADGEN), "--url", t.url, "--model", t.model, "--api-key", t.api_key,
                           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "1"],
                          capture_output=True, timeout=120 + duration, check=True)
    result = json.loads(done.stdout)
    assert not result.get("errors"), result.get("error_kinds")
    cpu, answered = _cpu_s(t.proc.popen.pid) - cpu, _answered(t) - answered
    return float(result["throughput_rps"]), cpu / max(answered, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--no-redis", action="store_true", help="only the in-process configurations")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as raw:
        tmp = Path(raw)
        # As `make bench` (bench.py): the gateway alone on the first core, its SQLite writer thread with it;
        # the mock, Redis, the load generator and this script on the second.
        cpus = sorted(os.sched_getaffinity(0))
        pinned = len(cpus) >= 2
        target_core, own_core = (cpus[0], cpus[1]) if pinned else (None, None)
        if pinned:
            os.sched_setaffinity(0, {own_core})
        procs = bt.Procs(tmp, cpus if pinned else None)
        try:
            mock = bt.start_mock(procs, sys.executable, own_core)
            stores: list[str | None] = [None]
            if shutil.which("redis-server") and not a.no_redis:
                port = bt.free_port()
                redis = procs.start("redis", ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                                    core=own_core)
                time.sleep(0.5)
                assert redis.popen.poll() is None, "redis-server did not start"
                stores.append(f"redis://127.0.0.1:{port}/0")
            lines = {}
            for store in stores:
                where = "redis" if store else "process"
                targets = {name: _gateway(procs, tmp, mock.url, f"gw-{name.replace('+', '-').replace(' ', '-')}-{where}",
                                          *flags, store, target_core)
                           for name, flags in CONFIGS.items()}
                runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
                cpu: dict[str, list[float]] = {name: [] for name in CONFIGS}
                for _ in range(a.repeats):
                    for name, target in targets.items():
                        rps, us = _run(target, a.duration, a.concurrency)
                        runs[name].append(rps)
                        cpu[name].append(round(us, 1))
                medians = {k: statistics.median(v) for k, v in runs.items()}
                cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
                lines[where] = {"rps": {k: round(v) for k, v in medians.items()}, "runs": runs,
                                "cpu_us_per_request": cpu_medians, "cpu_runs": cpu}
                for name, base, bound in COSTS:
                    cost = (1 - medians[name] / medians[base]) * 100
                    # CPU per request is the steadier figure on a shared box: throughput on one core is its
                    # inverse, so the same cost in RPS terms is 1 - base/on.
                    cpu_cost = (1 - cpu_medians[base] / cpu_medians[name]) * 100
                    key = f"{name} vs {base}".replace(" ", "_")
                    lines[where][f"{key}_cost_percent"] = round(cost, 1)
                    lines[where][f"{key}_cpu_cost_percent"] = round(cpu_cost, 1)
                    target = f" (target <= {bound:g} %)" if bound is not None else ""
                    print(f"usage {name} vs {base} ({where}): {medians[name]:,.0f} vs {medians[base]:,.0f} rps, "
                          f"cost {cost:.1f} %{target}; gateway CPU {cpu_medians[name]:.0f} vs "
                          f"{cpu_medians[base]:.0f} us/request, cost {cpu_cost:.1f} %", flush=True)
            print(json.dumps(lines))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
