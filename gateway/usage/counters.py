"""Token and request counters in time buckets (1m, 1h, 1d) by tenant, key id, model and license.

Without Redis the counters live in this process (the usage API says `"counters": "process"`). With
`GATEWAY_REDIS_URL` each replica adds to a local batch on the request path (no I/O there) and flushes it
to Redis once a second in one pipeline, so every replica's counts add up (`"counters": "redis"`); the
usage API flushes its own replica's batch before it reads.

Redis layout: one hash per bucket,
  gw:use:<1m|1h|1d>:<bucket start, unix s>   fields  i|<key> o|<key> n|<key>   (input tokens, output
                                                     tokens, requests; <key> = JSON [tenant, key id,
                                                     model, license])
Keys are bounded by time: a bucket's key expires after its width's retention (RETENTION_S: minute buckets
26 h, hour buckets 8 days, day buckets 400 days), so at most ~1,560 + 192 + 400 keys exist; fields are
bounded by the configuration (tenants x keys x models seen in that bucket). In-process counters keep the
same retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson

log = logging.getLogger("gateway.usage")

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
RETENTION_S = {"1m": 26 * 3600, "1h": 8 * 86400, "1d": 400 * 86400}
FLUSH_INTERVAL_S = 1.0
_MAX_PENDING_BUCKETS = 10_000  # while Redis is down, a batch that can't be written stays this big at most

Key = tuple[str, str, str, str]  # tenant, key id, model, license
Buckets = dict[str, dict[int, dict[Key, list[int]]]]  # width -> bucket start -> key -> [in, out, requests]


def _empty() -> Buckets:
    return {width: {} for width in WIDTHS}


class UsageCounters:
    def __init__(self, redis_url: str | None = None, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.shared = bool(redis_url)
        self._counts = _empty()  # per process: the counters themselves; shared: the batch not yet flushed
        self._minute = -1  # the current minute's rows per key, so most adds are one dictionary lookup
        self._rows: dict[Key, tuple[list[int], list[int], list[int]]] = {}
        self._interval = flush_interval_s
        self._task: asyncio.Task | None = None
        self._redis = None
        if redis_url:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=2.0)

    def add(self, when: float, tenant: str, key_id: str, model: str, license_: str, inp: int, out: int) -> None:
        """On the request path: dictionary updates only."""
        key = (tenant, key_id, model, license_)
        minute = int(when // 60)
        if minute != self._minute:
            self._minute, self._rows = minute, {}
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = self._new_rows(when, key)
        for row in rows:
            row[0] += inp
            row[1] += out
            row[2] += 1
        if self.shared and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_loop())

    def _new_rows(self, when: float, key: Key) -> tuple[list[int], list[int], list[int]]:
        found = []
        for width, size in WIDTHS.items():
            start = int(when // size) * size
            buckets = self._counts[width]
            rows = buckets.get(start)
            if rows is None:
                rows = buckets[start] = {}
                if not self.shared:
                    self._prune(width, when)
            row = rows.get(key)
            if row is None:
                row = rows[key] = [0, 0, 0]
            found.append(row)
        return found[0], found[1], found[2]

    def _prune(self, width: str, now: float) -> None:
        cutoff = now - RETENTION_S[width]
        buckets = self._counts[width]
        for start in [s for s in buckets if s < cutoff]:
            del buckets[start]

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        if not self.shared or not any(self._counts.values()):
            return
        batch, self._counts, self._minute = self._counts, _empty(), -1  # the cached rows are in `batch` now
        pipe = self._redis.pipeline(transaction=False)
        for width, buckets in batch.items():
            for start, rows in buckets.items():
                name = f"gw:use:{width}:{start}"
                for key, (inp, out, n) in rows.items():
                    field = orjson.dumps(key).decode()
                    if inp:
                        pipe.hincrby(name, "i|" + field, inp)
                    if out:
                        pipe.hincrby(name, "o|" + field, out)
                    pipe.hincrby(name, "n|" + field, n)
                pipe.expire(name, RETENTION_S[width])
        try:
            await pipe.execute()
        except Exception as exc:  # Redis down: keep the batch for the next flush (bounded)
            log.warning("Usage counters not written to Redis (%s); retrying.", exc)
            self._minute = -1
            self._merge(batch)

    def _merge(self, batch: Buckets) -> None:
        for width, buckets in batch.items():
            mine = self._counts[width]
            if len(mine) + len(buckets) > _MAX_PENDING_BUCKETS:
                continue
            for start, rows in buckets.items():
                target = mine.setdefault(start, {})
                for key, values in rows.items():
                    row = target.setdefault(key, [0, 0, 0])
                    for i in range(3):
                        row[i] += values[i]

    async def read(self, width: str, starts: list[int]) -> dict[int, dict[Key, list[int]]]:
        """The counts of these buckets (all replicas' with Redis)."""
        if not self.shared:
            buckets = self._counts[width]
            return {s: buckets[s] for s in starts if s in buckets}
        await self.flush()
        pipe = self._redis.pipeline(transaction=False)
        for start in starts:
            pipe.hgetall(f"gw:use:{width}:{start}")
        out: dict[int, dict[Key, list[int]]] = {}
        for start, fields in zip(starts, await pipe.execute()):
            rows: dict[Key, list[int]] = {}
            for field, value in fields.items():
                kind, _, raw = field.decode().partition("|")
                try:
                    key = tuple(orjson.loads(raw))
                    index = "ion".index(kind)
                    count = int(value)
                except (ValueError, orjson.JSONDecodeError):
                    continue  # not ours: skip
                if len(key) == 4:
                    rows.setdefault(key, [0, 0, 0])[index] += count
            if rows:
                out[start] = rows
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self.flush()
            await self._redis.aclose()
