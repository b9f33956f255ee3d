"""Pure functions of `make bench`: medians of repeated loadgen runs, the side-by-side table, the checks
against the issue's targets, and the generated section of BENCHMARKS.md. No processes, no I/O except
`update_benchmarks_md`, so the tests can run them on canned loadgen JSON.

Data shapes (what bench.py builds and writes to results/*.json):
    scenario  = {"runs": [loadgen JSON, ...], "median": {metric: value}, "saturated": bool, "errors": int}
              | {"skipped": "why"}
    sweep     = {"steps": [{"rate": r, "median": {...}, "ok": bool, "saturated": bool, "errors": int}, ...],
                 "saturation_rps": float | None, "bound": "<" | "=" | ">=", "p99_bound_ms": float}
    rss       = {"runs": [{"idle_kb", "peak_kb", "peak_fds", "loadgen": {...}}], "median": {...}, ...}
    results   = {target: {scenario: scenario | sweep | rss}}
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = ("direct", "nginx", "gateway", "litellm")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
SATURATED_MARK, ERROR_MARK = "*", "!"


def run_metrics(result: dict) -> dict[str, float | None]:
    """The numbers one loadgen JSON contributes to the table."""
    latency = result.get("latency_ms") or {}
    stream = result.get("stream") or {}
    ttft = stream.get("ttft_ms") or stream.get("first_event_ms") or {}
    return {"rps": result.get("throughput_rps"), "p50": latency.get("p50"), "p99": latency.get("p99"),
            "chunks_per_s": stream.get("chunks_per_s"), "ttft_p50": ttft.get("p50"),
            "first_event_p50": (stream.get("first_event_ms") or {}).get("p50"),
            "ok": result.get("ok"), "errors": result.get("errors")}


def median_of(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(present) if present else None


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Median of each metric over repeated runs (per metric, not the median run), plus the flags."""
    per_run = [run_metrics(r) for r in runs]
    keys = per_run[0].keys() if per_run else []
    return {"runs": runs, "median": {k: median_of([m[k] for m in per_run]) for k in keys},
            "saturated": any(r.get("generator_saturated") for r in runs),
            "errors": sum(r.get("errors") or 0 for r in runs)}


def summarise_rss(runs: list[dict], streams: int) -> dict[str, Any]:
    """Peak RSS of the target's process tree while `streams` streams were open, against its idle RSS
    before the first run (a later run's own idle already holds memory the allocator kept)."""
    idle = runs[0]["idle_kb"] if runs else None
    peak = median_of([r["peak_kb"] for r in runs])
    delta = None if peak is None or idle is None else peak - idle
    ok = median_of([r["loadgen"].get("ok") for r in runs])
    return {"runs": runs, "streams": streams,
            "median": {"idle_mb": None if idle is None else idle / 1024,
                       "peak_mb": None if peak is None else peak / 1024,
                       "delta_mb": None if delta is None else delta / 1024,
                       "kb_per_stream": None if delta is None else delta / streams,
                       "peak_fds": median_of([r["peak_fds"] for r in runs]), "ok": ok},
            "saturated": any(r["loadgen"].get("generator_saturated") for r in runs),
            "errors": sum(r["loadgen"].get("errors") or 0 for r in runs)}


def sweep_verdict(steps: list[dict]) -> tuple[float | None, str]:
    """Highest rate whose step held (achieved ≥ 95 % and p99 within bound): (rate, '=' | '>=' | '<')."""
    held = [s["rate"] for s in steps if s["ok"]]
    if not steps:
        return None, "="
    if not held:
        return steps[0]["rate"], "<"
    return max(held), ">=" if all(s["ok"] for s in steps) else "="


def step_ok(median: dict, rate: float, p99_bound_ms: float, errors: int) -> bool:
    rps, p99 = median.get("rps"), median.get("p99")
    return errors == 0 and rps is not None and p99 is not None and rps >= 0.95 * rate and p99 <= p99_bound_ms


# --- table -------------------------------------------------------------------------------------------

