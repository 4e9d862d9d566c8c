"""The store contract: every Store method, run once per backend (SQLite file, PostgreSQL) with the same
expectations. PostgreSQL tests use the server at $TETHER_TEST_PG (default 127.0.0.1:5432, database
``test``), each in a schema of its own that is dropped afterwards, and are skipped with the reason when
the server cannot be reached.

"Replica" below means a second store object opened on the same URL: another gateway process would hold
exactly that (its own connection or pool) — so these tests show concurrent writers from two processes'
point of view on one chain, one review queue, one set of leases.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from proxy.chain import GENESIS, INDEXED_FIELDS, canonical, record_hash
from proxy.journal.writer import archive, base_record, verify
from proxy.store import Store, StoreUnavailable, open_store
from proxy.store.postgres import LATEST_VERSION as LATEST
from proxy.store.rows import REVIEW_COLS, SUMMARY_FIELDS, Unstorable, prepare_review
from tests.conftest import ROOT, _in_thread, drop_schema, new_pg_url, pg_admin, pg_dsn, pg_unavailable, with_params

# --------------------------------------------------------------------------- PostgreSQL plumbing

def require_pg() -> None:
    reason = pg_unavailable()
    if reason:
        pytest.skip(reason)




# --------------------------------------------------------------------------- fixtures

BACKENDS = [pytest.param("sqlite", id="sqlite"),
            pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "sqlite":
        yield str(tmp_path / "store.db")
        return
    require_pg()
    url, schema = new_pg_url()
    try:
        yield url
    finally:
        drop_schema(schema)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = open_store(store_url)
    await s.open()
    yield s
    await s.close()


OpenReplica = Callable[[], Awaitable[Store]]


@pytest.fixture
async def replica(store_url: str) -> AsyncIterator[OpenReplica]:
    """Open another store on the same URL (what another gateway process holds)."""
    opened: list[Store] = []

    async def make() -> Store:
        s = open_store(store_url)
        await s.open()
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


def is_pg(s: Store) -> bool:
    return s.kind == "postgresql"


# --------------------------------------------------------------------------- helpers

def mk(i: int, **fields: Any) -> dict[str, Any]:
    rec = base_record("request", ts=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000000Z", request_id=f"r{i}",
                      agent="bot", on_behalf_of="ae:jane", capability="contact.read", decision="live",
                      method="GET", path=f"/api/contacts/{i}")
    rec.update(fields)
    return rec


def cols(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in INDEXED_FIELDS}


async def append(s: Store, recs: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return await s.journal_append([canonical(r) for r in recs], [cols(r) for r in recs])


def review_item(n: int, **kw: Any) -> dict[str, Any]:
    now = 1_700_000_000.0 + n
    item = {"id": f"rv_{n}", "state": "pending", "created_at": now, "updated_at": now, "expires_at": now + 3600,
            "agent": "bot", "capability": "contact.update", "upstream": "crm", "on_behalf_of": "ae:jane",
            "intent": "fix the name — ünïcode", "request": {"method": "PATCH", "path": f"/api/contacts/{n}",
                                                           "body_json": {"name": "A\u0000B", "n": 1.5}},
            "synthetic": {"status": 200}, "decision": None, "digest": "abc"}
    item.update(kw)
    return item


def tx(n: int, **kw: Any) -> dict[str, Any]:
    now = 1_700_000_000.0 + n
    t = {"id": f"tx_{n}", "state": "open", "agent": "bot", "created_at": now, "updated_at": now,
         "deadline": now + 600, "on_behalf_of": None, "name": f"work {n}", "opened": "explicit"}
    t.update(kw)
    return t


# --------------------------------------------------------------------------- lifecycle and migrations


async def test_open_applies_migrations_and_reopening_is_idempotent(store_url):
    s = open_store(store_url)
    await s.open()
    v = await s.schema_version()
    assert v >= 2
    await append(s, [mk(1)])
    await s.close()
    s2 = open_store(store_url)
    await s2.open()
    try:
        assert await s2.schema_version() == v
        assert (await s2.journal_head())[0] == 1
    finally:
        await s2.close()


async def test_replicas_starting_at_once_migrate_exactly_once(store_url):
    stores = [open_store(store_url) for _ in range(8)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        versions = {await s.schema_version() for s in stores}
        assert len(versions) == 1 and versions.pop() >= 2
        # every replica sees the one journal_meta row: a second migration run would have failed or duplicated it
        heads = await asyncio.gather(*(s.journal_head() for s in stores))
        assert set(heads) == {(0, GENESIS)}
        await append(stores[3], [mk(1)])
        assert {(await s.journal_head())[0] for s in stores} == {1}
    finally:
        for s in stores:
            await s.close()


async def test_a_closed_store_is_unavailable(store_url):
    s = open_store(store_url)
    await s.open()
    await s.ping()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await s.journal_head()
    with pytest.raises(StoreUnavailable):
        await append(s, [mk(1)])
    with pytest.raises(StoreUnavailable):
        await s.ping()


# --------------------------------------------------------------------------- journal


async def test_empty_journal_head_and_anchor_are_genesis(store):
    assert await store.journal_head() == (0, GENESIS)
    assert await store.journal_anchor() == (0, GENESIS)
    assert await store.journal_query() == []
    assert [r async for r in store.journal_scan()] == []
    assert (await verify(store)).ok


async def test_append_links_each_batch_onto_the_last(store):
    out1 = await append(store, [mk(1)])
    out2 = await append(store, [mk(2), mk(3), mk(4)])
    out3 = await append(store, [mk(i) for i in range(5, 10)])
    seqs = [seq for seq, _ in out1 + out2 + out3]
    assert seqs == list(range(1, 10))
    rows = await store.journal_query()
    assert [r.seq for r in rows] == seqs
    prev = GENESIS
    for r, (seq, h) in zip(rows, out1 + out2 + out3):
        assert r.prev_hash == prev and r.hash == h == record_hash(prev, seq, r.payload)
        prev = h
    assert await store.journal_head() == (9, out3[-1][1])
    assert rows[1].prev_hash == out1[0][1]  # batch 2 continues batch 1
    assert rows[4].prev_hash == out2[-1][1]  # batch 3 continues batch 2
    res = await verify(store)
    assert res.ok and res.checked == 9


async def test_payload_bytes_are_kept_exactly(store):
    # not canonical JSON: odd spacing, escapes, raw UTF-8 — the hash covers these exact bytes
    payload = b'{"kind":"request",  "ts":"2026-01-01T00:00:00.000000Z", "x":"\\u00e9 \xc3\xa9 \\u0000", "n":1.50}'
    c = {"ts": "2026-01-01T00:00:00.000000Z", "kind": "request", "request_id": None, "agent": None,
         "on_behalf_of": None, "capability": None, "decision": None}
    [(seq, h)] = await store.journal_append([payload], [c])
    [row] = await store.journal_query()
    assert row.payload == payload and isinstance(row.payload, bytes)
    assert h == record_hash(GENESIS, seq, payload)
    assert row.record()["x"] == "\u00e9 \u00e9 \u0000"
    assert (await verify(store)).ok


async def test_indexed_columns_round_trip_even_with_nul(store):
    recs = [mk(1, agent="a\u0000b", on_behalf_of="jöe"), mk(2, agent="plain")]
    await append(store, recs)
    rows = await store.journal_query()
    assert rows[0].columns["agent"] == "a\u0000b" and rows[0].columns["on_behalf_of"] == "jöe"
    assert [r.seq for r in await store.journal_query(filters={"agent": "a\u0000b"})] == [1]
    assert (await verify(store)).ok


async def test_query_filters_ranges_order_and_limit(store):
    recs = []
    for i in range(1, 21):
        recs.append(mk(i, agent="bot" if i % 2 else "other", decision="denied" if i % 5 == 0 else "live",
                       kind="outcome" if i % 4 == 0 else "request", capability=f"cap.{i % 3}",
                       on_behalf_of=None if i % 7 == 0 else "ae:jane"))
    await append(store, recs[:7])
    await append(store, recs[7:])

    async def seqs(**kw: Any) -> list[int]:
        return [r.seq for r in await store.journal_query(**kw)]

    assert await seqs() == list(range(1, 21))
    assert await seqs(after_seq=15) == [16, 17, 18, 19, 20]
    assert await seqs(before_seq=4) == [1, 2, 3]
    assert await seqs(after_seq=5, before_seq=9) == [6, 7, 8]
    assert await seqs(limit=3) == [1, 2, 3]
    assert await seqs(descending=True, limit=3) == [20, 19, 18]
    assert await seqs(filters={"agent": "other"}) == list(range(2, 21, 2))
    assert await seqs(filters={"decision": "denied"}) == [5, 10, 15, 20]
    assert await seqs(filters={"kind": "outcome", "agent": "other"}) == [4, 8, 12, 16, 20]
    assert await seqs(filters={"capability": "cap.0"}) == [3, 6, 9, 12, 15, 18]
    assert await seqs(filters={"request_id": "r13"}) == [13]
    assert await seqs(filters={"on_behalf_of": "ae:jane", "decision": "denied"}) == [5, 10, 15, 20]
    assert await seqs(filters={"agent": "nobody"}) == []
    assert await seqs(since="2026-01-01T00:00:18.000000Z") == [18, 19, 20]
    assert await seqs(until="2026-01-01T00:00:03.000000Z") == [1, 2]
    assert await seqs(since="2026-01-01T00:00:05.000000Z", until="2026-01-01T00:00:08.000000Z") == [5, 6, 7]
    assert await seqs(filters={"agent": "bot"}, descending=True, limit=2) == [19, 17]
    with pytest.raises(ValueError):
        await store.journal_query(filters={"path": "/x"})
    rows = await store.journal_query(filters={"request_id": "r10"})
    assert rows[0].record() == recs[9] and rows[0].columns == cols(recs[9])


async def test_scan_walks_everything_in_order_in_batches(store):
    for b in range(7):
        await append(store, [mk(b * 10 + i) for i in range(1, 11)])
    seen = [r.seq async for r in store.journal_scan(batch=16)]
    assert seen == list(range(1, 71))


async def test_archive_moves_the_anchor_and_the_chain_continues(store, tmp_path):
    out = await append(store, [mk(i) for i in range(1, 11)])
    removed = await store.journal_archive(6)
    assert [r.seq for r in removed] == [1, 2, 3, 4, 5, 6]
    assert removed[-1].hash == out[5][1]
    assert await store.journal_anchor() == (6, out[5][1])
    assert await store.journal_head() == (10, out[9][1])
    assert [r.seq for r in await store.journal_query()] == [7, 8, 9, 10]
    assert [r.seq async for r in store.journal_scan(batch=2)] == [7, 8, 9, 10]
    assert await store.journal_archive(3) == []  # already gone: nothing more, anchor unchanged
    assert (await store.journal_anchor())[0] == 6
    more = await append(store, [mk(11), mk(12)])
    assert [s for s, _ in more] == [11, 12]
    res = await verify(store)
    assert res.ok and res.checked == 6 and res.first_seq == 7
    # the journal module's archive() (file first, then the store) on top of it
    path = await archive(store, tmp_path / "arch", keep_records=2)
    assert path is not None and (await store.journal_anchor())[0] == 10
    assert (await verify(store)).ok


async def test_replicas_appending_concurrently_extend_one_chain(store, replica):
    other = await replica()
    third = await replica()
    writers = [store, other, third]

    async def writer(w: int) -> list[list[int]]:
        got = []
        for b in range(12):
            n = 1 + (w + b) % 4
            out = await append(writers[w], [mk(0, request_id=f"w{w}-b{b}-{k}") for k in range(n)])
            got.append([seq for seq, _ in out])
        return got

    batches = [b for res in await asyncio.gather(*(writer(w) for w in range(3))) for b in res]
    for b in batches:  # a batch is contiguous: nobody interleaves inside it
        assert b == list(range(b[0], b[0] + len(b)))
    total = sum(len(b) for b in batches)
    assert sorted(s for b in batches for s in b) == list(range(1, total + 1))
    res = await verify(other)
    assert res.ok and res.checked == total
    ids = [r.columns["request_id"] for r in await store.journal_query(limit=10_000)]
    assert len(ids) == len(set(ids)) == total


async def test_journal_wait_returns_soon_after_another_replica_commits(store, replica):
    other = await replica()
    await append(store, [mk(1)])
    head = (await store.journal_head())[0]
    await store.journal_wait(head, 0.05)  # warm up (PostgreSQL: starts listening)

    async def later() -> None:
        await asyncio.sleep(0.3)
        await append(other, [mk(2)])

    t0 = time.monotonic()
    task = asyncio.ensure_future(later())
    while (await store.journal_head())[0] <= head:
        await store.journal_wait(head, 5.0)
        assert time.monotonic() - t0 < 2.0
    await task
    assert time.monotonic() - t0 < 1.0


# --------------------------------------------------------------------------- review items


async def test_review_insert_get_list_count(store):
    for n in range(1, 6):
        await store.review_insert(review_item(n, agent="bot" if n < 4 else "other",
                                              capability="contact.update" if n % 2 else "contact.create",
                                              upstream="crm" if n != 5 else "erp"))
    item = await store.review_get("rv_2")
    assert item == review_item(2, capability="contact.create")
    assert item["request"]["body_json"]["name"] == "A\u0000B"
    assert await store.review_get("rv_404") is None

    async def ids(**kw: Any) -> list[str]:
        return [i["id"] for i in await store.review_list(**kw)]

    assert await ids() == ["rv_5", "rv_4", "rv_3", "rv_2", "rv_1"]  # newest first
    assert await ids(agent="other") == ["rv_5", "rv_4"]
    assert await ids(capability="contact.create") == ["rv_4", "rv_2"]
    assert await ids(upstream="erp") == ["rv_5"]
    assert await ids(older_than=1_700_000_002.0) == ["rv_2", "rv_1"]
    assert await ids(limit=2) == ["rv_5", "rv_4"]
    assert await ids(state="approved") == []
    assert await store.review_count() == 5
    assert await store.review_count("approved") == 0
    with pytest.raises(Exception) as err:
        await store.review_insert(review_item(1))
    assert not isinstance(err.value, StoreUnavailable)  # a duplicate is a conflict, not an outage


async def test_review_transition_is_compare_and_set(store):
    await store.review_insert(review_item(1))
    before = time.time()
    assert not await store.review_transition("rv_1", ("approved",), "replayed", {"replay": {"x": 1}})
    assert not await store.review_transition("rv_404", ("pending",), "approved", {})
    decision = {"by": "rita", "action": "approve", "edited": False}
    assert await store.review_transition("rv_1", ("pending", "other"), "approved", {"decision": decision})
    it = await store.review_get("rv_1")
    assert it["state"] == "approved" and it["decision"] == decision and it["updated_at"] >= before
    assert it["request"] == review_item(1)["request"]  # untouched fields survive
    assert not await store.review_transition("rv_1", ("pending",), "rejected", {"decision": {"by": "bob"}})
    assert (await store.review_get("rv_1"))["decision"]["by"] == "rita"
    assert await store.review_transition("rv_1", ("approved",), "replayed", {"replay": {"status": 200}})
    it = await store.review_get("rv_1")
    assert it["state"] == "replayed" and it["replay"] == {"status": 200} and it["decision"] == decision
    [summary] = await store.review_list(state="replayed")
    assert summary == {**{k: it[k] for k in (*REVIEW_COLS, *SUMMARY_FIELDS) if k in it},
                       "request": {"method": "PATCH", "path": "/api/contacts/1"}}


async def test_two_reviewers_at_once_exactly_one_wins(store, replica):
    other = await replica()
    for n in range(1, 4):
        await store.review_insert(review_item(n))
    for n in range(1, 4):
        attempts = [(store if k % 2 else other).review_transition(
            f"rv_{n}", ("pending",), "approved" if k % 3 else "rejected", {"decision": {"by": f"reviewer-{k}"}})
            for k in range(40)]
        results = await asyncio.gather(*attempts)
        assert sum(results) == 1, results
        winner = results.index(True)
        it = await other.review_get(f"rv_{n}")
        assert it["decision"]["by"] == f"reviewer-{winner}"
        assert it["state"] == ("approved" if winner % 3 else "rejected")


async def test_review_stats_count_decisions_of_a_grant(store):
    states = {1: "approved", 2: "replayed", 3: "replay_failed", 4: "rejected", 5: "expired", 6: "pending",
              7: "approved"}
    for n, st in states.items():
        await store.review_insert(review_item(n, state=st, decision={"edited": n in (2, 7)}))
    await store.review_insert(review_item(8, state="approved", capability="other.cap"))
    stats = await store.review_stats("bot", "contact.update", 0)
    assert stats == {"approved": 4, "approved_edited": 2, "rejected": 1, "expired": 1, "replay_failed": 1,
                     "pending": 1}
    assert (await store.review_stats("bot", "contact.update", time.time() + 10))["approved"] == 0


async def test_review_due_lists_expired_pending_items_oldest_first(store):
    if not hasattr(store, "review_due"):
        pytest.skip(f"{store.kind}: review_due is a proposed interface addition not implemented here yet")
    for n in range(1, 8):
        await store.review_insert(review_item(n, expires_at=1_000.0 + (10 - n),
                                              state="pending" if n != 3 else "rejected"))
    await store.review_insert(review_item(9, expires_at=None))
    await store.review_insert(review_item(10, expires_at=5_000.0))
    due = await store.review_due(2_000.0)
    assert [i["id"] for i in due] == ["rv_7", "rv_6", "rv_5", "rv_4", "rv_2", "rv_1"]
    assert [i["id"] for i in await store.review_due(2_000.0, limit=2)] == ["rv_7", "rv_6"]
    assert await store.review_due(500.0) == []


async def test_a_review_row_json_cannot_hold_is_refused_alone_never_inside_a_batch(store):
    """What an agent put in a captured request is serialised before it joins a commit shared with others."""
    bad = review_item(1, request={"method": "POST", "path": "/api/x", "headers": [["X-Ok", "1"], ["X-Note", "a\udcffb"]],
                                  "body_text": "{}"})
    with pytest.raises(Unstorable) as err:
        prepare_review(bad)
    assert err.value.field == "request.headers[1][1]"
    with pytest.raises(Unstorable):
        await store.review_insert(bad)
    with pytest.raises(Unstorable, match="64-bit"):
        prepare_review(review_item(2, request={"n": 2 ** 70}))
    # a good row rides in the same commit as journal records; nothing of the refused one exists
    good = prepare_review(review_item(3))
    await store.journal_append([canonical(mk(1)), canonical(mk(2))], [cols(mk(1)), cols(mk(2))],
                               [("review_insert", good)])
    assert (await store.review_get("rv_3"))["intent"] == review_item(3)["intent"]
    assert await store.review_get("rv_1") is None and (await store.journal_head())[0] == 2


async def test_review_lists_are_summaries_and_usage_is_per_agent_pending(store):
    big = "x" * 50_000
    for n in range(1, 5):
        await store.review_insert(review_item(n, agent="bot" if n < 4 else "other", state="pending" if n != 2 else "rejected",
                                              request={"method": "POST", "path": "/api/c", "headers": [["X-A", "b"]],
                                                       "body_text": big, "body_bytes": len(big)}))
    listed = await store.review_list()
    assert len(listed) == 4 and all("body_text" not in i["request"] and "headers" not in i["request"] for i in listed)
    assert listed[0]["request"] == {"method": "POST", "path": "/api/c", "body_bytes": 50_000}
    assert listed[0]["intent"] == review_item(1)["intent"] and listed[0]["on_behalf_of"] == "ae:jane"
    count, used = await store.review_usage("bot")
    assert count == 2 and 100_000 < used < 110_000  # rv_1 and rv_3: the rejected one no longer counts
    assert await store.review_usage("other") == (1, used // 2) and await store.review_usage("nobody") == (0, 0)
    assert await store.review_transition("rv_1", ("pending",), "approved", {"decision": {"by": "rita"}})
    assert (await store.review_usage("bot"))[0] == 1
    # a row written before summaries existed (summary NULL) is still listed, from its document
    legacy = {"on_behalf_of": "ae:old", "intent": "legacy", "request": {"method": "PUT", "path": "/p",
                                                                       "body_json": {"a": 1}}}
    import orjson

    values = ["rv_old", "pending", 1.0, 1.0, None, "bot", "c.old", "crm", orjson.dumps(legacy)]
    if is_pg(store):
        async with store._conn() as conn:  # type: ignore[attr-defined]
            await conn.execute(f"INSERT INTO {store._s}.review_items (id, state, created_at, updated_at, "  # type: ignore[attr-defined]
                               "expires_at, agent, capability, upstream, doc) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                               *values)
    else:
        async with store._write():  # type: ignore[attr-defined]
            await store._conn().execute("INSERT INTO review_items (id, state, created_at, updated_at, expires_at, "  # type: ignore[attr-defined]
                                        "agent, capability, upstream, doc) VALUES (?,?,?,?,?,?,?,?,?)", values)
    [old] = await store.review_list(capability="c.old")
    assert old["intent"] == "legacy" and old["request"] == {"method": "PUT", "path": "/p"}


def test_both_backends_have_the_same_schema_versions():
    from proxy.store import sqlite as sq

    assert len(sq._MIGRATIONS) == LATEST


# --------------------------------------------------------------------------- transactions and steps


async def test_transactions_insert_get_list_due(store):
    await store.tx_insert(tx(1))
    await store.tx_insert(tx(2, agent="other", deadline=None))
    await store.tx_insert(tx(3, deadline=1_000.0))
    await store.tx_insert(tx(4, state="committed", deadline=1_000.0))
    assert await store.tx_get("tx_1") == tx(1)
    assert await store.tx_get("nope") is None
    assert [t["id"] for t in await store.tx_list()] == ["tx_4", "tx_3", "tx_2", "tx_1"]
    assert [t["id"] for t in await store.tx_list(state="open")] == ["tx_3", "tx_2", "tx_1"]
    assert [t["id"] for t in await store.tx_list(agent="other")] == ["tx_2"]
    assert [t["id"] for t in await store.tx_list(state="open", agent="bot", limit=1)] == ["tx_3"]
    assert [t["id"] for t in await store.tx_due(2_000.0)] == ["tx_3"]
    assert [t["id"] for t in await store.tx_due(1_800_000_000.0)] == ["tx_3", "tx_1"]
    with pytest.raises(Exception) as err:
        await store.tx_insert(tx(1))
    assert not isinstance(err.value, StoreUnavailable)


async def test_tx_count_counts_by_state(store):
    if not hasattr(store, "tx_count"):
        pytest.skip(f"{store.kind}: tx_count is a proposed interface addition not implemented here yet")
    for n in range(1, 6):
        await store.tx_insert(tx(n, state="open" if n % 2 else "committed"))
    assert await store.tx_count() == 3 and await store.tx_count("committed") == 2
    assert await store.tx_count("needs_attention") == 0


async def test_tx_transition_is_compare_and_set_and_moves_the_deadline(store, replica):
    other = await replica()
    await store.tx_insert(tx(1, deadline=1_000.0))
    assert not await store.tx_transition("tx_1", ("committed",), "rolled_back")
    assert await other.tx_transition("tx_1", ("open",), "open", {"deadline": 5_000.0, "note": "extended"})
    t = await store.tx_get("tx_1")
    assert t["deadline"] == 5_000.0 and t["note"] == "extended" and t["state"] == "open"
    assert await store.tx_due(2_000.0) == []
    results = await asyncio.gather(*[(store if k % 2 else other).tx_transition(
        "tx_1", ("open",), "committed" if k % 2 else "rolling_back", {"by": k}) for k in range(30)])
    assert sum(results) == 1
    t = await store.tx_get("tx_1")
    assert t["by"] == results.index(True) and t["state"] in ("committed", "rolling_back")
    assert await store.tx_transition("tx_1", (t["state"],), "rolled_back", None)
    assert (await other.tx_get("tx_1"))["state"] == "rolled_back"


async def test_steps_insert_update_and_list_in_order(store, replica):
    other = await replica()
    await store.tx_insert(tx(1))
    await store.tx_insert(tx(2))
    now = time.time()
    ids = []
    for k in range(4):
        s = {"tx_id": "tx_1" if k != 2 else "tx_2", "state": "planned", "created_at": now, "updated_at": now,
             "order": k, "plan": {"request": {"method": "DELETE", "path": f"/x/{k}"}}, "id": "ignored"}
        ids.append(await (store if k % 2 else other).step_insert(s))
    assert all(isinstance(i, int) for i in ids) and ids == sorted(ids) and len(set(ids)) == 4
    steps = await store.steps_for("tx_1")
    assert [s["id"] for s in steps] == [ids[0], ids[1], ids[3]]
    assert steps[0]["plan"] == {"request": {"method": "DELETE", "path": "/x/0"}} and steps[0]["tx_id"] == "tx_1"
    await other.step_update(ids[1], {"state": "armed", "created_ids": ["7"]})
    s1 = [s for s in await store.steps_for("tx_1") if s["id"] == ids[1]][0]
    assert s1["state"] == "armed" and s1["created_ids"] == ["7"] and s1["order"] == 1 and s1["updated_at"] >= now
    with pytest.raises(KeyError):
        await store.step_update(10_000_000, {"state": "armed"})
    assert await store.steps_for("tx_404") == []
    with pytest.raises(Exception):  # a step belongs to a transaction that exists
        await store.step_insert({"tx_id": "tx_404", "state": "planned", "created_at": now})


# --------------------------------------------------------------------------- governance


async def test_promotions_latest_per_grant_and_history(store, replica):
    other = await replica()
    rows = [
        {"agent": "bot", "capability": "c.update", "mode": "canary", "at": 1.0, "by": "rita"},
        {"agent": "bot", "capability": "c.create", "mode": "live", "at": 2.0, "by": "rita", "forced": True},
        {"agent": "bot", "capability": "c.update", "mode": "live", "at": 3.0, "by": "bob"},
        {"agent": "other", "capability": "c.update", "mode": "dry_run", "at": 4.0, "by": "rita"},
    ]
    for k, r in enumerate(rows):
        await (store if k % 2 else other).promotion_add(r)
    latest = await store.promotions()
    assert [(p["agent"], p["capability"], p["mode"]) for p in latest] == [
        ("bot", "c.create", "live"), ("bot", "c.update", "live"), ("other", "c.update", "dry_run")]
    assert latest[0] == rows[1]
    assert await store.promotions(agent="bot", capability="c.update") == [rows[2]]
    assert [p["agent"] for p in await store.promotions(capability="c.update")] == ["bot", "other"]
    assert await store.promotions(history=True) == rows
    assert await store.promotions(agent="bot", capability="c.update", history=True) == [rows[0], rows[2]]
    assert await store.promotions(agent="nobody") == []


async def test_quarantine_set_and_release(store, replica):
    other = await replica()
    row = {"agent": "bot", "since": 123.5, "reason": "error budget spent", "by": "tether"}
    assert await store.quarantine_set("bot", row)
    assert not await other.quarantine_set("bot", {**row, "reason": "second"})
    assert await other.quarantines() == {"bot": row}
    assert await store.quarantine_set("other", {"agent": "other", "reason": "manual"})
    assert set(await store.quarantines()) == {"bot", "other"}
    assert await other.quarantine_release("bot", "rita", "fixed")
    assert not await store.quarantine_release("bot", "rita", "again")
    assert set(await store.quarantines()) == {"other"}
    results = await asyncio.gather(*[(store if k % 2 else other).quarantine_set("racy", {"k": k}) for k in range(20)])
    assert sum(results) == 1


# --------------------------------------------------------------------------- leases


async def test_lease_is_exclusive_renewable_and_expires(store, replica):
    other = await replica()
    assert await store.try_lease("tx-sweep", "replica-a", 0.6)
    assert not await other.try_lease("tx-sweep", "replica-b", 0.6)
    assert await store.try_lease("tx-sweep", "replica-a", 0.6)  # the holder renews
    assert await other.try_lease("review-expiry", "replica-b", 5)  # another lease, another holder
    await asyncio.sleep(0.4)
    assert await store.try_lease("tx-sweep", "replica-a", 0.6)  # renewed at 0.4 s: holds until ~1.0 s
    await asyncio.sleep(0.4)
    assert not await other.try_lease("tx-sweep", "replica-b", 0.6)  # would have expired without renewal
    await asyncio.sleep(0.5)
    assert await other.try_lease("tx-sweep", "replica-b", 5)  # expired: taken over
    assert not await store.try_lease("tx-sweep", "replica-a", 5)
    assert not await store.try_lease("review-expiry", "replica-a", 5)


async def test_a_lease_renewed_with_ttl_zero_is_released(store, replica):
    other = await replica()
    assert await store.try_lease("tx-rollback:t1", "replica-a", 30)
    assert not await other.try_lease("tx-rollback:t1", "replica-b", 30)
    assert not await other.try_lease("tx-rollback:t1", "replica-b", 0)  # only the holder can release
    assert await store.try_lease("tx-rollback:t1", "replica-a", 0)  # the holder lets go
    await asyncio.sleep(0.01)
    assert await other.try_lease("tx-rollback:t1", "replica-b", 30)


async def test_many_replicas_racing_for_a_lease_exactly_one_gets_it(store, replica):
    others = [await replica() for _ in range(3)]
    stores = [store, *others]
    results = await asyncio.gather(*[stores[k % 4].try_lease("journal-retention", f"holder-{k}", 30)
                                     for k in range(40)])
    assert sum(results) == 1


# --------------------------------------------------------------------------- the CLI on both backends


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "proxy.cli.store", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_store_migrate_and_info_commands(store_url):
    pg = store_url.startswith("postgresql")
    if pg:
        r = _cli("store", "info", "--store", store_url)
        assert r.returncode == 1 and "migration(s) pending" in r.stdout, r.stdout + r.stderr
    r = _cli("store", "migrate", "--store", store_url)
    assert r.returncode == 0, r.stderr
    assert f"migrated schema version 0 -> {LATEST}" in r.stdout
    r = _cli("store", "migrate", "--store", store_url)
    assert r.returncode == 0 and "nothing to migrate" in r.stdout

    async def fill() -> None:
        s = open_store(store_url)
        await s.open()
        await append(s, [mk(1), mk(2), mk(3)])
        await s.review_insert(review_item(1))
        await s.tx_insert(tx(1))
        await s.quarantine_set("bot", {"reason": "x"})
        await s.close()

    _in_thread(fill)
    r = _cli("store", "info", "--store", store_url, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == ("postgresql" if pg else "sqlite")
    assert doc["schema_version"] == doc["latest_schema_version"] == LATEST and doc["migrations_pending"] == 0
    assert doc["journal"]["records"] == 3 and doc["journal"]["head_seq"] == 3
    assert doc["review_items"]["pending"] == 1 and doc["transactions"]["open"] == 1
    assert doc["quarantined_agents"] == ["bot"]
    if pg:
        assert doc["server"]["synchronous_commit"] == "on"
    r = _cli("store", "info", "--store", store_url)
    assert r.returncode == 0 and "3 records" in r.stdout
    # and the journal commands read either backend
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "proxy", "journal", "verify", "--store", store_url], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("OK 3 records"), r.stdout + r.stderr


# --------------------------------------------------------------------------- PostgreSQL specifics


pg_only = pytest.mark.postgres
on_pg = pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)


@pg_only
def test_url_format():
    from proxy.store.postgres import PostgresStore, parse_url, redact

    dsn, o = parse_url("postgresql://u:p%40ss@db:6432/tether?schema=tenant_1&pool_min=2&pool_max=20"
                       "&sslmode=require&command_timeout=3.5&connect_timeout=2&migrate=false&application_name=x")
    assert dsn == "postgresql://u:p%40ss@db:6432/tether?sslmode=require&application_name=x"
    assert o == {"schema": "tenant_1", "pool_min": 2, "pool_max": 20, "connect_timeout": 2.0,
                 "command_timeout": 3.5, "migrate": False}
    assert parse_url("postgres://h/db")[1]["schema"] == "public"
    assert parse_url("postgresql://h/db?options=-csearch_path%3Dfrom_options")[1]["schema"] == "from_options"
    for bad in ("postgresql://h/db?schema=a;drop", "postgresql://h/db?pool_max=0", "postgresql://h/db?migrate=maybe",
                "postgresql://h/db?pool_min=5&pool_max=2", 'postgresql://h/db?schema="x"'):
        with pytest.raises(ValueError):
            parse_url(bad)
        with pytest.raises(StoreUnavailable):
            PostgresStore(bad)
    assert redact("postgresql://u:secret@db/x?schema=s") == "postgresql://u:***@db/x?schema=s"
    assert redact("postgresql://u@db/x") == "postgresql://u@db/x"
    s = PostgresStore("postgresql://u:secret@db/x?schema=s")
    assert "secret" not in s.description and s.channel == "tether_journal_s"
    assert PostgresStore("postgresql://u@db/x").channel == "tether_journal"


@pg_only
async def test_schemas_are_independent_deployments():
    require_pg()
    (u1, s1), (u2, s2) = new_pg_url(), new_pg_url()
    a, b = open_store(u1), open_store(u2)
    try:
        await a.open()
        await b.open()
        await append(a, [mk(1), mk(2)])
        assert (await b.journal_head())[0] == 0
        await b.review_insert(review_item(1))
        assert await a.review_get("rv_1") is None
        assert await a.try_lease("x", "h1", 30) and await b.try_lease("x", "h2", 30)
    finally:
        await a.close()
        await b.close()
        drop_schema(s1)
        drop_schema(s2)


@pg_only
async def test_migrate_false_refuses_an_old_schema_until_migrated():
    require_pg()
    url, schema = new_pg_url()
    try:
        s = open_store(with_params(url, migrate="false"))
        with pytest.raises(StoreUnavailable, match="tether store migrate"):
            await s.open()
        s = open_store(url)
        await s.open()
        await s.close()
        s = open_store(with_params(url, migrate="false"))
        await s.open()
        assert await s.schema_version() == LATEST
        await s.close()
    finally:
        drop_schema(schema)


@pg_only
@on_pg
async def test_commits_are_durable_and_the_chain_head_is_locked(store):
    async with store._conn() as conn:  # type: ignore[attr-defined]
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    # an appender holding the head row blocks the others until it commits: no fork in the chain
    other = open_store(store.url)  # type: ignore[attr-defined]
    await other.open()
    try:
        async with store._conn() as conn:  # type: ignore[attr-defined]
            tr = conn.transaction()
            await tr.start()
            await conn.fetchrow(store._sql["head_lock"])  # type: ignore[attr-defined]
            blocked = asyncio.ensure_future(append(other, [mk(1)]))
            await asyncio.sleep(0.3)
            assert not blocked.done()
            await tr.rollback()
        assert [s for s, _ in await asyncio.wait_for(blocked, 5)] == [1]
    finally:
        await other.close()


@pg_only
@on_pg
async def test_journal_wait_blocks_until_a_commit_then_wakes_at_once(store, replica):
    other = await replica()
    await append(store, [mk(1)])
    t0 = time.monotonic()
    await store.journal_wait(1, 0.4)  # nothing new: waits the whole timeout, no busy loop
    assert time.monotonic() - t0 >= 0.35
    t0 = time.monotonic()
    await store.journal_wait(0, 5)  # already past: returns at once
    assert time.monotonic() - t0 < 0.1

    async def later() -> None:
        await asyncio.sleep(0.4)
        await append(other, [mk(2)])

    task = asyncio.ensure_future(later())
    t0 = time.monotonic()
    await store.journal_wait(1, 5)
    took = time.monotonic() - t0
    await task
    assert 0.3 <= took < 1.0, took
    # the store notifies ``tether_journal[_<schema>]`` with the last sequence number
    import asyncpg

    got: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(pg_dsn())
    try:
        await conn.add_listener(store.channel, lambda *a: got.put_nowait(a[-1]))  # type: ignore[attr-defined]
        await append(other, [mk(3), mk(4)])
        assert await asyncio.wait_for(got.get(), 2) == "4"
    finally:
        await conn.close()


@pg_only
async def test_unreachable_server_is_unavailable_quickly():
    require_pg()
    s = open_store("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await s.open()
    assert time.monotonic() - t0 < 5


@pg_only
async def test_terminated_backends_fail_cleanly_then_reconnect():
    require_pg()
    app = f"tether_kill_{secrets.token_hex(4)}"
    url, schema = new_pg_url(application_name=app, pool_min=3, pool_max=3)
    s = open_store(url)
    await s.open()
    try:
        await append(s, [mk(1)])
        await s.journal_wait(1, 0.01)  # a LISTEN connection too
        await asyncio.gather(*(s.ping() for _ in range(3)))
        killed = pg_admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app)
        assert len(killed) >= 2
        outcomes = []
        for i in range(2, 6):
            try:
                out = await asyncio.wait_for(append(s, [mk(i)]), 15)  # never hangs
                outcomes.append(out[0][0])
            except StoreUnavailable as exc:
                outcomes.append(str(exc))
        assert all(isinstance(o, int) for o in outcomes[1:]), outcomes  # reconnected by the second try
        res = await verify(s)
        assert res.ok, res
        # tail -f keeps working: the LISTEN connection is re-established
        head = (await s.journal_head())[0]
        await s.journal_wait(head, 0.2)

        async def later() -> None:
            await asyncio.sleep(0.3)
            await append(s, [mk(99)])

        task = asyncio.ensure_future(later())
        t0 = time.monotonic()
        await s.journal_wait(head, 5)
        await task
        assert time.monotonic() - t0 < 1.0
    finally:
        await s.close()
        drop_schema(schema)


class TcpProxy:
    """A TCP forwarder in front of PostgreSQL that the test can take down, bring back, or freeze."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.conns: set[asyncio.StreamWriter] = set()
        self.frozen = asyncio.Event()  # set: forward nothing (a partition, a hung server)

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Refuse new connections and cut the open ones (the server is gone)."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for w in list(self.conns):
            w.transport.abort()
        self.conns.clear()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        self.conns |= {cw, uw}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    while self.frozen.is_set():
                        await asyncio.sleep(0.05)
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.transport.abort()
                self.conns.discard(w)

        await asyncio.gather(pump(cr, uw), pump(ur, cw))


