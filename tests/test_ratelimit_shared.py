"""Shared rate-limit buckets (proxy/safety/ratelimit.py) seen from inside: leases, Redis, failing closed.

The processes' view (workers, replicas) is tests/test_many_processes.py; here two gateways in one test
process share a bucket through Redis (``server.ratelimit: redis://…``), each test under a key prefix of
its own, skipped with the reason when no Redis server answers at 127.0.0.1:6379.
"""

from __future__ import annotations

import secrets
import socket

import pytest

from proxy.safety.ratelimit import Lease, SharedRateLimiter, redis_url
from tests.conftest import base_rules

REDIS = "redis://127.0.0.1:6379/0"


def redis_unavailable() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                return "the server at 127.0.0.1:6379 does not answer PING like Redis"
    except OSError as exc:
        return f"Redis not reachable at 127.0.0.1:6379: {exc}"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'tether-gateway[redis]')"
    return None


def test_redis_url_keeps_tethers_prefix_apart():
    assert redis_url("redis://h:6379/2?prefix=t1:&socket_keepalive=true") == (
        "redis://h:6379/2?socket_keepalive=true", "t1:")
    assert redis_url("rediss://h/0")[1] == "tether:rl:"


class CountingBuckets:
    """A bucket store that counts round trips (the cost leases save) and never runs dry."""

    def __init__(self) -> None:
        self.calls = 0

    async def take(self, reqs):
        self.calls += 1
        return [(want, 1e9) for _, _, _, _, want in reqs]

    async def close(self) -> None:
        pass


async def test_leases_grow_with_demand_so_a_busy_key_costs_few_round_trips():
    buckets = CountingBuckets()
    rl = SharedRateLimiter(buckets)
    demands = [("agent:bot", 600_000.0, None, 1.0, "x")]
    for _ in range(2000):
        await rl.acquire(demands)
    # 2000 requests in a burst: leases of up to 5% of the burst (30,000 tokens) or half a second of demand
    assert buckets.calls < 40, buckets.calls
    # a low limit is leased token by token: nothing is held back from the other processes
    small = SharedRateLimiter(CountingBuckets())
    for _ in range(5):
        await small.acquire([("grant:bot:x", 30.0, None, 1.0, "y")])
    assert small.buckets.calls == 5 and small._leases["grant:bot:x"].tokens == 0


async def test_an_empty_shared_bucket_is_remembered_so_refusals_cost_no_round_trip():
    class Empty(CountingBuckets):
        async def take(self, reqs):
            self.calls += 1
            return [(0.0, 0.25) for _ in reqs]

    rl = SharedRateLimiter(Empty())
    for _ in range(10):
        with pytest.raises(Exception) as exc:
            await rl.acquire([("agent:bot", 60.0, 5, 1.0, "agent bot's request limit")])
        assert exc.value.code == "rate_limited" and exc.value.headers["Retry-After"] == "1"
    assert rl.buckets.calls == 1
    assert isinstance(rl._leases["agent:bot"], Lease)


async def test_two_gateways_share_one_budget_through_redis(make_gateway, upstream, tmp_path):
    reason = redis_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"tether-test-{secrets.token_hex(6)}:"
    gws = []
    for i in range(2):
        rules = base_rules(upstream.url, str(tmp_path / f"g{i}.db"))  # separate stores: only Redis is shared
        rules["server"]["ratelimit"] = f"{REDIS}?prefix={prefix}"
        rules["agents"]["bot"]["rate_limit"] = {"requests_per_minute": 30}
        gws.append(await make_gateway(rules))
    statuses = [(await gws[i % 2].request("GET", f"/api/contacts/{i}")).status for i in range(80)]
    reached = len(upstream.seen("GET", "/api/contacts/"))
    assert 28 <= reached <= 32, reached
    assert statuses.count(429) == 80 - reached
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS)
    try:
        keys = await client.keys(f"{prefix}*")
        assert keys == [f"{prefix}agent:bot".encode()]
        assert 0 < await client.pttl(keys[0]) <= 180_000  # a quiet key goes away by itself
        await client.delete(*keys)
    finally:
        await client.aclose()


async def test_unreachable_shared_buckets_fail_closed(make_gateway, upstream, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["ratelimit"] = f"redis://127.0.0.1:{port}/0"
    rules["agents"]["bot"]["rate_limit"] = {"requests_per_minute": 600}
    gw = await make_gateway(rules)
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 503 and (await r.json())["error"]["code"] == "rate_limit_unavailable"
    assert upstream.seen("GET") == []
    rules["agents"]["bot"]["rate_limit"] = None  # no limit that applies: nothing to ask, nothing refused
    gw2 = await make_gateway(rules)
    assert (await gw2.request("GET", "/api/contacts")).status == 200


@pytest.mark.stores
async def test_store_buckets_in_one_process_behave_like_local_ones(make_gateway, upstream, store_url):
    rules = base_rules(upstream.url, store_url)
    rules["server"]["ratelimit"] = "store"
    rules["capabilities"]["contact.read"]["rate_limit"] = {"per_minute": 60, "burst": 3}
    gw = await make_gateway(rules)
    statuses = [(await gw.request("GET", "/api/contacts/1")).status for _ in range(5)]
    assert statuses == [404, 404, 404, 429, 429]
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    text = await (await gw.admin("GET", "/metrics")).text()
    trips = [line for line in text.splitlines() if line.startswith("tether_ratelimit_lease_requests_total ")]
    assert trips and 1 <= float(trips[0].split()[1]) <= 6  # refusals after the bucket ran dry cost none