Cell = tuple[float | None, str]  # value, marks
Getter = Callable[[dict[str, Any], str], Cell]


def _get(scenario: str, metric: str, saturation_matters: bool = True) -> Getter:
    def get(results: dict[str, Any], target: str) -> Cell:
        s = results.get(target, {}).get(scenario)
        if not s or "skipped" in s or "median" not in s:
            return None, ""
        value = s["median"].get(metric)
        return value, _marks(s, saturation_matters) if value is not None else ""
    return get


def _marks(s: dict, saturation_matters: bool = True) -> str:
    saturated = saturation_matters and s.get("saturated")
    return (SATURATED_MARK if saturated else "") + (ERROR_MARK if s.get("errors") else "")


def _added(scenario: str, metric: str) -> Getter:
    def get(results: dict[str, Any], target: str) -> Cell:
        if target == "direct":
            return None, ""
        (v, m), (d, dm) = _get(scenario, metric)(results, target), _get(scenario, metric)(results, "direct")
        if v is None or d is None:
            return None, ""
        return v - d, "".join(dict.fromkeys(m + dm))  # each mark once
    return get


def _best_closed(results: dict[str, Any], target: str) -> Cell:
    cells = [_get(s, "rps")(results, target) for s in ("c1", "c16", "c64", "c256")]
    cells = [c for c in cells if c[0] is not None]
    return max(cells, key=lambda c: c[0]) if cells else (None, "")


def _sweep(results: dict[str, Any], target: str) -> Cell:
    s = results.get(target, {}).get("sweep")
    if not s or "skipped" in s or s.get("saturation_rps") is None:
        return None, ""
    marks = (SATURATED_MARK if any(st.get("saturated") for st in s["steps"]) else "")
    marks += ERROR_MARK if any(st.get("errors") for st in s["steps"]) else ""
    prefix = {"<": "<", ">=": ">=", "=": ""}[s["bound"]]
    return s["saturation_rps"], prefix + "|" + marks  # the prefix goes before the number


# (label, getter, decimals, ratio: whether gateway/litellm and gateway/nginx mean something)
ROWS: list[tuple[str, Getter, int, bool]] = [
    ("c1 non-streamed: rps", _get("c1", "rps"), 0, True),
    ("c1: p50 ms", _get("c1", "p50"), 2, True),
    ("c1: p99 ms", _get("c1", "p99"), 2, True),
    ("c1: added p50 ms vs direct", _added("c1", "p50"), 2, False),
    ("c1: added p99 ms vs direct", _added("c1", "p99"), 2, False),
    ("c16: rps", _get("c16", "rps"), 0, True),
    ("c16: p99 ms", _get("c16", "p99"), 1, True),
    ("c64: rps", _get("c64", "rps"), 0, True),
    ("c64: p99 ms", _get("c64", "p99"), 1, True),
    ("c256: rps", _get("c256", "rps"), 0, True),
    ("c256: p99 ms", _get("c256", "p99"), 1, True),
    ("best closed-loop rps (saturation)", _best_closed, 0, True),
    ("open-loop sweep: highest rate held", _sweep, 0, True),
    ("open 500 rps: p99 ms", _get("open_500", "p99"), 2, True),
    ("open 500 rps: added p99 ms", _added("open_500", "p99"), 2, False),
    ("stream c16 x128: chunks/s", _get("stream_c16", "chunks_per_s"), 0, True),
    ("stream c16 x128: TTFT p50 ms", _get("stream_c16", "ttft_p50"), 2, True),
    ("stream c16 x128: p99 ms", _get("stream_c16", "p99"), 1, True),
    # /v1/responses (the gateway only): the same work as the chat rows above, through the bridge
    # (each run beside a run of the same chat scenario: the "paired" rows, from the same minutes)
    ("responses c64: rps", _get("responses_c64", "rps"), 0, False),
    ("responses c64: p99 ms", _get("responses_c64", "p99"), 1, False),
    ("paired chat c64: rps", _get("paired_c64", "rps"), 0, False),
    ("responses stream c16 x128: chunks/s", _get("responses_stream_c16", "chunks_per_s"), 0, False),
    ("responses stream c16 x128: TTFT p50 ms", _get("responses_stream_c16", "ttft_p50"), 2, False),
    ("paired chat stream c16 x128: chunks/s", _get("paired_stream_c16", "chunks_per_s"), 0, False),
    # RSS rows: no `*`; a busy generator does not change what the server holds per open stream
    ("slow streams: ok", _get("streams", "ok", False), 0, False),
    ("slow streams: peak open sockets", _get("streams", "peak_fds", False), 0, False),
    ("slow streams: idle RSS MB", _get("streams", "idle_mb", False), 1, True),
    ("slow streams: peak RSS MB", _get("streams", "peak_mb", False), 1, True),
    ("slow streams: KB per stream", _get("streams", "kb_per_stream", False), 1, True),
]


