"""Where a request's CPU goes: the gateway in front of the fast mock under closed-loop load, sampled from
outside by py-spy (no instrumentation in the process, so nothing measured is added by the measuring), and
each sample's on-CPU time put in one bucket of the request path:

    server    uvicorn, httptools, the ASGI glue (starlette), our header deadline and drain
    parse     the request body: orjson, the wire schema (pydantic), gateway/wire
    auth      the key lookup and who the caller is (gateway/tenancy, api/callers)
    policy    the license decision (gateway/policy, snapshot)
    prompt    prompt formats (gateway/prompts)
    limits    rate limits, quotas, holds (gateway/admission)
    routing   filters, scorers, picker (gateway/routing)
    upstream  aiohttp and our backend client (gateway/backends)
    relay     what goes back to the client (gateway/api/generation, responses bridge)
    logging   logs, audit, metrics (gateway/observability, logging, prometheus_client)
    usage     usage records and the ledger (gateway/usage, gateway/store, SQLAlchemy and its drivers'
              threads)
    pipeline  the rest of gateway/ (pipeline.py, api routes)
    loop      the event loop itself (asyncio, uvloop callbacks), gc

A sample goes to the innermost frame that names a bucket (asyncio, contextlib and the like are looked
through to their caller). The gateway's own CPU time over the window (/proc utime + stime) divided by the
requests served gives µs per request, and each bucket its share of that.

    make profile                                  # installs py-spy into .venv on first use
    .venv/bin/python load_tests/cpu_profile.py --concurrency 64 --duration 10 [--stream] [--endpoint responses]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_targets as bt  # noqa: E402

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
TICKS = os.sysconf("SC_CLK_TCK")

# (bucket, pattern on the frame's file path), first match wins: the gateway's own folders before the
# libraries they call, so that pydantic called from gateway/wire is `parse` however it is reached.
BUCKETS: list[tuple[str, re.Pattern[str]]] = [(name, re.compile(pattern)) for name, pattern in [
    ("usage", r"gateway/(usage|store)/|aiosqlite/|sqlalchemy/|asyncpg/"),
    ("logging", r"gateway/observability/|/logging/|prometheus_client/"),
    ("limits", r"gateway/admission/"),
    ("policy", r"gateway/(policy/|snapshot\.py)"),
    ("auth", r"gateway/tenancy/|gateway/api/callers\.py"),
    ("prompt", r"gateway/prompts/"),
    ("routing", r"gateway/routing/"),
    ("upstream", r"gateway/backends/|aiohttp/|yarl/|multidict/|aiohappyeyeballs/"),
    ("relay", r"gateway/api/generation\.py|gateway/responses/"),
    ("parse", r"gateway/wire/|gateway/api/json\.py|pydantic|orjson"),
    ("server", r"uvicorn/|httptools|starlette/|fastapi/|h11/|gateway/(cli/server|deadlines|lifecycle)\.py"),
    ("pipeline", r"gateway/"),
    ("loop", r"asyncio/|uvloop|<gc>|gc\b"),
]]
TRANSPARENT = re.compile(r"contextlib\.py|functools\.py|typing\.py|abc\.py|enum\.py|<frozen|dataclasses\.py")
FRAME_FILE = re.compile(r"\((?P<file>[^:()]+)(?::\d+)?\)$")


def bucket_of(stack: str) -> str:
    """A collapsed stack (`outer (file:line);...;inner (file:line)`): the bucket of its innermost named frame."""
    frames = stack.split(";")
    for frame in reversed(frames):
        found = FRAME_FILE.search(frame.strip())
        path = found["file"] if found else frame
        if TRANSPARENT.search(path):
            continue
        for name, pattern in BUCKETS:
            if name != "loop" and pattern.search(path):
                return name
    return "loop" if any(BUCKETS[-1][1].search(f) for f in frames) else "other"


def breakdown(collapsed: str) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[bucket_of(stack)] += int(count)
    return dict(counts)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and its threads (the gateway's log and spool writers included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--endpoint", choices=("chat", "completions", "responses"), default="chat")
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON too")
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: `make profile` installs it (pip install py-spy)")
    with tempfile.TemporaryDirectory(prefix="profile-") as raw:
        tmp = Path(raw)
        cpus = sorted(os.sched_getaffinity(0))
        pinned = len(cpus) > 1
        procs = bt.Procs(tmp, cpus if pinned else None)
        try:
            mock = bt.start_mock(procs, sys.executable, cpus[-1] if pinned else None)
            gateway = bt.start_gateway(procs, sys.executable, tmp, {bt.GATEWAY_MODEL: {
                "id": "mock-0", "url": mock.url, "served_model_name": bt.MOCK_MODEL}}, cpus[0] if pinned else None)
            load = [sys.executable, str(LOADGEN), "--url", gateway.url, "--model", gateway.model, "--api-key",
                    gateway.api_key, "--endpoint", a.endpoint, "--concurrency", str(a.concurrency),
                    "--duration", str(a.duration), "--warmup", "2", "--out", str(tmp / "load.json")]
            if a.stream:
                load.append("--stream")
            if pinned:
                load = ["taskset", "-c", str(cpus[-1]), *load]
            loader = subprocess.Popen(load)
            time.sleep(2.2)  # past the warm-up
            before = cpu_seconds(gateway.proc.pid)
            sampled = subprocess.run([spy, "record", "--pid", str(gateway.proc.pid), "--format", "raw",
                                      "--rate", str(a.rate), "--duration", str(int(a.duration - 1)),
                                      "--nonblocking", "--output", str(tmp / "stacks.txt")],
                                     capture_output=True, text=True)
            after = cpu_seconds(gateway.proc.pid)
            loader.wait(60)
            if sampled.returncode != 0:
                sys.exit(f"py-spy failed: {sampled.stderr[-2000:]}")
            result = json.loads((tmp / "load.json").read_text())
            rps = float(result["throughput_rps"])
            window = int(a.duration - 1)
            us_per_request = (after - before) / (rps * window) * 1e6
            counts = breakdown((tmp / "stacks.txt").read_text(errors="replace"))  # py-spy may cut a name mid-character
            if os.environ.get("PROFILE_KEEP"):
                shutil.copy(tmp / "stacks.txt", os.environ["PROFILE_KEEP"])
        finally:
            procs.stop_all()
    total = sum(counts.values()) or 1
    kind = f"{a.endpoint}{' streamed' if a.stream else ''}, c{a.concurrency}"
    print(f"{kind}: {rps:,.0f} rps, {us_per_request:,.0f} µs of gateway CPU per request "
          f"({sum(counts.values()):,} samples)")
    print("| part | share | µs per request |\n|---|---:|---:|")
    for name, count in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"| {name} | {count / total:.1%} | {us_per_request * count / total:,.0f} |")
    if a.json:
        print(json.dumps({"rps": rps, "us_per_request": us_per_request, "samples": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