def _pg_host_port() -> tuple[str, int]:
    from urllib.parse import urlsplit

    u = urlsplit(pg_dsn())
    return u.hostname or "127.0.0.1", u.port or 5432


def _via(proxy: TcpProxy, **params: Any) -> tuple[str, str]:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(pg_dsn())
    netloc = u.netloc.rpartition("@")
    dsn = urlunsplit((u.scheme, f"{netloc[0]}{netloc[1]}127.0.0.1:{proxy.port}", u.path, u.query, ""))
    schema = f"tether_t_{secrets.token_hex(5)}"
    return with_params(dsn, schema=schema, **params), schema


@pg_only
async def test_server_gone_then_back_unavailable_then_recovers():
    require_pg()
    proxy = TcpProxy(*_pg_host_port())
    await proxy.up()
    url, schema = _via(proxy, connect_timeout=1, command_timeout=2)
    s = open_store(url)
    await s.open()
    try:
        await append(s, [mk(1)])
        await proxy.down()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(append(s, [mk(2)]), 15)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.ping(), 15)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(s.review_get("x"), 15)
        assert time.monotonic() - t0 < 10
        await proxy.up()
        assert [x for x, _ in await asyncio.wait_for(append(s, [mk(3)]), 15)] == [2]
        assert (await verify(s)).ok
    finally:
        await s.close()
        await proxy.down()
        drop_schema(schema)


