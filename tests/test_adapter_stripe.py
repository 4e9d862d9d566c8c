"""The Stripe adapter's decisions, from plain data (no sockets)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from multidict import CIMultiDict

from adapters import get_adapter
from adapters.base import FORM_CT, NotCompensable, Operation, UndoPlan
from adapters.stripe import PARAM_PATTERNS, StripeAdapter, target_of
from proxy.policy.bodies import encode_form
from proxy.errors import TetherError

A = StripeAdapter()


def op(method: str, path: str, body: Any = None, *, template: str | None = None, operation: str | None = None,
       allow_accounts: list[str] | None = None, context: bool = True) -> Operation:
    """An operation as matching leaves it (template: the capability's path)."""
    tmpl = template or path
    kind = operation or A.infer_operation(method, tmpl, "read" if method == "GET" else "write")
    cap = SimpleNamespace(name="cap.test", operation=kind,
                          config=SimpleNamespace(allow_accounts=allow_accounts or []))
    o = Operation(method=method, path=path, segments=tuple(s for s in path.split("/") if s), body=body,
                  content_type=FORM_CT, capability=cap)
    return o


class OpWithContext:
    """Stands in for an Operation once it has the proposed ``context`` field."""

    def __init__(self, o: Operation) -> None:
        self._o = o
        self.context: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._o, name)


def test_registered_by_name() -> None:
    assert isinstance(get_adapter("stripe"), StripeAdapter)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize("method,template,expected", [
    ("POST", "/v1/customers", "create"),
    ("POST", "/v1/customers/{customer}", "update"),
    ("DELETE", "/v1/customers/{customer}", "delete"),
    ("POST", "/v1/products", "create"),
    ("POST", "/v1/products/{id}", "update"),
    ("POST", "/v1/plans", "create"),
    ("POST", "/v1/plans/{plan}", "update"),
    ("POST", "/v1/subscriptions", "create"),
    ("POST", "/v1/subscriptions/{subscription_exposed_id}", "update"),
    ("DELETE", "/v1/subscriptions/{subscription_exposed_id}", "delete"),
    ("POST", "/v1/subscriptions/{subscription}/resume", "action"),
    ("POST", "/v1/invoices", "create"),
    ("POST", "/v1/invoices/{invoice}/finalize", "action"),
    ("POST", "/v1/invoices/{invoice}/void", "action"),
    ("POST", "/v1/refunds", "create"),
    ("POST", "/v1/refunds/{refund}/cancel", "action"),
    ("POST", "/v1/customers/{customer}/tax_ids", "create"),
    ("DELETE", "/v1/customers/{customer}/discount", "delete"),
    ("POST", "/v1/checkout/sessions", "create"),
    ("POST", "/v1/checkout/sessions/{session}/expire", "action"),
    ("POST", "/v1/payment_intents/{intent}/capture", "action"),
])
def test_post_to_a_collection_creates_to_an_item_updates(method: str, template: str, expected: str) -> None:
    assert A.infer_operation(method, template, "write") == expected


def test_declared_reads_stay_reads() -> None:
    assert A.infer_operation("POST", "/v1/invoices/create_preview", "read") == "read"
    assert A.infer_operation("GET", "/v1/customers/{customer}", "read") == "read"


