"""The Redis rate limiter's two Lua scripts (admit, finish), with the quota checks of gateway.usage inside
them: one round trip per admission and one per finish. See gateway.admission.ratelimit_redis for the keys."""

from __future__ import annotations

from gateway.admission.quota_lua import PERIODS_LUA

# Shared by both scripts. Nothing in a tenant's keys is trusted: whatever wrote them (an older gateway, a
# person with redis-cli, a bug), a value that doesn't parse is repaired or dropped, never an error, because a
# script that errors fails every later call on those keys.
LUA_HELPERS = """
-- A token count: a finite number >= 0, floored; nil for anything else (garbage, nan, inf, a missing value).
local function count(s)
  local n = tonumber(s)
  if n == nil or n ~= n or n < 0 or n == math.huge then return nil end
  return math.floor(n) + 0
end
-- The tokens of a reservation "<id>:<tokens>" (the text after its last colon); nil if it doesn't parse.
local function amount(m) return count(string.match(m, ':([^:]*)$')) end
-- Whole numbers as digits, never "1e+15" or "100.0", so finish can rebuild a member byte for byte.
local function fmt(n) return string.format('%.0f', n) end
-- A key of the wrong type fails every command on it: drop it (it holds nothing this script wrote).
local function expect(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then redis.call('DEL', key) return 1 end
  return 0
end
-- The exact sum of a token log, removing members that don't parse. Bounded: past `limit` members the log
-- is dropped instead (the tenant's TPM window restarts empty), so a repair can't stall Redis for everyone.
local function recount(key, limit)
  if redis.call('ZCARD', key) > limit then redis.call('DEL', key) return 0 end
  local total = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    local a = amount(m)
    if a then total = total + a else redis.call('ZREM', key, m) end
  end
  return total
end
"""

