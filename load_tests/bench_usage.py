"""The cost of the usage ledger and of quotas: the gateway's throughput with usage records (and token
quotas) on, vs off, on the fast mock engine (closed loop, 64 concurrent, non-streamed chat). `make bench`
prints its lines after the main benchmark; alone: `python load_tests/bench_usage.py [--duration 8
--repeats 5]`.

Configurations, each per process and, when `redis-server` is installed, with GATEWAY_REDIS_URL (rate
limits and quotas in Redis; the usage ledger in the embedded database either way):
- off: GATEWAY_USAGE_RECORDS=false, a tenant without quotas (keys and decisions as always);
- ledger: usage records on (the ledger row of every request, written to the database each second);
- ledger+quotas: also daily and monthly token quotas that never bind (a reservation and a
  reconciliation per request: with Redis, a round trip each).
Runs alternate between the configurations so drift on the machine hits all alike; the median of the
repeats is compared. Issue 20's cost bound (5 %) is the ledger's; quotas are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_targets as bt  # noqa: E402

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"


CONFIGS = {"off": (False, False), "ledger": (True, False), "ledger+quotas": (True, True)}


def _gateway(procs: bt.Procs, tmp: Path, mock_url: str, name: str, ledger: bool, quotas: bool,
             redis_url: str | None) -> bt.Target:
    d = tmp / name
    d.mkdir()
    env = bt.gateway_files(d, {bt.GATEWAY_MODEL: {"id": "mock-0", "url": mock_url,
                                                  "served_model_name": bt.MOCK_MODEL}})
    tenants = yaml.safe_load(Path(env["GATEWAY_TENANTS"]).read_text())
    if quotas:
        tenants["tenants"][0]["limits"].update(tokens_per_day=10**15, tokens_per_month=10**15)
    Path(env["GATEWAY_TENANTS"]).write_text(yaml.safe_dump(tenants))
    env["GATEWAY_USAGE_RECORDS"] = "true" if ledger else "false"
    env["GATEWAY_DATA_DIR"] = str(d / "data")  # its own embedded database and spool
    if redis_url:
        env["GATEWAY_REDIS_URL"] = redis_url
    port = bt.free_port()
    proc = procs.start(name, [sys.executable, "-m", "gateway", "serve", "--port", str(port)], env=env)
    bt.wait_http(f"http://127.0.0.1:{port}/ready", proc, 60)
    return bt.Target(name, f"http://127.0.0.1:{port}", bt.GATEWAY_MODEL, bt.BENCH_KEY, proc, {})


def _rps(t: bt.Target, duration: float, concurrency: int) -> float:
    done = subprocess.run([sys.executable, str(LOADGEN), "--url", t.url, "--model", t.model, "--api-key", t.api_key,
                           "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "1"],
                          capture_output=True, timeout=120 + duration, check=True)
    result = json.loads(done.stdout)
    assert not result.get("errors"), result.get("error_kinds")
    return float(result["throughput_rps"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as raw:
        tmp = Path(raw)
        procs = bt.Procs(tmp, None)
        try:
            mock = bt.start_mock(procs, sys.executable, None)
            stores: list[str | None] = [None]
            if shutil.which("redis-server"):
                port = bt.free_port()
                redis = procs.start("redis", ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"])
                time.sleep(0.5)
                assert redis.popen.poll() is None, "redis-server did not start"
                stores.append(f"redis://127.0.0.1:{port}/0")
            lines = {}
            for store in stores:
                where = "redis" if store else "process"
                targets = {name: _gateway(procs, tmp, mock.url, f"gw-{name.replace('+', '-')}-{where}", *flags, store)
                           for name, flags in CONFIGS.items()}
                runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
                for _ in range(a.repeats):
                    for name, target in targets.items():
                        runs[name].append(_rps(target, a.duration, a.concurrency))
                medians = {k: statistics.median(v) for k, v in runs.items()}
                lines[where] = {"rps": {k: round(v) for k, v in medians.items()}, "runs": runs}
                for name in ("ledger", "ledger+quotas"):
                    cost = (1 - medians[name] / medians["off"]) * 100
                    lines[where][f"{name}_cost_percent"] = round(cost, 1)
                    bound = " (target <= 5 %)" if name == "ledger" else ""
                    print(f"usage {name} ({where}): {medians[name]:,.0f} rps on vs {medians['off']:,.0f} rps off, "
                          f"cost {cost:.1f} %{bound}", flush=True)
            print(json.dumps(lines))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
