"""tether catalogue: a known rules set and journal give a checked table; readiness and stages."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.chain import INDEXED_FIELDS, canonical
from proxy.cli.catalogue import (
    AGENT_READY,
    INCOMPATIBLE,
    NEEDS_WRAPPING,
    NOT_REGISTERED,
    Traffic,
    build,
    readiness,
    spec_operations,
)
from proxy.cli.main import main
from proxy.config import CapabilityConfig, load_rules, parse_rules
from proxy.store.sqlite import SQLiteStore

DATA = Path(__file__).parent / "data"
RULES = DATA / "catalogue" / "rules.yaml"

# (capability, decision) of each request record in the journal the golden table was made with
TRAFFIC = [("contact.read", "live")] * 3 + [("contact.update", "live"), ("contact.update", "denied"),
                                            ("contact.create", "dry_run")]


def make_journal(path: Path, traffic: list[tuple[str, str]] = TRAFFIC) -> str:
    """A journal with one request and one outcome record per entry, at fixed times."""

    async def go() -> None:
        store = SQLiteStore(str(path))
        await store.open()
        recs = []
        for i, (cap, decision) in enumerate(traffic):
            rec = {"ts": f"2026-01-0{i + 1}T00:00:00.000000Z", "kind": "request", "request_id": f"r{i}",
                   "agent": "bot", "on_behalf_of": None, "intent": None, "capability": cap, "upstream": "crm",
                   "method": "GET", "path": "/", "decision": decision, "reason": None}
            recs += [rec, {**rec, "kind": "outcome"}]
        await store.journal_append([canonical(r) for r in recs], [{k: r.get(k) for k in INDEXED_FIELDS} for r in recs])
        await store.close()

    asyncio.run(go())
    return str(path)


def catalogue(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["catalogue", *args]) == 0
    return capsys.readouterr().out


def test_golden_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_journal(tmp_path / "tether.db")
    out = catalogue(capsys, "--config", str(RULES), "--store", db)
    assert out == (DATA / "catalogue" / "expected.txt").read_text()


def test_golden_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_journal(tmp_path / "tether.db")
    out = catalogue(capsys, "--config", str(RULES), "--store", db, "--format", "markdown")
    assert out == (DATA / "catalogue" / "expected.md").read_text()


def test_json_and_csv_carry_the_same_facts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = make_journal(tmp_path / "tether.db")
    doc = json.loads(catalogue(capsys, "--config", str(RULES), "--store", db, "--format", "json"))
    rows = {r["capability"]: r for r in doc["capabilities"]}
    assert rows["contact.update"]["decisions"] == {"denied": 1, "live": 1}
    assert rows["contact.update"]["holders"] == [{"agent": "bot", "mode": "live"}]
    assert rows["contact.read"]["requests"] == 3
    assert rows["invoice.void"]["readiness"] == NEEDS_WRAPPING
    assert rows["note.upload"]["readiness"] == INCOMPATIBLE
    stages = {s["upstream"]: s["stage"] for s in doc["summary"]}
    assert stages == {"crm": 3, "billing": 2, "ledger": 0}
    assert doc["journal"]["records"] == 12
    table = list(csv.DictReader(io.StringIO(catalogue(capsys, "--config", str(RULES), "--store", db, "--format", "csv"))))
    assert [r["capability"] for r in table] == list(rows)
    assert {r["capability"]: r["readiness"] for r in table} == {k: v["readiness"] for k, v in rows.items()}


def test_without_a_journal_traffic_is_unknown_and_stage_4_unprovable(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TETHER_STORE", raising=False)
    rules = tmp_path / "rules.yaml"  # server.store (tether.db, beside the rules file) does not exist: nothing is
    rules.write_text(RULES.read_text())  # read, nothing created
    out = catalogue(capsys, "--config", str(rules))
    assert "Traffic: no journal read" in out
    assert "stage 4 cannot be evidenced" in out
    assert not (tmp_path / "tether.db").exists()


def rules_with(caps: dict[str, Any], grants: list[Any]) -> Any:
    return parse_rules({"identity": {"hs_secret": {"value": "x" * 32}},
                        "upstreams": {"crm": {"url": "http://127.0.0.1:9"}},
                        "agents": {"bot": {"grants": grants}}, "capabilities": caps})


def test_rate_limits_of_capability_grant_and_upstream() -> None:
    rules = parse_rules({"identity": {"hs_secret": {"value": "x" * 32}},
                         "upstreams": {"crm": {"url": "http://127.0.0.1:9", "rate_limit": {"per_minute": 600}}},
                         "agents": {"bot": {"grants": [{"capability": "a", "rate_limit": {"per_minute": 5}}]}},
                         "capabilities": {"a": {"upstream": "crm", "method": "GET", "path": "/a",
                                                "rate_limit": {"per_minute": 60, "burst": 10}}}})
    assert build(rules).rows[0].rate_limit == "60/min burst 10; bot: 5/min; upstream: 600/min"


def test_stages() -> None:
    read = {"upstream": "crm", "method": "GET", "path": "/a/{id}"}
    write = {"upstream": "crm", "method": "PATCH", "path": "/a/{id}", "body": {"allow_fields": ["x"]}}
    caps = {"a.read": read, "a.write": write}
    summary = build(rules_with(caps, [])).summaries[0]
    assert summary.stage == 0
    assert build(rules_with(caps, ["a.read"])).summaries[0].stage == 1
    assert build(rules_with(caps, ["a.read", "a.write"])).summaries[0].stage == 2  # a write without mode: dry-run
    live = rules_with(caps, ["a.read", {"capability": "a.write", "mode": "live"}])
    assert build(live).summaries[0].stage == 3  # no journal: cannot be 4
    traffic = Traffic()
    assert build(live, traffic=traffic).summaries[0].stage == 3  # a journal without traffic: not 4 either
    traffic.add({"kind": "request", "capability": "a.write", "decision": "live", "ts": "2026-01-01"})
    assert build(live, traffic=traffic).summaries[0].stage == 4
    # a live write that cannot be undone does not raise the stage, and is counted as a risk
    risky = rules_with({**caps, "a.write": {**write, "compensation": "none"}},
                       ["a.read", {"capability": "a.write", "mode": "live"}])
    s = build(risky, traffic=traffic).summaries[0]
    assert s.stage == 2 and s.live_uncompensated == 1 and "cannot be undone" in s.evidence


@pytest.mark.parametrize("cap,expected", [
    ({"method": "GET"}, AGENT_READY),
    ({"method": "DELETE"}, AGENT_READY),
    ({"method": "POST", "body": {"json_schema": {"type": "object"}}}, AGENT_READY),
    ({"method": "POST"}, NEEDS_WRAPPING),
    ({"method": "POST", "body": {"forbid_fields": ["x"]}}, NEEDS_WRAPPING),
    ({"method": "POST", "body": {"allow_fields": []}, "compensation": "non_compensable"}, NEEDS_WRAPPING),
    ({"method": "PUT", "compensation": "none", "stream_request": True}, INCOMPATIBLE),
    ({"method": "POST", "effect": "read"}, AGENT_READY),
])
def test_readiness_classes(cap: dict[str, Any], expected: str) -> None:
    assert readiness(CapabilityConfig(upstream="crm", path="/x", **cap))[0] == expected


def test_openapi_operations_not_registered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("""
identity: {hs_secret: {value: x}}
upstreams: {mini: {url: "http://127.0.0.1:9000"}}
agents: {bot: {grants: [w.list]}}
capabilities:
  w.list: {upstream: mini, method: GET, path: /v2/widgets}
  w.get: {upstream: mini, method: GET, path: "/v2/widgets/{id}"}
""")
    rules = load_rules(rules_file)
    up, ops = spec_operations(str(DATA / "openapi" / "mini.yaml"), rules, "mini", None)
    c = build(rules, spec=(up, ops))
    covered = {r.name: r.operation for r in c.rows if r.registered}
    assert covered == {"w.list": "GET /widgets", "w.get": "GET /widgets/{widget-id}"}  # prefix /v2 guessed
    missing = {f"{r.method} {r.path}": r.readiness for r in c.rows if not r.registered}
    assert missing["POST /v2/widgets"] == NOT_REGISTERED
    assert missing["GET /files/{name}.json"] == INCOMPATIBLE
    assert len(missing) == 10  # 12 operations, 2 covered
    assert c.summaries[0].counts[NOT_REGISTERED] == 9 and c.summaries[0].stage == 1
    out = catalogue(capsys, "--config", str(rules_file), "--openapi", str(DATA / "openapi" / "mini.yaml"),
                    "--upstream", "mini", "--no-store")
    assert "not registered" in out and "POST /v2/widgets/search" in out