@pg_only
async def test_a_frozen_server_times_out_instead_of_hanging():
    require_pg()
    proxy = TcpProxy(*_pg_host_port())
    await proxy.up()
    url, schema = _via(proxy, connect_timeout=1, command_timeout=1.5)
    s = open_store(url)
    await s.open()
    try:
        await append(s, [mk(1)])
        proxy.frozen.set()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(append(s, [mk(2)]), 20)
        assert time.monotonic() - t0 < 8
        proxy.frozen.clear()
        for _ in range(20):  # back: the next appends succeed on fresh connections
            try:
                out = await asyncio.wait_for(append(s, [mk(3)]), 15)
                break
            except StoreUnavailable:
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the store did not recover")
        assert out[0][0] == 2
        assert (await verify(s)).ok
    finally:
        await s.close()
        await proxy.down()
        drop_schema(schema)


@pg_only
async def test_a_replica_frozen_inside_an_append_cannot_stall_the_chain_for_long():
    require_pg()
    url, schema = new_pg_url(command_timeout=1)  # idle_in_transaction_session_timeout: max(5 s, 2 x 1 s)
    frozen, other = open_store(url), open_store(with_params(url, command_timeout=15))
    await frozen.open()
    await other.open()
    try:
        async with frozen._conn() as conn:  # type: ignore[attr-defined]
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "5s"
            tr = conn.transaction()
            await tr.start()
            await conn.fetchrow(frozen._sql["head_lock"])  # type: ignore[attr-defined]
            # ... and this replica stops talking, holding the chain head
            t0 = time.monotonic()
            out = await asyncio.wait_for(append(other, [mk(1)]), 20)
            waited = time.monotonic() - t0
            assert out[0][0] == 1 and 4.0 <= waited < 10.0, waited
        assert (await verify(other)).ok
    finally:
        await frozen.close()
        await other.close()
        drop_schema(schema)


