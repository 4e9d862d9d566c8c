"""The audit journal: records per decision, written before forwarding, tamper-evident, durable, tailable."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time

import aiohttp
import pytest

from proxy.config import parse_rules
from proxy.journal.writer import archive
from proxy.policy.identity import mint_token
from proxy.store import open_store
from tests.conftest import ROOT, base_rules, store_sql, store_unwritable
from tests.procs import GatewayProcess, run_cli

pytestmark = pytest.mark.stores  # every test here runs on SQLite and on PostgreSQL


async def test_live_request_leaves_intent_then_outcome(gateway, upstream):
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    r = await gateway.request("PATCH", "/api/contacts/1", on_behalf_of="ae:jane", intent="fix the name",
                              json={"name": "B"},
                              headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert r.status == 200
    rid = r.headers["X-Tether-Request-Id"]
    recs = [x for x in await gateway.journal() if x["request_id"] == rid]
    assert [x["kind"] for x in recs] == ["request", "outcome"]
    intent, outcome = recs
    assert intent["decision"] == "live" and intent["agent"] == "bot" and intent["on_behalf_of"] == "ae:jane"
    assert intent["intent"] == "fix the name" and intent["capability"] == "contact.update"
    assert intent["method"] == "PATCH" and intent["path"] == "/api/contacts/1" and intent["upstream"] == "crm"
    assert intent["body_sha256"] == __import__("hashlib").sha256(b'{"name": "B"}').hexdigest()
    assert intent["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert outcome["status"] == 200 and outcome["forwarded"] is True and outcome["latency_ms"] > 0
    assert outcome["intent_seq"] == intent["seq"]
    # the authorisation event id the upstream saw is the intent record's sequence number
    assert upstream.received[-1].headers["X-Tether-Authz-Event"] == str(intent["seq"])
    # both records carry the fixed schema every record kind has (journal.base_record)
    from proxy.journal.writer import base_record

    fixed = set(base_record("x"))
    assert fixed <= set(intent) and fixed <= set(outcome)


async def test_denials_and_errors_are_journaled(gateway, upstream):
    await gateway.request("GET", "/api/unknown")
    await gateway.request("PATCH", "/api/contacts/1", agent="other-bot", json={"a": 1})
    async with gateway.session.get(f"{gateway.upstream_url('crm')}/api/contacts/1",
                                   headers={"Authorization": "Bearer junk"}) as r:
        assert r.status == 401
    await gateway.request("POST", "/api/contacts", intent=None, json={"a": 1})
    upstream.fail("GET", "/api/contacts/5", status=503)
    await gateway.request("GET", "/api/contacts/5")
    recs = [x for x in await gateway.journal() if x["kind"] in ("request", "outcome")]
    reasons = [(x["kind"], x["decision"], x.get("reason")) for x in recs]
    assert ("request", "denied", "route_not_registered") in reasons
    assert ("request", "denied", "capability_not_granted") in reasons
    assert ("request", "denied", "token_malformed") in reasons
    assert ("request", "denied", "intent_required") in reasons
    # an upstream error is a live request with an outcome carrying its status
    out = [x for x in recs if x["kind"] == "outcome" and x["path"] == "/api/contacts/5"]
    assert out and out[0]["status"] == 503
    malformed = [x for x in recs if x.get("reason") == "token_malformed"][0]
    assert malformed["agent"] is None and malformed["status"] == 401


async def test_audit_fields_and_redaction(make_gateway, upstream, store_url):
    rules = base_rules(upstream.url, store_url)
    rules["capabilities"]["contact.create"]["audit_fields"] = ["name", "ssn", "address.city"]
    rules["capabilities"]["contact.create"]["sensitive_fields"] = ["ssn"]
    gw = await make_gateway(rules)
    r = await gw.request("POST", "/api/contacts", json={"name": "Ann", "ssn": "123-45-6789",
                                                         "address": {"city": "Oslo"}, "notes": "x"})
    assert r.status == 201
    rec = [x for x in await gw.journal() if x["kind"] == "request" and x["capability"] == "contact.create"][0]
    assert rec["audit"] == {"name": "Ann", "ssn": "[redacted]", "address.city": "Oslo"}
    assert rec["redacted"] == ["ssn"]
    assert "123-45-6789" not in json.dumps(await gw.journal())


async def test_unwritable_journal_refuses_and_forwards_nothing(gateway, upstream):
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    async with store_unwritable(gateway.gw.store):  # the store now refuses every journal write
        # a read goes out while its record commits (issue 27): the commit fails, so its answer is withheld
        r = await gateway.request("GET", "/api/contacts/1")
        assert r.status == 503
        doc = await r.json()
        assert doc["error"]["code"] == "journal_unavailable" and "withheld" in doc["error"]["message"]
        assert b'"name"' not in await r.read()  # nothing of the record reached the agent
        # a write never leaves before its record is durable
        r = await gateway.request("PATCH", "/api/contacts/1", json={"name": "Z"})
        assert r.status == 503
        assert upstream.seen("PATCH") == []
        async with gateway.session.get(gateway.url + "/_tether/readyz") as rr:
            assert rr.status == 503
    # recovers by itself once the store takes writes again
    r = await gateway.request("GET", "/api/contacts/1")
    assert r.status == 200
    assert upstream.records["contacts"]["1"]["name"] == "A"


def _db_file(gateway):
    """The store's URL as the CLI takes it (an SQLite path or a postgresql:// URL)."""
    return getattr(gateway.gw.store, "url", None) or gateway.gw.store.path


