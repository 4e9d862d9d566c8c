"""Stripe (API v1): form-encoded bodies, POST for both create and update, money that cannot come back.

What Stripe does differently from a generic REST API, and what this adapter decides about it:

* **One verb, two meanings.** ``POST /v1/customers`` creates, ``POST /v1/customers/{customer}`` updates,
  ``POST /v1/invoices/{invoice}/void`` is an action, ``DELETE`` deletes (or, for subscriptions,
  cancels). :meth:`StripeAdapter.infer_operation` reads that from the template for every resource.
* **Ids in Stripe's formats.** A path parameter named like Stripe's own OpenAPI parameters
  (``{customer}``, ``{subscription_exposed_id}``, ``{invoice}``, ...) must fully match that object's id
  format (``cus_...``, ``sub_...``, ``in_...``); plans, products and coupons may carry custom ids, so
  ``{plan}``, ``{product}``, ``{coupon}`` and ``{id}`` accept any plain Stripe id.
* **Form bodies** (``a[b][c]=v``) arrive parsed into nested dicts (:mod:`proxy.policy.bodies`); undo steps
  and stamped bodies are form-encoded again. Form values are strings, so comparisons with a JSON
  record read ``"100"`` as ``100`` and ``"true"`` as ``True``.
* **Undo plans** (transactions):

  =====================================  =============================================================
  write                                  undo
  =====================================  =============================================================
  create customer/product/plan/coupon/   ``DELETE`` the created object
  invoice item/webhook endpoint
  create price / tax rate / shipping     archive it (``active=false``): Stripe never deletes these
  rate / promotion code
  create subscription                    cancel it (``DELETE /v1/subscriptions/{id}``); an invoice it
                                         already charged is *not* refunded (the note says so)
  create invoice                         delete the draft (``DELETE /v1/invoices/{id}``): a new invoice
                                         is a draft, a draft cannot be voided, and deleting it leaves
                                         no trace; if it was finalized meanwhile the pre-undo check sees
                                         ``status != draft`` and flags a conflict for a human
  finalize invoice (action)              void it (``POST /v1/invoices/{id}/void``): a finalized invoice
                                         cannot return to draft; voiding is Stripe's own reversal
  update (``POST /v1/x/{id}``)           ``POST`` back the pre-image values of the touched fields only
                                         (metadata key by key; a value that was unset is sent as ``""``,
                                         which is how Stripe unsets); a write-only parameter (one the
                                         record does not show, e.g. ``source``) makes it non-compensable
  refunds, charges, payouts, transfers,  non-compensable: money moved. Such capabilities run dry-run,
  deletes, other actions                 or live with ``allow_live_without_compensation``
  =====================================  =============================================================

* **Idempotency.** The agent's own ``Idempotency-Key`` passes through unchanged; Tether sends one with
  every undo step (:attr:`StripeAdapter.idempotency_header`).
* **Tenant switches.** ``Stripe-Account`` / ``Stripe-Context`` act as another (connected) account:
  :meth:`StripeAdapter.check_request_headers` refuses them unless the capability's ``allow_accounts``
  lists the value, and remembers an allowed one so that Tether's own pre-image reads and undo steps go
  to the same account.
* **Provenance** goes into ``metadata[...]`` on creates and updates (``record_fields`` may name
  ``metadata[tether_agent]`` or just ``tether_agent``); an agent cannot forge those keys.
  Note: stamping ``authz_event`` (unique per request) into metadata makes an SDK retry with the same
  Idempotency-Key differ from the first attempt, which Stripe refuses (``idempotency_error``); the
  example rules stamp agent, on-behalf-of and intent only.

Every method here decides from plain data (no I/O); the gateway sends what they plan.
"""

from __future__ import annotations

import re
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .base import (
    FORM_CT,
    Adapter,
    NotCompensable,
    Operation,
    PlannedRequest,
    SyntheticResponse,
    UndoPlan,
)

# --------------------------------------------------------------------------- id formats

# Any plain Stripe id, generated (``cus_NffrFeUfNV2Hib``) or custom (plans, products, coupons:
# ``gold-monthly``). Starts with a letter or digit, so a whole segment can never be ``.`` or ``..``.
ANY_ID = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}"
_ANY_ID_RE = re.compile(ANY_ID)


