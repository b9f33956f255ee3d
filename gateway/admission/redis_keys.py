"""Where admission keeps a tenant's state in Redis: the key layout shared by the rate limiter
(gateway/admission/ratelimit_redis.py) and the token quotas (gateway/admission/quota_redis.py).

Keys, per tenant (the braces are a Redis Cluster hash tag: one tenant's keys share a slot, as a script needs):
  gw:rl:{t}:req    ZSET  member=admission id,            score=ms  (sliding request log)
  gw:rl:{t}:tok    ZSET  member="<id>:<reserved tokens>", score=ms  (token reservations)
  gw:rl:{t}:toksum STR   running sum of the reservations in :tok   (the TPM check is O(1), no scan)
  gw:rl:{t}:inf    ZSET  member=admission id,            score=ms  (in flight; stale after 15 min)
  gw:rl:{t}:quota  HASH  the token quota's periods and counts (gateway/admission/quota.py)
  gw:rl:{t}:qres   ZSET  member=admission id,            score=ms  (open quota reservations: a finish
                                                                    reconciles only one it finds; 2 h)
Expired entries are pruned with ZRANGEBYSCORE/ZREMRANGEBYSCORE from the old end: each entry is removed once,
amortised O(1) per request. Every key carries a TTL, so an idle tenant's keys vanish.

Tenants are isolated. No key is shared between tenants, and tenant_prefix() is injective whatever the name
(braces, colons and '%' are percent-escaped, so no name can close the hash tag early or spell another
tenant's keys). tenants.py's name pattern is not relied on.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]")


def tenant_prefix(tenant: str) -> str:
    """The prefix of a tenant's keys, "gw:rl:{<name>}". Injective: different names never share a key.

    Every character outside [A-Za-z0-9._@-] is percent-escaped, '%' itself included. So the escaped name has
    no braces (the hash tag ends exactly at our '}', and one tenant's keys share one Cluster slot) and no
    colons (no name can spell another tenant's ":req"). The empty name is refused: "{}" is not a hash tag.
    """
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"a rate-limited tenant needs a non-empty name, not {tenant!r}")
    safe = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), tenant)
    return f"gw:rl:{{{safe}}}"
