"""Token and request counters in time buckets (1m, 1h, 1d) by tenant, key id, model and license.

Without Redis the counters live in this process (the usage API says `"counters": "process"`). With
`GATEWAY_REDIS_URL` each replica adds to a local batch on the request path (no I/O there) and flushes it
to Redis once a second in one script, so every replica's counts add up (`"counters": "redis"`); the
usage API flushes its own replica's batch before it reads.

Redis layout: one hash per bucket,
  gw:use:<1m|1h|1d>:<bucket start, unix s>   fields  i|<key> o|<key> n|<key>   (input tokens, output
                                                     tokens, requests; <key> = JSON [tenant, key id,
                                                     model, license])
  gw:use:batch:<replica>                     string  the number of the last batch of that replica
                                                     (a random id per process) applied; kept 7 days
Keys are bounded by time: a bucket's key expires after its width's retention (RETENTION_S: minute buckets
26 h, hour buckets 8 days, day buckets 400 days), so at most ~1,560 + 192 + 400 keys exist, plus one
batch key per replica process of the last 7 days; fields are bounded by the configuration (tenants x keys
x models seen in that bucket). In-process counters, and a batch waiting for Redis, keep the same retention.

Every batch is applied exactly once. A flush that failed, timed out or was cancelled (every shutdown
cancels the flush loop) keeps its batch and sends it again, with the same number, before anything newer:
the script applies a batch only if its number is above the replica's last one (checked and written in the
same script, atomically), so a batch whose reply was lost after Redis applied it is not counted twice, and
one that never arrived is not lost. Flushes of one replica run one at a time, so numbers arrive in order.

The usage API reads a page of buckets in one script too (READ_PAGE_LUA): Redis sizes the buckets, and the
replica parses only those that fit the page's bound (parsing is what costs here: ~10-20 us a field in
redis-py). Both scripts name keys of many buckets, so they need one Redis, not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import orjson

log = logging.getLogger("gateway.usage")

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
RETENTION_S = {"1m": 26 * 3600, "1h": 8 * 86400, "1d": 400 * 86400}
FLUSH_INTERVAL_S = 1.0
BATCH_MARK_TTL_S = 7 * 86400  # a batch in doubt for longer than this (a week without Redis) may count twice

Key = tuple[str, str, str, str]  # tenant, key id, model, license
Buckets = dict[str, dict[int, dict[Key, list[int]]]]  # width -> bucket start -> key -> [in, out, requests]

# KEYS[1]: the replica's batch mark; KEYS[2..]: bucket hashes. ARGV: batch number, mark TTL, then per
# bucket hash: its TTL, its field count, and that many (field, increment) pairs.
APPLY_BATCH_LUA = """
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if seq <= last then return 0 end
local a = 3
for k = 2, #KEYS do
  local ttl, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIRE', KEYS[k], ttl)
