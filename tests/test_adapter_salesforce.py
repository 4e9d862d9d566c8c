"""The Salesforce adapter's deciding methods, with plain data (no sockets, no I/O).

Operations are built the way the pipeline builds them (split_target, decode_segments, method_override,
then the compiled registry's matcher), so what is tested here is what the gateway decides."""

from __future__ import annotations

import re
from typing import Any

import pytest

from adapters.base import AdapterOptionsError, NotCompensable, Operation, PlannedRequest, UndoPlan
from adapters.salesforce import SalesforceAdapter, SalesforceOperation, same_value, to_18
from proxy.config import parse_rules
from proxy.errors import TetherError
from proxy.normalise import decode_segments, parse_query, split_target
from proxy.policy.registry import Registry

V = "/services/data/v59.0"
ACC, CON, OPP = "0015g00000XyZaBAAZ", "0035g00000AbCdEAAZ", "0065g00000AbCdEAAZ"
PROV = {"Agent_Id__c": "renewal-bot", "On_Behalf_Of__c": "ae:jane", "Agent_Intent__c": "renew", "Authz_Event__c": "7"}


def cap(method: str, path: str) -> dict[str, Any]:
    return {"upstream": "sf", "method": method, "path": "/services/data/{version}" + path}


CAPS = {
    "account.read": cap("GET", "/sobjects/Account/{id}"),
    "account.create": cap("POST", "/sobjects/Account"),
    "account.update": cap("PATCH", "/sobjects/Account/{id}"),
    "account.delete": cap("DELETE", "/sobjects/Account/{id}"),
    "account.owner.update": cap("PATCH", "/sobjects/Account/{id}/Owner"),
    "contact.create": cap("POST", "/sobjects/Contact"),
    "contact.update": cap("PATCH", "/sobjects/Contact/{id}"),
    "contact.delete": cap("DELETE", "/sobjects/Contact/{id}"),
    "opportunity.read": cap("GET", "/sobjects/Opportunity/{id}"),
    "opportunity.create": cap("POST", "/sobjects/Opportunity"),
    "opportunity.update": cap("PATCH", "/sobjects/Opportunity/{id}"),
    "opportunity.upsert": cap("PATCH", "/sobjects/Opportunity/Ext_Key__c/{value}"),
    "query": cap("GET", "/query"),
    "limits": cap("GET", "/limits"),
}


def make(options: dict[str, Any] | None = None) -> tuple[SalesforceAdapter, Registry]:
    rules = parse_rules({"identity": {"hs_secret": {"value": "x" * 32}},
                         "upstreams": {"sf": {"url": "http://127.0.0.1:9", "adapter": "salesforce",
                                              "adapter_options": options or {}}},
                         "capabilities": CAPS})
    ad = SalesforceAdapter(options or {})
    return ad, Registry(rules, {"sf": ad})


AD, REG = make()


def op(method: str, target: str, body: Any = None, *, ad: SalesforceAdapter = AD, reg: Registry = REG,
       match: bool = True) -> Operation:
    """An operation exactly as match_route makes it (override resolved, capability matched)."""
    path, query = split_target(target, 8192)
    segs = decode_segments(path)
    if query:
        method = ad.method_override(method, parse_query(query)) or method
    o = Operation(method=method, path=path, query=query, segments=segs, body=body)
    if match and not ad.is_composite(o):
        found = reg.match("sf", method, segs)
        assert found is not None, f"{method} {target} matches no capability"
        o.capability, o.params = found
    return o


def unpack(method: str, target: str, body: Any = None, *, ad: SalesforceAdapter = AD,
           reg: Registry = REG) -> list[Operation]:
    outer = op(method, target, body, ad=ad, reg=reg, match=False)
    assert ad.is_composite(outer)
    subs = ad.unpack(outer) or []
    for s in subs:
        found = reg.match("sf", s.method, s.segments)
        if found is not None:
            s.capability, s.params = found
    return subs


def refused(code: str, fn: Any, *args: Any, **kw: Any) -> TetherError:
    with pytest.raises(TetherError) as ei:
        fn(*args, **kw)
    assert ei.value.code == code, ei.value
    return ei.value


def is_sf_id(value: Any, prefix: str | None = None) -> bool:
    return (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9]{18}", value) is not None
            and to_18(value[:15]) == value and (prefix is None or value.startswith(prefix)))


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("method,target,capability", [
    ("GET", f"{V}/sobjects/Account/{ACC}", "account.read"),
    ("GET", f"{V}/sobjects/account/{ACC[:15]}", "account.read"),
    ("GET", f"{V}/SOBJECTS/ACCOUNT/{ACC}", "account.read"),
    ("POST", f"{V}/sobjects/Opportunity/", "opportunity.create"),  # simple-salesforce's trailing slash
    ("POST", f"{V}/sobjects/opportunity", "opportunity.create"),
    ("PATCH", f"{V}/sobjects/Opportunity/{OPP}/", "opportunity.update"),
    ("PATCH", f"{V}/sobjects/Opportunity/Ext_Key__c/ACME-1", "opportunity.upsert"),
    ("PATCH", f"{V}/sobjects/Opportunity/ext_key__c/ACME-1", "opportunity.upsert"),
    ("POST", f"{V}/sobjects/Opportunity/{OPP}?_HttpMethod=PATCH", "opportunity.update"),
    ("POST", f"{V}/sobjects/Contact/{CON}?_HttpMethod=DELETE", "contact.delete"),
    ("GET", f"{V}/query/?q=SELECT+Id+FROM+Account", "query"),
    ("PATCH", f"{V}/sobjects/Account/{ACC}/Owner", "account.owner.update"),
])
def test_routes_match_every_spelling(method: str, target: str, capability: str) -> None:
    assert op(method, target).capability.name == capability


