"""`tether demo` end to end, judged by what it leaves behind, not by its wording."""

from __future__ import annotations

import json
import sqlite3

from tests.procs import run_cli


def test_demo_runs_every_pattern(tmp_path):
    state_file = tmp_path / "state.json"
    r = run_cli("demo", "--no-color", "--workdir", str(tmp_path), "--state-file", str(state_file), timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.loads(state_file.read_text())
    crm = state["crm"]
    # the rolled-back renewal left the CRM exactly as before; no quote was kept
    assert crm["opportunities"]["opp-1"]["stage"] == "negotiation"
    assert crm["opportunities"]["opp-1"]["amount"] == 120000
    assert crm["accounts"]["acme"]["tier"] == "silver"
    assert crm["quotes"] == {}
    # the approved dry-run write reached the CRM once, with provenance in the record
    [contact] = crm["contacts"].values()
    assert contact["name"] == "Sam Buyer" and contact["last_agent"] == "renewal-bot"
    assert contact["last_on_behalf_of"] == "ae:jane@acme.example"
    # the journal holds the story
    con = sqlite3.connect(state["store"])
    from proxy.compact import expand  # request records are stored compact

    recs = [expand(json.loads(row[0])) for row in con.execute("SELECT record FROM journal ORDER BY seq")]
    con.close()
    kinds = {(x["kind"], x.get("decision"), x.get("reason")) for x in recs}
    assert ("request", "denied", "route_not_registered") in kinds
    assert ("request", "dry_run", None) in kinds
    assert ("review", "approved", None) in kinds
    assert ("request", "replay", "approved") in kinds
    assert any(x["kind"] == "tx" and x["decision"] == "rolled_back" for x in recs)
    assert [x["agent"] for x in recs if x["kind"] == "governance" and x["decision"] == "quarantined"] == ["eager-bot"]
    r = run_cli("journal", "verify", "--store", state["store"])
    assert r.returncode == 0 and r.stdout.startswith("OK")