def _prefixed(*prefixes: str) -> str:
    return "(?:" + "|".join(re.escape(p) for p in prefixes) + r")_[A-Za-z0-9]{1,250}"


# Path parameter name (as in Stripe's OpenAPI description) -> the id format it must fully match.
PARAM_PATTERNS: dict[str, str] = {
    "customer": _prefixed("cus"),
    "subscription_exposed_id": _prefixed("sub"),
    "subscription": _prefixed("sub"),
    "schedule": _prefixed("sub_sched"),
    "invoice": _prefixed("in"),
    "invoiceitem": _prefixed("ii"),
    "refund": _prefixed("re", "pyr"),
    "charge": _prefixed("ch", "py"),
    "price": _prefixed("price"),
    "intent": _prefixed("pi", "seti"),
    "payment_intent": _prefixed("pi"),
    "setup_intent": _prefixed("seti"),
    "payment_method": _prefixed("pm", "card", "src", "ba"),
    "item": _prefixed("si"),
    "subscription_item": _prefixed("si"),
    "tax_rate": _prefixed("txr"),
    "shipping_rate_token": _prefixed("shr"),
    "promotion_code": _prefixed("promo"),
    "webhook_endpoint": _prefixed("we"),
    "credit_note": _prefixed("cn"),
    "payout": _prefixed("po"),
    "transfer": _prefixed("tr"),
    "quote": _prefixed("qt"),
    "account": _prefixed("acct"),
    "event": _prefixed("evt"),
    "session": r"cs_(?:test|live)_[A-Za-z0-9]{1,250}",
    # custom ids are allowed for these
    "plan": ANY_ID,
    "product": ANY_ID,
    "coupon": ANY_ID,
    "id": ANY_ID,
}


@dataclass(frozen=True, slots=True)
class Resource:
    """What a Stripe object type is called and how its generated ids start."""

    object: str
    prefix: str | None  # None: ids may be custom (and are random when not given)
    custom_ids: bool = False


RESOURCES: dict[str, Resource] = {
    "customers": Resource("customer", "cus"),
    "products": Resource("product", "prod", custom_ids=True),
    "plans": Resource("plan", "plan", custom_ids=True),
    "prices": Resource("price", "price"),
    "coupons": Resource("coupon", None, custom_ids=True),
    "promotion_codes": Resource("promotion_code", "promo"),
    "subscriptions": Resource("subscription", "sub"),
    "subscription_items": Resource("subscription_item", "si"),
    "subscription_schedules": Resource("subscription_schedule", "sub_sched"),
    "invoices": Resource("invoice", "in"),
    "invoiceitems": Resource("invoiceitem", "ii"),
    "credit_notes": Resource("credit_note", "cn"),
    "refunds": Resource("refund", "re"),
    "charges": Resource("charge", "ch"),
    "payment_intents": Resource("payment_intent", "pi"),
    "setup_intents": Resource("setup_intent", "seti"),
    "payment_methods": Resource("payment_method", "pm"),
    "tax_rates": Resource("tax_rate", "txr"),
    "shipping_rates": Resource("shipping_rate", "shr"),
    "webhook_endpoints": Resource("webhook_endpoint", "we"),
    "payouts": Resource("payout", "po"),
    "transfers": Resource("transfer", "tr"),
    "topups": Resource("topup", "tu"),
    "quotes": Resource("quote", "qt"),
    "sources": Resource("source", "src"),
    "tax_ids": Resource("tax_id", "txi"),
    "checkout/sessions": Resource("checkout.session", "cs_test"),
    "billing_portal/sessions": Resource("billing_portal.session", "bps"),
}

# First path segments that are namespaces, not collections (``/v1/checkout/sessions``).
NAMESPACES = frozenset({
    "apps", "billing", "billing_portal", "checkout", "climate", "entitlements", "financial_connections",
    "forwarding", "identity", "issuing", "radar", "reporting", "sigma", "tax", "terminal", "test_helpers",
    "treasury",
})