async def _fill(gateway, n=6):
    for i in range(n):
        await gateway.request("GET", f"/api/contacts/{i}")
    await gateway.gw.journal.flush(5)


async def test_verify_passes_on_an_intact_chain(gateway, tmp_path):
    await _fill(gateway)
    r = run_cli("journal", "verify", "--store", _db_file(gateway))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK ")


# the payload is TEXT-compatible BLOB in SQLite, bytea in PostgreSQL: edit it as text either way
_EDIT_PAYLOAD = {
    "sqlite": "UPDATE journal SET record = replace(record, '\"GET\"', '\"PUT\"') WHERE seq = 4",
    "postgresql": "UPDATE journal SET record = convert_to(replace(convert_from(record, 'UTF8'), '\"GET\"', "
                  "'\"PUT\"'), 'UTF8') WHERE seq = 4",
}


@pytest.mark.parametrize("tamper, expect", [
    (_EDIT_PAYLOAD, "record 4 was altered"),
    ("UPDATE journal SET agent = 'someone-else' WHERE seq = 5", "record 5: column 'agent' was altered"),
    ("DELETE FROM journal WHERE seq = 3", "record 3 is missing"),
    ("DELETE FROM journal WHERE seq = (SELECT MAX(seq) FROM journal)", "are missing"),
    ("UPDATE journal SET prev_hash = hash WHERE seq = 6", "record 6 does not link"),
])
async def test_verify_detects_edits_and_deletions(gateway, store_backend, tamper, expect):
    await _fill(gateway)
    path = _db_file(gateway)
    await asyncio.to_thread(store_sql, path, tamper[store_backend] if isinstance(tamper, dict) else tamper)
    r = run_cli("journal", "verify", "--store", path)
    assert r.returncode == 1
    assert expect in r.stdout, r.stdout


async def test_tail_export_show_and_mirror(make_gateway, upstream, tmp_path, store_url):
    rules = base_rules(upstream.url, store_url)
    rules["server"]["journal"] = {"mirror_file": str(tmp_path / "mirror" / "journal.jsonl")}
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    await gw.request("GET", "/api/contacts/1", on_behalf_of="ae:jane")
    await gw.request("PATCH", "/api/contacts/1", on_behalf_of="ae:jane", intent="renew Acme Corp", json={"name": "B"})
    await gw.request("GET", "/api/nope")
    await gw.gw.journal.flush(5)
    store = store_url
    r = run_cli("journal", "tail", "--store", store, "--decision", "live", "--kind", "request")
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    assert 'agent=bot | on_behalf_of=ae:jane | intent="renew Acme Corp" | capability=contact.update | ' \
           'action=PATCH /api/contacts/1 | decision=live' in lines[1]
    r = run_cli("journal", "tail", "--store", store, "--json", "--decision", "denied")
    docs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [d["reason"] for d in docs] == ["route_not_registered"]
    r = run_cli("journal", "tail", "--store", store, "--user", "ae:jane", "--kind", "outcome", "--json")
    assert [json.loads(x)["status"] for x in r.stdout.splitlines()] == [200, 200]
    out = tmp_path / "export.jsonl"
    r = run_cli("journal", "export", "--store", store, "--since", "1h", "--output", str(out))
    assert r.returncode == 0
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(exported) >= 6 and all("hash" in x and "prev_hash" in x for x in exported)
    r = run_cli("journal", "export", "--store", store, "--until", "2000-01-01T00:00:00Z")
    assert r.stdout == ""
    mirror = [json.loads(x) for x in (tmp_path / "mirror" / "journal.jsonl").read_text().splitlines()]
    assert [m["seq"] for m in mirror] == [e["seq"] for e in exported]
    rid = [e for e in exported if e.get("capability") == "contact.update"][0]["request_id"]
    r = run_cli("journal", "show", "--store", store, rid)
    assert r.returncode == 0 and r.stdout.count('"request_id"') == 2


