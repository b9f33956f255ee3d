"""`python load_tests/gateway_before_ledger.py serve ...`: the gateway as it was before the usage ledger
(issue 20), for bench_usage.py's baseline only.

Every request still gets its usage record in the audit trail and its tokens in the metrics, as before the
database existed; only the ledger's row (made, queued, encoded, spooled and written to the database each
second) is left out. Issue 20's bound is on what the ledger adds, so this, not a gateway without any usage
record, is what the ledger is compared with. The product has no such switch: without its ledger the usage
API, the usage report and quota reloads would have nothing to read.
"""

import sys

from gateway.usage.record import UsageRecorder

_init = UsageRecorder.__init__


def _without_rows(self: UsageRecorder, lines, rows, metrics) -> None:  # type: ignore[no-untyped-def]
    _init(self, lines, None, metrics)


UsageRecorder.__init__ = _without_rows  # type: ignore[method-assign]

from gateway.cli import main  # noqa: E402

sys.exit(main())