# The last template segment of a POST that acts on an object instead of creating a sub-object.
ACTIONS = frozenset({
    "accept", "apply", "apply_customer_balance", "approve", "attach", "cancel", "capture", "close",
    "confirm", "create_preview", "decline", "detach", "expire", "finalize", "finalize_quote",
    "increment_authorization", "mark_uncollectible", "pay", "preview", "reactivate", "reject", "release",
    "resume", "reverse", "send", "verify", "verify_microdeposits", "void", "migrate",
})

# Status an action leaves an object in (for dry-run answers).
ACTION_STATUS: dict[str, str] = {
    "finalize": "open", "void": "void", "pay": "paid", "mark_uncollectible": "uncollectible", "send": "open",
    "cancel": "canceled", "capture": "succeeded", "confirm": "succeeded", "resume": "active",
    "accept": "accepted", "release": "released", "expire": "expired", "close": "closed",
}

# Creates Stripe offers no way to take back: money moved, or the object is permanent.
NON_COMPENSABLE_CREATES: dict[str, str] = {
    "refunds": "a refund returns money to the customer and cannot be reversed",
    "charges": "a charge moves money; undoing it would be a refund, which Tether does not plan",
    "payment_intents": "a payment intent may move money when confirmed; Tether does not plan refunds",
    "payouts": "a payout moves money out of the balance",
    "transfers": "a transfer moves money to another account",
    "topups": "a top-up moves money into the balance",
    "credit_notes": "a credit note adjusts what the customer owes and may refund or credit them",
}

# Creates undone by DELETE of the created object.
DELETABLE = frozenset({"customers", "products", "plans", "coupons", "invoiceitems", "webhook_endpoints",
                       "subscription_items"})
# Creates undone by archiving (Stripe never deletes these objects).
ARCHIVABLE = frozenset({"prices", "tax_rates", "shipping_rates", "promotion_codes"})

# Update parameters that steer *how* Stripe applies a change and are not state to restore.
STEERING_PARAMS = frozenset({"expand", "proration_behavior", "proration_date", "payment_behavior",
                             "billing_cycle_anchor_behavior", "off_session", "validate", "invoice_now",
                             "prorate"})

# Objects whose creates/updates take no metadata (stamping provenance there would be refused).
NO_METADATA = frozenset({"tax_ids", "checkout/sessions", "billing_portal/sessions"})

# Form-encoded numbers Stripe answers as JSON numbers (dry-run answers type them the same way).
NUMERIC_FIELDS = frozenset({
    "amount", "amount_off", "application_fee_amount", "balance", "billing_cycle_anchor", "cancel_at",
    "days_until_due", "due_date", "duration_in_months", "interval_count", "max_redemptions", "quantity",
    "redeem_by", "trial_end", "trial_period_days", "unit_amount", "percent_off", "account_balance",
})

ACCOUNT_HEADERS = ("stripe-account", "stripe-context")
_CANONICAL_ACCOUNT_HEADER = {"stripe-account": "Stripe-Account", "stripe-context": "Stripe-Context"}
_METADATA_FIELD = re.compile(r"metadata\[([^\[\]]{1,40})\]")
_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_ALNUM = string.ascii_letters + string.digits


def _random_alnum(n: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(n))


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True, slots=True)
class Target:
    """Where a v1 request points: ``/v1/<collection>[/<id>[/<sub>[/<sub_id>]]]``."""

    collection: str  # "customers", "checkout/sessions"
    id: str | None = None
    sub: str | None = None  # an action ("void") or a nested collection ("sources")
    sub_id: str | None = None
    extra: tuple[str, ...] = ()

    @property
    def item_path(self) -> str:
        return f"/v1/{self.collection}/{self.id}"

    @property
    def is_action(self) -> bool:
        return self.sub is not None and self.sub in ACTIONS and self.sub_id is None and not self.extra

    @property
    def nested(self) -> bool:
        return self.sub is not None and not self.is_action

    @property
    def resource(self) -> Resource:
        name = self.sub if self.nested and self.sub else self.collection
        return RESOURCES.get(name) or Resource(name.rsplit("/", 1)[-1].rstrip("s") or "object", None)