def fmt(value: float | None, decimals: int, marks: str = "") -> str:
    prefix, _, marks = marks.rpartition("|")
    if value is None:
        return "-" + marks if marks else "-"
    return f"{prefix}{value:,.{decimals}f}{marks}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return ""
    return f"{a / b:.2f}x"


def table_rows(results: dict[str, Any], targets: tuple[str, ...] = TARGETS) -> list[list[str]]:
    """Header row, then one row per metric: label, one cell per target, gateway/litellm, gateway/nginx."""
    rows = [["metric", *targets, "gateway/litellm", "gateway/nginx"]]
    for label, getter, decimals, has_ratio in ROWS:
        cells = {t: getter(results, t) for t in targets}
        row = [label, *(fmt(v, decimals, m) for v, m in cells.values())]
        gw, gw_marks = cells.get("gateway", (None, ""))

        def exact(marks: str) -> bool:  # a bound ("<x", ">=x") divided by another says nothing
            return not marks.partition("|")[0] if "|" in marks else True

        row += [ratio(gw, cells[o][0]) if has_ratio and o in cells and exact(gw_marks) and exact(cells[o][1])
                else "" for o in ("litellm", "nginx")]
        rows.append(row)
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" + "---:|" * (len(rows[0]) - 1)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


# --- the targets -----------------------------------------------------------------------------

def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 5 with the measured value and pass / fail (None: not measured)."""
    def val(getter: Getter, target: str) -> float | None:
        return getter(results, target)[0]

    gw_best, lt_best, ng_best = (val(_best_closed, t) for t in ("gateway", "litellm", "nginx"))
    out = []

    def add(name: str, value: float | None, limit: float, higher_is_better: bool, unit: str, note: str = "") -> None:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        out.append({"check": name, "value": value, "limit": limit, "unit": unit, "pass": ok, "note": note,
                    "higher": higher_is_better})

    x = None if gw_best is None or not lt_best else gw_best / lt_best
    add("gateway saturation throughput / LiteLLM's (non-streamed)", x, 10, True, "x",
        f"gateway/nginx {ratio(gw_best, ng_best) or 'n/a'}")
    add("added latency, sequential p50", val(_added("c1", "p50"), "gateway"), 1, False, "ms")
    add("added latency, sequential p99", val(_added("c1", "p99"), "gateway"), 3, False, "ms")
    add("added p99 at 500 rps open loop", val(_added("open_500", "p99"), "gateway"), 5, False, "ms")
    add("streamed relay, SSE chunks/s (c16 x128)", val(_get("stream_c16", "chunks_per_s"), "gateway"), 50_000, True,
        "chunks/s")
    def of_chat(scenario: str, chat: str, metric: str) -> float | None:
        """Against the chat runs alternated with it (`paired_...`), else chat's own scenario (older results)."""
        mine = val(_get(scenario, metric), "gateway")
        theirs = val(_get("paired_" + chat, metric), "gateway") or val(_get(chat, metric), "gateway")
        return None if mine is None or not theirs else mine / theirs

    add("Responses / chat completions, non-streamed c64 rps", of_chat("responses_c64", "c64", "rps"), 0.9, True, "x")
    # A Responses stream has 8 lifecycle events around its deltas, chat's 2 (role, usage): answers/s too.
    add("Responses / chat completions, streamed c16 x128 chunks/s",
        of_chat("responses_stream_c16", "stream_c16", "chunks_per_s"), 0.9, True, "x",
        f"answers/s {of_chat('responses_stream_c16', 'stream_c16', 'rps') or 0:.2f}x")
    streams = (results.get("gateway", {}).get("streams") or {}).get("streams")
    add(f"gateway peak RSS with {streams or '?'} open streams", val(_get("streams", "peak_mb", False), "gateway"), 500,
        False, "MB", "" if streams in (None, 2000) else "fewer streams than the target's 2,000")
    return out


