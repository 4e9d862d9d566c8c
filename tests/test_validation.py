"""Field rules and constraints on JSON and form bodies, over the gateway and as units."""

from __future__ import annotations

import pytest

from proxy.config import BodyRules
from proxy.errors import TetherError
from proxy.policy.bodies import parse_body, parse_form
from proxy.policy.validation import BodyValidator
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


# --------------------------------------------------------------------------- the orjson fast path
# parse_json reads most bodies with orjson and proves, by writing them back or by counting colons, that no
# key was repeated; anything it cannot prove goes to the strict stdlib parser. Both must agree on every body.

import json as _json  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from proxy.policy.bodies import _MISSING, _parse_json_fast, parse_json  # noqa: E402

_text = st.text(alphabet=st.sampled_from(list("ab:c ,{}[]\"é")), max_size=6)
_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | _text
_docs = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                     max_leaves=20)


def _strict(body: bytes) -> object:
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError("duplicate")
            out[k] = v
        return out
    return _json.loads(body.decode(), object_pairs_hook=hook)


@settings(max_examples=300, deadline=None)
@given(doc=_docs, dup=st.booleans())
def test_fast_path_agrees_with_the_strict_parser(doc: object, dup: bool) -> None:
    body = _json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    if dup and isinstance(doc, dict) and doc:
        key = next(iter(doc))
        body = body[:-1] + b"," + _json.dumps(key, ensure_ascii=False).encode() + b":\"x:y\"}"
    try:
        expected: object = _strict(body)
    except ValueError:
        expected = "duplicate"
    try:
        got: object = parse_json(body)
    except TetherError as err:
        got = "duplicate" if err.code == "duplicate_json_key" else err.code
    assert got == expected
    fast = _parse_json_fast(body, 64)
    if expected == "duplicate":
        assert fast is _MISSING  # a repeated key is never accepted by the fast path


@pytest.mark.parametrize("body, fast", [
    (b'{"StageName":"Closed Won","CloseDate":"2026-12-31T10:00:00Z"}', True),
    (b'{"a":"x:y","a":"z"}', False),             # duplicate whose value holds a colon
    (b'{"a:b":1,"a:b":2}', False),               # duplicate key holding a colon
    (b'{"a":"\\u003a","a":2}', False),           # escapes: strict path
    (b'{"a":12345678901234567890123}', False),   # past 64 bits: orjson would read a float
    (b'\xef\xbb\xbf{"a":1}', False),             # BOM: refused by the strict path
])
def test_fast_path_only_takes_what_it_can_prove(body: bytes, fast: bool) -> None:
    assert (_parse_json_fast(body, 64) is not _MISSING) is fast
    try:
        assert parse_json(body) == _strict(body)
    except (TetherError, ValueError):
        with pytest.raises(TetherError):
            parse_json(body)


@pytest.mark.parametrize("body", [
    b'[[[[1]]]]',                      # compact: the shortcut's bracket bound does not hold, the walk refuses it
    b'[ [ [ [1] ] ] ]',                # not compact: the counting path refuses it
    b'{"a":{"b":{"c":{"d":1}}}}',
])
def test_depth_is_enforced_on_every_path(body: bytes) -> None:
    with pytest.raises(TetherError) as err:
        parse_json(body, 3)
    assert err.value.code == "json_too_deep"
    assert parse_json(body, 4) == _strict(body)


@pytest.mark.parametrize("body, expected", [
    (b'{"a":-0}', {"a": 0}),                    # orjson writes 0: not the same bytes, read the careful way
    (b'{"a":1E2,"b":1.50}', {"a": 100.0, "b": 1.5}),  # orjson writes 100.0 and 1.5
    (b'{"x":"\\/"}', {"x": "/"}),                # an escape orjson does not write back
    (b'{"a":18446744073709551616}', "unrepresentable_value"),  # past 64 bits: orjson would read a float
    (b'{"a":18446744073709551615,"b":-9223372036854775808}', {"a": 2**64 - 1, "b": -2**63}),  # orjson's range's ends
    (b'{"a":9007199254740993}', {"a": 2**53 + 1}),  # past 53 bits: still exact
])
def test_bodies_orjson_would_write_differently_read_as_the_strict_parser_reads_them(body: bytes, expected: object) -> None:
    try:
        got: object = parse_json(body)
    except TetherError as err:
        got = err.code
    assert got == expected