def target_of(segments: tuple[str, ...] | list[str]) -> Target | None:
    """Split decoded path segments; None when the path is not a Stripe v1 object path."""
    segs = list(segments)
    if len(segs) < 2 or segs[0] != "v1":
        return None
    rest = segs[1:]
    collection = rest.pop(0)
    if collection in NAMESPACES and rest:
        collection = f"{collection}/{rest.pop(0)}"
    rid = rest.pop(0) if rest else None
    sub = rest.pop(0) if rest else None
    sub_id = rest.pop(0) if rest else None
    return Target(collection, rid, sub, sub_id, tuple(rest))


def _segments(op: Operation) -> tuple[str, ...]:
    if op.segments:
        return op.segments
    return tuple(s for s in op.path.split("/") if s)


# --------------------------------------------------------------------------- value helpers


def _form_equal(sent: Any, current: Any) -> bool:
    """Does the record's JSON value equal what a form-encoded write sent? Lenient where the shapes
    cannot be compared (a nested create such as ``product[name]`` answered by an id; lists)."""
    if isinstance(sent, dict):
        if not isinstance(current, dict):
            return True
        return all(_form_equal(v, current[k]) for k, v in sent.items() if k in current)
    if isinstance(sent, list):
        return True
    if sent is None or sent == "":
        return current in (None, "", {}, [])
    if isinstance(current, bool):
        return str(sent).lower() == ("true" if current else "false")
    if isinstance(current, (int, float)):
        try:
            return float(sent) == float(current)
        except (TypeError, ValueError):
            return False
    if isinstance(current, dict):  # an expanded object: the form sent its id
        return current.get("id") == sent
    if current is None:
        return False
    return str(current) == str(sent)


def _is_stripe_object(value: Any) -> bool:
    return isinstance(value, dict) and "object" in value


def _restore_value(field: str, sent: Any, pre: Any) -> Any:
    """The form value that puts ``field`` back to its pre-image ``pre`` (only the parts ``sent`` touched)."""
    if isinstance(sent, dict):
        if pre is None:
            return ""
        if not isinstance(pre, dict) or _is_stripe_object(pre):
            raise NotCompensable(f"{field}: the record shows it as {type(pre).__name__}, not the fields the write "
                                 "set; its prior state cannot be written back")
        return {k: _restore_value(f"{field}[{k}]", v, pre.get(k)) for k, v in sent.items()}
    if pre is None:
        return ""
    if isinstance(pre, list):
        if any(isinstance(x, (dict, list)) for x in pre):
            raise NotCompensable(f"{field}: a list of objects cannot be written back as it was")
        return list(pre) if pre else ""
    if isinstance(pre, dict):
        if _is_stripe_object(pre) and isinstance(pre.get("id"), str):
            return pre["id"]  # an expanded object: write back its id
        raise NotCompensable(f"{field}: the write set a value where the record holds an object")
    return pre


def _typed(value: Any, key: str = "") -> Any:
    """Form strings as Stripe would answer them: ``"true"`` -> True, numbers for numeric fields."""
    if isinstance(value, dict):
        return {k: _typed(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v, key) for v in value]
    if isinstance(value, str):
        if value in ("true", "false"):
            return value == "true"
        if key in NUMERIC_FIELDS:
            if _INT_RE.fullmatch(value):
                return int(value)
            try:
                return float(value)
            except ValueError:
                return value
    return value


# --------------------------------------------------------------------------- the adapter