@pytest.mark.parametrize("method,target", [
    ("GET", f"{V}/sobjects/Account/not-an-id"),
    ("GET", f"{V}/sobjects/Account/{ACC}X"),  # 19 characters
    ("GET", f"{V}/sobjects/Account/{ACC[:16]}"),  # 16 characters
    ("GET", "/services/data/59.0/sobjects/Account/" + ACC),  # no 'v'
    ("GET", "/services/data/vlatest/sobjects/Account/" + ACC),
    ("DELETE", f"{V}/sobjects/Opportunity/{OPP}"),
])
def test_what_is_not_a_salesforce_target_matches_nothing(method: str, target: str) -> None:
    path, _ = split_target(target, 8192)
    assert REG.match("sf", method, decode_segments(path)) is None


@pytest.mark.parametrize("method,template,expected", [
    ("POST", "/services/data/{version}/sobjects/Account", "create"),
    ("POST", "/services/data/{version}/sobjects/Account/Id", "create"),
    ("PATCH", "/services/data/{version}/sobjects/Account/{id}", "update"),
    ("DELETE", "/services/data/{version}/sobjects/Account/{id}", "delete"),
    ("PATCH", "/services/data/{version}/sobjects/Account/Ext__c/{value}", "upsert"),
    ("PATCH", "/services/data/{version}/sobjects/Account/{field}/{value}", "upsert"),
    ("DELETE", "/services/data/{version}/sobjects/Account/Ext__c/{value}", "delete"),
    ("PATCH", "/services/data/{version}/sobjects/Account/{id}/Owner", "update"),
    ("POST", "/services/data/{version}/actions/standard/emailSimple", "action"),
    ("POST", "/services/data/{version}/composite", "action"),
])
def test_infer_operation(method: str, template: str, expected: str) -> None:
    assert AD.infer_operation(method, template, "write") == expected
    assert AD.infer_operation("GET", template, "read") == "read"


def test_override_is_honoured_on_post_only_and_spelled_exactly() -> None:
    assert AD.method_override("POST", [("_HttpMethod", "PATCH")]) == "PATCH"
    assert AD.method_override("POST", [("fields", "Name")]) is None
    for method, query in [("GET", [("_HttpMethod", "DELETE")]), ("PATCH", [("_HttpMethod", "DELETE")]),
                          ("POST", [("_httpmethod", "DELETE")]), ("POST", [("_method", "DELETE")]),
                          ("POST", [("_HttpMethod", "patch")]), ("POST", [("_HttpMethod", "TRACE")]),
                          ("POST", [("_HttpMethod", "PATCH"), ("_HttpMethod", "DELETE")]),
                          ("POST", [("_HttpMethod", "PATCH"), ("X-HTTP-Method-Override", "DELETE")])]:
        refused("ambiguous_request", AD.method_override, method, query)


def test_version_and_id_parameters_have_salesforce_formats() -> None:
    assert AD.param_pattern("version").fullmatch("v59.0") and not AD.param_pattern("version").fullmatch("59.0")
    for name in ("id", "recordId", "account_id", "AccountId"):
        pat = AD.param_pattern(name)
        assert pat.fullmatch(ACC) and pat.fullmatch(ACC[:15]) and not pat.fullmatch("x" * 16), name
    assert AD.param_pattern("extId") is None and AD.param_pattern("value") is None
    assert AD.param_pattern("sobject").fullmatch("Renewal__c") and not AD.param_pattern("sobject").fullmatch("a-b")
    strict, _ = make({"id_pattern": "006[a-zA-Z0-9]{15}"})
    assert strict.param_pattern("id").fullmatch(OPP) and not strict.param_pattern("id").fullmatch(ACC)


@pytest.mark.parametrize("options,words", [
    ({"colour": "red"}, "unknown adapter option"),
    ({"id_pattern": "["}, "id_pattern"),
    ({"api_version_pattern": 5}, "api_version_pattern"),
    ({"recreate_on_delete": "yes"}, "recreate_on_delete"),
    ({"key_prefixes": {"Renewal__c": "a0"}}, "key_prefixes.Renewal__c"),
    ({"key_prefixes": ["a0R"]}, "key_prefixes"),
    ({"restore_fields": ["Agent_Id__c", "not a field"]}, "restore_fields"),
    ({"readonly_fields": "Id"}, "readonly_fields"),
])
def test_bad_options_are_named(options: dict[str, Any], words: str) -> None:
    with pytest.raises(AdapterOptionsError, match=re.escape(words)):
        SalesforceAdapter(options)


# --------------------------------------------------------------------------- composite: unpacking


@pytest.mark.parametrize("path,expected", [
    (f"{V}/composite", True), (f"{V}/composite/batch", True), (f"{V}/composite/sobjects", True),
    (f"{V}/composite/tree/Account", True), (f"{V}/Composite/Graph", True), (f"{V}/tooling/composite", True),
    (f"{V}/sobjects/Account", False), (f"{V}/query", False), ("/composite", False),
])
def test_is_composite(path: str, expected: bool) -> None:
    assert AD.is_composite(Operation("POST", path, segments=decode_segments(path))) is expected


def composite(*items: dict[str, Any], all_or_none: bool | None = True) -> dict[str, Any]:
    doc: dict[str, Any] = {"compositeRequest": list(items)}
    if all_or_none is not None:
        doc["allOrNone"] = all_or_none
    return doc