# KEYS: req, tok, toksum, inf[, quota, open quota reservations].  ARGV: rpm, tpm, max_concurrent (-1 = unlimited),
# reserve, id, window_ms, stale_ms, walk_cap, recount_cap[, tokens_per_day, tokens_per_month (-1 = none), quota
# ttl_s, open reservation ttl_ms, reseed (1: report a missing quota hash instead of counting from zero)].
# A missing quota hash (Redis restarted empty, or failed over to a fresh replica; or the tenant's first
# admission in 32 days) is answered with quota_which 3 before anything is read or written: the gateway
# reloads the tenant's use from the ledger (QUOTA_SEED_LUA) and admits again.  Returns
# {admitted, requests, tokens, inflight, wait_req, wait_tok, wait_conc, too_large, reset_req, reset_tok,
# repaired, quota_which, quota_now_ms, day, month, day_used, month_used, quota_epoch}; waits in ms, -1 where that limit
# doesn't block; repaired > 0 when malformed state was found (and fixed); quota_which 0 = the quotas (if
# any: gateway/admission/quota.py) admit it, 1/2 = the daily/monthly quota refuses it.
ADMIT_LUA = LUA_HELPERS + PERIODS_LUA + """
if #KEYS >= 5 and ARGV[14] == '1' and redis.call('EXISTS', KEYS[5]) == 0 then
  return {0, 0, 0, 0, -1, -1, -1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0}
end
local rpm, tpm, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserve, id = count(ARGV[4]) or 0, ARGV[5]
local window, stale, cap, recount_cap = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - window
-- Every score is a TIME this script read; one more than a window ahead is damage (or a big clock step back).
local future = '(' .. fmt(now + window)
local repaired = expect(KEYS[1], 'zset') + expect(KEYS[2], 'zset') + expect(KEYS[3], 'string')
repaired = repaired + expect(KEYS[4], 'zset')

-- Prune what left the window. Only the expired head is read, so this is amortised O(1).
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
redis.call('ZREMRANGEBYSCORE', KEYS[1], future, '+inf')
local total = count(redis.call('GET', KEYS[3]))
local dirty = total == nil  -- the running sum is missing or not a number: recount it below
local function drop(lo, hi)  -- remove a score range of the token log, taking its amounts off the sum
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], lo, hi)
  for _, m in ipairs(gone) do
    local a = amount(m)
    if a == nil then dirty = true elseif total then total = total - a end
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], lo, hi) end
end
drop('-inf', cutoff)
drop(future, '+inf')
if redis.call('ZCARD', KEYS[2]) == 0 then
  total = 0  -- self-heal: an empty log sums to zero
elseif dirty or total < 0 then
  total = recount(KEYS[2], recount_cap)
  repaired = repaired + 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - stale)
redis.call('ZREMRANGEBYSCORE', KEYS[4], future, '+inf')
local nreq, ninf = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[4])

local wait_req, wait_tok, wait_conc, too_large = -1, -1, -1, 0
if rpm >= 0 and nreq >= rpm then
  -- Admitting needs nreq - rpm + 1 entries to expire; the last of them has rank nreq - rpm.
  local e = redis.call('ZRANGE', KEYS[1], nreq - rpm, nreq - rpm, 'WITHSCORES')
  if #e > 0 then wait_req = tonumber(e[2]) + window - now else wait_req = window end
end
if tpm >= 0 and total + reserve > tpm then
  if reserve > tpm then
    too_large, wait_tok = 1, window
  else
    -- Walk the oldest reservations (bounded) until enough tokens would have freed up.
    local need, freed = total + reserve - tpm, 0
    local e = redis.call('ZRANGE', KEYS[2], 0, cap - 1, 'WITHSCORES')
    for i = 1, #e, 2 do
      local a = amount(e[i])
      if a == nil then  -- counted as 0 tokens, as when it expires; removed now
        redis.call('ZREM', KEYS[2], e[i])
        repaired = repaired + 1
      else
        freed = freed + a
        if freed >= need then wait_tok = tonumber(e[i + 1]) + window - now break end
      end
    end
    if wait_tok < 0 then  -- past the cap: answer when the whole window has emptied (later, so safe)
      local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
      if #last > 0 then wait_tok = tonumber(last[2]) + window - now else wait_tok = window end
    end
  end
end
if maxc >= 0 and ninf >= maxc then wait_conc = 1000 end
local qwhich, qnow, qday, qmonth, qdu, qmu = 0, 0, 0, 0, 0, 0
if #KEYS >= 5 then
  qnow, qday, qmonth, qdu, qmu = quota_periods(KEYS[5])
  qwhich = quota_check(tonumber(ARGV[10]), tonumber(ARGV[11]), qdu, qmu, reserve)
  -- Open quota reservations: finish reconciles only one it finds here, so the undo of an admission whose
  -- reply was lost (a timeout) can never take back tokens that were not reserved.
  expect(KEYS[6], 'zset')
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[13]))
end
local admitted = 0
if qwhich == 0 and wait_req < 0 and wait_tok < 0 and wait_conc < 0 then
  admitted = 1
  if #KEYS >= 5 then
    qdu, qmu = qdu + reserve, qmu + reserve
    quota_reserve(KEYS[5], qday, qmonth, qdu, qmu, tonumber(ARGV[12]))
    redis.call('ZADD', KEYS[6], now, id)
    redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[13]))
  end
  if rpm >= 0 then
    redis.call('ZADD', KEYS[1], now, id)
    nreq = nreq + 1
  end
  if tpm >= 0 then
    redis.call('ZADD', KEYS[2], now, id .. ':' .. fmt(reserve))  -- finish rebuilds the same digits
    total = total + reserve
  end
  if maxc >= 0 then
    redis.call('ZADD', KEYS[4], now, id)
    ninf = ninf + 1
  end
end
-- The token sum is written with the same TTL as its log, so neither outlives the other.
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], fmt(total), 'PX', window)
  redis.call('PEXPIRE', KEYS[2], window)
else
  redis.call('DEL', KEYS[3])
end
if admitted == 1 then
  if rpm >= 0 then redis.call('PEXPIRE', KEYS[1], window) end
  if maxc >= 0 then redis.call('PEXPIRE', KEYS[4], stale) end
end
local reset_req, reset_tok = 0, 0
local lr = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if #lr > 0 then reset_req = tonumber(lr[2]) + window - now end
local lt = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if #lt > 0 then reset_tok = tonumber(lt[2]) + window - now end
local qepoch = ''
if #KEYS >= 5 then qepoch = redis.call('HGET', KEYS[5], 'e') or '' end
return {admitted, nreq, total, ninf, wait_req, wait_tok, wait_conc, too_large, reset_req, reset_tok, repaired,
        qwhich, qnow, qday, qmonth, qdu, qmu, qepoch}
"""