class StripeAdapter(Adapter):
    """Stripe API v1. No adapter options beyond ``id_pattern`` (overrides the pattern of ``{id}``)."""

    name = "stripe"
    tenant_headers = frozenset(ACCOUNT_HEADERS)
    request_content_type = FORM_CT  # Stripe's API takes form-encoded bodies (a[b]=c)
    default_param_pattern = ANY_ID
    idempotency_header = "Idempotency-Key"
    version_header = None

    # -- matching -------------------------------------------------------------------------------

    def param_pattern(self, name: str) -> re.Pattern[str] | None:
        """Stripe's OpenAPI parameter names tell which object an id names, hence its format."""
        if name == "id" and self._id_re is not None:
            return self._id_re
        pattern = PARAM_PATTERNS.get(name)
        return re.compile(pattern) if pattern is not None else None

    def infer_operation(self, method: str, template: str, effect: str) -> str:
        """POST to a collection creates, POST to an item updates, POST to ``.../{id}/<verb>`` is an
        action, DELETE deletes (a subscription's DELETE cancels it)."""
        if effect == "read":
            return "read"
        segs = [s for s in template.strip("/").split("/") if s]
        last = segs[-1] if segs else ""
        if method == "DELETE":
            return "delete"
        if method == "POST":
            if last.startswith("{"):
                return "update"
            if last in ACTIONS and len(segs) >= 2 and segs[-2].startswith("{"):
                return "action"
            return "create"
        if method in ("PUT", "PATCH"):
            return "update"
        return "action"

    # -- tenant switches ------------------------------------------------------------------------

    def check_request_headers(self, op: Operation, headers: Mapping[str, str]) -> None:
        """Refuse ``Stripe-Account`` / ``Stripe-Context`` (acting as another account) unless the
        capability's ``allow_accounts`` lists the value. An allowed value is recorded in
        ``op.context`` so the pre-image read and the undo step go to the same account.

        Header names that a lenient server might read as these (``Stripe_Account``) are refused as
        ambiguous, as is sending one twice."""
        from proxy.errors import TetherError
        from proxy.headers import canonical_name

        found: dict[str, str] = {}
        for name, value in headers.items():
            canon = canonical_name(name)
            if canon not in ACCOUNT_HEADERS:
                continue
            if name.lower() != canon:
                raise TetherError("ambiguous_request", f"header {name!r} is an alias of {canon!r}; refused")
            if canon in found:
                raise TetherError("ambiguous_request", f"more than one {_CANONICAL_ACCOUNT_HEADER[canon]} header")
            found[canon] = value.strip()
        if not found:
            return None
        cap = op.capability
        allowed = list(getattr(getattr(cap, "config", None), "allow_accounts", None) or [])
        cap_name = getattr(cap, "name", "?")
        for canon, value in found.items():
            if value not in allowed:
                raise TetherError("tenant_switch_refused",
                                  f"{_CANONICAL_ACCOUNT_HEADER[canon]}: {value!r} is not in the allow_accounts of "
                                  f"capability {cap_name!r}")
        for canon, value in found.items():
            op.context[_CANONICAL_ACCOUNT_HEADER[canon]] = value
        return None

    @staticmethod
    def _account_headers(op: Operation) -> dict[str, str]:
        context = getattr(op, "context", None)
        if not isinstance(context, dict):
            return {}
        return {k: v for k, v in context.items() if k.lower() in ACCOUNT_HEADERS}

    # -- dry-run --------------------------------------------------------------------------------

    def new_id(self, op: Operation) -> str:
        t = target_of(_segments(op))
        res = t.resource if t is not None else Resource("object", None)
        if res.prefix is None:
            return _random_alnum(8)
        return f"{res.prefix}_dryrun{_random_alnum(14)}"

    # -- what it does, in words -----------------------------------------------------------------

    name_fields = ("name", "email", "description", "number", "nickname", "receipt_email")

    def record_kind(self, op: Operation) -> str:
        """``customer``, ``subscription``, ``invoice`` (the object the path names)."""
        t = target_of(_segments(op))
        if t is None:
            return super().record_kind(op)
        return t.resource.object.replace("_", " ") if getattr(t.resource, "object", None) else "object"

    def describe(self, op: Operation, record: Any = None) -> "Description":
        """As the base, with Stripe's actions named (``void`` invoice, ``refund``) and a customer named
        by name or e-mail."""
        from .base import Description

        d = super().describe(op, record)
        t = target_of(_segments(op))
        rid = d.record_id or (t.id if t is not None else None)
        action = d.action
        if t is not None and t.is_action and t.sub:
            action = f"{t.sub.replace('_', ' ')}"
        elif t is not None and op.method == "DELETE" and t.collection == "subscriptions":
            action = "cancel"
        return Description(action, d.kind, d.name, rid)

    def synthetic_response(self, op: Operation, item_id: str) -> SyntheticResponse:
        """A Stripe object the SDKs parse into their classes: ``id``, ``object``, the fields written
        (typed as Stripe answers them), ``livemode: false``, ``created``."""
        kind = getattr(op.capability, "operation", "action")
        t = target_of(_segments(op))
        body = op.body if isinstance(op.body, dict) else {}
        fields = _typed({k: v for k, v in body.items() if k != "expand"})
        headers = {"Request-Id": f"req_dryrun{_random_alnum(14)}"}
        if t is None:
            return SyntheticResponse(200, {"object": "unknown", "livemode": False, **fields}, headers)
        res = t.resource
        now = int(time.time())
        if kind == "create":
            given = body.get("id")
            custom = res.custom_ids and isinstance(given, str) and _ANY_ID_RE.fullmatch(given)
            rid = given if custom else self.new_id(op)
            rec: dict[str, Any] = {**fields, "id": rid, "object": res.object, "livemode": False, "created": now}
            rec.setdefault("metadata", {})
            parent = RESOURCES.get(t.collection)
            if t.nested and t.id and parent is not None:
                rec.setdefault(parent.object, t.id)  # /v1/customers/{id}/tax_ids -> "customer": id
            rec.update(_created_defaults(res.object, rec))
            return SyntheticResponse(200, rec, headers)
        oid = (t.sub_id if t.nested else t.id) or item_id
        if kind in ("update", "upsert"):
            return SyntheticResponse(200, {**fields, "id": oid, "object": res.object, "livemode": False}, headers)
        if kind == "delete":
            if t.collection == "subscriptions" and not t.nested:
                return SyntheticResponse(200, {"id": oid, "object": "subscription", "status": "canceled",
                                               "canceled_at": now, "livemode": False}, headers)
            return SyntheticResponse(200, {"id": oid, "object": res.object, "deleted": True}, headers)
        rec = {**fields, "id": t.id or item_id, "object": res.object, "livemode": False}
        if t.sub in ACTION_STATUS:
            rec["status"] = ACTION_STATUS[t.sub]
        return SyntheticResponse(200, rec, headers)

    # -- outcome --------------------------------------------------------------------------------

    def is_failure(self, status: int, body: Any) -> bool:
        """4xx/5xx, or a body that is a Stripe error envelope (``{"error": {...}}``) whatever the status."""
        if status >= 400:
            return True
        return isinstance(body, dict) and isinstance(body.get("error"), dict) and "object" not in body

    def created_ids(self, op: Operation, status: int, headers: dict[str, str], body: Any) -> list[str]:
        if status >= 300 or not isinstance(body, dict) or getattr(op.capability, "operation", "") != "create":
            return []
        rid = body.get("id")
        return [rid] if isinstance(rid, str) and rid else []

    # -- compensation ---------------------------------------------------------------------------

    def pre_image_request(self, op: Operation) -> PlannedRequest | None:
        """Updates read the object first (``GET /v1/<collection>/{id}``) to restore what they touch."""
        if getattr(op.capability, "operation", "") not in ("update", "upsert"):
            return None
        t = target_of(_segments(op))
        if t is None or t.id is None or t.nested or t.is_action:
            return None
        return PlannedRequest("GET", t.item_path, content_type=None, headers=self._account_headers(op))

    def plan_undo(self, op: Operation, pre_image: Any) -> UndoPlan:
        kind = getattr(op.capability, "operation", "")
        t = target_of(_segments(op))
        if t is None:
            raise NotCompensable(f"{op.path} is not a Stripe v1 object path")
        body = op.body if isinstance(op.body, dict) else {}
        hdrs = self._account_headers(op)
        if kind == "create":
            return self._undo_create(t, body, hdrs)
        if kind in ("update", "upsert"):
            return self._undo_update(t, op, body, pre_image, hdrs)
        if kind == "action":
            if t.collection == "invoices" and t.sub == "finalize" and t.id:
                return UndoPlan("void", PlannedRequest("POST", f"/v1/invoices/{t.id}/void", content_type=FORM_CT,
                                                       headers=hdrs),
                                note="a finalized invoice cannot return to draft: void it (Stripe's own "
                                     "reversal; the invoice number stays used). A paid invoice needs a refund, "
                                     "which Tether leaves to a human (the check flags it)")
            raise NotCompensable(f"the {t.sub or 'custom'} action on Stripe {t.collection} cannot be undone")
        if kind == "delete":
            if t.collection == "subscriptions" and not t.nested:
                raise NotCompensable("a canceled subscription cannot be reactivated")
            raise NotCompensable(f"deleting Stripe {t.resource.object} objects is permanent: a re-created one would "
                                 "get a new id and lose its links")
        raise NotCompensable(f"the stripe adapter cannot undo a {kind or 'custom'} operation")

    def _undo_create(self, t: Target, body: dict[str, Any], hdrs: dict[str, str]) -> UndoPlan:
        if t.nested or t.id is not None:
            raise NotCompensable(f"Tether plans no undo for creating nested {t.sub} under {t.collection}")
        coll = t.collection
        if coll in NON_COMPENSABLE_CREATES:
            raise NotCompensable(NON_COMPENSABLE_CREATES[coll])
        expect = {k: v for k, v in body.items() if k not in STEERING_PARAMS} or None
        item = f"/v1/{coll}/{{created_id}}"
        if coll == "plans" and isinstance(body.get("product"), dict):
            raise NotCompensable("the plan creates its product inline (product[...]); one undo step can delete "
                                 "only one object: create the product first, then the plan with product=<id>")
        if coll == "subscriptions":
            return UndoPlan("cancel", PlannedRequest("DELETE", item, content_type=None, headers=hdrs), expect=expect,
                            note="cancel the subscription at once; an invoice it already charged is not refunded")
        if coll == "invoices":
            return UndoPlan("delete", PlannedRequest("DELETE", item, content_type=None, headers=hdrs), expect=expect,
                            note="delete the draft invoice (a draft cannot be voided; deleting leaves no trace); "
                                 "if it was finalized meanwhile the check flags a conflict for a human to void it")
        if coll in ARCHIVABLE:
            return UndoPlan("custom", PlannedRequest("POST", item, body={"active": "false"}, content_type=FORM_CT,
                                                     headers=hdrs), expect=expect,
                            note=f"Stripe never deletes {coll}: archive it (active=false)")
        if coll in DELETABLE:
            return UndoPlan("delete", PlannedRequest("DELETE", item, content_type=None, headers=hdrs), expect=expect,
                            note=f"delete the created {t.resource.object}")
        raise NotCompensable(f"Tether has no undo for creating Stripe {coll}")

    def _undo_update(self, t: Target, op: Operation, body: dict[str, Any], pre_image: Any,
                     hdrs: dict[str, str]) -> UndoPlan:
        if t.nested or t.id is None or t.is_action:
            raise NotCompensable(f"Tether plans no undo for updates of nested Stripe objects ({op.path})")
        if not isinstance(pre_image, dict) or not pre_image.get("id"):
            raise NotCompensable(f"no pre-image of {t.item_path} to restore")
        if pre_image.get("deleted") is True:
            raise NotCompensable(f"{t.item_path} is deleted")
        restore: dict[str, Any] = {}
        for key, sent in body.items():
            if key in STEERING_PARAMS:
                continue
            if key == "metadata":
                before = pre_image.get("metadata") or {}
                if isinstance(sent, dict):
                    restore["metadata"] = {k: ("" if before.get(k) is None else before.get(k)) for k in sent}
                else:  # metadata="" cleared every key: put each one back
                    restore["metadata"] = dict(before) if before else ""
                continue
            if key not in pre_image:
                raise NotCompensable(f"{key!r} is a write-only parameter of {t.collection}: the record does not "
                                     "show its prior state, so the write cannot be undone")
            restore[key] = _restore_value(key, sent, pre_image[key])
        expect = {k: v for k, v in body.items() if k not in STEERING_PARAMS} or None
        if not restore:
            return UndoPlan("restore", None, pre_image=pre_image, note="the write changed no stored field")
        fields = ", ".join(sorted(restore))
        return UndoPlan("restore", PlannedRequest("POST", t.item_path, body=restore, content_type=FORM_CT,
                                                  headers=hdrs),
                        pre_image=pre_image, expect=expect, note=f"restore {fields} from the pre-image")

    def arm_undo(self, plan: UndoPlan, op: Operation, status: int, headers: dict[str, str], body: Any) -> UndoPlan:
        """Fill the created object's id from Stripe's answer (it must look like a Stripe id)."""
        req = plan.request
        if req is None or "{created_id}" not in req.path:
            return plan
        rid = body.get("id") if isinstance(body, dict) else None
        if not isinstance(rid, str) or not _ANY_ID_RE.fullmatch(rid):
            raise NotCompensable("Stripe's answer named no created id")
        req.path = req.path.replace("{created_id}", rid)
        if plan.kind == "cancel" and isinstance(body, dict) and body.get("status") in ("active", "past_due"):
            plan.note += f" (it started {body.get('status')}: check its first invoice)"
        return plan

    def check_request(self, plan: UndoPlan) -> PlannedRequest | None:
        """Before an undo step, read the object it will change (same account) to detect a concurrent change."""
        req = plan.request
        if req is None or "{created_id}" in req.path:
            return None
        t = target_of([s for s in req.path.split("/") if s])
        if t is None or t.id is None:
            return None
        hdrs = {k: v for k, v in (req.headers or {}).items() if k.lower() in ACCOUNT_HEADERS}
        return PlannedRequest("GET", t.item_path, content_type=None, headers=hdrs)

    def undo_already_done(self, plan: UndoPlan, status: int, body: Any) -> bool:
        """Does this answer (to an undo step, or to the read before it) show the step's effect is
        already there: deleted, canceled, voided, archived? Then the step is done, not in conflict.
        (Proposed gateway hook; see the report. The common case: a transaction that created *and*
        finalized an invoice rolls back the finalize by voiding, after which the draft-delete step
        finds a void invoice, which is as undone as Stripe allows.)"""
        req = plan.request
        if req is None:
            return False
        if status in (404, 410):
            return plan.kind == "delete"
        if status >= 300 or not isinstance(body, dict):
            return False
        state = body.get("status")
        if plan.kind == "delete":
            return body.get("deleted") is True or (req.path.startswith("/v1/invoices/") and state == "void")
        if plan.kind == "cancel":
            return state in ("canceled", "incomplete_expired")
        if plan.kind == "void":
            return state == "void"
        if plan.kind == "custom" and req.body == {"active": "false"}:
            return body.get("active") is False
        return False

    def current_matches(self, plan: UndoPlan, current: Any) -> bool:
        """Is the object still as the agent left it (so the undo overwrites nobody else's change)?"""
        if not isinstance(current, dict):
            return False
        if current.get("deleted") is True:
            # already gone: a DELETE then answers 404, which counts as done; anything else is a conflict
            return plan.kind == "delete"
        status = current.get("status")
        path = plan.request.path if plan.request is not None else ""
        if plan.kind == "void" and status != "open":
            return False
        if plan.kind == "delete" and path.startswith("/v1/invoices/") and status != "draft":
            return False
        if plan.kind == "cancel" and status in ("canceled", "incomplete_expired"):
            return False
        if not plan.expect:
            return True
        return all(_form_equal(v, current[k]) for k, v in plan.expect.items() if k in current)

    # -- provenance -----------------------------------------------------------------------------

    def stamp_provenance(self, op: Operation, fields: dict[str, str]) -> Any:
        """Put provenance into ``metadata[...]`` of top-level objects that take metadata. A key the
        agent set itself is overwritten (provenance cannot be forged); ``metadata=""`` (clear all)
        is left as sent, since one request cannot both clear and set metadata."""
        if not isinstance(op.body, dict) or not fields:
            return None
        t = target_of(_segments(op))
        if t is None or t.nested or t.is_action or t.collection in NO_METADATA:
            return None
        current = op.body.get("metadata")
        if current is not None and not isinstance(current, dict):
            return None
        metadata = dict(current or {})
        for field, value in fields.items():
            m = _METADATA_FIELD.fullmatch(field)
            key = m.group(1) if m else field
            metadata[key] = value[:500]
        return {**op.body, "metadata": metadata}


def _created_defaults(obj: str, rec: dict[str, Any]) -> dict[str, Any]:
    """Fields a freshly created object of this type always shows."""
    if obj == "subscription":
        return {"status": rec.get("status", "active")}
    if obj == "invoice":
        return {"status": "draft", "paid": False}
    if obj in ("price", "plan", "product", "tax_rate", "shipping_rate", "promotion_code"):
        return {"active": rec.get("active", True)}
    if obj == "refund":
        return {"status": "succeeded"}
    return {}


__all__ = ["ANY_ID", "PARAM_PATTERNS", "RESOURCES", "StripeAdapter", "Target", "target_of"]
