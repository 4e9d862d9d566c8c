"""The compact stored form of request and outcome records (proxy/compact.py): every reader sees the
records exactly as they were written, the chain verifies, and journals written before it still read and
verify the same."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.chain import canonical, encode_record
from proxy.compact import (
    INHERITED,
    OUTCOME_FIELDS,
    REQUEST_FIELDS,
    expand,
    iso_from_micros,
)
from proxy.journal.lines import human_line
from proxy.journal.writer import archive
from proxy.store import open_store
from tests.conftest import base_rules, store_sql
from tests.procs import run_cli

FIXTURE = Path(__file__).parent / "data" / "journal-v1"


def whole(rec: dict[str, Any]) -> dict[str, Any]:
    """A record as a reader gets it back: its kind's fixed schema filled with nulls, keys sorted."""
    schema = {"request": REQUEST_FIELDS, "outcome": OUTCOME_FIELDS}.get(rec.get("kind"), ())  # type: ignore[arg-type]
    return dict(sorted({**dict.fromkeys(schema), **rec}.items()))


def stored(rec: dict[str, Any], intent: dict[str, Any] | None = None) -> dict[str, Any]:
    return orjson.loads(encode_record(rec, intent)[0])


# --------------------------------------------------------------------------- the form itself

_text = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["bot", "ae:jane", "live", "GET", "/a/1", ""]))
_int64 = st.integers(-2 ** 63, 2 ** 63 - 1)  # beyond, a record is stored whole and escaped (tested below)
_value = st.one_of(_text, st.integers(-10, 10 ** 12), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                   st.lists(_int64, max_size=2), st.dictionaries(st.sampled_from(["x", "of", "k"]), _int64, max_size=2))
_ts = st.one_of(st.integers(0, 4102444800 * 10 ** 6).map(iso_from_micros),
                st.sampled_from(["2026-11-25T10:00:00Z", "yesterday", "2026-11-25T10:00:00.123456+00:00"]))
_extra_keys = st.sampled_from(["audit", "stage", "mcp", "channel", "reviewer", "applied", "upstream_ids", "of", "k",
                               "id", "escaped", "body_sha256", "review_item", "replay"])