async def test_a_cancelled_store_call_never_leaves_the_connection_to_the_next_caller_mid_transaction(tmp_path):
    """A background loop cancelled at shutdown while the database thread works for it (here: waiting for
    another process's write lock inside BEGIN) must not hand the connection on until that work is over
    and its transaction rolled back. Before, the next caller — the gateway's 'stopped' record, committed
    inline — ran on the same connection at once: "cannot start a transaction within a transaction"."""
    import sqlite3

    from proxy.chain import encode_record

    path = str(tmp_path / "t.db")
    store = open_store(path)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)  # another process holding the write lock
    other.execute("BEGIN IMMEDIATE")
    try:
        lease = asyncio.ensure_future(store.try_lease("review-expiry", "me", 60))
        await asyncio.sleep(0.2)  # its BEGIN is waiting on the database thread
        lease.cancel()
        asyncio.get_running_loop().call_later(0.3, other.execute, "ROLLBACK")  # the other process finishes
        payload, columns = encode_record(base_record("system", event="stopped"))
        linked = await store.journal_append([payload], [columns], inline=True)
        assert [seq for seq, _ in linked] == [1]
        with pytest.raises(asyncio.CancelledError):
            await lease
        assert (await store.journal_head())[0] == 1
        assert await store.try_lease("review-expiry", "me", 60)  # the connection is usable, no transaction left
    finally:
        other.close()
        await store.close()