# KEYS: tok, toksum, inf[, quota, open quota reservations].  ARGV: id, reserved, actual (-1 = keep the
# reservation), window_ms, recount_cap[, day, month of the admission].  Swaps the reservation's amount for the actual usage, keeping
# its timestamp (and in the quota's periods), and frees the slot.
FINISH_LUA = LUA_HELPERS + PERIODS_LUA + """
local id, window, recount_cap = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5])
local reserved, actual = count(ARGV[2]) or 0, count(ARGV[3])  -- actual nil: keep the reservation
expect(KEYS[1], 'zset')
expect(KEYS[2], 'string')
expect(KEYS[3], 'zset')
redis.call('ZREM', KEYS[3], id)
if actual then
  local member = id .. ':' .. fmt(reserved)
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score then  -- absent: it already left the window, nothing to reconcile
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[1], score, id .. ':' .. fmt(actual))
    local total = count(redis.call('GET', KEYS[2]))
    if total then total = total + actual - reserved end
    if total == nil or total < 0 then total = recount(KEYS[1], recount_cap) end
    redis.call('SET', KEYS[2], fmt(total), 'PX', window)
    redis.call('PEXPIRE', KEYS[1], window)
  end
end
if actual and #KEYS >= 4 then
  expect(KEYS[5], 'zset')
  if redis.call('ZREM', KEYS[5], id) == 1 then  -- absent: never reserved, or reconciled already
    quota_reconcile(KEYS[4], count(ARGV[6]), count(ARGV[7]), reserved, actual)
  end
end
return 1
"""

# KEYS: quota.  ARGV: day, month, day tokens, month tokens (deltas, may be < 0), day baseline, month baseline,
# ttl_s, missing (1: leave a missing hash alone), epoch (the hash's `e` when the replica last saw it).  Adds what a replica counted during a Redis outage to the
# periods it was spent in, and returns 1. A hash that is missing (Redis lost it) is, with `missing` 1, not
# written (returns 2): the gateway reseeds it from the ledger, which already holds what was spent. A period the hash does not hold yet (no admission there since)
# starts from the baseline: the total the replica last saw in Redis for that period. A hash already on a
# later period keeps it.
QUOTA_WRITE_BACK_LUA = LUA_HELPERS + """
expect(KEYS[1], 'hash')
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return 2 end
local day, month = count(ARGV[1]), count(ARGV[2])
local dd, dm = tonumber(ARGV[3]) or 0, tonumber(ARGV[4]) or 0
local bd, bm = count(ARGV[5]) or 0, count(ARGV[6]) or 0
local h = redis.call('HMGET', KEYS[1], 'd', 'du', 'm', 'mu', 'e')
local hd, hm = count(h[1]), count(h[3])
-- Reseeded from the ledger since this replica last saw the hash (another epoch): the seed holds what the
-- ledger had of the outage's spend, so the replica's total is merged (the larger), not added again.
local merge = (h[5] or '') ~= (ARGV[9] or '')
local function after(current, baseline, delta)
  if merge then return math.max(current, baseline + delta) end
  return current + delta
end
if hd == day then
  redis.call('HSET', KEYS[1], 'du', fmt(math.max(0, after(count(h[2]) or 0, bd, dd))))
elseif hd == nil or hd < day then
  redis.call('HSET', KEYS[1], 'd', fmt(day), 'du', fmt(math.max(0, bd + dd)))
end
if hm == month then
  redis.call('HSET', KEYS[1], 'mu', fmt(math.max(0, after(count(h[4]) or 0, bm, dm))))
elseif hm == nil or hm < month then
  redis.call('HSET', KEYS[1], 'm', fmt(month), 'mu', fmt(math.max(0, bm + dm)))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[7]))
return 1
"""

# KEYS: quota.  ARGV: day, day tokens, month, month tokens (from the ledger and this replica's own count), ttl_s,
# epoch (a random id, the hash's `e`: replicas that saw the hash before the seed merge their outage spend).
# Set if absent: a hash that exists (another replica seeded it first, or an admission made it) is left as it
# is, so two replicas reseeding at once never count a tenant's use twice. Periods are Redis' own: a seed for
# a day or month that is not Redis' current one counts nothing.
QUOTA_SEED_LUA = LUA_HELPERS + PERIODS_LUA + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local now, day, month = quota_periods(KEYS[1])
local du, mu = 0, 0
if count(ARGV[1]) == day then du = count(ARGV[2]) or 0 end
if count(ARGV[3]) == month then mu = count(ARGV[4]) or 0 end
quota_reserve(KEYS[1], day, month, du, mu, tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'e', ARGV[6])
return 1
"""