@pytest.mark.parametrize("name,good,bad", [
    ("customer", ["cus_NffrFeUfNV2Hib", "cus_1"], ["cus_", "prod_123", "cus_a.b", "cus_a-b", "..", "cus_ab/c"]),
    ("subscription_exposed_id", ["sub_1MowQVLkdIwHu7ixeRlqHVzs"], ["si_123", "sub"]),
    ("invoice", ["in_1MtHbELkdIwHu7ixl4OzzPMv"], ["inv_1", "in_"]),
    ("refund", ["re_3MtwBwLkdIwHu7ix0iVqzJrA", "pyr_1Abc"], ["ch_1"]),
    ("price", ["price_1MoBy5LkdIwHu7ixZhnattbh"], ["plan_1"]),
    ("intent", ["pi_3MtwBw", "seti_1Abc"], ["cus_1"]),
    ("session", ["cs_test_a1B2c3"], ["cs_a1"]),
    ("plan", ["gold-monthly", "plan_NjpIbv5w0pDbnT", "Gold.v2"], [".", "..", "-x", "a/b", "a b", ""]),
    ("product", ["prod_NWjs8kKbJWmuuc", "sku-123"], ["..", "_x"]),
    ("id", ["cus_1", "custom_id-2"], ["..", ".hidden"]),
])
def test_ids_fullmatch_stripe_formats(name: str, good: list[str], bad: list[str]) -> None:
    pattern = A.param_pattern(name)
    assert pattern is not None
    for value in good:
        assert pattern.fullmatch(value), (name, value)
    for value in bad:
        assert not pattern.fullmatch(value), (name, value)


def test_unknown_param_names_fall_back_to_any_stripe_id() -> None:
    assert A.param_pattern("whatever") is None
    assert A.default_param_pattern is not None
    import re

    assert re.fullmatch(A.default_param_pattern, "txn_1Abc") and not re.fullmatch(A.default_param_pattern, "..")
    assert set(PARAM_PATTERNS) >= {"customer", "plan", "product", "invoice", "refund", "price", "id"}
    # the id_pattern option overrides {id}
    custom = StripeAdapter({"id_pattern": r"cus_[0-9]+"})
    assert custom.param_pattern("id").fullmatch("cus_123") and not custom.param_pattern("id").fullmatch("cus_ab")


def test_targets() -> None:
    t = target_of(("v1", "invoices", "in_1", "void"))
    assert t is not None and t.is_action and t.item_path == "/v1/invoices/in_1"
    t = target_of(("v1", "customers", "cus_1", "tax_ids", "txi_1"))
    assert t is not None and t.nested and not t.is_action and t.resource.object == "tax_id"
    assert target_of(("v2", "core", "accounts")) is None
    assert target_of(("v1", "checkout", "sessions")).collection == "checkout/sessions"


# --------------------------------------------------------------------------- dry-run


def test_synthetic_create_is_a_stripe_object() -> None:
    body = {"email": "a@b.test", "balance": "2500", "tax_exempt": "none", "metadata": {"k": "v"},
            "preferred_locales": ["en"], "expand": ["default_source"], "invoice_settings": {"footer": "x"}}
    r = A.synthetic_response(op("POST", "/v1/customers", body), "dr_1")
    assert r.status == 200
    rec = r.body
    assert rec["object"] == "customer" and rec["id"].startswith("cus_") and rec["livemode"] is False
    assert isinstance(rec["created"], int) and rec["balance"] == 2500 and rec["email"] == "a@b.test"
    assert rec["metadata"] == {"k": "v"} and "expand" not in rec and rec["preferred_locales"] == ["en"]
    assert A.param_pattern("customer").fullmatch(rec["id"])  # usable in a follow-up call
    assert r.headers["Request-Id"].startswith("req_")


def test_synthetic_create_keeps_a_custom_plan_id_and_types_numbers() -> None:
    rec = A.synthetic_response(op("POST", "/v1/plans", {"id": "gold", "amount": "4900", "currency": "usd",
                                                         "interval": "month", "interval_count": "1",
                                                         "product": "prod_1"}), "dr").body
    assert rec["id"] == "gold" and rec["object"] == "plan" and rec["amount"] == 4900 and rec["interval_count"] == 1
    assert rec["active"] is True and rec["metadata"] == {}
    rec = A.synthetic_response(op("POST", "/v1/customers", {"id": "chosen"}), "dr").body
    assert rec["id"] != "chosen"  # customers cannot choose their id
    assert A.synthetic_response(op("POST", "/v1/invoices", {"customer": "cus_1"}), "dr").body["status"] == "draft"
    assert A.synthetic_response(op("POST", "/v1/coupons", {"percent_off": "12.5"}), "dr").body["percent_off"] == 12.5


