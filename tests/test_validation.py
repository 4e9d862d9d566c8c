"""Field rules and constraints on JSON and form bodies, over the gateway and as units."""

from __future__ import annotations

import pytest

from proxy.bodies import parse_body, parse_form
from proxy.config import BodyRules
from proxy.errors import TetherError
from proxy.validation import BodyValidator
from tests.conftest import base_rules


def V(**rules):
    return BodyValidator("cap", BodyRules(**rules))


def _code(fn):
    with pytest.raises(TetherError) as e:
        fn()
    return e.value.code, e.value.details


def test_allow_forbid_require():
    v = V(allow_fields=["name", "address", "tags"], forbid_fields=["address.secret"], require_fields=["name"])
    v.validate("json", {"name": "a", "address": {"city": "x"}, "tags": ["a"]})
    assert _code(lambda: v.validate("json", {"name": "a", "owner": "me"})) == (
        "field_not_allowed", {"field": "owner", "rule": "allow_fields"})
    assert _code(lambda: v.validate("json", {"name": "a", "address": {"secret": 1}}))[0] == "field_not_allowed"
    assert _code(lambda: v.validate("json", {"tags": []}))[1]["field"] == "name"


def test_constraints_json():
    v = V(constraints={"stage": {"enum": ["open", "won"]}, "discount": {"min": 0, "max": 20},
                       "note": {"max_length": 5}, "code": {"pattern": "[A-Z]{3}"}, "qty": {"type": "integer"}})
    v.validate("json", {"stage": "won", "discount": 20, "note": "hi", "code": "ABC", "qty": 3})
    for body, field in [({"stage": "lost"}, "stage"), ({"discount": 21}, "discount"), ({"discount": "5"}, "discount"),
                        ({"note": "toolong"}, "note"), ({"code": "ABCD"}, "code"), ({"qty": 1.5}, "qty"),
                        ({"qty": True}, "qty")]:
        code, details = _code(lambda: v.validate("json", body))
        assert (code, details["field"]) == ("constraint_violated", field), body


def test_constraints_on_form_bodies_with_nested_keys():
    v = V(allow_fields=["amount", "currency", "metadata"], constraints={"amount": {"max": 5000},
                                                                      "metadata.plan": {"enum": ["gold", "silver"]}})
    kind, body = parse_body(b"amount=1000&currency=usd&metadata[plan]=gold", "application/x-www-form-urlencoded", 32)
    assert kind == "form" and body == {"amount": "1000", "currency": "usd", "metadata": {"plan": "gold"}}
    v.validate(kind, body)
    _, body = parse_body(b"amount=9000&currency=usd", "application/x-www-form-urlencoded", 32)
    assert _code(lambda: v.validate("form", body))[1]["field"] == "amount"
    _, body = parse_body(b"amount=1&metadata[plan]=platinum", "application/x-www-form-urlencoded", 32)
    assert _code(lambda: v.validate("form", body))[1]["field"] == "metadata.plan"
    _, body = parse_body(b"amount=1&customer=cus_1", "application/x-www-form-urlencoded", 32)
    assert _code(lambda: v.validate("form", body)) == ("field_not_allowed", {"field": "customer", "rule": "allow_fields"})


def test_relative_caps_use_the_pre_image():
    v = V(constraints={"amount": {"max_increase_pct": 10}, "discount": {"max_increase": 5}})
    v.validate("json", {"amount": 110}, pre_image={"amount": 100})
    assert _code(lambda: v.validate("json", {"amount": 111}, pre_image={"amount": 100}))[0] == "constraint_violated"
    assert _code(lambda: v.validate("json", {"discount": 16}, pre_image={"discount": 10}))[0] == "constraint_violated"
    # no pre-image: cannot decide, so refuse
    assert _code(lambda: v.validate("json", {"amount": 100}, pre_image=None))[0] == "constraint_violated"


def test_json_schema_json_and_form():
    schema = {"type": "object", "properties": {"amount": {"type": "integer", "minimum": 1},
                                               "items": {"type": "array", "items": {"type": "object"}}},
              "required": ["amount"], "additionalProperties": False}
    v = V(json_schema=schema)
    v.validate("json", {"amount": 5})
    code, details = _code(lambda: v.validate("json", {"amount": 0}))
    assert code == "schema_violation" and details["field"] == "amount"
    assert _code(lambda: v.validate("json", {"amount": 1, "extra": 1}))[0] == "schema_violation"
    v.validate("form", parse_form(b"amount=5&items[0][price]=p_1"))
    assert _code(lambda: v.validate("form", parse_form(b"amount=x")))[1]["field"] == "amount"


@pytest.mark.parametrize("body, ctype, code", [
    (b'{"a": 1, "a": 2}', "application/json", "duplicate_json_key"),
    (b'{"a": ', "application/json", "malformed_json"),
    (b"a=1&b=2", "application/json", "malformed_json"),
    (b'{"a": 1}', "application/x-www-form-urlencoded", "body_content_type_mismatch"),
    (b"a=1&a=2", "application/x-www-form-urlencoded", "ambiguous_request"),
    (b"a=1&a[b]=2", "application/x-www-form-urlencoded", "ambiguous_request"),
    (b'{"a": NaN}', "application/json", "malformed_json"),
    (b"\xff\xfe{}", "application/json", "malformed_json"),
    (b"[" * 100 + b"]" * 100, "application/json", "json_too_deep"),
])
def test_bodies_that_read_two_ways_are_refused(body, ctype, code):
    assert _code(lambda: parse_body(body, ctype, 64))[0] == code


def _rules(upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["capabilities"]["contact.update"]["body"] = {
        "allow_fields": ["name", "stage", "amount"],
        "constraints": {"stage": {"enum": ["open", "won"]}, "amount": {"max_increase_pct": 10}},
    }
    rules["capabilities"]["contact.create"]["body"] = {"require_fields": ["name"], "forbid_fields": ["owner"]}
    return rules


async def test_field_rules_over_the_gateway(make_gateway, upstream, tmp_path):
    gw = await make_gateway(_rules(upstream, tmp_path))
    upstream.put_record("contacts", {"id": "1", "name": "A", "amount": 100})
    r = await gw.request("PATCH", "/api/contacts/1", json={"stage": "won", "amount": 105})
    assert r.status == 200, await r.text()
    r = await gw.request("PATCH", "/api/contacts/1", json={"owner": "me"})
    assert r.status == 422
    err = (await r.json())["error"]
    assert err["code"] == "field_not_allowed" and "owner" in err["message"] and err["details"]["field"] == "owner"
    r = await gw.request("PATCH", "/api/contacts/1", json={"stage": "lost"})
    assert (await r.json())["error"]["code"] == "constraint_violated"
    # 105 -> 120 is +14%: refused against the pre-image read through the gateway
    r = await gw.request("PATCH", "/api/contacts/1", json={"amount": 120})
    assert r.status == 422 and (await r.json())["error"]["details"]["rule"] == "max_increase_pct: 10"
    r = await gw.request("POST", "/api/contacts", json={"email": "x"})
    assert (await r.json())["error"]["code"] == "field_required"
    r = await gw.request("POST", "/api/contacts", data=b'{"name": "a", "name": "b"}',
                         headers={"Content-Type": "application/json"})
    assert (await r.json())["error"]["code"] == "duplicate_json_key"
    # the only writes that reached the upstream are the valid PATCH (and the pre-image GETs)
    assert [x.method for x in upstream.received if x.method != "GET"] == ["PATCH"]
