"""Jinja filters: how numbers, times and durations read on a console page."""

from __future__ import annotations

from datetime import datetime, timezone


def number(value: object) -> str:
    """12,345 (thousands separated); an absent value is an en dash."""
    if value is None or value == "":
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}" if isinstance(value, (int, float)) else str(value)


def utc(value: object, with_seconds: bool = False) -> str:
    """Unix seconds (or an ISO string) as `2024-05-01 13:05 UTC`."""
    if value is None or value == "":
        return "–"
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    else:
        moment = datetime.fromtimestamp(float(value), timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if with_seconds else "%Y-%m-%d %H:%M UTC")


def percent(used: int, limit: int | None) -> int:
    if not limit:
        return 0
    return min(100, round(100 * used / limit))


def duration(seconds: object) -> str:
    if seconds is None:
        return "–"
    s = int(float(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if s >= size:
            return f"{s / size:.0f} {unit}"
    return f"{s} s"


FILTERS = {"number": number, "utc": utc, "percent": percent, "duration": duration}