def test_composite_references_are_replaced_by_ids_of_the_right_object_for_matching() -> None:
    subs = unpack("POST", f"{V}/composite", composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "newAcct", "body": {"Name": "Acme"}},
        {"method": "GET", "url": f"{V}/sobjects/Account/@{{newAcct.id}}?fields=Name", "referenceId": "readBack"},
        {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "jane",
         "body": {"LastName": "Doe", "AccountId": "@{newAcct.id}"}},
        {"method": "PATCH", "url": f"{V}/sobjects/Contact/@{{jane.id}}", "referenceId": "fix",
         "body": {"Title": "CFO"}},
    ))
    assert [(s.method, s.capability.name, s.ref, s.index) for s in subs] == [
        ("POST", "account.create", "newAcct", 0), ("GET", "account.read", "readBack", 1),
        ("POST", "contact.create", "jane", 2), ("PATCH", "contact.update", "fix", 3)]
    assert is_sf_id(subs[1].params["id"], "001") and is_sf_id(subs[3].params["id"], "003")
    assert subs[1].query == "fields=Name"
    assert subs[2].body == {"LastName": "Doe", "AccountId": "@{newAcct.id}"}  # validated as sent
    assert all(isinstance(s, SalesforceOperation) and s.envelope == "composite" and s.atomic for s in subs)
    assert subs[3].target_ref == "jane" and subs[3].target_ref_creates