def test_synthetic_update_delete_and_actions() -> None:
    rec = A.synthetic_response(op("POST", "/v1/customers/cus_1", {"name": "N", "metadata": {"a": "1"}},
                                  template="/v1/customers/{customer}"), "dr").body
    assert rec == {"id": "cus_1", "object": "customer", "name": "N", "metadata": {"a": "1"}, "livemode": False}
    assert A.synthetic_response(op("DELETE", "/v1/customers/cus_1", template="/v1/customers/{customer}"),
                                "dr").body == {"id": "cus_1", "object": "customer", "deleted": True}
    rec = A.synthetic_response(op("DELETE", "/v1/subscriptions/sub_1",
                                  template="/v1/subscriptions/{subscription_exposed_id}"), "dr").body
    assert rec["object"] == "subscription" and rec["status"] == "canceled" and "deleted" not in rec
    rec = A.synthetic_response(op("POST", "/v1/invoices/in_1/void", template="/v1/invoices/{invoice}/void"),
                               "dr").body
    assert rec["id"] == "in_1" and rec["object"] == "invoice" and rec["status"] == "void"


# --------------------------------------------------------------------------- outcome


@pytest.mark.parametrize("status,body,failed", [
    (200, {"id": "cus_1", "object": "customer"}, False),
    (402, {"error": {"type": "card_error", "code": "card_declined"}}, True),
    (404, {"error": {"type": "invalid_request_error"}}, True),
    (500, None, True),
    (200, {"error": {"type": "api_error"}}, True),
])
def test_failures(status: int, body: Any, failed: bool) -> None:
    assert A.is_failure(status, body) is failed


def test_created_ids_only_for_creates() -> None:
    create = op("POST", "/v1/customers", {})
    assert A.created_ids(create, 200, {}, {"id": "cus_1", "object": "customer"}) == ["cus_1"]
    assert A.created_ids(create, 402, {}, {"error": {}}) == []
    update = op("POST", "/v1/customers/cus_1", {}, template="/v1/customers/{customer}")
    assert A.created_ids(update, 200, {}, {"id": "cus_1"}) == []


# --------------------------------------------------------------------------- undo plans


@pytest.mark.parametrize("coll,rid", [("customers", "cus_9"), ("products", "prod_9"), ("plans", "gold"),
                                      ("coupons", "SPRING25")])
def test_create_is_undone_by_delete(coll: str, rid: str) -> None:
    o = op("POST", f"/v1/{coll}", {"name": "x", "expand": ["y"]})
    plan = UndoPlan.from_dict(A.plan_undo(o, None).to_dict())
    assert plan.kind == "delete" and plan.request.method == "DELETE"
    assert plan.request.path == f"/v1/{coll}/{{created_id}}" and plan.expect == {"name": "x"}
    armed = A.arm_undo(plan, o, 200, {}, {"id": rid, "object": "x"})
    assert armed.request.path == f"/v1/{coll}/{rid}"
    check = A.check_request(armed)
    assert check.method == "GET" and check.path == f"/v1/{coll}/{rid}"


@pytest.mark.parametrize("answer", [{"id": "../../v1/charges"}, {"id": ""}, {"no": "id"}, None, {"id": 5}])
def test_arming_needs_a_stripe_id(answer: Any) -> None:
    o = op("POST", "/v1/customers", {})
    with pytest.raises(NotCompensable):
        A.arm_undo(A.plan_undo(o, None), o, 200, {}, answer)