@st.composite
def request_records(draw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {f: draw(_text) for f in REQUEST_FIELDS if draw(st.booleans()) or f in ("kind", "ts")}
    rec["kind"] = "request"
    rec["ts"] = draw(_ts)
    if "body_sha256" in rec and draw(st.booleans()):
        rec["body_sha256"] = draw(st.binary(min_size=32, max_size=32)).hex()
    for k in draw(st.lists(_extra_keys, max_size=4)):
        rec[k] = draw(_value)
    return rec


@settings(max_examples=400, deadline=None)
@given(request_records())
def test_a_request_record_comes_back_whole(rec):
    doc = stored(rec)
    if not {"of", "k", "id"} & rec.keys():  # fields named like short names keep a record whole
        assert "kind" not in doc
    assert expand(doc) == (whole(rec) if "kind" not in doc else dict(sorted(rec.items())))


@settings(max_examples=400, deadline=None)
@given(request_records(), st.data())
def test_an_outcome_comes_back_whole_from_its_intent(intent, data):
    out = {f: data.draw(_text) for f in OUTCOME_FIELDS if data.draw(st.booleans())}
    out.update(kind="outcome", ts=data.draw(_ts), intent_seq=data.draw(st.one_of(st.integers(1, 10 ** 9), st.none())))
    for k in INHERITED:  # mostly the intent's values (inherited), sometimes changed or missing
        choice = data.draw(st.sampled_from(["same", "same", "changed", "missing"]))
        if choice == "same" and k in intent:
            out[k] = intent[k]
        elif choice == "changed":
            out[k] = data.draw(_text)
        else:
            out.pop(k, None)
    for k in data.draw(st.lists(_extra_keys, max_size=3)):
        out[k] = data.draw(_value)
    doc = stored(out, intent)
    if not {"of", "k", "id"} & out.keys():
        assert "kind" not in doc
    assert expand(doc, expand(stored(intent))) == (whole(out) if "kind" not in doc else dict(sorted(out.items())))


def test_what_the_compact_form_leaves_out_and_keeps():
    intent = {"ts": "2026-11-25T10:00:00.123456Z", "kind": "request", "request_id": "r1", "agent": "bot",
              "on_behalf_of": "ae:jane", "on_behalf_of_proof": "asserted", "intent": "renew", "capability": "c.update",
              "upstream": "crm", "method": "PATCH", "path": "/c/1", "decision": "live", "reason": None, "query": None,
              "body_sha256": "ab" * 32, "body_bytes": 2, "tx": None, "trace_id": None, "rules_version": "v1"}
    doc = stored(intent)
    assert doc == {"a": "bot", "bb": 2, "bs": "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s", "c": "c.update",
                   "d": "live", "i": "renew", "id": "r1", "k": "r", "m": "PATCH", "ob": "ae:jane", "op": "asserted",
                   "p": "/c/1", "rv": "v1", "t": 1795600800123456, "u": "crm"}
    out = {**intent, "kind": "outcome", "ts": "2026-11-25T10:00:00.200000Z", "intent": None, "intent_seq": 7,
           "status": 200, "latency_ms": 1.5, "upstream_latency_ms": None, "forwarded": True}
    for k in ("query", "body_sha256", "body_bytes", "trace_id", "rules_version"):
        del out[k]
    assert stored(out, intent) == {"f": True, "k": "o", "l": 1.5, "of": 7, "s": 200, "t": 1795600800200000}
    # a decision or reason that changed since the intent is kept, even when it became null
    changed = {**out, "decision": "refused", "reason": "journal_unavailable"}
    assert stored(changed, intent)["d"] == "refused"
    assert stored({**out}, {**intent, "reason": "x"})["r"] is None
    # an outcome without its intent at hand (a replay's) is stored whole, only shorter
    assert stored(out)["a"] == "bot" and "of" not in stored(out)
    # a field named like a short name keeps the record whole; other kinds are stored as they are
    assert stored({**intent, "of": 1})["kind"] == "request"
    assert stored({"kind": "system", "ts": intent["ts"], "event": "started"})["kind"] == "system"
    # text that is not Unicode in the intent: the outcome stores its own (escaped and listed), as before
    odd = {**intent, "agent": "b\udcffot"}
    odd_out = stored({**out, "agent": "b\udcffot"}, odd)
    assert odd_out["kind"] == "outcome" and odd_out["agent"] == "b\\udcffot" and odd_out["escaped"] == ["agent"]


# --------------------------------------------------------------------------- through the gateway

def compact_rules(upstream_url: str, store: str, mirror: Path) -> dict[str, Any]:
    rules = base_rules(upstream_url, store)
    rules["server"]["journal"] = {"mirror_file": str(mirror)}
    rules["capabilities"]["contact.update"]["audit_fields"] = ["name", "secret"]
    rules["capabilities"]["contact.update"]["sensitive_fields"] = ["secret"]
    rules["agents"]["dry-bot"] = {"grants": ["contact.read", {"capability": "contact.update", "mode": "dry_run"}]}
    return rules


async def _traffic(gw: Any, upstream: Any) -> None:
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    assert (await gw.request("GET", "/api/contacts/1", on_behalf_of="ae:jane")).status == 200
    assert (await gw.request("GET", "/api/contacts/1?fields=name", headers={
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})).status == 200
    assert (await gw.request("PATCH", "/api/contacts/1", on_behalf_of="ae:jane", intent="fix the name",
                             json={"name": "B", "secret": "s3"})).status == 200
    assert (await gw.request("PATCH", "/api/contacts/1", agent="dry-bot", intent="rename",
                             json={"name": "C"})).status == 200
    assert (await gw.request("GET", "/api/nope")).status == 403
    upstream.fail("PATCH", "/api/contacts/1", status=500)
    assert (await gw.request("PATCH", "/api/contacts/1", json={"name": "D"},
                             headers={"X-Tether-Transaction": "t-1"})).status == 500
    assert (await gw.request("GET", "/api/contacts/404")).status == 404


@pytest.mark.stores
async def test_every_reader_sees_the_records_as_written(make_gateway, upstream, store_url, tmp_path):
    """The mirror holds each record whole, as the writer got it; the store holds request and outcome
    records compact; what the store gives back (tail, export, the admin API, verify) is the whole record."""
    mirror = tmp_path / "mirror.jsonl"
    gw = await make_gateway(compact_rules(upstream.url, store_url, mirror))
    await _traffic(gw, upstream)
    await gw.gw.journal.flush(5)
    written = {d.pop("seq"): d for d in map(orjson.loads, mirror.read_bytes().splitlines())
               if d.get("kind") != "checkpoint"}
    rows = await gw.gw.store.journal_query(limit=1000)
    assert [r.seq for r in rows] == sorted(written)
    kinds = set()
    for r in rows:
        want = written[r.seq]
        assert want.pop("hash") == r.hash
        raw = orjson.loads(r.payload)
        if want["kind"] in ("request", "outcome"):
            kinds.add(want["kind"])
            assert "kind" not in raw and raw["k"] in ("r", "o"), raw  # stored compact ...
            assert len(r.payload) < len(canonical(want))
            assert r.record() == whole(want), r.seq  # ... and read whole
        else:
            assert r.payload == canonical(want) and r.record() == want
    assert kinds == {"request", "outcome"}
    outcomes = [r for r in rows if r.record()["kind"] == "outcome" and r.record()["intent_seq"]]
    assert len(outcomes) >= 5 and all("of" in orjson.loads(r.payload) for r in outcomes)

    # the human lines are those of the records as written
    store = store_url
    out = run_cli("journal", "tail", "--store", store, "-n", "1000")
    assert out.stdout.splitlines() == [human_line(s, whole(w) if w["kind"] in ("request", "outcome") else w)
                                       for s, w in sorted(written.items())]
    # searching by agent or person finds the outcomes too (their columns hold the whole record's values)
    out = run_cli("journal", "tail", "--store", store, "--user", "ae:jane", "--kind", "outcome", "--json")
    assert [(d["method"], d["status"], d["capability"]) for d in map(json.loads, out.stdout.splitlines())] == \
        [("GET", 200, "contact.read"), ("PATCH", 200, "contact.update")]
    exported = [json.loads(x) for x in run_cli("journal", "export", "--store", store).stdout.splitlines()]
    assert [{k: v for k, v in e.items() if k not in ("seq", "hash", "prev_hash")} for e in exported] == \
        [r.record() for r in rows]
    # a row keeps its hash (SQLite: its 32 bytes), not the one before it: reading fills prev_hash in
    assert exported[0]["prev_hash"] == "0" * 64
    assert all(e["prev_hash"] == before["hash"] for before, e in zip(exported, exported[1:]))
    stored_hashes = store_sql(store, "SELECT prev_hash, length(hash) FROM journal")
    assert {tuple(x) for x in stored_hashes} == {("", 64 if store.startswith("postgres") else 32)}
    assert run_cli("journal", "verify", "--store", store).returncode == 0

    # the console's record view: the outcome whole, its intent among the related records, integrity intact
    dry = next(r for r in outcomes if r.record()["agent"] == "dry-bot")
    doc = await (await gw.admin("GET", f"/api/journal/{dry.seq}")).json()
    assert doc["record"]["decision"] == "dry_run" and doc["record"]["review_item"] == doc["review_item"]["id"]
    assert doc["integrity"]["ok"] is True, doc["integrity"]
    assert [x["kind"] for x in doc["related"]] == ["request", "outcome"]
    assert doc["related"][1]["path"] == "/api/contacts/1" and doc["related"][1]["intent"] is None
    listed = await (await gw.admin("GET", "/api/journal?kind=outcome&limit=100")).json()
    assert {x["seq"]: {k: v for k, v in x.items() if k not in ("seq", "hash")} for x in listed["records"]} == \
        {r.seq: r.record() for r in rows if r.columns["kind"] == "outcome"}


@pytest.mark.stores
async def test_an_outcome_column_changed_behind_its_back_is_caught(make_gateway, upstream, store_url, tmp_path):
    gw = await make_gateway(compact_rules(upstream.url, store_url, tmp_path / "m.jsonl"))
    await _traffic(gw, upstream)
    await gw.gw.journal.flush(5)
    await gw.gw.stop(grace=1)
    rows = [r for r in await _rows(store_url) if r.record()["kind"] == "outcome" and r.record()["intent_seq"]]
    seq = rows[0].seq
    store_sql(store_url, f"UPDATE journal SET agent = 'someone-else' WHERE seq = {seq}")
    r = run_cli("journal", "verify", "--store", store_url)
    assert r.returncode == 1 and f"record {seq}: column 'agent' was altered" in r.stdout, r.stdout
    store_sql(store_url, f"UPDATE journal SET agent = 'bot' WHERE seq = {seq}")
    assert run_cli("journal", "verify", "--store", store_url).returncode == 0
    # the intent an outcome inherits from is chained like any record
    intent_seq = rows[0].record()["intent_seq"]
    store_sql(store_url, f"UPDATE journal SET capability = 'contact.delete' WHERE seq = {intent_seq}")
    r = run_cli("journal", "verify", "--store", store_url)
    assert r.returncode == 1 and f"record {intent_seq}: column 'capability' was altered" in r.stdout, r.stdout


@pytest.mark.stores
async def test_an_outcome_whose_intent_was_archived(make_gateway, upstream, store_url, tmp_path):
    """Archiving can take an intent and leave its outcome: the outcome then reads with the indexed
    columns standing in for what it inherits, the store verifies, and so do the archives."""
    gw = await make_gateway(compact_rules(upstream.url, store_url, tmp_path / "m.jsonl"))
    await _traffic(gw, upstream)
    assert (await gw.request("PATCH", "/api/contacts/1", on_behalf_of="ae:jane", intent="last",
                             json={"name": "E"})).status == 200
    await gw.gw.journal.flush(5)
    store = gw.gw.store
    last = (await store.journal_query(descending=True, limit=1))[0]
    whole_before = last.record()
    assert whole_before["kind"] == "outcome" and whole_before["agent"] == "bot"
    await archive(store, tmp_path / "archive", keep_records=1)
    [left] = await store.journal_query(limit=10)
    got = left.record()
    assert left.seq == last.seq and left.base is None
    assert {k: got[k] for k in ("agent", "on_behalf_of", "capability", "decision", "request_id", "status")} == \
        {k: whole_before[k] for k in ("agent", "on_behalf_of", "capability", "decision", "request_id", "status")}
    assert got["method"] is None  # not an indexed column: in the archive, with the intent record
    await gw.gw.stop(grace=1)
    assert run_cli("journal", "verify", "--store", store_url).returncode == 0
    r = run_cli("journal", "verify", "--store", store_url, "--archives", str(tmp_path / "archive"))
    assert r.returncode == 0, r.stdout


async def _rows(url: str) -> list[Any]:
    store = open_store(url)
    await store.open()
    try:
        return await store.journal_query(limit=100000)
    finally:
        await store.close()


# --------------------------------------------------------------------------- journals written before


def _fixture_rows() -> list[dict[str, Any]]:
    return [json.loads(x) for x in (FIXTURE / "journal.jsonl").read_text().splitlines()]


async def _load_fixture(url: str) -> None:
    """The old rows, appended to a fresh store as they were: the chain gives them the same hashes."""
    rows = _fixture_rows()
    store = open_store(url)
    await store.open()
    try:
        linked = await store.journal_append([r["payload"].encode() for r in rows], [r["columns"] for r in rows])
    finally:
        await store.close()
    assert linked == [(r["seq"], r["hash"]) for r in rows]


@pytest.mark.stores
async def test_a_journal_written_before_reads_and_verifies_the_same(make_gateway, upstream, store_url, tmp_path):
    await _load_fixture(store_url)
    old = _fixture_rows()
    last_ts = json.loads(old[-1]["payload"])["ts"]

    def same_as_before() -> None:
        r = run_cli("journal", "tail", "--store", store_url, "-n", "1000", "--json")
        assert r.stdout.splitlines()[:len(old)] == (FIXTURE / "tail.jsonl").read_text().splitlines()
        r = run_cli("journal", "tail", "--store", store_url, "-n", "1000")
        assert r.stdout.splitlines()[:len(old)] == (FIXTURE / "tail.txt").read_text().splitlines()
        r = run_cli("journal", "export", "--store", store_url, "--until", last_ts[:19] + ".999999Z")
        assert r.stdout.splitlines() == (FIXTURE / "export.jsonl").read_text().splitlines()
        for fmt, name in (("text", "report.txt"), ("csv", "report.csv")):
            r = run_cli("journal", "report", "--store", store_url, "--since", "2026-01-01", "--until",
                        last_ts[:19] + ".999999Z", "--user", "jane", "--format", fmt)
            want = (FIXTURE / name).read_text().splitlines()
            got = r.stdout.splitlines()
            assert got[1:] == want[1:] and got[0].split(" .. ")[0] == want[0].split(" .. ")[0], r.stdout
        r = run_cli("journal", "verify", "--store", store_url)
        assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout

    same_as_before()
    # a gateway of today appends compact records to the same chain: both read and verify
    gw = await make_gateway(compact_rules(upstream.url, store_url, tmp_path / "m.jsonl"))
    await _traffic(gw, upstream)
    recs = await gw.journal()
    assert len(recs) > len(old) + 10
    await gw.gw.stop(grace=1)
    same_as_before()
    rows = await _rows(store_url)
    assert [r.payload.decode() for r in rows[:len(old)]] == [r["payload"] for r in old]
    assert all("kind" not in orjson.loads(r.payload) for r in rows[len(old):] if r.columns["kind"] in
               ("request", "outcome"))