@pytest.mark.parametrize("items,code", [
    ([{"method": "PATCH", "url": f"{V}/sobjects/Contact/@{{later.id}}", "referenceId": "a", "body": {}},
      {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "later", "body": {}}], "unresolved_reference"),
    ([{"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "a", "body": {"AccountId": "@{nope.id}"}}],
     "unresolved_reference"),
    ([{"method": "GET", "url": f"{V}/query?q=@{{nope.id}}", "referenceId": "a"}], "unresolved_reference"),
    ([{"method": "GET", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "a"},
      {"method": "GET", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "A"}], "ambiguous_request"),
    ([{"method": "GET", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "1st"}], "unsupported_composite"),
    ([{"method": "GET", "url": f"{V}/sobjects/Account/{ACC}"}], "unsupported_composite"),
    ([{"method": "PATCH", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "a",
       "httpHeaders": {"Authorization": "Bearer stolen"}}], "ambiguous_request"),
    ([{"method": "PATCH", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "a",
       "httpHeaders": {"X-HTTP-Method-Override": "DELETE"}}], "ambiguous_request"),
    ([{"method": "POST", "url": f"{V}/sobjects/Account/{ACC}?_HttpMethod=DELETE", "referenceId": "a"}],
     "ambiguous_request"),
    ([{"method": "POST", "url": f"{V}/composite/sobjects", "referenceId": "a", "body": {"records": []}}],
     "unsupported_composite"),
    ([{"method": "GET", "url": "/v59.0/sobjects/Account/" + ACC, "referenceId": "a"}], "unsupported_composite"),
    ([{"method": "GET", "url": f"{V}/sobjects/../../apexrest/x", "referenceId": "a"}], "ambiguous_request"),
    ([{"method": "GET", "url": f"{V}/sobjects/Account/%2e%2e", "referenceId": "a"}], "ambiguous_request"),
    ([{"method": "patch", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "a"}], "ambiguous_request"),
    ([], "unsupported_composite"),
])
def test_composite_refusals(items: list[dict[str, Any]], code: str) -> None:
    refused(code, unpack, "POST", f"{V}/composite", composite(*items))


def test_unknown_composite_resources_and_methods_are_refused() -> None:
    refused("unsupported_composite", unpack, "POST", f"{V}/composite/graph", {"graphs": []})
    refused("unsupported_composite", unpack, "GET", f"{V}/composite")
    refused("unsupported_composite", unpack, "POST", f"{V}/composite", None)
    refused("unsupported_composite", unpack, "POST", f"{V}/tooling/composite", composite())


def test_batch_urls_are_relative_to_services_data() -> None:
    subs = unpack("POST", f"{V}/composite/batch", {"haltOnError": True, "batchRequests": [
        {"method": "PATCH", "url": f"v59.0/sobjects/opportunity/{OPP}", "richInput": {"StageName": "Closed Won"}},
        {"method": "GET", "url": "v59.0/limits"},
        {"method": "GET", "url": f"{V}/sobjects/Account/{ACC}"}]})
    assert [(s.path, s.capability.name, s.body) for s in subs] == [
        (f"{V}/sobjects/opportunity/{OPP}", "opportunity.update", {"StageName": "Closed Won"}),
        (f"{V}/limits", "limits", None), (f"{V}/sobjects/Account/{ACC}", "account.read", None)]
    assert all(s.envelope == "batch" and not s.atomic for s in subs)
    refused("unsupported_composite", unpack, "POST", f"{V}/composite/batch", {"batchRequests": [
        {"method": "POST", "url": "v59.0/sobjects/ContentVersion", "binaryPartName": "file"}]})
    refused("unresolved_reference", unpack, "POST", f"{V}/composite/batch", {"batchRequests": [
        {"method": "GET", "url": "v59.0/sobjects/Account/@{a.id}"}]})


def test_collections_become_one_operation_per_record() -> None:
    subs = unpack("POST", f"{V}/composite/sobjects", {"allOrNone": True, "records": [
        {"attributes": {"type": "Account"}, "Name": "Acme"},
        {"attributes": {"type": "contact"}, "LastName": "Doe"}]})
    assert [(s.method, s.capability.name, s.body, s.atomic) for s in subs] == [
        ("POST", "account.create", {"Name": "Acme"}, True), ("POST", "contact.create", {"LastName": "Doe"}, True)]
    subs = unpack("PATCH", f"{V}/composite/sobjects", {"records": [
        {"attributes": {"type": "Opportunity"}, "id": OPP, "StageName": "Closed Won"}]})
    assert [(s.method, s.path, s.body, s.atomic) for s in subs] == [
        ("PATCH", f"{V}/sobjects/Opportunity/{OPP}", {"StageName": "Closed Won"}, False)]
    subs = unpack("PATCH", f"{V}/composite/sobjects/Opportunity/Ext_Key__c", {"allOrNone": True, "records": [
        {"attributes": {"type": "Opportunity"}, "ext_key__c": "ACME 1", "Amount": 5}]})
    assert [(s.capability.name, s.path, s.params, s.body) for s in subs] == [
        ("opportunity.upsert", f"{V}/sobjects/Opportunity/Ext_Key__c/ACME%201", {"version": "v59.0", "value": "ACME 1"},
         {"Amount": 5})]
    refused("unsupported_composite", unpack, "POST", f"{V}/composite/sobjects", {"records": [{"Name": "no type"}]})
    refused("unsupported_composite", unpack, "PATCH", f"{V}/composite/sobjects", {"records": [
        {"attributes": {"type": "Account"}, "Name": "no id"}]})
    refused("unsupported_composite", unpack, "PATCH", f"{V}/composite/sobjects/Opportunity/Ext_Key__c", {"records": [
        {"attributes": {"type": "Account"}, "Ext_Key__c": "x"}]})


def test_an_upsert_value_cannot_smuggle_a_path() -> None:
    refused("ambiguous_request", unpack, "PATCH", f"{V}/composite/sobjects/Opportunity/Ext_Key__c", {"records": [
        {"attributes": {"type": "Opportunity"}, "Ext_Key__c": "A/B"}]})
    refused("ambiguous_request", unpack, "PATCH", f"{V}/composite/sobjects/Opportunity/Ext_Key__c", {"records": [
        {"attributes": {"type": "Opportunity"}, "Ext_Key__c": "../../Account/x"}]})


def test_collection_delete_is_typed_by_key_prefix() -> None:
    subs = unpack("DELETE", f"{V}/composite/sobjects?ids={CON},{ACC}&allOrNone=true")
    assert [(s.method, s.capability.name, s.params["id"], s.atomic) for s in subs] == [
        ("DELETE", "contact.delete", CON, True), ("DELETE", "account.delete", ACC, True)]
    err = refused("unsupported_composite", unpack, "DELETE", f"{V}/composite/sobjects?ids=a0B5g00000AbCdEAAZ")
    assert "key_prefixes" in err.message
    ad, reg = make({"key_prefixes": {"Account": "a0B"}})  # an org-specific object can be declared
    assert unpack("DELETE", f"{V}/composite/sobjects?ids=a0B5g00000AbCdEAAZ", ad=ad, reg=reg)[0].capability.name == \
        "account.delete"
    refused("unsupported_composite", unpack, "DELETE", f"{V}/composite/sobjects?ids={CON},nope")
    refused("ambiguous_request", unpack, "DELETE", f"{V}/composite/sobjects?ids={CON}&ids={ACC}")


def test_collection_retrieve_is_a_read_per_id() -> None:
    for subs in (unpack("GET", f"{V}/composite/sobjects/Account?ids={ACC},{ACC[:15]}&fields=Name"),
                 unpack("POST", f"{V}/composite/sobjects/Account", {"ids": [ACC, ACC[:15]], "fields": ["Name"]})):
        assert [(s.method, s.capability.name, s.query) for s in subs] == [("GET", "account.read", "fields=Name")] * 2


def test_tree_records_and_their_children_are_creates() -> None:
    subs = unpack("POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Account", "referenceId": "acme"}, "Name": "Acme",
         "Contacts": {"records": [{"attributes": {"type": "Contact", "referenceId": "jane"}, "LastName": "Doe"},
                                  {"attributes": {"type": "Contact", "referenceId": "joe"}, "LastName": "Roe"}]}},
        {"attributes": {"type": "Account", "referenceId": "globex"}, "Name": "Globex"}]})
    assert [(s.capability.name, s.ref, s.body, s.index) for s in subs] == [
        ("account.create", "acme", {"Name": "Acme"}, 0), ("contact.create", "jane", {"LastName": "Doe"}, 1),
        ("contact.create", "joe", {"LastName": "Roe"}, 2), ("account.create", "globex", {"Name": "Globex"}, 3)]
    assert all(s.envelope == "tree" and s.atomic for s in subs)
    refused("unsupported_composite", unpack, "POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Contact", "referenceId": "x"}, "LastName": "Doe"}]})
    refused("unsupported_composite", unpack, "POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Account"}, "Name": "no ref"}]})
    refused("ambiguous_request", unpack, "POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Account", "referenceId": "a"}, "Name": "x"},
        {"attributes": {"type": "Account", "referenceId": "a"}, "Name": "y"}]})


# --------------------------------------------------------------------------- dry-run answers


def test_synthetic_answers_have_salesforce_shapes() -> None:
    r = AD.synthetic_response(op("POST", f"{V}/sobjects/Opportunity/", {"Name": "x"}), "dr_1")
    assert r.status == 201 and set(r.body) == {"id", "success", "errors"} and r.body["success"] is True
    assert is_sf_id(r.body["id"], "006") and r.body["errors"] == []
    custom, _ = make({"key_prefixes": {"Opportunity": "a0R"}})
    assert is_sf_id(custom.new_id(op("POST", f"{V}/sobjects/Opportunity", {})), "a0R")
    assert AD.synthetic_response(op("PATCH", f"{V}/sobjects/Opportunity/{OPP}", {"StageName": "x"}), "d").status == 204
    assert AD.synthetic_response(op("DELETE", f"{V}/sobjects/Account/{ACC}"), "d").body_bytes() == b""
    up = AD.synthetic_response(op("PATCH", f"{V}/sobjects/Opportunity/Ext_Key__c/K-1", {"Amount": 1}), "d")
    assert up.status == 201 and up.body["created"] is True and is_sf_id(up.body["id"], "006")


