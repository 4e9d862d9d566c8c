"""Token-bucket rate limits per agent, per grant and per upstream.

Buckets (each ``rate`` tokens per minute, ``burst`` capacity):

* ``agent:<a>`` — all requests of an agent (``agents.<a>.rate_limit.requests_per_minute``);
* ``agent-writes:<a>`` — its writes (``writes_per_minute``);
* ``grant:<a>:<capability>`` — one grant (the grant's ``rate_limit``, else the capability's);
* ``upstream:<u>`` — everything sent to an upstream (``upstreams.<u>.rate_limit``).

A request (and every sub-request of a composite one) must find a token in every bucket that applies;
tokens are taken only when all buckets have one, so a refusal costs nothing. A refusal is 429
``rate_limited`` with ``Retry-After`` (whole seconds until the emptiest bucket refills), and is journaled
like every denial. The state is in memory, per process; buckets of agents that went quiet are dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import TetherError

if TYPE_CHECKING:
    from .exchange import Exchange
    from .gateway import Gateway


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


class RateLimiter:
    _MAX_BUCKETS = 100_000

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
            retry = max(1, math.ceil(worst))
            raise TetherError("rate_limited", f"{worst_what} is exhausted; retry in {retry}s",
                              headers={"Retry-After": str(retry)})
        if consume:
            for b, n in buckets:
                b.tokens -= n


def demands_for(ex: "Exchange") -> list[tuple[str, float, int | None, float, str]]:
    """Which buckets this request draws on, and how many tokens from each."""
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


def rate_limit(gw: "Gateway", ex: "Exchange") -> None:
    """Pipeline stage."""
    demands = demands_for(ex)
    if demands:
        gw.rate_limiter.take(demands)


__all__ = ["Bucket", "RateLimiter", "demands_for", "rate_limit"]
