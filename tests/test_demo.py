"""`tether demo` end to end, judged by what it leaves behind, not by its wording."""

from __future__ import annotations

import json
import sqlite3

from tests.procs import ROOT, run_cli


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
    # the vendor's MCP server behind Tether: the granted read live, the unnamed tool never sent, the write
    # tool captured, then approved and called once (the server's own list of the calls it received)
    mcp = state["mcp_upstream"]
    assert mcp["ok"] is True and mcp["listed"] == ["billing_get_invoice", "billing_issue_credit"]
    assert mcp["calls"] == [["get_invoice", {"number": "INV-1002"}],
                            ["issue_credit", {"invoice": "INV-1002", "amount": 480, "reason": "late delivery"}]]
    tools = [x for x in recs if x["kind"] == "request" and x.get("upstream") == "billing"]
    assert ("billing.issue_credit", "dry_run") in {(x["capability"], x["decision"]) for x in tools}
    refused = {x["mcp"]["tool"] for x in recs if x["kind"] == "request" and x.get("error") == "capability_not_granted"
               and (x.get("mcp") or {}).get("tool")}
    assert refused == {"export_customers", "billing_export_customers"}
    r = run_cli("journal", "verify", "--store", state["store"])
    assert r.returncode == 0 and r.stdout.startswith("OK")


def test_demo_without_the_mcp_sdk_leaves_the_mcp_server_out(tmp_path):
    """The mcp SDK is a test extra: without it the demo says why and runs every other step."""
    shadow = tmp_path / "shadow" / "mcp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the mcp SDK is hidden for this test')\n")
    state_file = tmp_path / "state.json"
    r = run_cli("demo", "--no-color", "--workdir", str(tmp_path), "--state-file", str(state_file), timeout=120,
                env={"PYTHONPATH": f"{shadow.parent}:{ROOT}"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Left out: mcp is not installed" in r.stdout
    state = json.loads(state_file.read_text())
    assert state["mcp_upstream"]["skipped"].startswith("mcp is not installed")
    assert state["transaction"] == "rolled_back" and state["mcp"] == "rolled_back" and state["quarantined"]


def test_the_demo_rules_pin_the_demo_servers_tools():
    """rules/demo.yaml's pins are the digests of the demo server's tool definitions (defined explicitly, so
    they do not move with the SDK's schema generation)."""
    from proxy.cli.demo import RULES
    from proxy.cli.demo_mcp import TOOLS
    from proxy.config import load_rules
    from proxy.mcp_upstream import check_pins

    rules = load_rules(RULES)
    states = check_pins(rules.mcp_capabilities, TOOLS, upstream="billing")
    assert {t: s.state for t, s in states.items()} == {"get_invoice": "ok", "issue_credit": "ok"}
    assert "export_customers" not in {c.target for c in rules.mcp_capabilities.values()}