async def test_tail_follow_shows_a_new_record_within_a_second(gateway, upstream):
    await gateway.request("GET", "/api/contacts/1")
    await gateway.gw.journal.flush(5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "journal", "tail", "-f", "-n", "0", "--json",
                             "--store", _db_file(gateway)], stdout=subprocess.PIPE, env=env)
    try:
        await asyncio.sleep(1.5)  # let it start and reach the follow loop
        r = await gateway.request("GET", "/api/contacts/42")
        rid = r.headers["X-Tether-Request-Id"]
        t0 = time.monotonic()
        seen = False
        buf = b""
        while time.monotonic() - t0 < 1.0 and not seen:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                buf += os.read(proc.stdout.fileno(), 65536)
                seen = rid.encode() in buf
            await asyncio.sleep(0)
        assert seen, f"no record for {rid} within 1 s: {buf[:500]!r}"
    finally:
        proc.kill()
        proc.wait()


async def test_retention_archives_and_the_chain_stays_verifiable(gateway, tmp_path):
    await _fill(gateway, 10)
    store = gateway.gw.store
    head, _ = await store.journal_head()
    path = await archive(store, tmp_path / "archive", keep_records=4)
    assert path is not None and path.exists()
    assert (await store.journal_anchor())[0] == head - 4
    await _fill(gateway, 3)
    db = _db_file(gateway)
    r = run_cli("journal", "verify", "--store", db)
    assert r.returncode == 0 and "archived" in r.stdout
    r = run_cli("journal", "verify", "--store", db, "--archives", str(tmp_path / "archive"))
    assert r.returncode == 0, r.stdout
    # an archive that was tampered with is caught
    lines = path.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["payload"] = doc["payload"].replace("GET", "DELETE")
    lines[1] = json.dumps(doc)
    path.write_text("\n".join(lines) + "\n")
    r = run_cli("journal", "verify", "--store", db, "--archives", str(tmp_path / "archive"))
    assert r.returncode == 1 and "was altered" in r.stdout


@pytest.mark.slow
async def test_kill9_under_32_writers_loses_no_acknowledged_record(upstream, tmp_path, store_url):
    rules = base_rules(upstream.url, store_url)
    token = mint_token(parse_rules(rules).identity, "bot")
    for i in range(40):
        upstream.put_record("contacts", {"id": str(i), "name": "n"})
    proc = GatewayProcess(rules, tmp_path).start()
    acked: list[str] = []
    stop = asyncio.Event()

    async def writer(i: int, s: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 2:
                    req = s.patch(f"{proc.url}/crm/api/contacts/{i}", json={"name": f"v{n}"},
                                  headers={"Authorization": f"Bearer {token}", "X-Tether-Intent": "load"})
                else:
                    req = s.post(f"{proc.url}/crm/api/contacts", json={"name": f"c{i}-{n}"},
                                 headers={"Authorization": f"Bearer {token}", "X-Tether-Intent": "load"})
                async with req as r:
                    await r.read()
                    if r.status < 300:
                        acked.append(r.headers["X-Tether-Request-Id"])
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.ensure_future(writer(i, s)) for i in range(32)]
        await asyncio.sleep(2.5)
        proc.kill9()
        stop.set()
        await asyncio.gather(*tasks)
    assert len(acked) > 100, len(acked)
    # restart on the same store: it must come up, and the chain must verify
    proc2 = GatewayProcess(rules, tmp_path, name="rules2.yaml").start()
    proc2.stop()
    r = run_cli("journal", "verify", "--store", store_url)
    assert r.returncode == 0, r.stdout
    store = open_store(store_url)
    await store.open()
    journaled = {r.columns["request_id"] for r in await store.journal_query(filters={"kind": "request"},
                                                                            limit=10_000_000)}
    await store.close()
    missing = [a for a in acked if a not in journaled]
    assert not missing, f"{len(missing)} acknowledged requests missing from the journal"
    # nothing reached the upstream without an intent record
    forwarded = {x.headers["X-Tether-Request-Id"] for x in upstream.received if "X-Tether-Request-Id" in x.headers}
    assert forwarded <= journaled
    assert len(forwarded) >= len(acked)