def test_subscription_create_is_undone_by_cancel() -> None:
    o = op("POST", "/v1/subscriptions", {"customer": "cus_1", "items": [{"price": "price_1"}],
                                         "proration_behavior": "none"})
    plan = A.plan_undo(o, None)
    assert plan.kind == "cancel" and plan.request.method == "DELETE"
    assert plan.expect == {"customer": "cus_1", "items": [{"price": "price_1"}]}
    armed = A.arm_undo(plan, o, 200, {}, {"id": "sub_1", "object": "subscription", "status": "active"})
    assert armed.request.path == "/v1/subscriptions/sub_1" and "first invoice" in armed.note
    assert A.current_matches(armed, {"id": "sub_1", "status": "active", "customer": "cus_1", "items": {"data": []}})
    assert not A.current_matches(armed, {"id": "sub_1", "status": "canceled", "customer": "cus_1"})


def test_invoice_create_is_undone_by_deleting_the_draft() -> None:
    o = op("POST", "/v1/invoices", {"customer": "cus_1", "auto_advance": "false"})
    armed = A.arm_undo(A.plan_undo(o, None), o, 200, {}, {"id": "in_1", "object": "invoice", "status": "draft"})
    assert armed.kind == "delete" and armed.request.method == "DELETE" and armed.request.path == "/v1/invoices/in_1"
    draft = {"id": "in_1", "object": "invoice", "status": "draft", "customer": "cus_1", "auto_advance": False}
    assert A.current_matches(armed, draft)
    # finalized meanwhile: deleting is impossible, voiding is a human's call -> conflict
    assert not A.current_matches(armed, {**draft, "status": "open"})


def test_invoice_finalize_is_undone_by_void() -> None:
    o = op("POST", "/v1/invoices/in_1/finalize", {}, template="/v1/invoices/{invoice}/finalize")
    plan = A.plan_undo(o, None)
    assert plan.kind == "void" and plan.request.method == "POST" and plan.request.path == "/v1/invoices/in_1/void"
    assert A.check_request(plan).path == "/v1/invoices/in_1"
    assert A.current_matches(plan, {"id": "in_1", "status": "open"})
    assert not A.current_matches(plan, {"id": "in_1", "status": "paid"})  # needs a refund: a human's call


def test_price_create_is_undone_by_archiving() -> None:
    o = op("POST", "/v1/prices", {"unit_amount": "100", "currency": "usd", "product": "prod_1"})
    armed = A.arm_undo(A.plan_undo(o, None), o, 200, {}, {"id": "price_1", "object": "price"})
    assert armed.kind == "custom" and armed.request.method == "POST" and armed.request.path == "/v1/prices/price_1"
    assert armed.request.body == {"active": "false"} and armed.request.content_type == FORM_CT
    assert A.current_matches(armed, {"id": "price_1", "unit_amount": 100, "currency": "usd", "product": "prod_1"})
    assert not A.current_matches(armed, {"id": "price_1", "unit_amount": 200, "currency": "usd"})


@pytest.mark.parametrize("path,body,why", [
    ("/v1/refunds", {"charge": "ch_1"}, "refund"),
    ("/v1/charges", {"amount": "100"}, "money"),
    ("/v1/payouts", {"amount": "100"}, "payout"),
    ("/v1/plans", {"amount": "100", "product": {"name": "inline"}}, "inline"),
    ("/v1/webhook_things", {}, "no undo"),
])
def test_creates_that_cannot_be_undone(path: str, body: dict[str, Any], why: str) -> None:
    with pytest.raises(NotCompensable, match=why):
        A.plan_undo(op("POST", path, body), None)


@pytest.mark.parametrize("method,path,template", [
    ("DELETE", "/v1/customers/cus_1", "/v1/customers/{customer}"),
    ("DELETE", "/v1/subscriptions/sub_1", "/v1/subscriptions/{subscription_exposed_id}"),
    ("POST", "/v1/invoices/in_1/pay", "/v1/invoices/{invoice}/pay"),
    ("POST", "/v1/invoices/in_1/void", "/v1/invoices/{invoice}/void"),
    ("POST", "/v1/customers/cus_1/tax_ids", "/v1/customers/{customer}/tax_ids"),
])
def test_deletes_actions_and_nested_creates_are_not_compensable(method: str, path: str, template: str) -> None:
    with pytest.raises(NotCompensable):
        A.plan_undo(op(method, path, {}, template=template), None)


