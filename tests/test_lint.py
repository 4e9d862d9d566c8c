"""tether rules check: one crafted file per lint; every problem listed at once; the rules JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli.lint import Finding, lint_file, rules_json_schema
from proxy.cli.main import main
from tests.conftest import base_rules
from tests.test_catalogue import make_journal

ROOT = Path(__file__).resolve().parent.parent

HEAD = """\
version: 1
identity: {hs_secret: {value: lint-test-secret-0123456789abcdef}}
upstreams:
  crm: {url: "http://127.0.0.1:9000"}
"""


def lint(tmp_path: Path, body: str, **kw: Any) -> list[Finding]:
    f = tmp_path / "rules.yaml"
    f.write_text(HEAD + body)
    kw.setdefault("use_default_store", False)
    return lint_file(f, **kw)


def codes(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(x.level, x.code, x.path) for x in findings]


def only(findings: list[Finding], code: str) -> list[Finding]:
    return [x for x in findings if x.code == code]


def test_clean_file_has_no_findings(tmp_path: Path) -> None:
    assert lint(tmp_path, """
agents: {bot: {grants: [a.read, {capability: a.update, mode: dry_run}]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: "/a/{id}"}
  a.update: {upstream: crm, method: PATCH, path: "/a/{id}", body: {allow_fields: [name]}}
""") == []
    assert lint_file(ROOT / "rules" / "example.yaml", use_default_store=False) == []


def test_overlapping_routes_literal_beats_parameter(tmp_path: Path) -> None:
    found = only(lint(tmp_path, """
agents: {bot: {grants: [a.read, a.search]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: "/a/{id}"}
  a.search: {upstream: crm, method: GET, path: /a/search}
"""), "overlapping-routes")
    assert len(found) == 1
    f = found[0]
    assert f.level == "WARNING" and f.path == "capabilities.a.read.path"
    assert "'a.search' wins (a literal segment beats a parameter)" in f.message and "/a/search" in f.message


def test_a_parameter_pattern_that_excludes_the_literal_is_no_overlap(tmp_path: Path) -> None:
    assert only(lint(tmp_path, """
agents: {bot: {grants: [a.read, a.search, b.one, b.two]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: "/a/{id}", params: {id: "[0-9]+"}}
  a.search: {upstream: crm, method: GET, path: /a/search}
  b.one: {upstream: crm, method: GET, path: "/b/{n}", params: {n: "[0-9]+"}}
  b.two: {upstream: crm, method: GET, path: "/b/{s}", params: {s: "[a-z]+"}}
"""), "overlapping-routes") == []


def test_shadowed_route_declaration_order_wins(tmp_path: Path) -> None:
    found = lint(tmp_path, """
agents: {bot: {grants: [a.read, a.read2, c.narrow, c.wide]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: "/a/{id}"}
  a.read2: {upstream: crm, method: GET, path: "/a/{x}"}
  c.narrow: {upstream: crm, method: GET, path: "/c/{id}", params: {id: "[0-9]+"}}
  c.wide: {upstream: crm, method: GET, path: "/c/{any}"}
""")
    shadowed = only(found, "shadowed-route")
    assert [(x.level, x.path) for x in shadowed] == [("ERROR", "capabilities.a.read2.path")]
    assert "'a.read' (GET /a/{id}), declared earlier" in shadowed[0].message
    # a narrower earlier route leaves the rest to the later one: an overlap, not a shadow
    over = only(found, "overlapping-routes")
    assert [x.path for x in over] == ["capabilities.c.wide.path"]
    assert "'c.narrow' wins whenever its parameter patterns match" in over[0].message


def test_routes_of_other_methods_or_upstreams_do_not_overlap(tmp_path: Path) -> None:
    found = lint(tmp_path, """
  other: {url: "http://127.0.0.1:9001"}
agents: {bot: {grants: [a.read, a.delete, b.read]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: "/a/{id}"}
  a.delete: {upstream: crm, method: DELETE, path: "/a/{x}"}
  b.read: {upstream: other, method: GET, path: "/a/{x}"}
""")
    assert not only(found, "overlapping-routes") and not only(found, "shadowed-route")


def test_grant_of_unknown_capability_is_listed_with_every_other_problem(tmp_path: Path) -> None:
    found = lint(tmp_path, """
agents:
  bot:
    grants: [a.read, ghost.cap, {capability: a.read2, mode: live, colour: red}]
capabilities:
  a.read: {upstream: crm, method: GET, path: "/a/{id}", colour: blue}
  a.read2: {upstream: crm, method: get, path: /b}
""")
    # config.parse_rules would stop at the schema errors; the linter still reports the unknown grant
    assert ("ERROR", "unknown-capability", "agents.bot.grants[1]") in codes(found)
    assert ("ERROR", "unknown-key", "capabilities.a.read.colour") in codes(found)
    assert ("ERROR", "unknown-key", "agents.bot.grants[2].colour") in codes(found)
    assert ("ERROR", "schema", "capabilities.a.read2.method") in codes(found)
    # a.read2 is held (by the grant that did not validate): not reported as unheld
    assert not only(found, "unheld-capability")


def test_unknown_capability_in_an_otherwise_valid_file(tmp_path: Path) -> None:
    found = lint(tmp_path, """
agents: {bot: {grants: [a.read, nope]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: /a}
""")
    assert codes(found) == [("ERROR", "unknown-capability", "agents.bot.grants[1]")]
    assert found[0].message == "unknown capability 'nope'"


def test_unknown_upstream_and_adapter(tmp_path: Path) -> None:
    found = lint(tmp_path, """
  odd: {url: "http://127.0.0.1:9001", adapter: no-such-adapter}
agents: {bot: {grants: [a.read, b.read]}}
capabilities:
  a.read: {upstream: nowhere, method: GET, path: /a}
  b.read: {upstream: odd, method: GET, path: /b}
""")
    assert ("ERROR", "unknown-upstream", "capabilities.a.read.upstream") in codes(found)
    assert ("ERROR", "unknown-adapter", "upstreams.odd.adapter") in codes(found)


def test_live_non_compensable_write(tmp_path: Path) -> None:
    found = lint(tmp_path, """
agents:
  bot:
    grants:
      - {capability: pay.charge, mode: live}
      - {capability: pay.refund, mode: canary}
      - {capability: pay.note, mode: live}
      - {capability: pay.void, mode: dry_run}
capabilities:
  pay.charge: {upstream: crm, method: POST, path: /charges, compensation: non_compensable, body: {allow_fields: [amount]}}
  pay.refund: {upstream: crm, method: POST, path: /refunds, compensation: none, body: {allow_fields: [amount]}}
  pay.note: {upstream: crm, method: POST, path: /notes, compensation: none, allow_live_without_compensation: true,
             body: {allow_fields: [text]}}
  pay.void: {upstream: crm, method: POST, path: /voids, compensation: none, body: {allow_fields: [id]}}
""")
    live = only(found, "live-non-compensable")
    assert [(x.level, x.path) for x in live] == [("ERROR", "agents.bot.grants[0]"), ("ERROR", "agents.bot.grants[1]"),
                                                 ("INFO", "agents.bot.grants[2]")]
    assert "cannot be undone (compensation: non_compensable)" in live[0].message


def test_write_without_field_rules(tmp_path: Path) -> None:
    found = only(lint(tmp_path, """
agents: {bot: {grants: [a.create, a.update, a.delete, a.put, a.search]}}
capabilities:
  a.create: {upstream: crm, method: POST, path: /a}
  a.update: {upstream: crm, method: PATCH, path: "/a/{id}", body: {forbid_fields: [owner]}}
  a.delete: {upstream: crm, method: DELETE, path: "/a/{id}"}
  a.put: {upstream: crm, method: PUT, path: "/a/{id}", body: {json_schema: {type: object}}}
  a.search: {upstream: crm, method: POST, path: /a/search, effect: read}
"""), "write-without-fields")
    assert [(x.level, x.path) for x in found] == [("WARNING", "capabilities.a.create"), ("WARNING", "capabilities.a.update")]
    assert "only forbid_fields" in found[1].message


def test_capability_nobody_holds(tmp_path: Path) -> None:
    found = lint(tmp_path, """
agents: {bot: {grants: [a.read]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: /a}
  b.read: {upstream: crm, method: GET, path: /b}
""")
    assert codes(found) == [("WARNING", "unheld-capability", "capabilities.b.read")]


def test_unused_capability_from_the_journal(tmp_path: Path) -> None:
    db = make_journal(tmp_path / "tether.db", [("a.read", "live"), ("a.read", "live")])
    body = """
agents: {bot: {grants: [a.read, b.read]}}
capabilities:
  a.read: {upstream: crm, method: GET, path: /a}
  b.read: {upstream: crm, method: GET, path: /b}
"""
    found = lint(tmp_path, body, store=db)
    assert codes(found) == [("WARNING", "unused-capability", "capabilities.b.read")]
    assert "4 journal record(s) from" in found[0].message
    assert lint(tmp_path, body) == []  # no journal: no opinion on traffic
    # the rules file's server.store is read when it exists
    found = lint(tmp_path, body.replace("agents:", f"server: {{store: {db}}}\nagents:"), use_default_store=True)
    assert codes(found) == [("WARNING", "unused-capability", "capabilities.b.read")]


def test_yaml_errors_and_duplicate_keys(tmp_path: Path) -> None:
    found = lint(tmp_path, "capabilities:\n  a: {upstream: crm, method: GET, path: /a}\n  a: {}\n")
    assert codes(found) == [("ERROR", "yaml", "line 7, column 3")]
    assert "duplicate key 'a'" in found[0].message


# --------------------------------------------------------------------------- the command


def test_check_command_output_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    warn = tmp_path / "warn.yaml"
    warn.write_text(HEAD + "capabilities:\n  b.read: {upstream: crm, method: GET, path: /b}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEAD + "agents: {bot: {grants: [nope]}}\n")
    assert main(["rules", "check", "--no-store", str(warn)]) == 0
    out = capsys.readouterr().out
    assert out == f"WARNING {warn}: capabilities.b.read: no agent holds this capability [unheld-capability]\n"
    assert main(["rules", "check", "--no-store", "--strict", str(warn)]) == 1
    capsys.readouterr()
    assert main(["rules", "check", "--no-store", "--config", str(bad)]) == 1
    assert capsys.readouterr().out.startswith(f"ERROR {bad}: agents.bot.grants[0]: unknown capability 'nope'")
    assert main(["rules", "check", "--no-store", "--format", "json", str(bad), str(warn)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(d["level"], d["code"], Path(d["file"]).name) for d in doc] == [
        ("ERROR", "unknown-capability", "bad.yaml"), ("WARNING", "unheld-capability", "warn.yaml")]


# --------------------------------------------------------------------------- the JSON Schema


def schema_validator() -> Any:
    from jsonschema import Draft202012Validator  # a runtime dependency (proxy.policy.validation uses it)

    schema = rules_json_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_schema_validates_the_example_rules_file() -> None:
    v = schema_validator()
    doc = yaml.safe_load((ROOT / "rules" / "example.yaml").read_text())
    assert [e.message for e in v.iter_errors(doc)] == []


def test_schema_accepts_shorthands_and_refuses_what_the_config_refuses(tmp_path: Path) -> None:
    v = schema_validator()
    doc = base_rules("http://127.0.0.1:9000", str(tmp_path / "t.db"))
    doc["server"]["review"] = {"ttl": "7d"}
    doc["server"]["limits"] = {"max_body_bytes": "10MB"}
    doc["upstreams"]["crm"]["credentials"] = {"type": "api_key", "header": "X-Key", "value_env": "KEY"}
    assert [e.message for e in v.iter_errors(doc)] == []
    for bad in ({"capabilities": {"x": {"upstream": "crm", "method": "get", "path": "/x"}}},
                {"capabilities": {"x": {"upstream": "crm", "method": "GET", "path": "/x", "colour": 1}}},
                {"agents": {"bot": {"grants": [{"capability": "x", "mode": "sometimes"}]}}},
                {"server": {"review": {"ttl": "a week"}}}):
        assert not v.is_valid({**doc, **bad}), bad


def test_schema_validates_an_imported_file(tmp_path: Path) -> None:
    v = schema_validator()
    out = tmp_path / "mini.yaml"
    assert main(["rules", "import-openapi", str(ROOT / "tests" / "data" / "openapi" / "mini.yaml"), "--upstream",
                 "mini", "--agent", "bot", "-o", str(out), "-q"]) == 0
    assert [e.message for e in v.iter_errors(yaml.safe_load(out.read_text()))] == []


def test_schema_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tether-rules.schema.json"
    assert main(["rules", "schema", "--output", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Tether rules file"
    assert "description" in schema["$defs"]["GrantConfig"]["properties"]["mode"]
    assert main(["rules", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema
