"""Token-bucket rate limits per agent, per grant and per upstream — one budget per key for the whole gateway.

Buckets (each ``rate`` tokens per minute, ``burst`` capacity):

* ``agent:<a>`` — all requests of an agent (``agents.<a>.rate_limit.requests_per_minute``);
* ``agent-writes:<a>`` — its writes (``writes_per_minute``);
* ``grant:<a>:<capability>`` — one grant (the grant's ``rate_limit``, else the capability's);
* ``upstream:<u>`` — everything sent to an upstream (``upstreams.<u>.rate_limit``).

A request (and every sub-request of a composite one) must find a token in every bucket that applies;
tokens are taken only when all buckets have one, so a refusal costs nothing. A refusal is 429
``rate_limited`` with ``Retry-After`` (whole seconds until the emptiest bucket refills), and is journaled
like every denial.

**Where the buckets live** (``server.ratelimit``):

* ``local`` — in the process's memory: exact, free, and right for one process alone;
* ``store`` — in the gateway's store (the SQLite file the workers share, or PostgreSQL for replicas —
  Kong's "cluster" policy), so every process draws on the same bucket;
* ``redis://…`` / ``rediss://…`` / ``unix://…`` — in Redis or Valkey (one script call per lease, timed by
  the server's clock; Envoy's global rate-limit service is the model), for very high rates;
  ``?prefix=NAME`` sets the key prefix (default ``tether:rl:``);
* ``auto`` (default) — ``local`` for one process on SQLite, ``store`` with ``--workers`` > 1 or a
  PostgreSQL store.

**Leases.** With a shared bucket a process does not pay a round trip per request: it *leases* tokens —
takes a few at once from the shared bucket and spends them locally. A lease is sized to about half a
second of what this process spent on that key lately, and never more than 5% of the burst (at least one
token); unused leased tokens lapse after two seconds. A shared bucket found empty is remembered until it
will have refilled enough, so refusals cost no round trip either. Every admitted request spent a token
taken atomically from the shared bucket, so over any period *t* at most ``burst + rate × t`` requests
pass, plus at most the tokens the processes held in leases when the period began (one lease each: ≤ 5%
of the burst per process). Leases can make the gateway admit *less* than the limit, never noticeably
more: a process may be refused while another still holds a few leased tokens.

If the shared buckets cannot be reached, requests that need them are refused with 503
``rate_limit_unavailable`` (fail closed), never forwarded unlimited.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import TetherError

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..core.exchange import Exchange
    from ..core.runtime import Runtime
    from ..store import Store

log = logging.getLogger("tether.ratelimit")

Demand = tuple[str, float, "int | None", float, str]  # key, per_minute, burst, tokens needed, description


@dataclass(slots=True)
class Bucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, n: float) -> float:
        return 0.0 if self.tokens >= n else (n - self.tokens) / self.rate


def _refusal(wait: float, what: str) -> TetherError:
    retry = max(1, math.ceil(wait))
    return TetherError("rate_limited", f"{what} is exhausted; retry in {retry}s", headers={"Retry-After": str(retry)})


class RateLimiter:
    """Buckets in this process's memory (``server.ratelimit: local``): exact for one process."""

    _MAX_BUCKETS = 100_000
    shared = False

    def __init__(self) -> None:
        self._buckets: dict[str, Bucket] = {}

    def _bucket(self, key: str, per_minute: float, burst: int | None, now: float) -> Bucket:
        b = self._buckets.get(key)
        rate = per_minute / 60.0
        cap = float(burst if burst is not None else max(1.0, per_minute))
        if b is None or b.rate != rate or b.capacity != cap:
            if len(self._buckets) >= self._MAX_BUCKETS:
                self._evict(now)
            b = self._buckets[key] = Bucket(rate, cap, cap if b is None else min(b.tokens, cap), now)
        return b

    def _evict(self, now: float) -> None:
        """Drop buckets that are full again (their agents went quiet): they carry no information."""
        for k in [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * b.rate >= b.capacity]:
            del self._buckets[k]

    def take(self, demands: list[tuple[str, float, int | None, float, str]], now: float | None = None, *,
             consume: bool = True) -> None:
        """``demands``: (key, per_minute, burst, tokens needed, description). All or nothing.
        ``consume=False`` only checks (before asking an agent for its body: the tokens are taken later)."""
        if not demands:
            return
        now = time.monotonic() if now is None else now
        worst = 0.0
        worst_what = ""
        buckets = []
        for key, per_minute, burst, n, what in demands:
            b = self._bucket(key, per_minute, burst, now)
            b.refill(now)
            wait = b.wait_for(n)
            if wait > worst:
                worst, worst_what = wait, what
            buckets.append((b, n))
        if worst > 0:
            raise _refusal(worst, worst_what)
        if consume:
            for b, n in buckets:
                b.tokens -= n

    def peek(self, demands: list[tuple[str, float, int | None, float, str]]) -> None:
        """Refuse now if a bucket is known to be empty, taking nothing (before asking for a body)."""
        self.take(demands, consume=False)

    async def close(self) -> None:
        return None