PRE = {"id": "cus_1", "object": "customer", "name": "Old", "email": "old@x.test", "phone": None,
       "invoice_prefix": "ABC", "tax_exempt": "none", "preferred_locales": [], "balance": 0,
       "address": {"city": "Paris", "line1": "1 rue", "country": "FR", "postal_code": None},
       "shipping": None, "default_source": {"id": "card_1", "object": "card"},
       "metadata": {"tier": "silver", "crm": "42"}, "subscriptions": {"object": "list", "data": []}}


def upd(body: dict[str, Any]) -> Operation:
    return op("POST", "/v1/customers/cus_1", body, template="/v1/customers/{customer}")


def test_update_pre_image_is_a_get_of_the_object() -> None:
    pre = A.pre_image_request(upd({"name": "x"}))
    assert pre.method == "GET" and pre.path == "/v1/customers/cus_1" and pre.body is None
    assert A.pre_image_request(op("POST", "/v1/customers", {})) is None
    assert A.pre_image_request(op("POST", "/v1/invoices/in_1/void", {},
                                  template="/v1/invoices/{invoice}/void")) is None


def test_update_restores_only_the_touched_fields_metadata_key_by_key() -> None:
    body = {"name": "New", "phone": "+33", "metadata": {"tier": "gold", "promo": "x"}, "expand": ["y"],
            "address": {"city": "Lyon"}, "shipping": {"name": "N", "address": {"line1": "2"}},
            "preferred_locales": ["fr"], "balance": "100", "default_source": "card_2"}
    plan = A.plan_undo(upd(body), PRE)
    assert plan.kind == "restore" and plan.request.method == "POST" and plan.request.content_type == FORM_CT
    assert plan.request.path == "/v1/customers/cus_1"
    assert plan.request.body == {"name": "Old", "phone": "", "metadata": {"tier": "silver", "promo": ""},
                                 "address": {"city": "Paris"}, "shipping": "", "preferred_locales": "",
                                 "balance": 0, "default_source": "card_1"}
    assert encode_form(plan.request.body) == (
        "name=Old&phone=&metadata%5Btier%5D=silver&metadata%5Bpromo%5D=&address%5Bcity%5D=Paris&shipping="
        "&preferred_locales=&balance=0&default_source=card_1")
    assert "expand" not in plan.expect and plan.expect["name"] == "New"
    assert plan.pre_image == PRE


def test_update_clearing_all_metadata_is_restored_key_by_key() -> None:
    plan = A.plan_undo(upd({"metadata": ""}), PRE)
    assert plan.request.body == {"metadata": {"tier": "silver", "crm": "42"}}


def test_write_only_parameters_make_an_update_non_compensable() -> None:
    with pytest.raises(NotCompensable, match="source"):
        A.plan_undo(upd({"name": "x", "source": "tok_visa"}), PRE)
    with pytest.raises(NotCompensable, match="prior state"):
        A.plan_undo(upd({"subscriptions": {"x": "1"}}), PRE)


def test_update_without_pre_image_is_not_compensable() -> None:
    for pre in (None, {"error": {"type": "x"}}, {"id": "cus_1", "deleted": True}):
        with pytest.raises(NotCompensable):
            A.plan_undo(upd({"name": "x"}), pre)


def test_update_of_steering_parameters_only_restores_nothing() -> None:
    plan = A.plan_undo(upd({"expand": ["default_source"]}), PRE)
    assert plan.kind == "restore" and plan.request is None


