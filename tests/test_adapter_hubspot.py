"""HubSpotAdapter's deciding methods, with plain data (no sockets, no gateway)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from adapters import get_adapter
from adapters.base import AdapterOptionsError, NotCompensable, Operation, PlannedRequest, UndoPlan
from adapters.hubspot import HubSpotAdapter
from proxy.config import parse_rules
from proxy.errors import TetherError
from proxy.normalise import decode_segments, split_target
from proxy.policy.registry import Registry

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def op(method: str, target: str, body: Any = None, index: int | None = None) -> Operation:
    path, query = split_target(target, 8192)
    return Operation(method=method, path=path, query=query, segments=decode_segments(path), body=body, index=index)


@pytest.fixture
def hs() -> HubSpotAdapter:
    a = get_adapter("hubspot", {"provenance_properties": ["tether_agent", "tether_intent"]})
    assert isinstance(a, HubSpotAdapter)
    return a


# --------------------------------------------------------------------------- spellings


@pytest.mark.parametrize("spelling", ["deals", "0-3", "deal", "Deals", "DEALS"])
def test_every_spelling_of_a_standard_type_is_one_canonical_name(hs, spelling):
    assert hs.canonical_segments(("crm", "v3", "objects", spelling, "123"), "") == ("crm", "v3", "objects", "deals", "123")
    assert hs.canonical_segments(("crm", "v3", "objects", spelling)) == ("crm", "v3", "objects", "deals")


@pytest.mark.parametrize("segments,expected", [
    (("crm", "v3", "objects", "0-1", "search"), ("crm", "v3", "objects", "contacts", "search")),
    (("crm", "v3", "objects", "0-2", "batch", "create"), ("crm", "v3", "objects", "companies", "batch", "create")),
    (("crm", "v4", "objects", "0-1", "5", "associations", "0-2", "7"),
     ("crm", "v4", "objects", "contacts", "5", "associations", "companies", "7")),
    (("crm", "v3", "associations", "0-3", "0-1", "batch", "read"),
     ("crm", "v3", "associations", "deals", "contacts", "batch", "read")),
    (("crm", "v3", "properties", "0-3", "dealstage"), ("crm", "v3", "properties", "deals", "dealstage")),
    (("crm", "objects", "2026-03", "0-3", "77"), ("crm", "objects", "2026-03", "deals", "77")),
    (("crm", "v3", "objects", "2-999", "1"), ("crm", "v3", "objects", "2-999", "1")),  # unknown: kept
    (("api", "v3", "objects", "0-3"), ("api", "v3", "objects", "0-3")),  # not a HubSpot objects path
    (("crm", "v3", "objects", "{objectType}", "{dealId}"), ("crm", "v3", "objects", "{objectType}", "{dealId}")),
])
def test_canonical_segments_only_touches_type_segments(hs, segments, expected):
    assert hs.canonical_segments(segments) == expected


def test_type_aliases_option_ties_custom_object_spellings():
    a = get_adapter("hubspot", {"type_aliases": {"2-3456789": "p_cars", "cars": "p_cars"}})
    for spelling in ("2-3456789", "cars", "P_CARS", "p_cars"):
        assert a.canonical_segments(("crm", "v3", "objects", spelling)) == ("crm", "v3", "objects", "p_cars")
    b = get_adapter("hubspot", {"type_aliases": {"orders_by_id": "0-3"}})  # an alias of an alias
    assert b.canonical_segments(("crm", "v3", "objects", "orders_by_id")) == ("crm", "v3", "objects", "deals")


def test_id_property_lookups_have_their_own_canonical_id(hs):
    segs = ("crm", "v3", "objects", "contacts", "Jane@Acme.com")
    assert hs.canonical_segments(segs, "idProperty=email")[-1] == "email=Jane@Acme.com"
    assert hs.canonical_segments(("crm", "v3", "objects", "0-1", "42"), "archived=false")[-1] == "42"
    # search is not an id, whatever the query says
    assert hs.canonical_segments(("crm", "v3", "objects", "contacts", "search"), "idProperty=email")[-1] == "search"
    with pytest.raises(TetherError) as e:
        hs.canonical_segments(segs, "idProperty=email&idProperty=phone")
    assert e.value.code == "ambiguous_request"
    with pytest.raises(TetherError) as e:
        hs.canonical_segments(("crm", "v3", "objects", "contacts", "email=jane@acme.com"), "")
    assert e.value.code == "ambiguous_request"
    with pytest.raises(TetherError) as e:
        hs.canonical_segments(segs, "idProperty=em%20ail")
    assert e.value.code == "bad_request"


def test_param_patterns(hs):
    idp = hs.param_pattern("contactId")
    assert idp is not None and idp is hs.param_pattern("objectId") and idp is hs.param_pattern("id")
    assert idp.fullmatch("12345") and idp.fullmatch("email=jane@acme.com")
    assert not idp.fullmatch("jane@acme.com") and not idp.fullmatch("batch")
    tp = hs.param_pattern("objectType")
    assert tp is not None and tp.fullmatch("deals") and tp.fullmatch("0-3") and not tp.fullmatch("0-3x")
    assert hs.param_pattern("propertyName") is None
    strict = get_adapter("hubspot", {"id_pattern": r"\d+"})
    assert not strict.param_pattern("dealId").fullmatch("email=x")


def _registry(caps: dict[str, Any]) -> tuple[Registry, HubSpotAdapter]:
    rules = parse_rules({
        "version": 1,
        "identity": {"hs_secret": {"value": "x" * 40}},
        "upstreams": {"hubspot": {"url": "https://api.hubapi.com", "adapter": "hubspot"}},
        "agents": {"bot": {"grants": list(caps)}},
        "capabilities": {k: {"upstream": "hubspot", **v} for k, v in caps.items()},
    })
    ad = get_adapter("hubspot")
    assert isinstance(ad, HubSpotAdapter)
    return Registry(rules, {"hubspot": ad}), ad


def _match(reg: Registry, ad: HubSpotAdapter, method: str, target: str) -> str | None:
    """Registry.match canonicalises through the adapter (the path itself is forwarded unchanged)."""
    path, query = split_target(target, 8192)
    found = reg.match("hubspot", method, decode_segments(path), query)
    return found[0].name if found else None


def test_a_grant_and_a_deny_hold_for_every_spelling_once_matching_is_canonical():
    reg, ad = _registry({
        "deal.update": {"method": "PATCH", "path": "/crm/v3/objects/deals/{dealId}"},
        # a permissive template that must NOT catch deals under another spelling
        "other.update": {"method": "PATCH", "path": "/crm/v3/objects/{objectType}/{objectId}",
                         "params": {"objectType": "(?!deals$).+"}},
        "contact.read": {"method": "GET", "path": "/crm/v3/objects/contacts/{contactId}"},
    })
    for spelling in ("deals", "0-3", "deal", "Deals"):
        assert _match(reg, ad, "PATCH", f"/crm/v3/objects/{spelling}/7") == "deal.update", spelling
    assert _match(reg, ad, "PATCH", "/crm/v3/objects/0-1/7") == "other.update"
    assert _match(reg, ad, "GET", "/crm/v3/objects/0-1/7") == "contact.read"
    assert _match(reg, ad, "GET", "/crm/v3/objects/contacts/jane@acme.com?idProperty=email") == "contact.read"
    assert _match(reg, ad, "GET", "/crm/v3/objects/contacts/jane@acme.com") is None  # not numeric, no idProperty
    # without the canonical step the type id would miss the literal grant and the permissive pattern would
    # take it: this is why the hook belongs in matching, not in rules authors' patterns
    raw = reg.routers["hubspot"].match("PATCH", ("crm", "v3", "objects", "0-3", "7"))
    assert raw is not None and raw[0].name == "other.update"


# --------------------------------------------------------------------------- operations


@pytest.mark.parametrize("method,template,effect,expected", [
    ("POST", "/crm/v3/objects/contacts/search", "write", "read"),
    ("POST", "/crm/v3/objects/{objectType}/search", "read", "read"),
    ("POST", "/crm/v3/objects/deals/batch/read", "write", "read"),
    ("POST", "/crm/v3/objects/{objectType}", "write", "create"),
    ("POST", "/crm/v3/objects/0-3", "write", "create"),
    ("PATCH", "/crm/v3/objects/{objectType}/{objectId}", "write", "update"),
    ("DELETE", "/crm/v3/objects/deals/{dealId}", "write", "delete"),
    ("PUT", "/crm/v3/objects/contacts/{contactId}", "write", "upsert"),
    ("POST", "/crm/v3/objects/contacts/batch/archive", "write", "delete"),
    ("POST", "/crm/v3/objects/contacts/batch/upsert", "write", "upsert"),
    ("POST", "/crm/v3/objects/contacts/merge", "write", "action"),
    ("POST", "/crm/v3/objects/contacts/gdpr-delete", "write", "action"),
    ("GET", "/crm/v3/objects/contacts", "read", "read"),
])
def test_infer_operation(hs, method, template, effect, expected):
    assert hs.infer_operation(method, template, effect) == expected


def test_batch_writes_are_composite_and_batch_read_is_not(hs):
    for action in ("create", "update", "archive", "upsert"):
        assert hs.is_composite(op("POST", f"/crm/v3/objects/0-1/batch/{action}"))
    assert not hs.is_composite(op("POST", "/crm/v3/objects/contacts/batch/read"))
    assert not hs.is_composite(op("POST", "/crm/v3/objects/contacts/search"))
    assert not hs.is_composite(op("GET", "/crm/v3/objects/contacts/batch/create"))
    assert hs.unpack(op("POST", "/crm/v3/objects/contacts/search", {})) is None


def test_unpack_batch_create_per_input(hs):
    inputs = [{"properties": {"email": "a@x.com"}, "associations": []}, {"properties": {"email": "b@x.com"}}]
    subs = hs.unpack(op("POST", "/crm/v3/objects/0-1/batch/create", {"inputs": inputs}))
    # the agent's spelling is kept in what is addressed; the canonical one is what is matched
    assert [(s.method, s.path, s.index, s.body) for s in subs] == [
        ("POST", "/crm/v3/objects/0-1", 0, inputs[0]), ("POST", "/crm/v3/objects/0-1", 1, inputs[1])]
    assert subs[0].segments == ("crm", "v3", "objects", "contacts")


def test_unpack_batch_update_archive_upsert(hs):
    subs = hs.unpack(op("POST", "/crm/v3/objects/deals/batch/update", {"inputs": [
        {"id": "11", "properties": {"dealstage": "qualifiedtobuy"}},
        {"id": "ext-9", "idProperty": "deal_external_id", "properties": {"dealstage": "contractsent"}}]}))
    assert [(s.method, s.path, s.query, s.body) for s in subs] == [
        ("PATCH", "/crm/v3/objects/deals/11", "", {"properties": {"dealstage": "qualifiedtobuy"}}),
        ("PATCH", "/crm/v3/objects/deals/ext-9", "idProperty=deal_external_id", {"properties": {"dealstage": "contractsent"}})]
    assert subs[1].segments[-1] == "deal_external_id=ext-9"
    subs = hs.unpack(op("POST", "/crm/v3/objects/contacts/batch/archive", {"inputs": [{"id": "5"}, {"id": 6}]}))
    assert [(s.method, s.path, s.body) for s in subs] == [("DELETE", "/crm/v3/objects/contacts/5", None),
                                                          ("DELETE", "/crm/v3/objects/contacts/6", None)]
    subs = hs.unpack(op("POST", "/crm/v3/objects/contacts/batch/upsert", {"inputs": [
        {"id": "jane+1@acme.com", "idProperty": "email", "properties": {"firstname": "Jane"}}]}))
    assert (subs[0].method, subs[0].path, subs[0].query) == ("PUT", "/crm/v3/objects/contacts/jane%2B1%40acme.com",
                                                             "idProperty=email")
    assert subs[0].segments[-1] == "email=jane+1@acme.com"


@pytest.mark.parametrize("path,body,code", [
    ("create", None, "unsupported_composite"),
    ("create", {"inputs": "x"}, "unsupported_composite"),
    ("create", {"inputs": [], "dryRun": True}, "unsupported_composite"),
    ("create", {"inputs": [5]}, "unsupported_composite"),
    ("create", {"inputs": [{"id": "1", "properties": {}}]}, "unsupported_composite"),
    ("update", {"inputs": [{"properties": {}}]}, "unsupported_composite"),
    ("update", {"inputs": [{"id": True, "properties": {}}]}, "unsupported_composite"),
    ("update", {"inputs": [{"id": "../5", "properties": {}}]}, "ambiguous_request"),
    ("update", {"inputs": [{"id": "%2e%2e", "properties": {}}]}, "ambiguous_request"),
    ("update", {"inputs": [{"id": "a=b", "properties": {}}]}, "ambiguous_request"),
    ("update", {"inputs": [{"id": "x", "idProperty": "e mail", "properties": {}}]}, "unsupported_composite"),
    ("upsert", {"inputs": [{"id": "x", "properties": {}}]}, "unsupported_composite"),
    ("archive", {"inputs": [{"id": "5", "properties": {}}]}, "unsupported_composite"),
    ("archive", {"inputs": [{"id": "x", "idProperty": "email"}]}, "unsupported_composite"),
    ("archive", {"inputs": [{"id": str(i)} for i in range(101)]}, "unsupported_composite"),
])
def test_unpack_refuses_what_it_cannot_read_one_way(hs, path, body, code):
    with pytest.raises(TetherError) as e:
        hs.unpack(op("POST", f"/crm/v3/objects/contacts/batch/{path}", body))
    assert e.value.code == code


# --------------------------------------------------------------------------- dry-run


def test_synthetic_single_responses_are_hubspot_shaped(hs):
    r = hs.synthetic_response(op("POST", "/crm/v3/objects/contacts", {"properties": {"email": "a@x.com", "n": 3}}), "dr")
    assert r.status == 201
    b = r.body
    assert re.fullmatch(r"\d{11}", b["id"]) and b["archived"] is False
    assert ISO.fullmatch(b["createdAt"]) and ISO.fullmatch(b["updatedAt"])
    assert b["properties"]["email"] == "a@x.com" and b["properties"]["n"] == "3"
    assert b["properties"]["hs_object_id"] == b["id"] and "createdate" in b["properties"]
    assert "lastmodifieddate" in b["properties"]
    r = hs.synthetic_response(op("PATCH", "/crm/v3/objects/0-3/77", {"properties": {"dealstage": "x"}}), "dr")
    assert r.status == 200 and r.body["id"] == "77" and "hs_lastmodifieddate" in r.body["properties"]
    assert "createdate" not in r.body["properties"]
    r = hs.synthetic_response(op("PATCH", "/crm/v3/objects/contacts/j@x.com?idProperty=email", {"properties": {}}), "dr")
    assert r.body["properties"]["email"] == "j@x.com"
    assert hs.synthetic_response(op("DELETE", "/crm/v3/objects/deals/77"), "dr").status == 204


def test_synthetic_batch_envelopes(hs):
    outer = op("POST", "/crm/v3/objects/contacts/batch/create",
               {"inputs": [{"properties": {"email": "a@x.com"}}, {"properties": {"email": "b@x.com"}}]})
    r = hs.synthetic_composite(outer, hs.unpack(outer), "dr")
    assert r.status == 201 and r.body["status"] == "COMPLETE"
    assert ISO.fullmatch(r.body["startedAt"]) and ISO.fullmatch(r.body["completedAt"])
    assert [x["properties"]["email"] for x in r.body["results"]] == ["a@x.com", "b@x.com"]
    assert len({x["id"] for x in r.body["results"]}) == 2
    outer = op("POST", "/crm/v3/objects/contacts/batch/upsert",
               {"inputs": [{"id": "a@x.com", "idProperty": "email", "properties": {"firstname": "A"}}]})
    r = hs.synthetic_composite(outer, hs.unpack(outer), "dr")
    assert r.status == 200 and r.body["results"][0]["new"] is False
    assert r.body["results"][0]["properties"]["email"] == "a@x.com"
    outer = op("POST", "/crm/v3/objects/contacts/batch/update", {"inputs": [{"id": "9", "properties": {"a": "b"}}]})
    r = hs.synthetic_composite(outer, hs.unpack(outer), "dr")
    assert r.status == 200 and r.body["results"][0]["id"] == "9"
    outer = op("POST", "/crm/v3/objects/contacts/batch/archive", {"inputs": [{"id": "9"}]})
    assert hs.synthetic_composite(outer, hs.unpack(outer), "dr").status == 204


# --------------------------------------------------------------------------- outcome


@pytest.mark.parametrize("status,body,failed", [
    (200, {"id": "1", "properties": {}}, False),
    (201, {"status": "COMPLETE", "results": []}, False),
    (204, None, False),
    (207, {"status": "COMPLETE", "results": [], "numErrors": 1, "errors": [{"message": "x"}]}, True),
    (200, {"status": "COMPLETE", "results": [], "numErrors": 2}, True),
    (200, {"status": "COMPLETE", "results": [], "errors": [{"message": "x"}]}, True),
    (200, {"status": "CANCELED", "results": []}, True),
    (409, {"status": "error", "category": "CONFLICT"}, True),
])
def test_is_failure(hs, status, body, failed):
    assert hs.is_failure(status, body) is failed


def _batch_create(n: int = 2) -> tuple[Operation, list[Operation]]:
    outer = op("POST", "/crm/v3/objects/contacts/batch/create",
               {"inputs": [{"properties": {"email": f"{i}@x.com"}} for i in range(n)]})
    return outer, hs_default().unpack(outer)


def hs_default() -> HubSpotAdapter:
    a = get_adapter("hubspot")
    assert isinstance(a, HubSpotAdapter)
    return a


def test_created_ids_single_and_batch_in_any_result_order(hs):
    single = op("POST", "/crm/v3/objects/contacts", {"properties": {"email": "a@x.com"}})
    assert hs.created_ids(single, 201, {}, {"id": "501", "properties": {}}) == ["501"]
    assert hs.created_ids(op("PATCH", "/crm/v3/objects/contacts/5", {}), 200, {}, {"id": "5"}) == []
    assert hs.created_ids(single, 409, {}, {"status": "error"}) == []
    _, subs = _batch_create(3)
    results = [{"id": str(600 + i), "properties": {"email": f"{i}@x.com"}} for i in range(3)]
    body = {"status": "COMPLETE", "results": list(reversed(results))}
    assert [hs.created_ids(s, 201, {}, body) for s in subs] == [["600"], ["601"], ["602"]]


def test_result_for_uses_trace_ids_and_refuses_to_guess(hs):
    outer = op("POST", "/crm/v3/objects/contacts/batch/create", {"inputs": [
        {"properties": {"firstname": "Sam"}, "objectWriteTraceId": "t1"},
        {"properties": {"firstname": "Sam"}, "objectWriteTraceId": "t2"}]})
    subs = hs.unpack(outer)
    body = {"results": [{"id": "2", "properties": {"firstname": "Sam"}, "objectWriteTraceId": "t2"},
                        {"id": "1", "properties": {"firstname": "Sam"}, "objectWriteTraceId": "t1"}]}
    assert [hs.result_for(s, body)["id"] for s in subs] == ["1", "2"]
    # identical inputs without trace ids, answered out of order: cannot be told apart
    outer = op("POST", "/crm/v3/objects/contacts/batch/create", {"inputs": [
        {"properties": {"firstname": "Sam"}}, {"properties": {"firstname": "Ann"}}, {"properties": {"firstname": "Sam"}}]})
    subs = hs.unpack(outer)
    body = {"results": [{"id": "3", "properties": {"firstname": "Ann"}}, {"id": "1", "properties": {"firstname": "Sam"}},
                        {"id": "2", "properties": {"firstname": "Sam"}}]}
    assert hs.result_for(subs[0], body) is None and hs.result_for(subs[2], body)["id"] == "2"
    assert hs.result_for(subs[1], body)["id"] == "3"


# --------------------------------------------------------------------------- compensation


def test_update_pre_image_reads_the_touched_and_provenance_properties(hs):
    o = op("PATCH", "/crm/v3/objects/0-3/77", {"properties": {"dealstage": "contractsent", "amount": 5}})
    assert hs.pre_image_request(o) == PlannedRequest(
        "GET", "/crm/v3/objects/0-3/77", "properties=dealstage,amount,tether_agent,tether_intent", content_type=None)
    o = op("PATCH", "/crm/v3/objects/contacts/j%40x.com?idProperty=email", {"properties": {"firstname": "J"}})
    pre = hs.pre_image_request(o)
    assert pre is not None and pre.path == "/crm/v3/objects/contacts/j%40x.com"
    assert pre.query == "idProperty=email&properties=firstname,tether_agent,tether_intent"
    assert hs.pre_image_request(op("POST", "/crm/v3/objects/contacts", {"properties": {}})) is None
    assert hs.pre_image_request(op("DELETE", "/crm/v3/objects/contacts/5")) is None


def test_plan_undo_create_is_archive_of_the_created_record(hs):
    o = op("POST", "/crm/v3/objects/0-1", {"properties": {"email": "a@x.com"}})
    plan = hs.plan_undo(o, None)
    assert plan.kind == "delete" and plan.request.method == "DELETE"
    assert plan.request.path == "/crm/v3/objects/0-1/{created_id}" and plan.expect == {"email": "a@x.com"}
    armed = hs.arm_undo(plan, o, 201, {}, {"id": "901", "properties": {}})
    assert armed.request.path == "/crm/v3/objects/0-1/901"
    with pytest.raises(NotCompensable):
        hs.arm_undo(hs.plan_undo(o, None), o, 201, {}, {"properties": {}})


def test_plan_undo_update_restores_by_numeric_id_and_clears_what_was_empty(hs):
    o = op("PATCH", "/crm/v3/objects/contacts/j%40x.com?idProperty=email",
           {"properties": {"firstname": "Jo", "jobtitle": "CEO"}})
    pre = {"id": "42", "properties": {"firstname": "Joanna", "jobtitle": None, "tether_agent": "old-bot"}}
    plan = hs.plan_undo(o, pre)
    assert plan.kind == "restore"
    assert (plan.request.method, plan.request.path) == ("PATCH", "/crm/v3/objects/contacts/42")
    assert plan.request.body == {"properties": {"firstname": "Joanna", "jobtitle": "", "tether_agent": "old-bot",
                                                "tether_intent": ""}}
    assert plan.expect == {"firstname": "Jo", "jobtitle": "CEO"}
    assert hs.check_request(plan) == PlannedRequest("GET", "/crm/v3/objects/contacts/42",
                                                    "properties=firstname,jobtitle", content_type=None)
    assert hs.current_matches(plan, {"id": "42", "properties": {"firstname": "Jo", "jobtitle": "CEO"}})
    assert not hs.current_matches(plan, {"id": "42", "properties": {"firstname": "Someone", "jobtitle": "CEO"}})
    assert not hs.current_matches(plan, {"status": "error"})
    with pytest.raises(NotCompensable):
        hs.plan_undo(o, {"status": "error"})


def test_conflict_checks_ignore_only_the_case_of_e_mail_addresses(hs):
    plan = UndoPlan("restore", PlannedRequest("PATCH", "/crm/v3/objects/contacts/1"),
                    expect={"email": "Jane@Acme.com", "company": "Acme", "n": "3"})
    assert hs.current_matches(plan, {"properties": {"email": "jane@acme.com", "company": "Acme", "n": 3}})
    assert not hs.current_matches(plan, {"properties": {"email": "jane@acme.com", "company": "ACME", "n": "3"}})


def test_plan_undo_upsert_depends_on_whether_the_record_existed(hs):
    outer = op("POST", "/crm/v3/objects/contacts/batch/upsert", {"inputs": [
        {"id": "a@x.com", "idProperty": "email", "properties": {"firstname": "A"}}]})
    sub = hs.unpack(outer)[0]
    pre = hs.pre_image_request(sub)
    assert pre is not None and (pre.method, pre.path) == ("POST", "/crm/v3/objects/contacts/batch/read")
    assert pre.body["idProperty"] == "email" and pre.body["inputs"] == [{"id": "a@x.com"}]
    assert "email" in pre.body["properties"] and "firstname" in pre.body["properties"]
    existed = hs.plan_undo(sub, {"status": "COMPLETE", "results": [{"id": "8", "properties": {"firstname": "Al"}}]})
    assert existed.kind == "restore" and existed.request.path == "/crm/v3/objects/contacts/8"
    assert existed.request.body["properties"]["firstname"] == "Al"
    absent = hs.plan_undo(sub, {"status": "COMPLETE", "results": [], "numErrors": 1, "errors": [{}]})
    assert absent.kind == "delete"
    answer = {"status": "COMPLETE", "results": [{"id": "9", "new": True, "properties": {"email": "a@x.com"}}]}
    assert hs.arm_undo(absent, sub, 200, {}, answer).request.path == "/crm/v3/objects/contacts/9"
    assert hs.created_ids(sub, 200, {}, answer) == ["9"]
    raced = hs.plan_undo(sub, {"results": []})
    with pytest.raises(NotCompensable, match="someone created it"):
        hs.arm_undo(raced, sub, 200, {}, {"results": [{"id": "9", "new": False, "properties": {"email": "a@x.com"}}]})


def test_archive_is_not_compensable_unless_recreate_is_chosen(hs):
    o = op("DELETE", "/crm/v3/objects/0-3/77")
    with pytest.raises(NotCompensable, match="only in its UI, within 90 days"):
        hs.plan_undo(o, None)
    rec = get_adapter("hubspot", {"archive_undo": "recreate"})
    pre = rec.pre_image_request(o)
    assert pre is not None and pre.query == "properties=dealname,amount,dealstage,pipeline,closedate"
    dated = op("DELETE", "/crm/objects/2026-03/0-3/77")
    assert rec.pre_image_request(dated).path == "/crm/objects/2026-03/0-3/77"
    plan = rec.plan_undo(o, {"id": "77", "properties": {"dealname": "Acme", "amount": "10", "closedate": None,
                                                        "hs_object_id": "77", "createdate": "2024-01-01T00:00:00Z"}})
    assert plan.kind == "recreate" and (plan.request.method, plan.request.path) == ("POST", "/crm/v3/objects/0-3")
    assert plan.request.body == {"properties": {"dealname": "Acme", "amount": "10"}}
    assert "NEW id" in plan.note
    assert rec.check_request(plan) is None


def test_undo_plans_survive_the_store_round_trip(hs):
    o = op("PATCH", "/crm/v3/objects/deals/77", {"properties": {"dealstage": "x"}})
    plan = hs.plan_undo(o, {"id": "77", "properties": {"dealstage": "y"}})
    assert UndoPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


# --------------------------------------------------------------------------- provenance


def test_stamp_provenance_goes_into_properties(hs):
    fields = {"tether_agent": "sdr-bot", "tether_intent": "book a demo"}
    o = op("POST", "/crm/v3/objects/contacts", {"properties": {"email": "a@x.com", "tether_agent": "spoof"},
                                                "associations": []})
    assert hs.stamp_provenance(o, fields) == {"properties": {"email": "a@x.com", "tether_agent": "sdr-bot",
                                                             "tether_intent": "book a demo"}, "associations": []}
    assert hs.stamp_provenance(op("POST", "/crm/v3/objects/contacts", {}), fields) == {"properties": fields}
    assert hs.stamp_provenance(op("POST", "/crm/v3/objects/contacts/search", {"filterGroups": []}), fields) is None
    assert hs.stamp_provenance(op("PATCH", "/crm/v3/objects/deals/1", {"properties": "x"}), fields) is None


def test_stamp_composite_stamps_every_input(hs):
    fields = {"tether_agent": "sdr-bot"}
    outer = op("POST", "/crm/v3/objects/contacts/batch/create",
               {"inputs": [{"properties": {"email": "a@x.com"}}, {"associations": []}]})
    assert hs.stamp_composite(outer, [], fields) == {"inputs": [
        {"properties": {"email": "a@x.com", "tether_agent": "sdr-bot"}},
        {"associations": [], "properties": {"tether_agent": "sdr-bot"}}]}
    archive = op("POST", "/crm/v3/objects/contacts/batch/archive", {"inputs": [{"id": "1"}]})
    assert hs.stamp_composite(archive, [], fields) is None


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [
    {"archive_undo": "resurrect"}, {"type_aliases": ["x"]}, {"type_aliases": {"x": ""}},
    {"recreate_properties": "name"}, {"provenance_properties": ["has space"]}, {"max_batch_inputs": 0},
    {"unknown": 1},
])
def test_bad_options_are_named(options):
    with pytest.raises(AdapterOptionsError):
        get_adapter("hubspot", options)
