"""Per-tenant token-bucket rate limits and daily request quotas, kept in Redis so every gateway replica
shares them. One script call refills, takes, and counts against the quota atomically.

To keep Redis off the hot path, a replica claims tokens in blocks (a lease of up to 1/20 of the burst,
or 50 ms worth of the rate) and spends them locally; an unused lease lapses after half a second. So a
tenant is never admitted above its limit, may be admitted slightly below it, and the daily quota counts
claimed tokens. Small limits (burst < 20) take one token per call, exactly."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import redis

from margin.common.errors import ResourceExhausted, Unavailable

# KEYS: bucket, quota counter. ARGV: rate/s, burst, now ms, cost, daily quota (0 = none), quota ttl s.
_TAKE = """
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local rate, burst, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local quota = tonumber(ARGV[5])
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
if tokens < cost then
  return {0, math.ceil((cost - tokens) * 1000 / rate)}
end
if quota > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + cost > quota then
    return {2, redis.call('TTL', KEYS[2]) * 1000}
  end
  redis.call('INCRBY', KEYS[2], cost)
  if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6])) end
end
redis.call('HSET', KEYS[1], 't', tostring(tokens - cost), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {1, 0}
"""


@dataclass(frozen=True)
class Limits:
    requests_per_second: float = 1000.0
    burst: int = 2000
    daily_quota: int = 0  # requests per UTC day; 0 = unlimited


class RateLimiter:
    def __init__(self, client: redis.Redis, default: Limits | None = None, prefix: str = "margin"):
        self._redis = client
        self._default = default or Limits()
        self._prefix = prefix
        self._take = client.register_script(_TAKE)
        self._limits: dict[int, tuple[float, Limits]] = {}
        self._leases: dict[int, tuple[float, float]] = {}  # tenant -> (tokens left, lapses at)
        self._lease_lock = threading.Lock()

    def set_limits(self, tenant_id: int, limits: Limits) -> None:
        if limits.requests_per_second <= 0 or limits.burst < 1 or limits.daily_quota < 0:
            raise ValueError("rate must be > 0, burst >= 1, quota >= 0")
        self._redis.hset(f"{self._prefix}:limits:{tenant_id}", mapping={
            "rps": limits.requests_per_second, "burst": limits.burst, "quota": limits.daily_quota})
        self._limits.pop(tenant_id, None)

    def limits(self, tenant_id: int) -> Limits:
        cached = self._limits.get(tenant_id)
        if cached and time.monotonic() - cached[0] < 5.0:
            return cached[1]
        raw = self._redis.hgetall(f"{self._prefix}:limits:{tenant_id}")
        limits = (Limits(float(raw[b"rps"]), int(raw[b"burst"]), int(raw[b"quota"])) if raw else self._default)
        self._limits[tenant_id] = (time.monotonic(), limits)
        return limits

    LEASE_S = 0.5

    @staticmethod
    def block_size(limits: Limits) -> int:
        return int(min(limits.burst // 20, limits.requests_per_second * 0.05))

    def take(self, tenant_id: int, cost: int = 1) -> None:
        """Spend ``cost`` requests of the tenant's allowance, or raise RESOURCE_EXHAUSTED with a retry hint."""
        now = time.monotonic()
        with self._lease_lock:
            tokens, lapses = self._leases.get(tenant_id, (0.0, 0.0))
            if now < lapses and tokens >= cost:
                self._leases[tenant_id] = (tokens - cost, lapses)
                return
        block = self.block_size(self.limits(tenant_id))
        if block > cost:
            try:
                self._claim(tenant_id, block)
            except ResourceExhausted:
                pass  # fewer than a block left: try for just what this request needs
            else:
                with self._lease_lock:
                    self._leases[tenant_id] = (block - cost, now + self.LEASE_S)
                return
        self._claim(tenant_id, cost)

    def _claim(self, tenant_id: int, cost: int) -> None:
        try:
            limits = self.limits(tenant_id)
            day = time.strftime("%Y%m%d", time.gmtime())
            allowed, wait_ms = self._take(
                keys=[f"{self._prefix}:bucket:{tenant_id}", f"{self._prefix}:quota:{tenant_id}:{day}"],
                args=[limits.requests_per_second, limits.burst, int(time.time() * 1000), cost,
                      limits.daily_quota, 86400 + 3600])
        except redis.RedisError as err:
            raise Unavailable(f"rate limiter unavailable (Redis): {err}") from None
        if allowed == 1:
            return
        if allowed == 2:
            raise ResourceExhausted(f"daily request quota of {limits.daily_quota} is used up", wait_ms / 1000)
        raise ResourceExhausted(f"rate limit of {limits.requests_per_second:g} requests/s (burst {limits.burst}) "
                                f"exceeded; retry in {wait_ms} ms", wait_ms / 1000)