def test_conflict_check_reads_form_values_as_json() -> None:
    plan = A.plan_undo(upd({"name": "New", "balance": "100", "tax_exempt": "exempt",
                            "metadata": {"tier": "gold"}, "address": {"city": "Lyon"}}), PRE)
    assert A.check_request(plan).path == "/v1/customers/cus_1"
    now = {**PRE, "name": "New", "balance": 100, "tax_exempt": "exempt", "metadata": {"tier": "gold", "crm": "42",
                                                                                      "tether_agent": "bot"},
           "address": {**PRE["address"], "city": "Lyon"}}
    assert A.current_matches(plan, now)
    assert not A.current_matches(plan, {**now, "name": "Someone else's"})
    assert not A.current_matches(plan, {**now, "metadata": {"tier": "platinum"}})
    assert not A.current_matches(plan, {**now, "balance": 101})
    assert not A.current_matches(plan, None)
    flags = A.plan_undo(upd({"tax_exempt": "none", "livemode": "false"}), {**PRE, "livemode": False})
    assert A.current_matches(flags, {**PRE, "livemode": False})


def test_a_deleted_object_is_fine_for_a_delete_and_a_conflict_otherwise() -> None:
    o = op("POST", "/v1/customers", {"email": "a@b.test"})
    armed = A.arm_undo(A.plan_undo(o, None), o, 200, {}, {"id": "cus_1"})
    assert A.current_matches(armed, {"id": "cus_1", "object": "customer", "deleted": True})
    restore = A.plan_undo(upd({"name": "x"}), PRE)
    assert not A.current_matches(restore, {"id": "cus_1", "object": "customer", "deleted": True})


def test_already_undone_states_are_done_not_conflicts() -> None:
    def armed(path: str, body: dict[str, Any], rid: str, template: str | None = None) -> UndoPlan:
        o = op("POST", path, body, template=template)
        return A.arm_undo(A.plan_undo(o, None), o, 200, {}, {"id": rid, "status": "active"})

    cus = armed("/v1/customers", {}, "cus_1")
    assert A.undo_already_done(cus, 404, {"error": {}}) and A.undo_already_done(cus, 200, {"id": "cus_1",
                                                                                          "deleted": True})
    assert not A.undo_already_done(cus, 200, {"id": "cus_1", "object": "customer"})
    inv = armed("/v1/invoices", {"customer": "cus_1"}, "in_1")
    assert A.undo_already_done(inv, 200, {"id": "in_1", "status": "void"})  # voided by the finalize undo
    assert not A.undo_already_done(inv, 200, {"id": "in_1", "status": "open"})
    sub = armed("/v1/subscriptions", {"customer": "cus_1"}, "sub_1")
    assert A.undo_already_done(sub, 200, {"id": "sub_1", "status": "canceled"})
    assert not A.undo_already_done(sub, 404, {"error": {}})  # a subscription never disappears: conflict
    price = armed("/v1/prices", {"currency": "usd"}, "price_1")
    assert A.undo_already_done(price, 200, {"id": "price_1", "active": False})
    assert not A.undo_already_done(price, 200, {"id": "price_1", "active": True})
    void = A.plan_undo(op("POST", "/v1/invoices/in_1/finalize", {}, template="/v1/invoices/{invoice}/finalize"), None)
    assert A.undo_already_done(void, 200, {"id": "in_1", "status": "void"})
    assert not A.undo_already_done(void, 200, {"id": "in_1", "status": "paid"})
    restore = A.plan_undo(upd({"name": "x"}), PRE)
    assert not A.undo_already_done(restore, 404, None) and not A.undo_already_done(restore, 200, PRE)


def test_idempotency_key_header() -> None:
    assert A.idempotency_header == "Idempotency-Key" and A.version_header is None


# --------------------------------------------------------------------------- provenance


FIELDS = {"metadata[tether_agent]": "billing-bot", "tether_intent": "renew"}