def test_synthetic_composite_envelopes() -> None:
    subs = unpack("POST", f"{V}/composite", composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a", "body": {"Name": "Acme"}},
        {"method": "PATCH", "url": f"{V}/sobjects/Account/@{{a.id}}", "referenceId": "b", "body": {"Name": "B"}},
        {"method": "GET", "url": f"{V}/sobjects/Account/{ACC}", "referenceId": "c"}))
    r = AD.synthetic_composite(op("POST", f"{V}/composite", match=False), subs, "dr_1")
    items = r.body["compositeResponse"]
    assert r.status == 200 and [(i["referenceId"], i["httpStatusCode"]) for i in items] == [
        ("a", 201), ("b", 204), ("c", 200)]
    assert is_sf_id(items[0]["body"]["id"], "001") and items[0]["body"]["success"] is True
    assert items[0]["httpHeaders"]["Location"] == f"{V}/sobjects/Account/{items[0]['body']['id']}"
    assert items[1]["body"] is None and items[2]["body"]["Id"] == ACC
    subs = unpack("POST", f"{V}/composite/batch", {"batchRequests": [
        {"method": "PATCH", "url": f"v59.0/sobjects/Opportunity/{OPP}", "richInput": {"Amount": 1}}]})
    assert AD.synthetic_composite(Operation("POST", "/"), subs, "d").body == {
        "hasErrors": False, "results": [{"statusCode": 204, "result": None}]}
    subs = unpack("DELETE", f"{V}/composite/sobjects?ids={CON},{ACC}")
    assert AD.synthetic_composite(Operation("DELETE", "/"), subs, "d").body == [
        {"id": CON, "success": True, "errors": []}, {"id": ACC, "success": True, "errors": []}]
    subs = unpack("POST", f"{V}/composite/sobjects", {"records": [{"attributes": {"type": "Contact"}, "LastName": "D"}]})
    r = AD.synthetic_composite(Operation("POST", "/"), subs, "d")
    assert r.status == 200 and is_sf_id(r.body[0]["id"], "003") and r.body[0]["success"] is True
    subs = unpack("POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Account", "referenceId": "acme"}, "Name": "Acme",
         "Contacts": {"records": [{"attributes": {"type": "Contact", "referenceId": "jane"}, "LastName": "Doe"}]}}]})
    r = AD.synthetic_composite(Operation("POST", "/"), subs, "d")
    assert r.status == 201 and r.body["hasErrors"] is False
    assert [x["referenceId"] for x in r.body["results"]] == ["acme", "jane"]
    assert is_sf_id(r.body["results"][0]["id"], "001") and is_sf_id(r.body["results"][1]["id"], "003")


# --------------------------------------------------------------------------- outcome


@pytest.mark.parametrize("status,body,failed", [
    (201, {"id": ACC, "success": True, "errors": []}, False),
    (204, None, False),
    (200, {"id": ACC, "success": True, "errors": [], "created": False}, False),
    (300, [f"{V}/sobjects/Account/{ACC}", f"{V}/sobjects/Account/{CON}"], True),
    (400, [{"message": "Required fields are missing: [Name]", "errorCode": "REQUIRED_FIELD_MISSING"}], True),
    (200, {"compositeResponse": [{"httpStatusCode": 201, "body": {}}, {"httpStatusCode": 204}]}, False),
    (200, {"compositeResponse": [{"httpStatusCode": 201}, {"httpStatusCode": 400, "body": [{}]}]}, True),
    (200, {"hasErrors": True, "results": [{"statusCode": 404}]}, True),
    (200, {"hasErrors": False, "results": [{"statusCode": 204}]}, False),
    (200, [{"id": ACC, "success": True, "errors": []}, {"success": False, "errors": [{"statusCode": "X"}]}], True),
    (200, [{"id": ACC, "success": True, "errors": []}], False),
    (200, {"totalSize": 0, "done": True, "records": []}, False),
    (400, {"hasErrors": True, "results": [{"referenceId": "a", "errors": []}]}, True),
])
def test_is_failure(status: int, body: Any, failed: bool) -> None:
    assert AD.is_failure(status, body) is failed