end
redis.call('SET', KEYS[1], seq, 'EX', ARGV[2])
return 1
"""


# KEYS: bucket hashes, oldest first; ARGV[1]: entries to read at most (a bucket costs its fields + 1; the
# first bucket is read whatever it holds). Returns the number of buckets covered, then (index, HGETALL) of
# each non-empty one: the buckets are sized in Redis (HLEN is O(1)), so the replica parses only what fits.
READ_PAGE_LUA = """
local budget = tonumber(ARGV[1])
local spent, out = 0, {0}
for i, key in ipairs(KEYS) do
  local n = redis.call('HLEN', key)
  spent = spent + n + 1
  if spent > budget and i > 1 then break end
  out[1] = i
  if n > 0 then
    out[#out + 1] = i
    out[#out + 1] = redis.call('HGETALL', key)
  end
end
return out
"""


def _empty() -> Buckets:
    return {width: {} for width in WIDTHS}


class UsageCounters:
    def __init__(self, redis_url: str | None = None, flush_interval_s: float = FLUSH_INTERVAL_S,
                 timeout_s: float = 2.0) -> None:
        self.shared = bool(redis_url)
        self._counts = _empty()  # per process: the counters themselves; shared: the batch not yet flushed
        self._minute = -1  # the current minute's rows per key, so most adds are one dictionary lookup
        self._rows: dict[Key, tuple[list[int], list[int], list[int]]] = {}
        self._interval = flush_interval_s
        self._task: asyncio.Task | None = None
        self._redis = None
        self._replica = os.urandom(8).hex()
        self._sequence = 0
        self._unconfirmed: tuple[int, Buckets] | None = None  # sent (maybe) but not acknowledged
        self._flushing = asyncio.Lock()
        if redis_url:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries inside redis-py (its default is 10, with backoff): the flush loop sends the batch
            # again a second later, and a flush must not hold the usage API's reads for tens of seconds.
            self._redis = Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=timeout_s,
                                         retry=Retry(NoBackoff(), 0))
            self._apply = self._redis.register_script(APPLY_BATCH_LUA)
            self._read_page = self._redis.register_script(READ_PAGE_LUA)

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
                _prune(buckets, width, when)  # a batch waiting for Redis stays as bounded as the counters
            row = rows.get(key)
            if row is None:
                row = rows[key] = [0, 0, 0]
            found.append(row)
        return found[0], found[1], found[2]

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        """Write what this replica counted to Redis. A batch not acknowledged stays, and is sent again
        (same number) by the next flush before anything newer; cancelling a flush loses nothing."""
        if not self.shared:
            return
        async with self._flushing:
            while True:
                if self._unconfirmed is None:
                    if not any(self._counts.values()):
                        return
                    self._sequence += 1
                    self._unconfirmed = (self._sequence, self._counts)
                    self._counts, self._minute = _empty(), -1  # the cached rows are in the batch now
                sequence, batch = self._unconfirmed
                try:
                    await self._send(sequence, batch)
                except Exception as exc:  # Redis down or slow: the batch waits for the next flush
                    log.warning("Usage counters not written to Redis (%s: %s); retrying.", type(exc).__name__, exc)
                    return
                # (cancelled: CancelledError leaves the batch unconfirmed, for the flush at close)
                self._unconfirmed = None

    async def _send(self, sequence: int, batch: Buckets) -> None:
        keys = [f"gw:use:batch:{self._replica}"]
        args: list[object] = [sequence, BATCH_MARK_TTL_S]
        now = time.time()
        for width, buckets in batch.items():
            for start, rows in buckets.items():
                if start + RETENTION_S[width] < now:
                    continue  # expired in Redis already: writing it would bring it back
                pairs: list[object] = []
                for key, (inp, out, n) in rows.items():
                    field = orjson.dumps(key).decode()
                    if inp:
                        pairs += ("i|" + field, inp)
                    if out:
                        pairs += ("o|" + field, out)
                    pairs += ("n|" + field, n)
                keys.append(f"gw:use:{width}:{start}")
                args += (RETENTION_S[width], len(pairs) // 2, *pairs)
        await self._apply(keys=keys, args=args)

    async def read(self, width: str, starts: list[int]) -> dict[int, dict[Key, list[int]]]:
        """The counts of these buckets (all replicas' with Redis)."""
        counts, _ = await self.read_page(width, starts, None)
        return counts

    async def read_page(self, width: str, starts: list[int],
                        max_entries: int | None) -> tuple[dict[int, dict[Key, list[int]]], int]:
        """The counts of the first buckets of `starts` whose entries (Redis hash fields, or rows in
        this process), one more per bucket, add up to at most `max_entries` (always at least one
        bucket); and how many buckets that is. The usage API pages on, so one call's work is bounded."""
        if not self.shared:
            buckets = self._counts[width]
            taken = _fitting([len(buckets.get(s, ())) for s in starts], max_entries)
            return {s: buckets[s] for s in starts[:taken] if s in buckets}, taken
        await self.flush()
        if not starts:
            return {}, 0
        reply = await self._read_page(keys=[f"gw:use:{width}:{start}" for start in starts],
                                      args=[max_entries if max_entries is not None else 2**53])
        out: dict[int, dict[Key, list[int]]] = {}
        for i in range(1, len(reply), 2):
            fields = reply[i + 1]
            rows: dict[Key, list[int]] = {}
            for j in range(0, len(fields), 2):
                kind, _, raw = fields[j].decode().partition("|")
                try:
                    key = tuple(orjson.loads(raw))
                    index = "ion".index(kind)
                    count = int(fields[j + 1])
                except (ValueError, orjson.JSONDecodeError):
                    continue  # not ours: skip
                if len(key) == 4:
                    rows.setdefault(key, [0, 0, 0])[index] += count
            if rows:
                out[starts[reply[i] - 1]] = rows
        return out, reply[0]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()  # a flush it was in keeps its batch for the flush below
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._redis is not None:
            await self.flush()
            await self._redis.aclose()


def _prune(buckets: dict[int, dict], width: str, now: float) -> None:
    cutoff = now - RETENTION_S[width]
    for start in [s for s in buckets if s < cutoff]:
        del buckets[start]


def _fitting(sizes: list[int], max_entries: int | None) -> int:
    """How many of the first buckets fit in `max_entries` (each costs its size + 1); at least one."""
    if max_entries is None:
        return len(sizes)
    spent = 0
    for taken, size in enumerate(sizes):
        spent += size + 1
        if spent > max_entries and taken:
            return taken
    return len(sizes)