def test_provenance_goes_into_metadata_and_cannot_be_forged() -> None:
    body = A.stamp_provenance(op("POST", "/v1/customers", {"email": "a@b.test",
                                                           "metadata": {"crm": "1", "tether_agent": "forged"}}), FIELDS)
    assert body == {"email": "a@b.test",
                    "metadata": {"crm": "1", "tether_agent": "billing-bot", "tether_intent": "renew"}}
    body = A.stamp_provenance(upd({"name": "x"}), FIELDS)
    assert body["metadata"] == {"tether_agent": "billing-bot", "tether_intent": "renew"}
    assert "metadata%5Btether_agent%5D=billing-bot" in encode_form(body)


def test_provenance_is_not_stamped_where_metadata_cannot_go() -> None:
    assert A.stamp_provenance(upd({"metadata": ""}), FIELDS) is None  # clear-all cannot also set keys
    assert A.stamp_provenance(op("POST", "/v1/customers/cus_1/tax_ids", {"type": "eu_vat"},
                                 template="/v1/customers/{customer}/tax_ids"), FIELDS) is None
    assert A.stamp_provenance(op("POST", "/v1/invoices/in_1/finalize", {},
                                 template="/v1/invoices/{invoice}/finalize"), FIELDS) is None
    assert A.stamp_provenance(op("POST", "/v1/customers", {}), {}) is None


# --------------------------------------------------------------------------- tenant switches


def test_no_account_header_is_fine() -> None:
    assert A.check_request_headers(op("POST", "/v1/customers", {}), CIMultiDict({"Idempotency-Key": "k"})) is None


@pytest.mark.parametrize("headers,code", [
    ({"Stripe-Account": "acct_1Other"}, "tenant_switch_refused"),
    ({"stripe-context": "acct_1Other"}, "tenant_switch_refused"),
    ({"Stripe_Account": "acct_1Allowed"}, "ambiguous_request"),
    ({"Stripe.Context": "acct_1Allowed"}, "ambiguous_request"),
])
def test_account_switches_are_refused_unless_allowed(headers: dict[str, str], code: str) -> None:
    o = OpWithContext(op("GET", "/v1/customers/cus_1", allow_accounts=["acct_1Allowed"]))
    with pytest.raises(TetherError) as info:
        A.check_request_headers(o, CIMultiDict(headers))  # type: ignore[arg-type]
    assert info.value.code == code and info.value.status in (400, 403)


def test_a_repeated_account_header_is_ambiguous() -> None:
    o = OpWithContext(op("GET", "/v1/customers/cus_1", allow_accounts=["acct_1Allowed"]))
    h: CIMultiDict[str] = CIMultiDict()
    h.add("Stripe-Account", "acct_1Allowed")
    h.add("Stripe-Account", "acct_1Allowed")
    with pytest.raises(TetherError) as info:
        A.check_request_headers(o, h)  # type: ignore[arg-type]
    assert info.value.code == "ambiguous_request"


def test_an_allowed_account_follows_the_pre_image_undo_and_check() -> None:
    o = OpWithContext(upd({"name": "New"}))
    o._o.capability.config.allow_accounts = ["acct_1Allowed"]
    headers = CIMultiDict({"Stripe-Account": "acct_1Allowed"})
    assert A.check_request_headers(o, headers) is None  # type: ignore[arg-type]
    assert o.context == {"Stripe-Account": "acct_1Allowed"}
    assert A.pre_image_request(o).headers == {"Stripe-Account": "acct_1Allowed"}  # type: ignore[arg-type]
    plan = UndoPlan.from_dict(A.plan_undo(o, PRE).to_dict())  # type: ignore[arg-type]
    assert plan.request.headers == {"Stripe-Account": "acct_1Allowed"}
    assert A.check_request(plan).headers == {"Stripe-Account": "acct_1Allowed"}
    create = OpWithContext(op("POST", "/v1/customers", {}, allow_accounts=["acct_1Allowed"]))
    A.check_request_headers(create, CIMultiDict({"Stripe-Account": "acct_1Allowed"}))  # type: ignore[arg-type]
    assert A.plan_undo(create, None).request.headers == {"Stripe-Account": "acct_1Allowed"}  # type: ignore[arg-type]
