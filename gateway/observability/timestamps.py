"""Wall-clock timestamps for audit and usage lines.

`datetime.now(timezone.utc).isoformat(timespec="milliseconds")` costs ~2.4 µs on this machine and every
request writes two such lines. The text changes once a millisecond and all but its last digits once a
second, so it is formatted at most once per millisecond (~0.2 µs a call). Same text as datetime's.
"""

from __future__ import annotations

import time

_millisecond = -1
_second = -1
_prefix = ""
_text = ""


def utc_now_iso() -> str:
    """Now, as `2026-12-02T09:13:05.123+00:00` (ISO 8601, UTC, milliseconds)."""
    global _millisecond, _second, _prefix, _text
    millisecond = int(time.time() * 1000)
    if millisecond != _millisecond:
        second, fraction = divmod(millisecond, 1000)
        if second != _second:
            _second, _prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _millisecond, _text = millisecond, "%s.%03d+00:00" % (_prefix, fraction)
    return _text
