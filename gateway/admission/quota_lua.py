"""Lua shared by the quota scripts (quota_redis.py) and the rate limiter's admit/finish scripts, so that a
tenant's rate limits and quotas are checked in one round trip. Needs ratelimit_redis._LUA_HELPERS first."""

PERIODS_LUA = """
-- Redis' TIME in ms, its UTC day number and month number (year*12 + month-1; civil_from_days, H. Hinnant),
-- and the tokens the quota hash holds for those periods (0 for a period that ended).
local function quota_periods(qkey)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local day = math.floor(tonumber(t[1]) / 86400)
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local mon = (mp < 10) and (mp + 3) or (mp - 9)
  local year = yoe + era * 400
  if mon <= 2 then year = year + 1 end
  local month = year * 12 + mon - 1
  expect(qkey, 'hash')
  local h = redis.call('HMGET', qkey, 'd', 'du', 'm', 'mu')
  local du, mu = 0, 0
  if count(h[1]) == day then du = count(h[2]) or 0 end
  if count(h[3]) == month then mu = count(h[4]) or 0 end
  return now, day, month, du, mu
end
-- 0 when `reserve` fits both quotas (-1 = none), else 1 (the day's) or 2 (the month's).
local function quota_check(pd, pm, du, mu, reserve)
  if pd >= 0 and du + reserve > pd then return 1 end
  if pm >= 0 and mu + reserve > pm then return 2 end
  return 0
end
-- Record the counts after a reservation; the key outlives a month.
local function quota_reserve(qkey, day, month, du, mu, ttl)
  redis.call('HSET', qkey, 'd', fmt(day), 'du', fmt(du), 'm', fmt(month), 'mu', fmt(mu))
  redis.call('EXPIRE', qkey, ttl)
end
-- Swap a reservation for the actual count, in the periods it was made in (an ended period keeps it).
local function quota_reconcile(qkey, day, month, reserved, actual)
  expect(qkey, 'hash')
  local h = redis.call('HMGET', qkey, 'd', 'du', 'm', 'mu')
  if count(h[1]) == day then
    redis.call('HSET', qkey, 'du', fmt(math.max(0, (count(h[2]) or 0) + actual - reserved)))
  end
  if count(h[3]) == month then
    redis.call('HSET', qkey, 'mu', fmt(math.max(0, (count(h[4]) or 0) + actual - reserved)))
  end
end
"""