def test_created_ids_from_every_shape() -> None:
    create = op("POST", f"{V}/sobjects/Account", {"Name": "x"})
    assert AD.created_ids(create, 201, {}, {"id": ACC, "success": True, "errors": []}) == [ACC]
    assert AD.created_ids(create, 400, {}, [{"errorCode": "X"}]) == []
    upsert = op("PATCH", f"{V}/sobjects/Opportunity/Ext_Key__c/K", {"Amount": 1})
    assert AD.created_ids(upsert, 201, {}, {"id": OPP, "success": True, "errors": [], "created": True}) == [OPP]
    assert AD.created_ids(upsert, 200, {}, {"id": OPP, "success": True, "errors": [], "created": False}) == []
    assert AD.created_ids(op("PATCH", f"{V}/sobjects/Opportunity/{OPP}", {}), 204, {}, None) == []
    subs = unpack("POST", f"{V}/composite", composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a", "body": {"Name": "A"}},
        {"method": "POST", "url": f"{V}/sobjects/Contact", "referenceId": "c", "body": {"LastName": "C"}}))
    body = {"compositeResponse": [
        {"referenceId": "c", "httpStatusCode": 201, "body": {"id": CON, "success": True, "errors": []}},
        {"referenceId": "a", "httpStatusCode": 201, "body": {"id": ACC, "success": True, "errors": []}}]}
    assert [AD.created_ids(s, 200, {}, body) for s in subs] == [[ACC], [CON]]
    subs = unpack("POST", f"{V}/composite/batch", {"batchRequests": [
        {"method": "POST", "url": "v59.0/sobjects/Account", "richInput": {"Name": "A"}},
        {"method": "POST", "url": "v59.0/sobjects/Account", "richInput": {"Name": "B"}}]})
    body = {"hasErrors": True, "results": [{"statusCode": 400, "result": [{"errorCode": "X"}]},
                                           {"statusCode": 201, "result": {"id": ACC, "success": True, "errors": []}}]}
    assert [AD.created_ids(s, 200, {}, body) for s in subs] == [[], [ACC]]
    subs = unpack("POST", f"{V}/composite/sobjects", {"records": [
        {"attributes": {"type": "Account"}, "Name": "A"}, {"attributes": {"type": "Account"}, "Name": "B"}]})
    body = [{"id": ACC, "success": True, "errors": []}, {"success": False, "errors": [{"statusCode": "X"}]}]
    assert [AD.created_ids(s, 200, {}, body) for s in subs] == [[ACC], []]
    subs = unpack("POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Account", "referenceId": "acme"}, "Name": "Acme",
         "Contacts": {"records": [{"attributes": {"type": "Contact", "referenceId": "jane"}, "LastName": "Doe"}]}}]})
    body = {"hasErrors": False, "results": [{"referenceId": "jane", "id": CON}, {"referenceId": "acme", "id": ACC}]}
    assert [AD.created_ids(s, 201, {}, body) for s in subs] == [[ACC], [CON]]


# --------------------------------------------------------------------------- compensation


def test_create_is_undone_by_deleting_the_created_record() -> None:
    o = op("POST", f"{V}/sobjects/contact/", {"LastName": "Doe", "Email": "j@acme.example"})
    assert AD.pre_image_request(o) is None
    plan = AD.plan_undo(o, None)
    assert (plan.kind, plan.request.method, plan.request.path) == (
        "delete", "DELETE", f"{V}/sobjects/contact/{{created_id}}")
    armed = AD.arm_undo(UndoPlan.from_dict(plan.to_dict()), o, 201, {}, {"id": CON, "success": True, "errors": []})
    assert armed.request.path == f"{V}/sobjects/contact/{CON}"
    check = AD.check_request(armed)
    assert (check.method, check.path, check.query) == ("GET", armed.request.path, "fields=LastName%2CEmail")


def test_update_restores_the_touched_and_provenance_fields_from_the_pre_image() -> None:
    ad, reg = make({"restore_fields": list(PROV)})
    o = op("POST", f"{V}/sobjects/Opportunity/{OPP}?_HttpMethod=PATCH", {"StageName": "Closed Won", "Amount": 900},
           ad=ad, reg=reg)
    assert o.method == "PATCH" and o.capability.name == "opportunity.update"
    pre = ad.pre_image_request(o)
    assert (pre.method, pre.path) == ("GET", f"{V}/sobjects/Opportunity/{OPP}")
    assert pre.query == "fields=" + "%2C".join(["StageName", "Amount", *PROV])
    image = {"attributes": {"type": "Opportunity"}, "Id": OPP, "StageName": "Proposal/Price Quote", "amount": 800.0,
             "Agent_Id__c": None, "On_Behalf_Of__c": "ae:bob", "Agent_Intent__c": None, "Authz_Event__c": "3"}
    plan = ad.plan_undo(o, image)
    assert plan.kind == "restore" and plan.request.method == "PATCH" and plan.request.path == o.path
    assert plan.request.body == {"StageName": "Proposal/Price Quote", "Amount": 800.0, "Agent_Id__c": None,
                                 "On_Behalf_Of__c": "ae:bob", "Agent_Intent__c": None, "Authz_Event__c": "3"}
    assert plan.expect == {"StageName": "Closed Won", "Amount": 900}
    assert ad.arm_undo(plan, o, 204, {}, None) is plan
    refused_plan = pytest.raises(NotCompensable, ad.plan_undo, o, None)
    assert "pre-image" in str(refused_plan.value)


def test_the_gateway_can_name_the_record_fields_to_restore() -> None:
    ad = SalesforceAdapter({})
    ad.record_fields = ("Agent_Id__c",)
    o = op("PATCH", f"{V}/sobjects/Opportunity/{OPP}", {"StageName": "x"})
    assert ad.plan_undo(o, {"StageName": "y", "Agent_Id__c": "a"}).request.body == {"StageName": "y", "Agent_Id__c": "a"}


def test_delete_is_not_compensable_unless_recreating_is_allowed() -> None:
    o = op("DELETE", f"{V}/sobjects/Account/{ACC}")
    assert AD.pre_image_request(o) is None
    with pytest.raises(NotCompensable, match="no undelete.*SOAP or Apex.*recreate_on_delete"):
        AD.plan_undo(o, None)
    ad, reg = make({"recreate_on_delete": True, "readonly_fields": ["AnnualRevenue"]})
    o = op("DELETE", f"{V}/sobjects/Account/{ACC}", ad=ad, reg=reg)
    assert ad.pre_image_request(o).path == o.path
    image = {"attributes": {"type": "Account"}, "Id": ACC, "Name": "Acme", "Industry": "Energy", "IsDeleted": False,
             "CreatedDate": "2026-01-01T00:00:00.000+0000", "AnnualRevenue": 5, "BillingAddress": {"city": "X"}}
    plan = ad.plan_undo(o, image)
    assert plan.kind == "recreate" and (plan.request.method, plan.request.path) == ("POST", f"{V}/sobjects/Account")
    assert plan.request.body == {"Name": "Acme", "Industry": "Energy"}
    assert "NEW record with a NEW id" in plan.note


