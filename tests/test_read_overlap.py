"""Reads go out while their intent record commits; their answer is released only once it is durable
(issue 27, decision 2). The store's commit is held back or made to fail here, in-process, and what the
upstream and the agent see is checked at each moment."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import base_rules

pytestmark = pytest.mark.stores


class HeldCommits:
    """Holds every journal commit of a store until released (or makes them fail)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.orig = store.journal_append
        self.gate = asyncio.Event()
        self.fail = False
        self.waiting = 0

    async def append(self, *a: Any, **kw: Any) -> Any:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if self.fail:
            raise OSError("disk gone (test)")
        return await self.orig(*a, **kw)

    def __enter__(self) -> "HeldCommits":
        self.store.journal_append = self.append
        return self

    def __exit__(self, *exc: Any) -> None:
        self.gate.set()
        del self.store.journal_append


async def until(pred: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def gw(make_gateway: Any, upstream: Any, store_url: str) -> Any:
    rules = base_rules(upstream.url, store_url)
    rules["capabilities"]["contact.list"]["journal"] = "before_forward"
    g = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "1", "name": "Ada"})
    return g


@pytest.mark.parametrize("path", ["/api/contacts/1", "/big"])
async def test_a_read_goes_out_while_its_record_commits_and_its_answer_waits_for_it(gw, upstream, path):
    with HeldCommits(gw.gw.store) as held:
        call = asyncio.ensure_future(gw.request("GET", path))
        await until(lambda: any(r.path == path for r in upstream.received))  # forwarded meanwhile...
        await asyncio.sleep(0.2)
        assert not call.done()  # ...but nothing of the answer was released
        assert held.waiting >= 1
        held.gate.set()
        r = await asyncio.wait_for(call, 10)
    assert r.status == 200
    recs = await gw.journal()
    intent = [x for x in recs if x["kind"] == "request" and x["path"] == path][-1]
    outcome = [x for x in recs if x["kind"] == "outcome" and x["request_id"] == intent["request_id"]][-1]
    assert outcome["intent_seq"] == intent["seq"] and outcome["status"] == 200


async def test_a_read_whose_record_cannot_be_committed_gets_no_answer(gw, upstream):
    with HeldCommits(gw.gw.store) as held:
        call = asyncio.ensure_future(gw.request("GET", "/big"))  # a streamed answer: withheld before its head
        await until(lambda: any(r.path == "/big" for r in upstream.received))
        held.fail = True
        held.gate.set()
        r = await asyncio.wait_for(call, 10)
        body = await r.read()
    assert r.status == 503 and b"journal_unavailable" in body and len(body) < 2000


async def test_writes_and_before_forward_reads_wait_for_their_record(gw, upstream):
    with HeldCommits(gw.gw.store) as held:
        write = asyncio.ensure_future(gw.request("PATCH", "/api/contacts/1", json={"name": "Bea"}))
        strict = asyncio.ensure_future(gw.request("GET", "/api/contacts"))  # journal: before_forward
        await until(lambda: held.waiting >= 1)
        await asyncio.sleep(0.3)
        assert upstream.seen("PATCH") == [] and upstream.seen("GET") == []  # nothing left before its record
        held.gate.set()
        assert (await asyncio.wait_for(write, 10)).status == 200
        assert (await asyncio.wait_for(strict, 10)).status == 200
    assert len(upstream.seen("PATCH")) == 1
