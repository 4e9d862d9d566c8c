"""One agent's bytes never break another agent's requests (the journal's group commit is shared).

An agent controls every byte it sends. Values JSON cannot hold exactly — a lone surrogate escape, an
integer beyond 64 bits, a number beyond a double, header bytes that are not UTF-8 — used to reach the
journal batch inside a captured review row (dry-run, canary or quarantined writes), where one of them
failed the whole commit: every agent's concurrent requests got 503 ``journal_unavailable`` and
already-forwarded writes lost their outcome records. Now such a body is refused at parse time (400
``unrepresentable_value``, the field named), a review row is serialised before it joins a batch (so it
can fail only its own request), and a journal record keeps what it cannot store exactly escaped and
listed in ``escaped``.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from proxy.journal.writer import verify
from tests.conftest import base_rules
from tests.test_bypass import raw_request

pytestmark = pytest.mark.stores


def rules_with_attackers(upstream, store):
    rules = base_rules(upstream.url, store)
    rules["agents"]["evil"] = {"grants": [{"capability": "contact.create", "mode": "dry_run"}]}
    rules["agents"]["evil-q"] = {"grants": [{"capability": "contact.create", "mode": "live"}]}  # quarantined below
    rules["capabilities"]["contact.create"]["audit_fields"] = ["name"]
    return rules


def attack(port: int, token: str, body: bytes, extra: bytes = b"", intent: bytes = b"probe") -> bytes:
    return (b"POST /crm/api/contacts HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
            b"X-Tether-Intent: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n%s") % (port, token.encode(), intent, len(body), extra, body)


# (body, extra header lines, intent, the field the refusal must name)
ATTACKS = [
    (rb'{"name": "\ud800"}', b"", b"probe", "name"),
    (b'{"name": "x", "n": 123456789012345678901234567890}', b"", b"probe", "n"),
    (b'{"name": "x", "deep": {"n": -9223372036854775809}}', b"", b"probe", "deep.n"),
    (b'{"name": "x", "n": 1e400}', b"", b"probe", "n"),
    (rb'{"\udc00": 1}', b"", b"probe", "(body)"),
    (b'{"name": "x"}', b"X-Note: a\xffb\r\n", b"probe", "X-Note"),  # a header that is not UTF-8
    (b'{"name": "x"}', b"", b"caf\xe9 \xff", "Intent"),  # an intent that is not UTF-8 (refused as it enters)
]
# what each refusal is called: values JSON cannot hold exactly, or text refused where it enters Tether
CODES = {"Intent": "bad_request"}


async def test_hostile_bytes_in_captured_writes_never_cost_another_agent_a_record(make_gateway, upstream, store_url):
    gw = await make_gateway(rules_with_attackers(upstream, store_url))
    r = await gw.admin("POST", "/api/agents/evil-q/quarantine", json={"reason": "test: forced to dry-run"})
    assert r.status == 200
    port = gw.gw.listeners[0].bound_port
    tokens = {"evil": gw.token("evil"), "evil-q": gw.token("evil-q")}
    done = asyncio.Event()
    answers: list[tuple[str, int, dict]] = []

    async def attacker(agent: str) -> None:
        i = 0
        while not done.is_set() or i < 2 * len(ATTACKS):
            body, extra, intent, field = ATTACKS[i % len(ATTACKS)]
            status, _, raw = await raw_request(port, attack(port, tokens[agent], body, extra, intent))
            answers.append((field, status, orjson.loads(raw) if raw else {}))
            i += 1

    sem = asyncio.Semaphore(16)

    async def live(i: int) -> int:
        async with sem:
            r = await gw.request("POST", "/api/contacts", json={"name": f"live {i}"}, intent=f"create {i}")
            return r.status

    attackers = [asyncio.ensure_future(attacker(a)) for a in ("evil", "evil", "evil-q")]
    statuses = await asyncio.gather(*[live(i) for i in range(500)])
    done.set()
    await asyncio.gather(*attackers)

    # the honest agent lost nothing: every write answered, forwarded once, and both its records kept
    assert statuses == [201] * 500
    assert len(upstream.seen("POST")) == 500
    recs = await gw.journal()
    mine = [x for x in recs if x["agent"] == "bot"]
    assert sorted(x["intent"] for x in mine if x["kind"] == "request" and x["decision"] == "live") == \
        sorted(f"create {i}" for i in range(500))
    outcomes = [x for x in mine if x["kind"] == "outcome"]
    assert len(outcomes) == 500 and all(x["status"] == 201 and x["forwarded"] for x in outcomes)
    assert gw.gw.journal.healthy

    # the attackers got a 400 naming what was refused, never a 503; nothing of theirs was captured
    assert len(answers) >= 3 * len(ATTACKS)
    for field, status, doc in answers:
        assert status == 400, (field, status, doc)
        err = doc["error"]
        assert err["code"] == CODES.get(field, "unrepresentable_value"), doc
        assert field in err.get("details", {}).get("field", "") or field in err["message"], doc
    assert (await gw.gw.store.review_usage("evil")) == (0, 0) and (await gw.gw.store.review_usage("evil-q"))[0] == 0
    assert not upstream.seen("POST", "/api/contacts") or len(upstream.seen("POST")) == 500
    # ... and every attempt is in the journal, as a denial; what JSON cannot hold is escaped and listed
    denied = [x for x in recs if x["agent"] in ("evil", "evil-q") and x["kind"] == "request"]
    assert len(denied) == len(answers) and all(x["decision"] == "denied" for x in denied)
    assert all(x["error"] in ("unrepresentable_value", "bad_request") for x in denied)
    # an intent that is not text is refused as it enters: journaled as a denial, its bytes never stored
    bad_intents = [x for x in denied if x["error"] == "bad_request"]
    assert bad_intents and all(x["intent"] is None and "X-Tether-Intent" in x["message"] for x in bad_intents)
    assert (await verify(gw.gw.store)).ok


async def test_a_record_json_cannot_hold_is_kept_escaped_not_dropped(store_url, tmp_path):
    """Records sharing one commit with a record JSON cannot hold (a claim or header with bytes that are not
    UTF-8, an integer beyond 64 bits): all are committed, the odd one with its values escaped and named
    in ``escaped``, and the mirror holds exactly what the chain hashed."""
    from proxy.journal.writer import JournalWriter, base_record
    from proxy.store import open_store

    store = open_store(store_url)
    await store.open()
    writer = JournalWriter(store, mirror_file=tmp_path / "mirror.jsonl")
    writer.start()
    try:
        odd = base_record("request", agent="bot", on_behalf_of="jane\ud800@acme", intent="caf\udce9",
                          audit={"n": 2 ** 70, 7: "int key"})
        good = [writer.write(base_record("request", agent="bot", intent=f"good {i}")) for i in range(50)]
        seqs = await asyncio.gather(writer.write(odd), *good)
        assert len(set(seqs)) == 51 and writer.healthy
        rows = await store.journal_query(limit=100)
        [rec] = [r.record() for r in rows if r.record().get("escaped")]
        assert rec["escaped"] == ["audit.7", "audit.n", "intent", "on_behalf_of"]
        assert rec["on_behalf_of"] == "jane\\ud800@acme" and rec["audit"] == {"n": str(2 ** 70), "7": "int key"}
        assert [r.columns["on_behalf_of"] for r in rows if r.record().get("escaped")] == ["jane\\ud800@acme"]
        assert (await verify(store)).ok
    finally:
        await writer.close()
        await store.close()
    lines = [orjson.loads(x) for x in (tmp_path / "mirror.jsonl").read_bytes().splitlines()]
    assert [(x["seq"], x["hash"]) for x in lines] == [(r.seq, r.hash) for r in rows]
    assert lines[0] == {"seq": rows[0].seq, "hash": rows[0].hash, **rows[0].record()}