def test_upsert_undo_depends_on_whether_the_record_exists() -> None:
    o = op("PATCH", f"{V}/sobjects/Opportunity/Ext_Key__c/O'Brien-1", {"Amount": 10})
    pre = AD.pre_image_request(o)
    assert (pre.method, pre.path) == ("GET", f"{V}/query")
    assert parse_query(pre.query) == [("q", "SELECT Id, Amount FROM Opportunity WHERE Ext_Key__c = 'O\\'Brien-1'")]
    plan = AD.plan_undo(o, {"totalSize": 0, "done": True, "records": []})
    assert plan.kind == "delete" and plan.request.path.endswith("/{created_id}")
    armed = AD.arm_undo(plan, o, 201, {}, {"id": OPP, "success": True, "errors": [], "created": True})
    assert armed.request.path == f"{V}/sobjects/Opportunity/{OPP}"
    with pytest.raises(NotCompensable):  # it updated after all: the earlier values were never read
        AD.arm_undo(AD.plan_undo(o, {"records": []}), o, 200, {}, {"id": OPP, "success": True, "created": False})
    rec = {"attributes": {"type": "Opportunity"}, "Id": OPP, "Amount": 3}
    plan = AD.plan_undo(o, {"totalSize": 1, "done": True, "records": [rec]})
    assert plan.kind == "restore" and plan.request.path == f"{V}/sobjects/Opportunity/{OPP}"
    assert plan.request.body == {"Amount": 3}
    switched = AD.arm_undo(plan, o, 201, {}, {"id": ACC, "success": True, "errors": [], "created": True})
    assert switched.kind == "delete" and switched.request.path == f"{V}/sobjects/Opportunity/{ACC}"
    assert AD.plan_undo(o, {"records": [rec, rec]}).request is None


def test_soql_literals_are_escaped() -> None:
    from adapters.salesforce import _soql_string

    assert _soql_string("O'Brien\\x") == "'O\\'Brien\\\\x'"


def test_composite_undo_is_per_sub_request_when_atomic() -> None:
    subs = unpack("POST", f"{V}/composite", composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a", "body": {"Name": "A"}},
        {"method": "PATCH", "url": f"{V}/sobjects/Account/@{{a.id}}", "referenceId": "b", "body": {"Name": "B"}},
        {"method": "PATCH", "url": f"{V}/sobjects/Opportunity/{OPP}", "referenceId": "c",
         "body": {"StageName": "Closed Won"}},
        {"method": "GET", "url": f"{V}/query?q=SELECT+Id+FROM+Contact", "referenceId": "q"},
        {"method": "PATCH", "url": f"{V}/sobjects/Contact/@{{q.records[0].Id}}", "referenceId": "d",
         "body": {"Title": "x"}}))
    assert [AD.pre_image_request(s) is None for s in subs[:3]] == [True, True, False]
    assert AD.plan_undo(subs[0], None).kind == "delete"
    covered = AD.plan_undo(subs[1], None)
    assert covered.kind == "covered" and covered.request is None
    assert AD.plan_undo(subs[2], {"StageName": "Qualification"}).request.body == {"StageName": "Qualification"}
    with pytest.raises(NotCompensable, match="known only when Salesforce runs"):
        AD.plan_undo(subs[4], None)
    body = {"compositeResponse": [
        {"referenceId": "a", "httpStatusCode": 201, "body": {"id": ACC, "success": True, "errors": []}},
        {"referenceId": "b", "httpStatusCode": 204, "body": None},
        {"referenceId": "c", "httpStatusCode": 204, "body": None}]}
    armed = AD.arm_undo(AD.plan_undo(subs[0], None), subs[0], 200, {}, body)
    assert armed.request.path == f"{V}/sobjects/Account/{ACC}"


@pytest.mark.parametrize("method,target,body", [
    ("POST", f"{V}/composite", composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a", "body": {"Name": "A"}},
        all_or_none=False)),
    ("POST", f"{V}/composite", composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a", "body": {"Name": "A"}},
        all_or_none=None)),
    ("POST", f"{V}/composite/batch", {"batchRequests": [
        {"method": "POST", "url": "v59.0/sobjects/Account", "richInput": {"Name": "A"}}]}),
    ("POST", f"{V}/composite/sobjects", {"records": [{"attributes": {"type": "Account"}, "Name": "A"}]}),
    ("DELETE", f"{V}/composite/sobjects?ids={ACC}", None),
])
def test_non_atomic_composite_writes_are_not_compensable(method: str, target: str, body: Any) -> None:
    sub = unpack(method, target, body)[0]
    with pytest.raises(NotCompensable, match="allOrNone: true"):
        AD.plan_undo(sub, None)


def test_tree_undo_deletes_each_created_record() -> None:
    subs = unpack("POST", f"{V}/composite/tree/Account", {"records": [
        {"attributes": {"type": "Account", "referenceId": "acme"}, "Name": "Acme",
         "Contacts": {"records": [{"attributes": {"type": "Contact", "referenceId": "jane"}, "LastName": "Doe"}]}}]})
    body = {"hasErrors": False, "results": [{"referenceId": "acme", "id": ACC}, {"referenceId": "jane", "id": CON}]}
    paths = [AD.arm_undo(AD.plan_undo(s, None), s, 201, {}, body).request.path for s in subs]
    assert paths == [f"{V}/sobjects/Account/{ACC}", f"{V}/sobjects/Contact/{CON}"]


