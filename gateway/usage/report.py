"""`gateway usage report`: usage by tenant x license x model from one or many audit files (one per replica),
for a period, as a table, CSV or JSON, with a "conditional licenses in production" section: which
production tenants used a model whose license is conditional (Llama 2, Falcon-180B), with which
attestations. Only `"type": "usage"` lines count; decision lines are skipped. A corrupt or truncated line
is reported as `file:line: reason` on stderr and skipped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

_FIELDS = ("tenant", "license", "commercial_use", "model", "requests", "errors", "prompt_tokens",
           "completion_tokens", "total_tokens", "gateway_counted")


def parse_time(text: str) -> datetime:
    """Unix seconds, or an ISO date/time (UTC when it names no offset)."""
    try:
        return datetime.fromtimestamp(float(text), timezone.utc)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass
class Report:
    rows: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    conditional: dict[tuple[str, str], dict] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    records: int = 0


def build(paths: Iterable[Path], since: datetime | None = None, until: datetime | None = None) -> Report:
    report = Report()
    for path in paths:
        try:
            handle = open(path, "rb")
        except OSError as exc:
            report.problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        with handle:
            for number, raw in enumerate(handle, 1):
                _line(report, f"{path}:{number}", raw, since, until)
    return report


def _line(report: Report, where: str, raw: bytes, since: datetime | None, until: datetime | None) -> None:
    if not raw.strip():
        return
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.get("type") != "usage":
            return
        moment = parse_time(record["time"])
        key = (str(record["tenant"]), str(record["license"]), str(record["model_served"]))
        prompt, completion = int(record["prompt_tokens"]), int(record["completion_tokens"])
        status = int(record["status"])
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        reason = "truncated or not JSON" if isinstance(exc, json.JSONDecodeError) else f"bad usage record ({exc})"
        report.problems.append(f"{where}: {reason}; skipped")
        return
    if (since and moment < since) or (until and moment >= until):
        return
    report.records += 1
    row = report.rows.setdefault(key, {"tenant": key[0], "license": key[1], "model": key[2],
                                       "commercial_use": record.get("commercial_use", "unknown"), "requests": 0,
                                       "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                       "total_tokens": 0, "gateway_counted": 0})
    row["requests"] += 1
    row["errors"] += status >= 400
    row["prompt_tokens"] += prompt
    row["completion_tokens"] += completion
    row["total_tokens"] += prompt + completion
    # Tokens the gateway counted or estimated; "none" (no answer, e.g. a 503) has no tokens to count.
    row["gateway_counted"] += record.get("usage_source") in ("gateway", "gateway_estimate")
    if record.get("commercial_use") == "conditional" and record.get("environment") == "production":
        entry = report.conditional.setdefault(key[:2], {"tenant": key[0], "license": key[1], "models": set(),
                                                        "attestations": set(), "requests": 0, "total_tokens": 0})
        entry["models"].add(key[2])
        entry["attestations"].update(record.get("attestations") or ())
        entry["requests"] += 1
        entry["total_tokens"] += prompt + completion


def _conditional(report: Report) -> list[dict]:
    return [{**e, "models": sorted(e["models"]), "attestations": sorted(e["attestations"])}
            for _, e in sorted(report.conditional.items())]


def render(report: Report, fmt: str) -> str:
    rows = [row for _, row in sorted(report.rows.items())]
    if fmt == "json":
        return json.dumps({"usage": rows, "conditional_licenses_in_production": _conditional(report),
                           "records": report.records, "skipped_lines": report.problems}, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    table = [tuple(_FIELDS)] + [tuple(str(row[f]) for f in _FIELDS) for row in rows]
    text = _table(table) if rows else "no usage records in this period"
    cond = _conditional(report)
    text += "\n\nConditional licenses in production:\n"
    if not cond:
        return text + "  none"
    lines = [("tenant", "license", "models", "attestations", "requests", "total_tokens")]
    lines += [(c["tenant"], c["license"], ", ".join(c["models"]), ", ".join(c["attestations"]) or "NONE",
               str(c["requests"]), str(c["total_tokens"])) for c in cond]
    return text + _table(lines)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
