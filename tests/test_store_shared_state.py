"""The store methods that make several processes one gateway (issue 24), once per backend: shared token
buckets, error-budget counts with release epochs, quota blocks, and the change signal.

"Replica" is a second store object on the same URL (what another process holds), as in test_store.py.
"""

from __future__ import annotations

import asyncio
import time

from tests.test_store import replica, store, store_url  # noqa: F401 - fixtures

RATE = 1.0  # tokens per second


async def test_buckets_are_one_budget_across_replicas(store, replica):
    other = await replica()
    key = "agent:bot"
    # capacity 10: leases of 4 from two replicas, then nothing left for a third lease of 4
    assert (await store.bucket_take([(key, RATE, 10.0, 1.0, 4.0)]))[0][0] == 4.0
    assert (await other.bucket_take([(key, RATE, 10.0, 1.0, 4.0)]))[0][0] == 4.0
    granted, left = (await store.bucket_take([(key, RATE, 10.0, 1.0, 4.0)]))[0]
    assert 2.0 <= granted + left < 3.0  # two tokens left, plus what refilled meanwhile
    assert granted == min(4.0, granted + left)
    # empty: a need it cannot meet grants nothing and says what is there
    granted, left = (await other.bucket_take([(key, RATE, 10.0, 3.0, 3.0)]))[0]
    assert granted == 0.0 and left < 3.0
    # several keys in one call, each on its own
    out = await other.bucket_take([("a", RATE, 5.0, 1.0, 2.0), ("b", RATE, 1.0, 2.0, 2.0)])
    assert out[0] == (2.0, 3.0) and out[1][0] == 0.0


async def test_bucket_takes_racing_from_two_replicas_never_grant_more_than_the_bucket(store, replica):
    other = await replica()

    async def hammer(s) -> float:
        got = 0.0
        for _ in range(25):
            got += (await s.bucket_take([("upstream:crm", 0.001, 20.0, 1.0, 1.0)]))[0][0]
        return got

    totals = await asyncio.gather(hammer(store), hammer(other), hammer(store), hammer(other))
    assert sum(totals) == 20.0


async def test_multi_key_takes_racing_from_two_replicas_neither_deadlock_nor_overgrant(store, replica):
    other = await replica()

    async def hammer(s, keys: list[str]) -> dict[str, float]:
        got = {k: 0.0 for k in keys}
        for _ in range(20):
            out = await s.bucket_take([(k, 0.001, 15.0, 1.0, 1.0) for k in keys])
            for k, (granted, _) in zip(keys, out):
                got[k] += granted
        return got

    results = await asyncio.wait_for(asyncio.gather(
        hammer(store, ["agent:a", "upstream:u"]), hammer(other, ["agent:a", "upstream:u"]),
        hammer(store, ["grant:a:x", "upstream:u"]), hammer(other, ["agent:a", "grant:a:x"])), 30)
    for key in ("agent:a", "upstream:u", "grant:a:x"):
        assert sum(r.get(key, 0.0) for r in results) == 15.0


async def test_error_budget_counts_add_up_across_replicas_and_a_release_restarts_them(store, replica):
    other = await replica()
    now = time.time()
    start = now - now % 10
    since = {"bot": now - 3600}
    totals, epochs = await store.sli_sync([("bot", 0, start, "requests", 5), ("bot", 0, start, "denials", 2)], since)
    assert totals["bot"] == {"requests": 5, "denials": 2} and epochs.get("bot", 0) == 0
    totals, _ = await other.sli_sync([("bot", 0, start, "requests", 3), ("bot", 0, start - 10, "denials", 1)], since)
    assert totals["bot"] == {"requests": 8, "denials": 3}
    # a quarantine judged in epoch 0 holds; the release voids the counts and moves the epoch on
    assert await store.quarantine_set("bot", {"agent": "bot", "since": now, "reason": "budget", "epoch": 0})
    assert not await other.quarantine_set("bot", {"agent": "bot", "since": now, "reason": "budget", "epoch": 0})
    assert await other.quarantine_release("bot", "rita", "fixed")
    assert await store.sli_epochs() == {"bot": 1}
    # counts a replica observed before it heard of the release are dropped, and so is its judgement
    totals, epochs = await store.sli_sync([("bot", 0, start, "denials", 7)], since)
    assert totals.get("bot", {}) == {} and epochs["bot"] == 1
    assert not await store.quarantine_set("bot", {"agent": "bot", "since": now, "reason": "late", "epoch": 0})
    assert "bot" not in await store.quarantines()
    totals, _ = await other.sli_sync([("bot", 1, start, "denials", 1)], since, prune_before=start - 5)
    assert totals["bot"] == {"denials": 1}
    # a quarantine by hand (no epoch) is not conditional
    assert await store.quarantine_set("bot", {"agent": "bot", "since": now, "reason": "by hand"})


async def test_a_quota_block_only_ends_by_expiring(store, replica):
    other = await replica()
    now = time.time()
    started, until = await store.quota_update("sf", {"blocked_until": now + 60, "reason": "reserve"}, now)
    assert started and until == now + 60
    # an answer that was on its way says the quota is fine: the block stays
    started, until = await other.quota_update("sf", {"blocked_until": 0, "remaining": 900}, now + 1)
    assert not started and until == now + 60
    started, until = await other.quota_update("sf", {"blocked_until": now + 90}, now + 2)
    assert not started and until == now + 90
    states = await store.quota_states()
    assert states["sf"]["blocked_until"] == now + 90
    # expired: the next block is a new episode
    started, _ = await store.quota_update("sf", {"blocked_until": now + 200}, now + 100)
    assert started


async def test_a_signal_reaches_every_watching_replica(store, replica):
    other = await replica()
    seen: list[str | None] = []
    got = asyncio.Event()

    def on(topic: str | None) -> None:
        seen.append(topic)
        got.set()

    await other.watch(on)
    await asyncio.sleep(0.3)  # the watcher is up (LISTEN connected / the file polled once)
    t0 = time.monotonic()
    await store.signal("quarantine:bot")
    await asyncio.wait_for(got.wait(), 5)
    assert time.monotonic() - t0 < 2.0
    assert seen and seen[0] in ("quarantine:bot", None)


async def test_a_fresh_sqlite_file_opens_while_another_opener_holds_the_write_lock(tmp_path):
    """The start-up race of ``--workers`` on a fresh file: switching to WAL while another connection holds
    the write lock fails at once with "database is locked" (SQLite does not wait for that one); the store
    waits for it instead."""
    import sqlite3

    from proxy.store import open_store

    path = tmp_path / "fresh.db"
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    s = open_store(str(path))
    opening = asyncio.ensure_future(s.open())
    await asyncio.sleep(0.3)
    assert not opening.done()  # waiting, not failed
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(opening, 10)
    assert await s.schema_version() >= 3
    await s.close()