def render_checks(items: list[dict[str, Any]]) -> str:
    lines = []
    for c in items:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["pass"]]
        value = "-" if c["value"] is None else f"{c['value']:,.2f}"
        op = ">=" if c.get("higher", c["check"].startswith(("gateway saturation", "streamed"))) else "<="
        note = f"  ({c['note']})" if c["note"] else ""
        lines.append(f"{verdict}  {c['check']}: {value} {c['unit']} (target {op} {c['limit']:,g}){note}")
    return "\n".join(lines)


def render_real_engines(real: dict[str, Any]) -> str:
    """Real-engine TTFT direct vs through the gateway, one line per engine."""
    lines = []
    for engine, r in real.items():
        if "skipped" in r:
            lines.append(f"{engine}: skipped ({r['skipped']})")
            continue
        d, g = r.get("direct_ttft_p50_ms"), r.get("gateway_ttft_p50_ms")
        same = r.get("direct_same_body_ttft_p50_ms")
        base = same if same is not None else d
        added = None if base is None or g is None else g - base
        line = (f"{engine}: TTFT p50 direct {fmt(d, 2)} ms, through the gateway {fmt(g, 2)} ms, "
                f"added {fmt(added, 2)} ms")
        if same is not None:
            line += (f" (vs direct with the gateway's upstream body {r.get('upstream_additions')}: {fmt(same, 2)} ms;"
                     f" vs the plain direct request: {fmt(None if d is None or g is None else g - d, 2)} ms)")
        lines.append(line + f" ({r.get('requests', '?')} sequential streamed requests x {r.get('rounds', '?')} "
                     f"rounds, medians){' [errors]' if r.get('errors') else ''}")
    return "\n".join(lines)


LEGEND = (f"`{SATURATED_MARK}` the load generator reported itself saturated in at least one repeat (the number is "
          f"its ceiling, not the target's); `{ERROR_MARK}` some requests failed; `-` not measured or skipped; "
          "`<`/`>=` the sweep's first step already failed / no step failed. Medians of the repeats.")


def markdown_section(stamp: str, command: str, machine: dict[str, Any], rows: list[list[str]],
                     check_items: list[dict[str, Any]], real: dict[str, Any], results_file: str,
                     notes: list[str]) -> str:
    m = machine
    parts = [f"Generated by `{command}` at {stamp} (raw numbers: `{results_file}`).", "",
             f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, kernel "
             f"{m.get('kernel')}, Python {m.get('python')}, {m.get('nginx')}, LiteLLM {m.get('litellm')}, gateway "
             f"commit {m.get('gateway_commit')}. {m.get('pinning')}", "",
             render_markdown(rows), "", LEGEND, "", "Targets of the issue:", "", "```",
             render_checks(check_items), "```"]
    if real:
        parts += ["", "Real engines, added time to first token:", "", "```", render_real_engines(real), "```"]
    if notes:
        parts += ["", *(f"- {n}" for n in notes)]
    return "\n".join(parts)


def update_benchmarks_md(path: Path, section: str) -> None:
    """Replace what lies between the markers; create the file (title, markers, a heading) if missing."""
    if not path.exists():
        path.write_text("# Benchmarks\n\n" + BEGIN + "\n" + END + "\n\n## What mattered\n\n(to be written)\n")
    text = path.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n" + section.strip("\n") + "\n" + END + tail)
