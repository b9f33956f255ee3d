"""The cost of the usage ledger and quotas: the gateway's throughput with usage records and token quotas
on, vs off, on the fast mock engine (closed loop, 64 concurrent, non-streamed chat). `make bench` prints
its line after the main benchmark; alone: `python load_tests/bench_usage.py [--duration 8 --repeats 3]`.

Configurations: off (GATEWAY_USAGE_RECORDS=false, a tenant without quotas) and on (usage records +
a tenant with daily and monthly quotas that never bind), each per process and, when `redis-server` is
installed, with GATEWAY_REDIS_URL (rate limits and quotas in Redis; the
usage ledger in the embedded database either way). Runs alternate off/on so
drift on the machine hits both alike; the median of the repeats is compared.
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


def _gateway(procs: bt.Procs, tmp: Path, mock_url: str, name: str, on: bool, redis_url: str | None) -> bt.Target:
    d = tmp / name
    d.mkdir()
    env = bt.gateway_files(d, {bt.GATEWAY_MODEL: {"id": "mock-0", "url": mock_url,
                                                  "served_model_name": bt.MOCK_MODEL}})
    tenants = yaml.safe_load(Path(env["GATEWAY_TENANTS"]).read_text())
    if on:
        tenants["tenants"][0]["limits"].update(tokens_per_day=10**15, tokens_per_month=10**15)
    Path(env["GATEWAY_TENANTS"]).write_text(yaml.safe_dump(tenants))
    env["GATEWAY_USAGE_RECORDS"] = "true" if on else "false"
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
    p.add_argument("--repeats", type=int, default=3)
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
                off = _gateway(procs, tmp, mock.url, f"gw-off-{where}", False, store)
                on = _gateway(procs, tmp, mock.url, f"gw-on-{where}", True, store)
                runs: dict[str, list[float]] = {"off": [], "on": []}
                for _ in range(a.repeats):
                    runs["off"].append(_rps(off, a.duration, a.concurrency))
                    runs["on"].append(_rps(on, a.duration, a.concurrency))
                medians = {k: statistics.median(v) for k, v in runs.items()}
                cost = (1 - medians["on"] / medians["off"]) * 100
                lines[where] = {"off_rps": round(medians["off"]), "on_rps": round(medians["on"]),
                                "cost_percent": round(cost, 1), "runs": runs}
                print(f"usage ledger + quotas ({where}): {medians['on']:,.0f} rps on vs {medians['off']:,.0f} "
                      f"rps off, cost {cost:.1f} % (target < 10 %)", flush=True)
            print(json.dumps(lines))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