def demands_for(ex: "Exchange") -> list[tuple[str, float, int | None, float, str]]:
    """Which buckets this request draws on, and how many tokens from each.

    A request of one operation (all but composite/batch ones) draws on buckets that depend only on the
    agent, the capability and the upstream: they are worked out once per rules version (the cache lives
    on the immutable registry) instead of formatting four descriptions per request. The list is shared:
    callers read it, never change it."""
    ident = ex.identity
    assert ident is not None and ex.upstream is not None
    ops = ex.operations
    if len(ops) == 1 and ops[0].capability is not None:
        key = (ident.agent, ops[0].capability.name, ex.upstream.name)
        cache = ex.registry.demand_cache
        found = cache.get(key)
        if found is None:
            found = cache[key] = _demands(ex)
        return found
    return _demands(ex)


def _demands(ex: "Exchange") -> list[tuple[str, float, int | None, float, str]]:
    rules = ex.registry.rules
    ident = ex.identity
    assert ident is not None and ex.upstream is not None
    agent = ident.agent
    out: list[tuple[str, float, int | None, float, str]] = []
    acfg = rules.agents[agent].rate_limit
    n_ops = float(max(1, len(ex.operations)))
    n_writes = float(sum(1 for op in ex.operations if op.capability is not None and op.capability.is_write))
    if acfg is not None:
        if acfg.requests_per_minute:
            out.append((f"agent:{agent}", acfg.requests_per_minute, acfg.burst, n_ops,
                        f"agent {agent}'s request limit ({acfg.requests_per_minute:g}/min)"))
        if acfg.writes_per_minute and n_writes:
            out.append((f"agent-writes:{agent}", acfg.writes_per_minute, acfg.burst, n_writes,
                        f"agent {agent}'s write limit ({acfg.writes_per_minute:g}/min)"))
    per_grant: dict[str, float] = {}
    for op in ex.operations:
        if op.capability is not None:
            per_grant[op.capability.name] = per_grant.get(op.capability.name, 0.0) + 1.0
    for cap_name, n in per_grant.items():
        grant = ex.registry.grant(agent, cap_name)
        limit = grant.config.rate_limit if grant is not None and grant.config.rate_limit else \
            ex.registry.capabilities[cap_name].config.rate_limit
        if limit is not None:
            out.append((f"grant:{agent}:{cap_name}", limit.per_minute, limit.burst, n,
                        f"the limit of {cap_name} for {agent} ({limit.per_minute:g}/min)"))
    ul = ex.upstream.cfg.rate_limit
    if ul is not None:
        out.append((f"upstream:{ex.upstream.name}", ul.per_minute, ul.burst, n_ops,
                    f"upstream {ex.upstream.name}'s limit ({ul.per_minute:g}/min)"))
    return out


async def rate_limit(gw: "Runtime", ex: "Exchange") -> None:
    """Pipeline stage. (A coroutine that suspends only when a shared bucket must be asked for a lease.)"""
    demands = demands_for(ex)
    if demands:
        limiter = gw.rate_limiter
        if limiter.shared:
            await limiter.acquire(demands)
        else:
            limiter.take(demands)


# --------------------------------------------------------------------------- shared buckets with leases

LEASE_TTL = 2.0  # seconds a leased token may wait to be spent
LEASE_SHARE = 0.05  # a lease is at most this share of the burst...
LEASE_SECONDS = 0.5  # ...and about this long of the process's recent spending on the key


