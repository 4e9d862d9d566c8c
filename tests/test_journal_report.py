"""Auditor answers in one command (issue 26 item 5) and agent text made inert in journal lines (issue 20
item 8): `journal report`, `journal tail` matching and counting, human lines that cannot be forged."""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from typing import Any

import orjson
import pytest

from proxy.cli.main import main
from proxy.inert import field_value, inert, json_text
from proxy.journal.lines import human_line
from tests.conftest import base_rules


async def cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = await asyncio.to_thread(main, list(args))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
        print(exc.code, file=sys.stderr)
    got = capsys.readouterr()
    return rc, got.out, got.err


# --------------------------------------------------------------------------- inert text


def test_control_and_bidi_characters_are_shown_escaped():
    hostile = "ok\r\x1b[2Kapproved\u202eevil\u2066x\u2069\u2028\x85\x7f"
    assert inert(hostile) == "ok\\r\\x1b[2Kapproved\\u202eevil\\u2066x\\u2069\\u2028\\x85\\x7f"
    assert inert("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    # JSON stays the same JSON: the escapes are JSON's own
    doc = {"intent": hostile}
    text = json_text(orjson.dumps(doc).decode())
    assert orjson.loads(text) == doc and "\u202e" not in text and "\x1b" not in text


def test_a_value_cannot_forge_a_field_of_a_human_line():
    rec = {"ts": "2026-11-25T10:00:00.000000Z", "kind": "request", "agent": "bot", "on_behalf_of": 'x | decision=live',
           "intent": 'renew" | decision=live | status=200 "', "capability": "c", "method": "PATCH", "path": "/a",
           "decision": "denied"}
    line = human_line(7, rec)
    fields = line.split(" | ")
    # the forged separators stay inside quoted values: exactly one decision field, and it is the real one
    assert line.count("decision=") == 3 and [f for f in fields if f.startswith("decision=")] == ["decision=denied"]
    assert 'on_behalf_of="x \\| decision=live"' in line
    assert 'intent="renew\\" \\| decision=live \\| status=200 \\""' in line
    assert field_value("plain") == "plain" and field_value("a\nb") == '"a\\nb"'
    assert human_line(3, {"ts": "t", "kind": "system", "event": "rules_reload_failed", "error": "bad\nfile"}) == \
        '#3 | t | event=system:rules_reload_failed | error="bad\\nfile"'


# --------------------------------------------------------------------------- a journal to ask about


def audit_rules(upstream: Any, store: str) -> dict[str, Any]:
    rules = base_rules(upstream.url, store)
    rules["capabilities"]["contact.update"]["body"] = {"allow_fields": ["stage"],
                                                       "constraints": {"stage": {"enum": ["open", "won"]}}}
    rules["agents"]["renewal-bot"] = {"grants": [{"capability": "contact.update", "mode": "live"},
                                                 {"capability": "contact.create", "mode": "dry_run"}]}
    rules["server"]["transactions"] = {"retry_attempts": 1, "retry_backoff": 0.01}
    return rules


async def make_history(gw: Any, upstream: Any) -> dict[str, Any]:
    upstream.put_record("contacts", {"id": "5", "name": "Ann", "stage": "open"})
    jane = {"agent": "renewal-bot", "on_behalf_of": "ae:jane@acme.example"}
    for _ in range(3):
        r = await gw.request("PATCH", "/api/contacts/5", json={"stage": "won"}, intent="close the Acme deal", **jane)
        assert r.status == 200
    r = await gw.request("PATCH", "/api/contacts/5", json={"stage": "lost"}, intent="give up on Acme", **jane)
    assert r.status == 422
    r = await gw.request("GET", "/api/secret", intent="peek", **jane)
    assert r.status == 403
    ok = (await gw.request("POST", "/api/contacts", json={"name": "Bo"}, intent="add Bo", **jane)).headers["X-Tether-Dry-Run"]
    bad = (await gw.request("POST", "/api/contacts", json={"name": "Cy"}, intent="add Cy", **jane)).headers["X-Tether-Dry-Run"]
    await gw.admin("POST", f"/api/review/items/{ok}/approve", json={"note": "fine"})
    await gw.admin("POST", f"/api/review/items/{bad}/reject", json={"reason": "Cy left the company"})
    async with gw.session.post(f"{gw.url}/_tether/transactions", headers=gw.headers("renewal-bot", "ae:jane@acme.example"),
                               json={"name": "renew | Acme"}) as resp:
        tx = (await resp.json())["id"]
    await gw.request("PATCH", "/api/contacts/5", json={"stage": "open"}, intent="reopen for renewal",
                     headers={"X-Tether-Transaction": tx}, **jane)
    async with gw.session.post(f"{gw.url}/_tether/transactions/{tx}/rollback",
                               headers=gw.headers("renewal-bot", "ae:jane@acme.example")) as resp:
        assert (await resp.json())["state"] == "rolled_back"
    # someone else's traffic, which the report must leave out
    await gw.request("PATCH", "/api/contacts/5", json={"stage": "won"}, intent="not jane's", agent="renewal-bot",
                     on_behalf_of="ae:bob@acme.example")
    await gw.journal()
    return {"approved": ok, "rejected": bad, "tx": tx}


@pytest.mark.stores
async def test_report_answers_what_the_agent_did_for_a_person(make_gateway, upstream, store_url, capsys):
    gw = await make_gateway(audit_rules(upstream, store_url))
    h = await make_history(gw, upstream)
    store = store_url

    rc, out, err = await cli(capsys, "journal", "report", "--store", store, "--agent", "renewal", "--user", "jane",
                             "--since", "1h")
    assert rc == 0, err
    assert "--agent 'renewal' matched renewal-bot" in out and "--user 'jane' matched ae:jane@acme.example" in out
    assert "What renewal-bot for ae:jane@acme.example did" in out
    summary = next(line for line in out.splitlines() if line.startswith("Summary:"))
    assert "8 requests" in summary and "4 live" in summary and "2 dry-run" in summary and "2 denied" in summary
    assert "1 approved" in summary and "1 rejected" in summary and "1 transaction" in summary
    groups = out.split("By capability and decision")[1].split("Reviews")[0]
    row = next(line for line in groups.splitlines() if line.startswith("contact.update") and " live " in line)
    assert row.split()[2] == "4" and "200×4" in row and "close the Acme deal (3)" in row
    reviews = out.split("Reviews (2)")[1].split("Denials")[0]
    assert h["approved"] in reviews and "rita" in reviews and "replayed 201" in reviews
    assert h["rejected"] in reviews and "Cy left the company" in reviews
    denials = out.split("Denials (2)")[1].split("Rollbacks")[0]
    assert "constraint_violated" in denials and "route_not_registered" in denials and "give up on Acme" in denials
    rollbacks = out.split("Rollbacks (1)")[1]
    assert h["tx"] in rollbacks and "renew | Acme" in rollbacks and "rolled_back" in rollbacks
    assert "not jane's" not in out  # bob's request is not jane's

    rc, md, _ = await cli(capsys, "journal", "report", "--store", store, "--agent", "renewal-bot", "--user", "jane",
                          "--format", "markdown")
    assert rc == 0 and md.startswith("# What renewal-bot for ae:jane@acme.example did")
    assert "| Capability | Decision | Count | Answers | Intents |" in md
    assert "renew \\| Acme" in md  # a pipe in a value cannot break the table

    rc, text, _ = await cli(capsys, "journal", "report", "--store", store, "--user", "jane", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8 and {r["on_behalf_of"] for r in rows} == {"ae:jane@acme.example"}
    approved = next(r for r in rows if r["review_item"] == h["approved"])
    assert approved["review_decision"] == "approved" and approved["reviewer"] == "rita" and approved["replay"] == "replayed"
    assert next(r for r in rows if r["tx"] == h["tx"])["tx_outcome"] == "rolled_back"

    rc, _, err = await cli(capsys, "journal", "report", "--store", store)
    assert rc == 2 and "give --agent and/or --user" in err


async def test_tail_matches_parts_of_names_counts_the_rest_and_names_system_events(make_gateway, upstream, tmp_path,
                                                                                   capsys):
    gw = await make_gateway(audit_rules(upstream, str(tmp_path / "t.db")))
    await make_history(gw, upstream)
    hostile = "x\r\x1b[31m | decision=live\u202e"
    # a record holding what an agent could have put there (whether or not the input is refused today: the
    # view must be safe for every record the journal holds, old ones included)
    from proxy.journal.writer import base_record

    await gw.gw.journal.write(base_record("request", agent="renewal-bot", on_behalf_of="ae:jane@acme.example",
                                          intent=hostile, capability=None, method="GET", path="/api/nope",
                                          decision="denied", reason="route_not_registered"))
    await gw.journal()
    store = str(tmp_path / "t.db")

    rc, out, err = await cli(capsys, "journal", "tail", "--store", store, "--user", "jane", "-n", "2")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all("on_behalf_of=ae:jane@acme.example" in line for line in lines)
    assert "--user 'jane' matched ae:jane@acme.example" in err
    assert "older records match too" in err
    more = int(err.split("tether: ")[-1].split()[0].replace(",", ""))
    everything = (await cli(capsys, "journal", "tail", "--store", store, "--user", "jane", "-n", "100000"))[1]
    assert more == len(everything.splitlines()) - 2  # it said exactly how many more there are
    # the hostile intent is one quoted, escaped field; the line cannot be forged or repaint the terminal
    line = lines[-1]
    assert "\x1b" not in line and "\r" not in line and "\u202e" not in line
    assert 'intent="x\\r\\x1b[31m \\| decision=live\\u202e"' in line
    assert [f for f in line.split(" | ") if f.startswith("decision=")] == ["decision=denied"]

    # an exact name is exact: --agent bot does not also match renewal-bot
    await gw.request("GET", "/api/contacts/5")  # agent 'bot'
    await gw.journal()
    rc, out, err = await cli(capsys, "journal", "tail", "--store", store, "--agent", "bot", "-n", "50")
    assert out and all("agent=bot |" in line for line in out.splitlines()) and "matched" not in err

    # system events by name
    rc, out, _ = await cli(capsys, "journal", "tail", "--store", store, "--kind", "system", "-n", "5")
    assert "event=system:started" in out

    # JSON lines: the same JSON, with nothing a terminal would act on
    rc, out, _ = await cli(capsys, "journal", "tail", "--store", store, "--user", "jane", "-n", "1", "--json")
    assert "\x1b" not in out and "\u202e" not in out and orjson.loads(out)["intent"] == hostile
