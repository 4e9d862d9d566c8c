"""Shared gateways: several Tether processes on one PostgreSQL store.

Three real gateway processes (``python -m proxy serve``, each on its own ports) share one schema of the
test database: one hash chain, one review queue, one set of transactions and leases. Skipped with the
reason when PostgreSQL is not reachable (see tests/test_store.py).
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from proxy.app.gateway import Gateway
from proxy.config import parse_rules
from proxy.policy.identity import mint_token
from proxy.store import open_store
from tests.conftest import ROOT, GatewayHandle, base_rules
from tests.procs import GatewayProcess, run_cli
from tests.test_store import TcpProxy, _pg_host_port, _via, drop_schema, new_pg_url, require_pg

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def pg_url() -> Any:
    require_pg()
    url, schema = new_pg_url()
    try:
        yield url
    finally:
        drop_schema(schema)


def shared_rules(upstream_url: str, store: str) -> dict[str, Any]:
    rules = base_rules(upstream_url, store)
    rules["agents"]["dry-bot"] = {"grants": ["contact.read", "contact.create"]}  # writes dry-run: reviewed
    rules["server"]["transactions"] = {"sweep_interval": 0.2, "retry_backoff": 0.05}
    rules["server"]["review"] = {"sweep_interval": 0.5}
    return rules


StartReplicas = Callable[..., Awaitable[list[GatewayProcess]]]


@pytest.fixture
async def replicas(upstream, pg_url, tmp_path) -> AsyncIterator[StartReplicas]:
    started: list[GatewayProcess] = []

    async def start(n: int = 3, rules: dict[str, Any] | None = None) -> list[GatewayProcess]:
        rules = rules or shared_rules(upstream.url, pg_url)
        procs = []
        for i in range(n):
            d = tmp_path / f"replica-{len(started) + i}"
            d.mkdir()
            procs.append(GatewayProcess(rules, d))
        # all at once: they race to migrate the fresh schema
        await asyncio.gather(*(asyncio.to_thread(p.start, 30.0) for p in procs))
        started.extend(procs)
        return procs

    yield start
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))


def tokens(rules: dict[str, Any]) -> tuple[Any, Callable[..., str]]:
    ident = parse_rules(rules).identity

    def token(agent: str = "bot", reviewer: str | None = None) -> str:
        if reviewer:
            return mint_token(ident, reviewer, roles=[ident.reviewer_role])
        return mint_token(ident, agent)

    return ident, token


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args)


async def journal_rows(url: str) -> list[dict[str, Any]]:
    s = open_store(url)
    await s.open()
    try:
        return [r.record() | {"seq": r.seq} for r in await s.journal_query(limit=1_000_000)]
    finally:
        await s.close()


async def test_three_replicas_write_one_verifiable_chain(replicas, upstream, pg_url):
    procs = await replicas()
    _, token = tokens(shared_rules(upstream.url, pg_url))
    for i in range(40):
        upstream.put_record("contacts", {"id": str(i), "name": "n"})
    acked: list[tuple[int, str]] = []
    h = {"Authorization": f"Bearer {token()}", "X-Tether-Intent": "shared load"}

    async def client(replica: int, k: int, s: aiohttp.ClientSession) -> None:
        base = procs[replica].listener("crm")
        for n in range(12):
            cid = (k * 7 + n) % 40
            if n % 3 == 0:
                req = s.get(f"{base}/api/contacts/{cid}", headers=h)
            elif n % 3 == 1:
                req = s.patch(f"{base}/api/contacts/{cid}", json={"name": f"r{replica}-{k}-{n}"}, headers=h)
            else:
                req = s.post(f"{base}/api/contacts", json={"name": f"new-{replica}-{k}-{n}"}, headers=h)
            async with req as r:
                await r.read()
                assert r.status < 300, (r.status, await r.text())
                acked.append((replica, r.headers["X-Tether-Request-Id"]))

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(rep, k, s) for rep in range(3) for k in range(8)))
    assert len(acked) == 3 * 8 * 12
    # while they run: the chain verifies from the command line
    r = await cli("journal", "verify", "--store", pg_url)
    assert r.returncode == 0 and r.stdout.startswith("OK "), r.stdout + r.stderr
    rows = await journal_rows(pg_url)
    intents = {x["request_id"]: x for x in rows if x["kind"] == "request"}
    missing = [rid for _, rid in acked if rid not in intents]
    assert not missing, f"{len(missing)} acknowledged requests are not in the journal"
    # one sequence across replicas: the authorisation event each upstream call carried is the seq of its intent
    forwarded = [x for x in upstream.received if "X-Tether-Request-Id" in x.headers]
    assert len(forwarded) >= len(acked)
    by_seq = {x["seq"]: x for x in rows}
    for x in forwarded:
        if "X-Tether-Authz-Event" not in x.headers:  # a read, sent while its record committed: its request id
            assert x.method == "GET" and x.headers["X-Tether-Request-Id"] in intents
            continue
        seq = int(x.headers["X-Tether-Authz-Event"])
        assert by_seq[seq]["request_id"] == x.headers["X-Tether-Request-Id"]
    started = {x["instance"] for x in rows if x["kind"] == "system" and x.get("event") == "started"}
    assert len(started) == 3  # all three wrote to this one chain
    seqs = [x["seq"] for x in rows]
    assert seqs == list(range(1, len(rows) + 1))
    # and after they all stop (each journals its 'stopped' record) the chain still verifies
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
    r = await cli("journal", "verify", "--store", pg_url)
    assert r.returncode == 0, r.stdout
    stopped = [x for x in await journal_rows(pg_url) if x.get("event") == "stopped"]
    assert len(stopped) == 3


async def test_a_review_item_approved_from_two_replicas_at_once_is_replayed_once(replicas, upstream, pg_url):
    procs = await replicas()
    _, token = tokens(shared_rules(upstream.url, pg_url))
    items = []
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            async with s.post(f"{procs[i % 3].listener('crm')}/api/contacts", json={"name": f"Once {i}"},
                              headers={"Authorization": f"Bearer {token('dry-bot')}",
                                       "X-Tether-Intent": "add a contact"}) as r:
                assert r.status == 201
                items.append(r.headers["X-Tether-Dry-Run"])
        assert upstream.seen("POST") == []
        # the review queue is shared: every replica lists every item
        for p in procs:
            async with s.get(f"{p.admin_url}/api/review/items?state=pending",
                             headers={"Authorization": f"Bearer {token(reviewer='rita')}"}) as r:
                assert {i["id"] for i in (await r.json())["items"]} == set(items)
        for item in items:
            async def approve(p: GatewayProcess, who: str) -> int:
                async with s.post(f"{p.admin_url}/api/review/items/{item}/approve", json={"note": who},
                                  headers={"Authorization": f"Bearer {token(reviewer=who)}"}) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(approve(procs[1], "rita"), approve(procs[2], "bob"),
                                            approve(procs[0], "eve"), approve(procs[1], "sam"))
            assert sorted(statuses) == [200, 409, 409, 409], statuses
    posts = upstream.seen("POST", "/api/contacts")
    assert sorted(x.json()["name"] for x in posts) == [f"Once {i}" for i in range(4)]  # each exactly once
    rows = await journal_rows(pg_url)
    for item in items:
        assert len([x for x in rows if x.get("review_item") == item and x["kind"] == "review"
                    and x["decision"] == "approved"]) == 1
        assert len([x for x in rows if x.get("review_item") == item and x["kind"] == "request"
                    and x["decision"] == "replay"]) == 1


async def test_a_transaction_opened_on_one_replica_is_rolled_back_from_another(replicas, upstream, pg_url):
    a, b, c = await replicas()
    _, token = tokens(shared_rules(upstream.url, pg_url))
    upstream.put_record("contacts", {"id": "acme", "name": "Before", "stage": "open"})
    h = {"Authorization": f"Bearer {token()}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{a.url}/_tether/transactions", json={"name": "renewal", "deadline": "10m"},
                          headers=h) as r:
            assert r.status == 201
            tx_id = (await r.json())["id"]
        th = {**h, "X-Tether-Intent": "renew", "X-Tether-Transaction": tx_id}
        async with s.patch(f"{a.listener('crm')}/api/contacts/acme", json={"name": "After"}, headers=th) as r:
            assert r.status == 200
        async with s.post(f"{c.listener('crm')}/api/contacts", json={"name": "Created"}, headers=th) as r:
            assert r.status == 201  # a write through another replica joins the same transaction
            created = (await r.json())["id"]
        assert upstream.records["contacts"]["acme"]["name"] == "After" and created in upstream.records["contacts"]
        async with s.post(f"{b.url}/_tether/transactions/{tx_id}/rollback", headers=h) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
        assert doc["state"] == "rolled_back"
        assert [st["state"] for st in doc["steps"]] == ["compensated", "compensated"]
        assert upstream.records["contacts"]["acme"]["name"] == "Before"
        assert created not in upstream.records["contacts"]
        async with s.get(f"{c.url}/_tether/transactions/{tx_id}", headers=h) as r:
            assert (await r.json())["state"] == "rolled_back"
        # committing it from the first replica is refused: it is closed everywhere
        async with s.post(f"{a.url}/_tether/transactions/{tx_id}/commit", headers=h) as r:
            assert r.status == 409
        # and one opened on b is committed through c
        async with s.post(f"{b.url}/_tether/transactions", json={}, headers=h) as r:
            tx2 = (await r.json())["id"]
        async with s.post(f"{c.url}/_tether/transactions/{tx2}/commit", headers=h) as r:
            assert (await r.json())["state"] == "committed"
    undo = [x for x in upstream.received if x.headers.get("X-Tether-Intent", "").startswith("rollback")
            and x.method != "GET"]
    assert [(x.method, x.path) for x in undo] == [("DELETE", f"/api/contacts/{created}"),
                                                  ("PATCH", "/api/contacts/acme")]


async def test_the_deadline_sweep_rolls_back_once_across_replicas(replicas, upstream, pg_url):
    procs = await replicas()
    _, token = tokens(shared_rules(upstream.url, pg_url))
    h = {"Authorization": f"Bearer {token()}"}
    tx_ids = []
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.post(f"{procs[i].url}/_tether/transactions", json={"deadline": 1.0}, headers=h) as r:
                tx_ids.append((await r.json())["id"])
            async with s.post(f"{procs[i].listener('crm')}/api/contacts", json={"name": f"temp {i}"},
                              headers={**h, "X-Tether-Intent": "x", "X-Tether-Transaction": tx_ids[-1]}) as r:
                assert r.status == 201
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = []
            for t in tx_ids:
                async with s.get(f"{procs[0].url}/_tether/transactions/{t}", headers=h) as r:
                    states.append((await r.json())["state"])
            if all(st == "rolled_back" for st in states):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail(f"the sweep did not roll back: {states}")
    assert upstream.records.get("contacts", {}) == {}
    deletes = upstream.seen("DELETE", "/api/contacts")
    assert len(deletes) == 3  # each undo sent once, whichever replica swept
    rows = await journal_rows(pg_url)
    for t in tx_ids:
        assert len([x for x in rows if x.get("event") == "rollback_started" and x.get("tx") == t]) == 1


async def test_journal_tail_follow_on_postgresql_prints_a_new_record_within_a_second(replicas, upstream, pg_url):
    procs = await replicas(2)
    _, token = tokens(shared_rules(upstream.url, pg_url))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tail = subprocess.Popen([sys.executable, "-m", "proxy", "journal", "tail", "-f", "-n", "0", "--json",
                             "--store", pg_url], stdout=subprocess.PIPE, env=env)
    try:
        await asyncio.sleep(2.0)  # let it start and reach the follow loop
        async with aiohttp.ClientSession() as s:
            for p in procs:
                async with s.get(f"{p.listener('crm')}/api/contacts/42",
                                 headers={"Authorization": f"Bearer {token()}"}) as r:
                    rid = r.headers["X-Tether-Request-Id"]
                t0 = time.monotonic()
                buf = b""
                while time.monotonic() - t0 < 1.0 and rid.encode() not in buf:
                    ready, _, _ = select.select([tail.stdout], [], [], 0.02)
                    if ready:
                        buf += os.read(tail.stdout.fileno(), 65536)  # type: ignore[union-attr]
                    await asyncio.sleep(0)
                assert rid.encode() in buf, f"no record for {rid} within 1 s: {buf[:500]!r}"
    finally:
        tail.kill()
        tail.wait()


async def test_gateway_answers_503_while_postgresql_is_away_and_recovers(upstream, http, tmp_path):
    require_pg()
    proxy = TcpProxy(*_pg_host_port())
    await proxy.up()
    url, schema = _via(proxy, connect_timeout=1, command_timeout=2)
    gateway = Gateway(parse_rules(base_rules(upstream.url, url)))
    try:
        await gateway.start()
        gw = GatewayHandle(gateway, tmp_path / "rules.yaml", http)
        upstream.put_record("contacts", {"id": "1", "name": "A"})
        r = await gw.request("GET", "/api/contacts/1")
        assert r.status == 200
        await proxy.down()
        t0 = time.monotonic()
        r = await gw.request("GET", "/api/contacts/1")
        assert r.status == 503 and (await r.json())["error"]["code"] == "journal_unavailable"
        r = await gw.request("PATCH", "/api/contacts/1", json={"name": "Z"})
        assert r.status == 503
        assert time.monotonic() - t0 < 10  # refused promptly, not hung
        async with gw.session.get(gw.url + "/_tether/readyz") as rr:
            assert rr.status == 503
        # the read went out while its record could not commit (its answer was withheld); no write left
        assert [x.method for x in upstream.received] == ["GET", "GET"]
        await proxy.up()
        for _ in range(50):
            r = await gw.request("PATCH", "/api/contacts/1", json={"name": "B"})
            if r.status == 200:
                break
            await asyncio.sleep(0.2)
        assert r.status == 200 and upstream.records["contacts"]["1"]["name"] == "B"
        async with gw.session.get(gw.url + "/_tether/readyz") as rr:
            assert rr.status == 200
        r = await cli("journal", "verify", "--store", url)
        assert r.returncode == 0, r.stdout
    finally:
        if proxy.server is None:
            await proxy.up()
        await gateway.stop(grace=1)
        await proxy.down()
        drop_schema(schema)