class BucketsUnavailable(Exception):
    """The shared buckets cannot be reached (store or Redis down)."""


class Buckets(Protocol):
    """Where shared buckets live: see :meth:`proxy.store.base.Store.bucket_take` for the contract."""

    async def take(self, reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Lease:
    """Tokens this process took from a shared bucket and has not spent yet."""

    rate: float  # the bucket's refill, tokens per second
    cap: float
    tokens: float = 0.0
    expires: float = 0.0
    empty_until: float = 0.0  # the shared bucket was empty: it cannot have refilled before this
    used: float = 0.0  # spent since the last lease (the demand estimate)
    leased_at: float = 0.0


class SharedRateLimiter:
    """Buckets shared by every process of the gateway, spent through local leases (see the module doc)."""

    shared = True
    _MAX_LEASES = 100_000

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets
        self._leases: dict[str, Lease] = {}
        self._lock = asyncio.Lock()
        self.round_trips = 0  # leases asked for (a metric of what the hot path paid)

    def _lease(self, key: str, per_minute: float, burst: int | None) -> Lease:
        rate = per_minute / 60.0
        cap = float(burst if burst is not None else max(1.0, per_minute))
        lease = self._leases.get(key)
        if lease is None or lease.rate != rate or lease.cap != cap:
            if len(self._leases) >= self._MAX_LEASES:
                self._leases.clear()  # unspent leased tokens lapse: the gateway admits less, never more
            lease = self._leases[key] = Lease(rate, cap)
        return lease

    async def acquire(self, demands: list[Demand]) -> None:
        """All or nothing, like :meth:`RateLimiter.take`; asks the shared buckets only for keys whose lease
        ran out (one round trip for all of them)."""
        for _ in range(3):
            now = time.monotonic()
            worst, worst_what = 0.0, ""
            leases: list[tuple[Lease, float]] = []
            short: list[tuple[str, Lease, float, str]] = []
            for key, per_minute, burst, n, what in demands:
                lease = self._lease(key, per_minute, burst)
                if lease.expires <= now:
                    lease.tokens = 0.0
                leases.append((lease, n))
                if lease.tokens >= n:
                    continue
                if lease.empty_until > now:
                    wait = lease.empty_until - now
                    if wait > worst:
                        worst, worst_what = wait, what
                    continue
                short.append((key, lease, n, what))
            if worst > 0:
                raise _refusal(worst, worst_what)
            if not short:
                for lease, n in leases:
                    lease.tokens -= n
                    lease.used += n
                return
            await self._refill(short)
        # other requests of this process kept spending what was leased for this one
        raise _refusal(1.0, demands[0][4])

    def peek(self, demands: list[Demand]) -> None:
        """Refuse now where this process knows a shared bucket is empty, taking nothing and asking no one
        (before asking an agent for its body: the rate_limit stage takes the tokens as for any request)."""
        now = time.monotonic()
        for key, per_minute, burst, n, what in demands:
            lease = self._leases.get(key)
            if lease is not None and lease.tokens < n and lease.empty_until > now:
                raise _refusal(lease.empty_until - now, what)

    async def _refill(self, short: list[tuple[str, Lease, float, str]]) -> None:
        async with self._lock:  # one lease request at a time: a waiting request may find its lease filled
            now = time.monotonic()
            reqs: list[tuple[str, float, float, float, float]] = []
            wanted: dict[str, tuple[Lease, float, str]] = {}
            for key, lease, n, what in sorted(short, key=lambda s: s[0]):
                if lease.expires <= now:
                    lease.tokens = 0.0
                if lease.tokens >= n or key in wanted:
                    continue
                need = n - lease.tokens
                spent_rate = lease.used / max(1e-3, now - lease.leased_at) if lease.leased_at else 0.0
                chunk = min(max(1.0, spent_rate * LEASE_SECONDS), max(1.0, math.floor(lease.cap * LEASE_SHARE)))
                reqs.append((key, lease.rate, lease.cap, need, min(lease.cap, max(need, chunk))))
                wanted[key] = (lease, need, what)
            if not reqs:
                return
            self.round_trips += 1
            try:
                got = await self.buckets.take(reqs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - store/Redis errors of every kind: fail closed
                log.error("shared rate-limit buckets unavailable: %s", exc)
                raise TetherError("rate_limit_unavailable",
                                  "the shared rate-limit buckets cannot be reached; nothing was forwarded",
                                  headers={"Retry-After": "1"}) from None
            now = time.monotonic()
            worst, worst_what = 0.0, ""
            for (key, *_), (granted, left) in zip(reqs, got):
                lease, need, what = wanted[key]
                if granted > 0:
                    lease.tokens += granted
                    lease.expires = now + LEASE_TTL
                    lease.used = 0.0
                    lease.leased_at = now
                else:
                    wait = max(0.0, need - left) / lease.rate
                    lease.empty_until = now + wait
                    if wait > worst:
                        worst, worst_what = wait, what
            if worst > 0:
                raise _refusal(worst, worst_what)

    async def close(self) -> None:
        await self.buckets.close()


class StoreBuckets:
    """Shared buckets in the gateway's store (the SQLite file its workers share, or PostgreSQL)."""

    def __init__(self, store: "Store") -> None:
        self.store = store

    async def take(self, reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]:
        return await self.store.bucket_take(reqs)

    async def close(self) -> None:
        return None  # the gateway closes its store


# One call per lease: refill each key by the server's clock, grant all-or-nothing per key, let quiet keys
# expire. Numbers go back as strings (a Lua number becomes an integer reply).
_LUA_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[4 * i - 3])
  local cap = tonumber(ARGV[4 * i - 2])
  local need = tonumber(ARGV[4 * i - 1])
  local want = tonumber(ARGV[4 * i])
  local v = redis.call('HMGET', key, 'tokens', 'stamp')
  local avail = cap
  local stamp = now
  if v[1] then
    avail = math.min(cap, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
    stamp = math.max(now, tonumber(v[2]))
  end
  local granted = 0
  if avail >= need then granted = math.min(avail, want) end
  redis.call('HSET', key, 'tokens', string.format('%.17g', avail - granted), 'stamp', string.format('%.17g', stamp))
  redis.call('PEXPIRE', key, math.ceil(cap / rate * 1000) + 60000)
  out[#out + 1] = string.format('%.17g', granted)
  out[#out + 1] = string.format('%.17g', avail - granted)
end
return out
"""


class RedisBuckets:
    """Shared buckets in Redis or Valkey (``redis.asyncio``; the ``redis`` extra)."""

    def __init__(self, url: str) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:  # pragma: no cover - exercised only without the extra
            raise BucketsUnavailable("server.ratelimit names Redis but the redis package is missing: "
                                     "pip install 'tether-gateway[redis]'") from None
        url, self.prefix = redis_url(url)
        self.client = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._script = self.client.register_script(_LUA_TAKE)

    async def take(self, reqs: list[tuple[str, float, float, float, float]]) -> list[tuple[float, float]]:
        args: list[Any] = []
        for _, rate, cap, need, want in reqs:
            args += [repr(rate), repr(cap), repr(need), repr(want)]
        res = await self._script(keys=[self.prefix + r[0] for r in reqs], args=args)
        return [(float(res[2 * i]), float(res[2 * i + 1])) for i in range(len(reqs))]

    async def close(self) -> None:
        await self.client.aclose()


def redis_url(url: str) -> tuple[str, str]:
    """Split Tether's ``prefix`` parameter off a Redis URL: (the URL for redis-py, the key prefix)."""
    parts = urlsplit(url)
    prefix = "tether:rl:"
    rest = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k == "prefix":
            prefix = v
        else:
            rest.append((k, v))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), "")), prefix


def make_rate_limiter(server: "ServerConfig", store: "Store") -> "RateLimiter | SharedRateLimiter":
    """The limiter ``server.ratelimit`` asks for (see the module doc)."""
    from ..store import shared_by_processes

    mode = server.ratelimit
    if mode == "auto":
        mode = "store" if shared_by_processes(store, server.workers) else "local"
    if mode == "local":
        return RateLimiter()
    if mode == "store":
        return SharedRateLimiter(StoreBuckets(store))
    return SharedRateLimiter(RedisBuckets(mode))


__all__ = ["Bucket", "Lease", "RateLimiter", "RedisBuckets", "SharedRateLimiter", "StoreBuckets", "demands_for",
           "make_rate_limiter", "rate_limit", "redis_url"]
