"""A process that uses the store, for tests that must kill or race one:

  python -m tests.support.store_worker migrate URL DATA_DIR [BARRIER_DIR N]
      apply the migrations, print the revisions before and after; with a barrier, only once N processes
      have reached it (so that they really start at once)
  python -m tests.support.store_worker write URL DATA_DIR INTERVAL_S ROWS_PER_S
      record ledger rows with request ids 0, 1, ... (32 hex digits) at that rate, printing "recorded N" after each (flushed),
      until SIGTERM (then close the ledger and print "closed N") or SIGKILL
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from gateway.store import migrate
from gateway.store.database import Database
from gateway.store.ledger import Ledger
from tests.support.store_fixtures import row


async def _migrate(url: str, data_dir: Path, barrier: Path | None, parties: int) -> None:
    db = Database.from_settings(url, data_dir)
    if barrier is not None:
        barrier.mkdir(parents=True, exist_ok=True)
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < parties:
            await asyncio.sleep(0.005)
    before, after = await migrate.upgrade(db)
    print(f"migrated {before} {after}", flush=True)
    await db.dispose()


async def _write(url: str, data_dir: Path, interval_s: float, rate: float) -> None:
    db = Database.from_settings(url, data_dir)
    ledger = Ledger(db, data_dir / "spool" / "ledger", interval_s=interval_s)
    await ledger.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("started", flush=True)
    count, began = 0, time.monotonic()
    while not stop.is_set():
        ledger.record(row(count))
        count += 1
        print(f"recorded {count}", flush=True)
        delay = began + count / rate - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
    await ledger.close(timeout=10)
    await db.dispose()
    print(f"closed {count}", flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "migrate":
        barrier = Path(argv[3]) if len(argv) > 3 else None
        asyncio.run(_migrate(argv[1], Path(argv[2]), barrier, int(argv[4]) if barrier else 0))
    elif argv[0] == "write":
        asyncio.run(_write(argv[1], Path(argv[2]), float(argv[3]), float(argv[4])))
    else:
        raise SystemExit(f"unknown command {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