def test_conflict_checks_allow_for_salesforce_normalisation() -> None:
    plan = UndoPlan("restore", PlannedRequest("PATCH", f"{V}/sobjects/Opportunity/{OPP}", body={}),
                    expect={"Amount": 1200, "CloseDate": "2026-03-31", "Due__c": "2026-03-31T10:00:00Z", "Flag__c": 1})
    current = {"amount": 1200.0, "CloseDate": "2026-03-31", "Due__c": "2026-03-31T10:00:00.000+0000", "Flag__c": 1}
    assert AD.current_matches(plan, current)
    assert not AD.current_matches(plan, {**current, "amount": 1300.0})
    assert not AD.current_matches(plan, {k: v for k, v in current.items() if k != "Flag__c"})
    assert not same_value(True, 1) and not same_value("2026-03-31", "2026-03-30") and same_value(1, 1.0)
    assert AD.current_matches(UndoPlan("restore"), {"x": 1})
    check = AD.check_request(plan)
    assert check.query == "fields=Amount%2CCloseDate%2CDue__c%2CFlag__c"
    assert AD.check_request(UndoPlan("recreate", PlannedRequest("POST", "/x"))) is None


def test_precondition_headers_for_a_future_gateway_hook() -> None:
    patch = UndoPlan("restore", PlannedRequest("PATCH", f"{V}/sobjects/Account/{ACC}", body={}))
    assert AD.precondition_headers(patch, {"ETag": '"abc--gzip"'}, {}) == {"If-Match": '"abc--gzip"'}
    assert AD.precondition_headers(patch, {}, {"LastModifiedDate": "2026-01-05T09:00:01.500+0000"}) == {
        "If-Unmodified-Since": "Mon, 05 Jan 2026 09:00:02 GMT"}
    assert AD.precondition_headers(patch, {}, {"LastModifiedDate": "2026-01-05T10:00:01.000+0100"}) == {
        "If-Unmodified-Since": "Mon, 05 Jan 2026 09:00:01 GMT"}
    delete = UndoPlan("delete", PlannedRequest("DELETE", f"{V}/sobjects/Account/{ACC}"))
    assert AD.precondition_headers(delete, {"ETag": "x"}, {}) == {}


# --------------------------------------------------------------------------- provenance


def test_provenance_is_stamped_into_creates_and_updates_only() -> None:
    o = op("PATCH", f"{V}/sobjects/Opportunity/{OPP}", {"StageName": "Closed Won", "agent_id__C": "spoofed"})
    assert AD.stamp_provenance(o, PROV) == {"StageName": "Closed Won", **PROV}
    assert o.body == {"StageName": "Closed Won", "agent_id__C": "spoofed"}  # the agent's body is left alone
    assert AD.stamp_provenance(op("POST", f"{V}/sobjects/Contact", {"LastName": "D"}), PROV) == {"LastName": "D", **PROV}
    assert AD.stamp_provenance(op("DELETE", f"{V}/sobjects/Account/{ACC}"), PROV) is None
    assert AD.stamp_provenance(op("POST", f"{V}/sobjects/Contact", ["not", "a", "record"]), PROV) is None
    assert AD.stamp_provenance(op("POST", f"{V}/sobjects/Contact", {"LastName": "D"}), {}) is None


def test_composite_bodies_can_be_stamped_record_by_record() -> None:
    body = composite(
        {"method": "POST", "url": f"{V}/sobjects/Account", "referenceId": "a", "body": {"Name": "A"}},
        {"method": "GET", "url": f"{V}/sobjects/Account/@{{a.id}}", "referenceId": "r"},
        {"method": "PATCH", "url": f"{V}/sobjects/Account/@{{a.id}}", "referenceId": "b", "body": {"Name": "B"}})
    outer = op("POST", f"{V}/composite", body, match=False)
    stamped = AD.stamp_composite(outer, unpack("POST", f"{V}/composite", body), PROV)
    assert [i.get("body") for i in stamped["compositeRequest"]] == [{"Name": "A", **PROV}, None, {"Name": "B", **PROV}]
    assert body["compositeRequest"][0]["body"] == {"Name": "A"}
    tree = {"records": [{"attributes": {"type": "Account", "referenceId": "acme"}, "Name": "Acme",
                         "Contacts": {"records": [{"attributes": {"type": "Contact", "referenceId": "j"},
                                                   "LastName": "Doe"}]}}]}
    stamped = AD.stamp_composite(Operation("POST", "/", body=tree), unpack("POST", f"{V}/composite/tree/Account", tree),
                                 PROV)
    acme = stamped["records"][0]
    assert acme["Agent_Id__c"] == "renewal-bot" and acme["attributes"] == {"type": "Account", "referenceId": "acme"}
    assert acme["Contacts"]["records"][0] == {"attributes": {"type": "Contact", "referenceId": "j"}, "LastName": "Doe",
                                              **PROV}
    coll = {"records": [{"attributes": {"type": "Account"}, "Name": "A"}]}
    stamped = AD.stamp_composite(Operation("POST", "/", body=coll), unpack("POST", f"{V}/composite/sobjects", coll), PROV)
    assert stamped["records"] == [{"attributes": {"type": "Account"}, "Name": "A", **PROV}]
    batch = {"batchRequests": [{"method": "PATCH", "url": f"v59.0/sobjects/Account/{ACC}", "richInput": {"Name": "A"}}]}
    stamped = AD.stamp_composite(Operation("POST", "/", body=batch), unpack("POST", f"{V}/composite/batch", batch), PROV)
    assert stamped["batchRequests"][0]["richInput"] == {"Name": "A", **PROV}
    reads = unpack("DELETE", f"{V}/composite/sobjects?ids={ACC}")
    assert AD.stamp_composite(Operation("DELETE", "/", body={"x": 1}), reads, PROV) is None
