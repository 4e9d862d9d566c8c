"""tether rules import-openapi: real public descriptions import into rules that load and enforce."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters import get_adapter
from proxy.cli.main import main
from proxy.cli.openapi import ImportOptions, Spec, import_operations, to_template
from proxy.config import load_rules, parse_rules
from proxy.policy.registry import Registry
from tests.conftest import SECRET, UPSTREAM_TOKEN

SPECS = Path("/work/shared/specs")
DATA = Path(__file__).parent / "data" / "openapi"
MINI = DATA / "mini.yaml"

needs_specs = pytest.mark.skipif(not SPECS.is_dir(), reason="the public OpenAPI descriptions are in /work/shared/specs")


def jsonschema_validator() -> Any:
    from jsonschema import Draft202012Validator  # a runtime dependency (proxy.policy.validation uses it)

    return Draft202012Validator


def run_import(*args: str) -> int:
    return main(["rules", "import-openapi", *args])


def registry_of(path: Path) -> Registry:
    rules = load_rules(path)
    return Registry(rules, {n: get_adapter(u.adapter, u.adapter_options) for n, u in rules.upstreams.items()})


def check_schemas(reg: Registry) -> int:
    validator = jsonschema_validator()
    n = 0
    for cap in reg.capabilities.values():
        body = cap.config.body
        if body is not None and body.json_schema is not None:
            validator.check_schema(body.json_schema)
            n += 1
    return n


# --------------------------------------------------------------------------- a small spec, every rule


@pytest.fixture
def mini(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    out = tmp_path / "mini.rules.yaml"
    assert run_import(str(MINI), "--upstream", "mini", "--agent", "bot", "--output", str(out)) == 0
    err = capsys.readouterr().err
    registry_of(out)  # loads and compiles
    return yaml.safe_load(out.read_text()), err


def test_one_capability_per_operation_named_from_operation_id(mini: tuple[dict[str, Any], str]) -> None:
    doc, err = mini
    caps = doc["capabilities"]
    assert set(caps) == {"mini.list_widgets", "mini.create_widget", "mini.get_widget", "mini.update_widget",
                         "mini.delete_widget", "mini.search_widgets", "mini.plant_tree", "mini.post_notes",
                         "mini.upload", "mini.free.post", "mini.things.by_id.put"}
    assert caps["mini.list_widgets"] == {"upstream": "mini", "method": "GET", "path": "/widgets", "effect": "read",
                                         "description": "List widgets"}
    assert doc["upstreams"]["mini"]["url"] == "https://eu.example.com/v2"  # server variables filled in


def test_effect_from_method_and_post_queries_are_reads(mini: tuple[dict[str, Any], str]) -> None:
    doc, err = mini
    caps = doc["capabilities"]
    assert caps["mini.create_widget"]["effect"] == "write"
    assert caps["mini.delete_widget"]["effect"] == "write"
    assert caps["mini.search_widgets"]["effect"] == "read"
    assert "mini.search_widgets: a POST used as a query" in err


def test_writes_are_dry_run_and_say_so(mini: tuple[dict[str, Any], str]) -> None:
    doc, _ = mini
    grants = doc["agents"]["bot"]["grants"]
    assert "mini.list_widgets" in grants and "mini.search_widgets" in grants
    writes = [g for g in grants if isinstance(g, dict)]
    assert writes and all(g["mode"] == "dry_run" for g in writes)
    assert {g["capability"] for g in writes} == {n for n, c in doc["capabilities"].items() if c["effect"] == "write"}


def test_params_renamed_patterns_kept_and_unroutable_paths_skipped(mini: tuple[dict[str, Any], str]) -> None:
    doc, err = mini
    cap = doc["capabilities"]["mini.get_widget"]
    assert cap["path"] == "/widgets/{widget_id}"  # {widget-id} is not a Tether parameter name
    assert cap["params"] == {"widget_id": "w_[0-9]+"}  # from the anchored schema pattern
    assert "skipped GET /files/{name}.json" in err and "not a whole segment" in err
    assert to_template("/a/{b}.json") [0] is None
    assert to_template("/a?x=1")[0] is None
    assert to_template("/a//b")[0] is None
    assert to_template("/sobjects/{id}", "/services/data/{version}")[0] == "/services/data/{version}/sobjects/{id}"


def test_refs_resolved_annotations_dropped_openapi30_converted(mini: tuple[dict[str, Any], str]) -> None:
    doc, _ = mini
    body = doc["capabilities"]["mini.create_widget"]["body"]
    # allOf members merged for allow_fields; the readOnly id is not a field a request may carry
    assert body["allow_fields"] == ["name", "size", "description", "colour"]
    base, extra = body["json_schema"]["allOf"]
    assert base["properties"]["name"] == {"type": "string"}  # description/example dropped...
    assert "description" in base["properties"]  # ...but a property *named* description stays
    assert base["properties"]["size"] == {"type": "integer", "exclusiveMinimum": 0}  # 3.0 boolean form converted
    assert extra["properties"]["colour"] == {"type": ["string", "null"], "enum": ["red", "blue", None]}  # nullable
    # a requestBody $ref to components/requestBodies
    assert doc["capabilities"]["mini.update_widget"]["body"]["json_schema"]["required"] == ["name"]
    # a $ref into another file, which refers to a schema of its own file
    thing = doc["capabilities"]["mini.things.by_id.put"]["body"]
    assert thing["allow_fields"] == ["owner", "tags"]
    assert thing["json_schema"]["properties"]["owner"]["properties"]["email"] == {"type": "string", "format": "email"}


def test_recursive_schema_kept_as_local_defs(mini: tuple[dict[str, Any], str]) -> None:
    doc, _ = mini
    schema = doc["capabilities"]["mini.plant_tree"]["body"]["json_schema"]
    assert schema["properties"]["children"]["items"] == {"$ref": "#/$defs/Tree"}
    assert schema["$defs"]["Tree"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Tree"}
    v = jsonschema_validator()(schema)
    assert v.is_valid({"label": "a", "children": [{"label": "b", "children": [{"label": "c"}]}]})
    assert not v.is_valid({"label": "a", "children": [{"label": "b", "children": [{"label": 3}]}]})


def test_allow_fields_choices(mini: tuple[dict[str, Any], str]) -> None:
    doc, err = mini
    caps = doc["capabilities"]
    assert caps["mini.post_notes"]["body"]["allow_fields"] == ["text", "pinned"]  # form, additionalProperties: false
    assert "allow_fields" not in caps["mini.free.post"]["body"]  # additionalProperties: true: a free-form body
    assert "body" not in caps["mini.upload"]  # multipart cannot be inspected: no rules, said so
    assert "no body rules for mini.upload" in err
    spec = Spec.load(MINI)
    closed = import_operations(spec, ImportOptions(upstream="mini", allow_fields="closed"))
    assert "allow_fields" not in closed.capabilities["mini.create_widget"]["body"]
    assert closed.capabilities["mini.post_notes"]["body"]["allow_fields"] == ["text", "pinned"]
    off = import_operations(spec, ImportOptions(upstream="mini", allow_fields="off"))
    assert "allow_fields" not in off.capabilities["mini.post_notes"]["body"]


def test_include_exclude_and_name_prefix() -> None:
    spec = Spec.load(MINI)
    res = import_operations(spec, ImportOptions(upstream="mini", include=["/widgets*"], exclude=["DELETE *"],
                                                name_prefix=""))
    assert sorted(res.capabilities) == ["create_widget", "get_widget", "list_widgets", "search_widgets",
                                        "update_widget"]
    res = import_operations(spec, ImportOptions(upstream="mini", include=["re:^(get|list)Widgets?$"]))
    assert sorted(res.capabilities) == ["mini.get_widget", "mini.list_widgets"]


# --------------------------------------------------------------------------- re-running merges


def test_rerun_merges_and_keeps_hand_edits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    shutil.copy(DATA / "mini-shared.yaml", spec_dir / "mini-shared.yaml")
    spec_file = spec_dir / "mini.yaml"
    spec_file.write_text(MINI.read_text())
    out = tmp_path / "rules.yaml"
    assert run_import(str(spec_file), "--upstream", "mini", "--agent", "bot", "-o", str(out)) == 0
    capsys.readouterr()

    # a person edits the file
    doc = yaml.safe_load(out.read_text())
    caps = doc["capabilities"]
    caps["mini.update_widget"]["description"] = "mine"
    caps["mini.update_widget"]["body"]["constraints"] = {"name": {"max_length": 10}}
    del caps["mini.get_widget"]["params"]
    caps["mini.custom"] = {"upstream": "mini", "method": "GET", "path": "/custom"}
    for g in doc["agents"]["bot"]["grants"]:
        if isinstance(g, dict) and g["capability"] == "mini.create_widget":
            g["mode"] = "live"
    doc["agents"]["bot"]["grants"].remove("mini.search_widgets")
    del caps["mini.free.post"]
    doc["agents"]["bot"]["grants"].remove({"capability": "mini.free.post", "mode": "dry_run"})
    out.write_text(yaml.safe_dump(doc, sort_keys=False))

    # the spec changes: /trees vanishes, /gadgets appears, a schema tightens
    spec = yaml.safe_load(spec_file.read_text())
    del spec["paths"]["/trees"]
    spec["paths"]["/gadgets"] = {"get": {"operationId": "listGadgets", "responses": {"200": {"description": "ok"}}}}
    spec["components"]["schemas"]["WidgetBase"]["properties"]["name"]["maxLength"] = 50
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))

    assert run_import(str(spec_file), "--upstream", "mini", "--agent", "bot", "-o", str(out)) == 0
    err = capsys.readouterr().err
    doc = yaml.safe_load(out.read_text())
    caps = doc["capabilities"]
    upd = caps["mini.update_widget"]
    assert upd["description"] == "mine"  # changed by the person: kept
    assert upd["body"]["constraints"] == {"name": {"max_length": 10}}  # added by the person: kept
    assert upd["body"]["json_schema"]["properties"]["name"] == {"type": "string", "maxLength": 50}  # untouched: follows the spec
    assert "params" not in caps["mini.get_widget"]  # deleted by the person: stays deleted
    assert caps["mini.custom"]["path"] == "/custom"
    assert "mini.list_gadgets" in caps and list(caps)[-1] == "mini.list_gadgets"  # new operations are appended
    assert "mini.plant_tree" in caps  # vanished: kept, and reported
    assert "mini.plant_tree (POST /trees) is no longer in the spec" in err
    grants = doc["agents"]["bot"]["grants"]
    assert {"capability": "mini.create_widget", "mode": "live"} in grants  # the promotion is the person's
    assert "mini.list_gadgets" in grants
    assert "mini.search_widgets" not in grants  # a grant the person removed is not granted again
    assert "no longer holds mini.search_widgets" in err
    assert "mini.free.post" not in caps  # a capability the person deleted is not brought back
    assert "mini.free.post (POST /free) was deleted by hand" in err
    load_rules(out)


def test_rerun_without_state_file_keeps_existing_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rules.yaml"
    assert run_import(str(MINI), "--upstream", "mini", "--include", "/widgets", "-o", str(out)) == 0
    (tmp_path / "rules.yaml.import-state.json").unlink()
    doc = yaml.safe_load(out.read_text())
    doc["capabilities"]["mini.create_widget"]["compensation"] = "none"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert run_import(str(MINI), "--upstream", "mini", "--include", "/widgets*", "-o", str(out)) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["capabilities"]["mini.create_widget"]["compensation"] == "none"
    assert "mini.get_widget" in doc["capabilities"]
    assert "no longer in the spec" not in capsys.readouterr().err


# --------------------------------------------------------------------------- real descriptions


@needs_specs
def test_stripe_imports_and_loads(tmp_path: Path) -> None:
    out = tmp_path / "stripe.yaml"
    assert run_import(str(SPECS / "stripe.oas.json"), "--upstream", "stripe", "-o", str(out), "-q") == 0
    reg = registry_of(out)
    assert len(reg.capabilities) == 533
    assert check_schemas(reg) > 250
    cap = reg.capabilities["stripe.post_customers"].config
    assert cap.body is not None and cap.body.allow_fields is not None and "email" in cap.body.allow_fields
    assert reg.capabilities["stripe.get_customers_customer"].effect == "read"
    assert reg.capabilities["stripe.post_customers_customer"].effect == "write"


@needs_specs
def test_salesforce_whole_spec_in_reasonable_time(tmp_path: Path) -> None:
    out = tmp_path / "salesforce.yaml"
    t0 = time.monotonic()
    assert run_import(str(SPECS / "salesforce.oas.json"), "--upstream", "salesforce", "--path-prefix",
                      "/services/data/{version}", "--param", r"version=v[0-9]+\.[0-9]+", "-o", str(out), "-q") == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 20, f"importing the Salesforce spec took {elapsed:.1f}s"
    reg = registry_of(out)
    assert len(reg.capabilities) == 3665
    patch = reg.capabilities["salesforce.sobjects.account.by_id.patch"]
    assert patch.template == "/services/data/{version}/sobjects/Account/{id}"
    assert patch.config.params == {"version": r"v[0-9]+\.[0-9]+"}
    assert patch.config.body is not None and "Name" in (patch.config.body.allow_fields or [])
    found = reg.match("salesforce", "PATCH", ("services", "data", "v59.0", "sobjects", "Account", "001xx"))
    assert found is not None and found[0].name == patch.name
    assert reg.match("salesforce", "PATCH", ("services", "data", "latest", "sobjects", "Account", "001xx")) is None


@needs_specs
@pytest.mark.parametrize("spec", ["hubspot-crm-deals-v3-namedpath.json", "hubspot-crm-deals-2026-03.json",
                                  "hubspot-crm-contacts-v3.json", "hubspot-crm-companies-v3.json"])
def test_hubspot_specs_import_and_load(tmp_path: Path, spec: str) -> None:
    out = tmp_path / "hubspot.yaml"
    assert run_import(str(SPECS / spec), "--upstream", "hubspot", "--agent", "bot", "-o", str(out), "-q") == 0
    reg = registry_of(out)
    assert len(reg.capabilities) >= 12
    assert check_schemas(reg) >= 9
    searches = [c for c in reg.capabilities.values() if c.template.endswith("/search")]
    assert searches and all(c.effect == "read" for c in searches)


# --------------------------------------------------------------------------- end to end, through a gateway


def gateway_rules(path: Path, upstream_url: str, store: str, live: tuple[str, ...] = ()) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    doc["server"] = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store}
    doc["identity"] = {"hs_secret": {"value": SECRET}}
    for up in doc["upstreams"].values():
        up["url"] = upstream_url
        up["credentials"] = {"type": "bearer", "token": {"value": UPSTREAM_TOKEN}}
    for g in doc["agents"]["bot"]["grants"]:
        if isinstance(g, dict) and g["capability"] in live:
            g["mode"] = "live"
    parse_rules(doc)
    return doc


@needs_specs
async def test_hubspot_requests_valid_pass_invalid_refused_with_field(tmp_path: Path, make_gateway: Any,
                                                                     upstream: Any) -> None:
    out = tmp_path / "hubspot.yaml"
    assert run_import(str(SPECS / "hubspot-crm-deals-v3-namedpath.json"), "--upstream", "hubspot", "--agent", "bot",
                      "-o", str(out), "-q") == 0
    rules = gateway_rules(out, upstream.url, str(tmp_path / "tether.db"),
                          live=("hubspot.crm.v3.objects.deals.by_deal_id.update",))
    gw = await make_gateway(rules)

    async def post(path: str, body: Any, method: str = "POST") -> tuple[int, Any]:
        resp = await gw.request(method, path, upstream="hubspot", json=body)
        data = await resp.read()
        import json

        return resp.status, json.loads(data) if data else None

    # valid per the spec: a dry-run write is captured and answered
    status, body = await post("/crm/v3/objects/deals", {"properties": {"dealname": "Acme", "amount": "1500"}})
    assert status in (200, 201, 202), body
    # a field the spec does not document
    status, body = await post("/crm/v3/objects/deals", {"properties": {"dealname": "Acme"}, "colour": "red"})
    assert status == 422 and body["error"]["code"] == "field_not_allowed"
    assert body["error"]["details"]["field"] == "colour"
    # a value of the wrong type, deep inside
    status, body = await post("/crm/v3/objects/deals", {"properties": {"amount": 1500}})
    assert status == 422 and body["error"]["code"] == "schema_violation"
    assert body["error"]["details"]["field"] == "properties.amount"
    # a required field missing
    status, body = await post("/crm/v3/objects/deals", {"associations": []})
    assert status == 422 and body["error"]["code"] == "schema_violation" and "properties" in body["error"]["message"]
    # a live write goes through to the upstream; an invalid one never leaves
    status, body = await post("/crm/v3/objects/deals/123", {"properties": {"dealstage": "closedwon"}}, "PATCH")
    assert status == 200, body
    status, body = await post("/crm/v3/objects/deals/123", {"properties": {"dealstage": "closedwon"}, "x": 1},
                              "PATCH")
    assert status == 422 and body["error"]["details"]["field"] == "x"
    sent = upstream.seen("PATCH", "/crm/v3/objects/deals/123")
    assert len(sent) == 1 and sent[0].json() == {"properties": {"dealstage": "closedwon"}}
    # a read
    resp = await gw.request("GET", "/crm/v3/objects/deals/123", upstream="hubspot")
    assert resp.status == 200


@needs_specs
async def test_stripe_form_bodies_checked_against_the_spec(tmp_path: Path, make_gateway: Any, upstream: Any) -> None:
    out = tmp_path / "stripe.yaml"
    assert run_import(str(SPECS / "stripe.oas.json"), "--upstream", "stripe", "--include", "/v1/customers",
                      "--include", "/v1/customers/{customer}", "--agent", "bot", "-o", str(out), "-q") == 0
    gw = await make_gateway(gateway_rules(out, upstream.url, str(tmp_path / "tether.db"),
                                          live=("stripe.post_customers_customer",)))
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    async def send(method: str, path: str, data: str) -> tuple[int, Any]:
        import json

        resp = await gw.request(method, path, upstream="stripe", data=data.encode(), headers=form)
        raw = await resp.read()
        return resp.status, json.loads(raw) if raw else None

    status, body = await send("POST", "/v1/customers", "email=a%40example.com&metadata[plan]=pro&balance=100")
    assert status in (200, 201, 202), body
    status, body = await send("POST", "/v1/customers", "email=a%40example.com&bogus=1")
    assert status == 422 and body["error"]["code"] == "field_not_allowed" and body["error"]["details"]["field"] == "bogus"
    status, body = await send("POST", "/v1/customers", "balance=lots")
    assert status == 422 and body["error"]["code"] == "schema_violation"
    assert body["error"]["details"]["field"] == "balance"
    status, body = await send("POST", "/v1/customers/cus_123", "name=Jane")
    assert status == 200, body
    assert upstream.seen("POST", "/v1/customers/cus_123")[0].body == b"name=Jane"


# --------------------------------------------------------------------------- the committed examples


IMPORTED = Path(__file__).resolve().parent.parent / "rules" / "imported"
EXAMPLES = {
    "stripe-customers.yaml": ["stripe.oas.json", "--upstream", "stripe", "--include", "/v1/customers",
                              "--include", "/v1/customers/{customer}", "--agent", "billing-bot"],
    "salesforce-opportunity.yaml": ["salesforce.oas.json", "--upstream", "salesforce", "--url",
                                    "https://example.my.salesforce.com", "--path-prefix", "/services/data/{version}",
                                    "--param", r"version=v[0-9]+\.[0-9]+", "--include", "/sobjects/Opportunity",
                                    "--include", "/sobjects/Opportunity/{id}", "--agent", "renewal-bot"],
    "hubspot-deals.yaml": ["hubspot-crm-deals-v3-namedpath.json", "--upstream", "hubspot", "--agent", "renewal-bot"],
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_examples_load_and_lint_clean(name: str) -> None:
    from proxy.cli.lint import lint_file

    registry_of(IMPORTED / name)
    assert [f.line() for f in lint_file(IMPORTED / name, use_default_store=False) if f.level == "ERROR"] == []


@needs_specs
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_committed_examples_are_what_the_import_makes(name: str, tmp_path: Path) -> None:
    """Re-running the documented command over the committed file changes nothing."""
    out = tmp_path / name
    shutil.copy(IMPORTED / name, out)
    shutil.copy(IMPORTED / (name + ".import-state.json"), tmp_path / (name + ".import-state.json"))
    spec, *args = EXAMPLES[name]
    assert run_import(str(SPECS / spec), *args, "-o", str(out), "-q") == 0
    assert out.read_text() == (IMPORTED / name).read_text()


def test_reference_cycles_terminate() -> None:
    """Pure $ref cycles (A -> A, A -> B -> A) and deep mutual recursion give finite, valid schemas."""
    validator = jsonschema_validator()
    doc = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"},
        "paths": {f"/{n}": {"post": {"operationId": n, "requestBody": {"content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{n}"}}}}, "responses": {}}} for n in ("Self", "A", "Node")},
        "components": {"schemas": {
            "Self": {"$ref": "#/components/schemas/Self"},
            "A": {"$ref": "#/components/schemas/B"},
            "B": {"$ref": "#/components/schemas/A"},
            "Node": {"type": "object", "properties": {"next": {"$ref": "#/components/schemas/Edge"}}},
            "Edge": {"type": "object", "properties": {"to": {"$ref": "#/components/schemas/Node"},
                                                      "weight": {"type": "number"}}},
        }},
    }
    res = import_operations(Spec(doc), ImportOptions(upstream="t"))
    for name in ("t.self", "t.a", "t.node"):
        schema = res.capabilities[name]["body"]["json_schema"]
        validator.check_schema(schema)
        validator(schema).is_valid({"next": {"to": {"next": {"weight": 1}}}})
    node = validator(res.capabilities["t.node"]["body"]["json_schema"])
    assert node.is_valid({"next": {"to": {"next": {"weight": 2}}}})
    assert not node.is_valid({"next": {"to": {"next": {"weight": "heavy"}}}})
