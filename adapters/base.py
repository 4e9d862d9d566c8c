"""The adapter interface: one upstream's knowledge, behind a few pure methods.

An adapter answers questions about a SaaS API that the gateway cannot answer generically:

* how its paths behave (case-insensitive object names, id formats, method overrides);
* whether a request is a composite/batch request, and which sub-operations it really executes;
* what a realistic synthetic response to a dry-run write looks like;
* how to read the pre-image of a record and how to undo a write (the compensation plan);
* whether a response is a failure despite its status (Slack's ``{"ok": false}`` with 200);
* how to stamp provenance into the record being written.

Methods that *decide* do no I/O, so they are tested with plain data (as mitmproxy tests addons with fake
flows); the gateway performs every request an adapter plans, through its normal forward path.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import orjson

from .quota import STANDARD_HEADERS as STANDARD_QUOTA_HEADERS
from .quota import QuotaReading, QuotaWindow, standard_quota

JSON_CT = "application/json"
# One path segment an id may be when the adapter knows no stricter format: starts with a letter or digit
# (so never '.' or '..'), then unreserved and sub-delim characters only (no / ? # % \ ; or controls).
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~!$&'()*+,=:@-]{0,254}")
FORM_CT = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class Operation:
    """One operation the upstream will execute: the request itself, or one unpacked sub-request."""

    method: str
    path: str  # raw, validated, upstream-relative path (what is forwarded)
    query: str = ""
    segments: tuple[str, ...] = ()
    body: Any = None  # parsed body (JSON value, or dict for a form), None when there is none
    content_type: str | None = None
    raw_body: bytes | None = None
    ref: str | None = None  # a composite sub-request's reference id
    index: int | None = None  # position inside a composite request
    # filled in by matching
    capability: Any = None
    params: dict[str, str] = field(default_factory=dict)
    # headers every request Tether itself sends about this operation must repeat (pre-image read, undo
    # step, pre-undo check), e.g. an allowed Stripe-Account; filled by Adapter.check_request_headers
    context: dict[str, str] = field(default_factory=dict)
    # adapter-private facts about a sub-request (e.g. what a composite reference pointed at)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SyntheticResponse:
    status: int
    body: Any = None  # JSON-serialisable, or bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = JSON_CT

    def body_bytes(self) -> bytes:
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        return orjson.dumps(self.body)


@dataclass(slots=True)
class PlannedRequest:
    """A request the gateway will send on an adapter's behalf (a pre-image read, an undo step)."""

    method: str
    path: str
    query: str = ""
    body: Any = None
    content_type: str | None = JSON_CT
    headers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "query": self.query, "body": self.body,
                "content_type": self.content_type, "headers": self.headers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlannedRequest":
        return cls(method=d["method"], path=d["path"], query=d.get("query", ""), body=d.get("body"),
                   content_type=d.get("content_type"), headers=d.get("headers") or {})


@dataclass(slots=True)
class UndoPlan:
    """How to undo one write. ``kind`` is delete / restore / recreate / cancel / void / custom.

    ``request`` may contain ``{created_id}`` placeholders filled from the forward response when the plan
    is armed. ``expect`` holds the values the agent wrote (for conflict detection before restoring)."""

    kind: str
    request: PlannedRequest | None = None
    pre_image: Any = None
    expect: dict[str, Any] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "request": self.request.to_dict() if self.request else None,
                "pre_image": self.pre_image, "expect": self.expect, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UndoPlan":
        req = d.get("request")
        return cls(kind=d["kind"], request=PlannedRequest.from_dict(req) if req else None,
                   pre_image=d.get("pre_image"), expect=d.get("expect"), note=d.get("note", ""))


@dataclass(frozen=True, slots=True)
class Description:
    """An operation in a reviewer's words: the action and the record it acts on (``change`` /
    ``Opportunity`` / ``Acme renewal 2027``). Built by :meth:`Adapter.describe` from the request and,
    when Tether read it, the record as it is now; the headline of a review item is made from it."""

    action: str  # a verb phrase: "create", "change", "delete", "post a message in"
    kind: str  # what one record is called: "Opportunity", "deal", "customer", "channel"
    name: str | None = None  # the record's own name: "Acme renewal 2027", "#sales", "jane@acme.example"
    record_id: str | None = None  # its id when the request names one


_ACTIONS = {"create": "create", "update": "change", "upsert": "create or change", "delete": "delete",
            "read": "read", "action": "run an action on"}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def humanise(field_name: str) -> str:
    """``close_date`` / ``CloseDate`` / ``metadata.plan`` -> ``close date`` / ``close date`` / ``metadata plan``."""
    words = _CAMEL.sub(" ", field_name.replace(".", " ").replace("_", " ").replace("-", " "))
    return " ".join(w.lower() if not w.isupper() or len(w) == 1 else w for w in words.split())


def record_field(record: Any, path: str) -> Any:
    """The value at a dotted path of a JSON object, or None."""
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def display_name(sources: list[Any], fields: list[Any]) -> str | None:
    """The first of ``fields`` found in the first source that has it. An entry is a dotted path, or a
    list of paths whose values are joined by a space (``[firstname, lastname]``)."""
    for src in sources:
        if not isinstance(src, dict):
            continue
        for f in fields:
            paths = f if isinstance(f, (list, tuple)) else [f]
            parts = [record_field(src, p) for p in paths]
            words = [str(v).strip() for v in parts if isinstance(v, (str, int, float)) and not isinstance(v, bool)
                     and str(v).strip()]
            if words:
                return " ".join(words)
    return None


class NotCompensable(Exception):
    """This write cannot be undone (raised by plan_undo with the reason)."""


class AdapterOptionsError(ValueError):
    """Adapter options in the rules file are wrong; the message names the option."""


class Adapter:
    """Generic behaviour; SaaS adapters override what differs."""

    name: ClassVar[str] = "base"
    case_insensitive_paths: ClassVar[bool] = False
    # the upstream reads JSON field names case-insensitively (Salesforce): field rules must too
    case_insensitive_fields: ClassVar[bool] = False
    # provenance field names the rules stamp into records (set by the gateway from provenance.record_fields);
    # undo plans restore them along with the agent's fields
    record_fields: tuple[str, ...] = ()
    default_param_pattern: ClassVar[str | None] = None
    id_param_names: ClassVar[frozenset[str]] = frozenset({"id"})
    id_pattern: ClassVar[str | None] = None
    # The vendor's own authentication headers besides Authorization (lower case). An agent sending one
    # would act with a credential it must not hold: Tether strips them (and refuses their aliases), to
    # this upstream and, as a foreign vendor's credential, to every other upstream too.
    credential_headers: ClassVar[frozenset[str]] = frozenset()
    # Headers with which the vendor acts for another account or tenant (lower case). Checked by
    # check_request_headers (refused unless the capability allows the value); sent to another vendor's
    # upstream they are stripped.
    tenant_headers: ClassVar[frozenset[str]] = frozenset()
    # Query (and form) parameters the vendor reads as a credential (lower case): a request carrying one is
    # refused, as with the upstream's ``credential_params``.
    credential_params: ClassVar[tuple[str, ...]] = ()
    # How the vendor wants a request body Tether itself encodes (a tool call's arguments through the MCP
    # door, a replay's edit): JSON unless the API takes forms (Stripe).
    request_content_type: ClassVar[str] = JSON_CT

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        unknown = set(self.options) - set(self.option_names())
        if unknown:
            raise AdapterOptionsError(f"unknown adapter option(s) for {self.name}: {', '.join(sorted(unknown))}")
        self._id_re = re.compile(self.options.get("id_pattern") or self.id_pattern) if (
            self.options.get("id_pattern") or self.id_pattern) else None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("id_pattern",)

    # -- matching -------------------------------------------------------------------------------

    def valid_id(self, rid: Any) -> bool:
        """May ``rid`` — an id taken from an upstream's answer — name the target of an undo step? It must
        match the adapter's id format (``id_pattern``), or else be one plain path segment: no ``/``,
        ``?``, ``#``, ``%``, ``\\``, no dot segment, no control or non-ASCII character. An upstream (or
        whatever it echoes) must not be able to aim a compensating DELETE at another record."""
        if not isinstance(rid, str):
            return False
        if self._id_re is not None:
            return self._id_re.fullmatch(rid) is not None
        return _PLAIN_ID.fullmatch(rid) is not None

    def param_pattern(self, name: str) -> re.Pattern[str] | None:
        """Default pattern a path parameter must fully match (ids in the upstream's format)."""
        if name in self.id_param_names and self._id_re is not None:
            return self._id_re
        return None

    def infer_operation(self, method: str, template: str, effect: str) -> str:
        if effect == "read":
            return "read"
        last = template.rstrip("/").rsplit("/", 1)[-1]
        if method == "POST" and not last.startswith("{"):
            return "create"
        if method in ("PATCH", "PUT", "POST"):
            return "update"
        if method == "DELETE":
            return "delete"
        return "action"

    def canonical_segments(self, segments: tuple[str, ...], query: str | None = None) -> tuple[str, ...]:
        """The segments as the upstream reads them, for matching only (HubSpot's ``0-3`` is ``deals``).
        Applied to rules templates and to requests alike; the forwarded path is never rewritten."""
        return segments

    def check_request_headers(self, op: Operation, headers: Mapping[str, str]) -> None:
        """Refuse (raise TetherError) agent headers this upstream reads as acting for another account or
        tenant (Stripe-Account) unless op.capability allows it; record in ``op.context`` what Tether's own
        requests for this operation must repeat. Default: nothing to check."""
        return None

    def method_override(self, method: str, query: list[tuple[str, str]]) -> str | None:
        """The method the upstream will really execute when the request carries an override it honours
        (Salesforce's ``_HttpMethod``); None when there is no override this upstream honours."""
        return None

    # -- composite ------------------------------------------------------------------------------

    def is_composite(self, op: Operation) -> bool:
        """Is this a composite/batch endpoint whose sub-requests must each be matched and granted?"""
        return False

    def unpack(self, op: Operation) -> list[Operation] | None:
        """Sub-operations of a composite/batch request, or None if ``op`` is a plain request.

        Every sub-operation is matched, granted and validated on its own; raising TetherError refuses
        the whole request."""
        return None

    # -- dry-run --------------------------------------------------------------------------------

    def new_id(self, op: Operation) -> str:
        return secrets.token_hex(12)

    def synthetic_response(self, op: Operation, item_id: str) -> SyntheticResponse:
        cap_op = getattr(op.capability, "operation", "action")
        body = op.body if isinstance(op.body, dict) else {}
        if cap_op == "create":
            return SyntheticResponse(201, {"id": self.new_id(op), **body})
        if cap_op == "delete":
            return SyntheticResponse(204)
        if cap_op in ("update", "upsert"):
            rid = op.params.get("id")
            return SyntheticResponse(200, ({"id": rid} if rid else {}) | body)
        return SyntheticResponse(202, {"accepted": True, "dry_run": item_id})

    def synthetic_composite(self, outer: Operation, ops: list[Operation], item_id: str) -> SyntheticResponse:
        """The synthetic answer to a whole composite request (adapters shape their own envelope)."""
        results = []
        for op in ops:
            r = self.synthetic_response(op, item_id)
            results.append({"status": r.status, "body": r.body if not isinstance(r.body, bytes) else None})
        return SyntheticResponse(200, {"results": results, "dry_run": item_id})

    # -- what it does, in words -----------------------------------------------------------------

    # fields that name a record, tried in order when the capability has no ``display.name``
    name_fields: ClassVar[tuple[Any, ...]] = ("name", "title", "subject", ("first_name", "last_name"), "email",
                                              "label")

    def describe(self, op: Operation, record: Any = None) -> Description:
        """The action and the record, in words (no I/O): from the capability's ``display`` config when it
        has one, then from what this upstream's records look like. ``record`` is the record as Tether
        read it (a pre-image), when it did; otherwise only the request names it."""
        cap = op.capability
        kind_op = getattr(cap, "operation", None) or "action"
        display = getattr(getattr(cap, "config", None), "display", None)
        kind = (display.object if display is not None and display.object else None) or self.record_kind(op)
        fields = list(display.name) if display is not None and display.name else list(self.name_fields)
        name = display_name([record, op.body if isinstance(op.body, dict) else None], fields)
        rid = op.params.get("id") or next((v for k, v in op.params.items() if k.lower().endswith("id")), None)
        return Description(_ACTIONS.get(kind_op, kind_op), kind, name, rid)

    def record_kind(self, op: Operation) -> str:
        """What one record of this path is called: the collection's last literal segment, singular."""
        template = getattr(op.capability, "template", None) or op.path
        literals = [s for s in template.strip("/").split("/") if s and not s.startswith("{")]
        word = literals[-1] if literals else "record"
        for plural, single in (("ies", "y"), ("sses", "ss"), ("ses", "s"), ("s", "")):
            if word.endswith(plural) and len(word) > len(plural) + 1:
                return word[: len(word) - len(plural)] + single
        return word

    def field_label(self, field_name: str) -> str:
        """A body field as a reviewer reads it (``close_date`` -> ``close date``)."""
        return humanise(field_name)

    # -- outcome --------------------------------------------------------------------------------

    def is_failure(self, status: int, body: Any) -> bool:
        return status >= 400

    def created_ids(self, op: Operation, status: int, headers: dict[str, str], body: Any) -> list[str]:
        if status >= 300 or not isinstance(body, dict):
            return []
        rid = body.get("id")
        return [str(rid)] if rid is not None else []

    # -- quota ----------------------------------------------------------------------------------

    # the response headers read_quota looks at (lower case); the gateway hands it only these
    quota_headers: ClassVar[frozenset[str]] = STANDARD_QUOTA_HEADERS

    def read_quota(self, status: int, headers: Mapping[str, str]) -> QuotaReading | None:
        """What this answer says about the upstream's quota (``adapters/quota.py``); None: nothing.
        ``headers``: the ``quota_headers`` present, by lower-case name."""
        return standard_quota(status, headers)

    # -- compensation ---------------------------------------------------------------------------

    def pre_image_request(self, op: Operation) -> PlannedRequest | None:
        """The read that captures the record before an update/delete (None: none needed)."""
        return None

    def pre_image_ok(self, plan: PlannedRequest, status: int, body: Any) -> bool:
        """Is this answer to a pre-image read usable? (Slack answers failures with 200 and ok: false.)"""
        return status < 400 and not self.is_failure(status, body)

    def plan_undo(self, op: Operation, pre_image: Any) -> UndoPlan:
        raise NotCompensable(f"the {self.name} adapter cannot undo {op.method} {op.path}")

    def arm_undo(self, plan: UndoPlan, op: Operation, status: int, headers: dict[str, str], body: Any) -> UndoPlan:
        """Fill the plan with what the forward response revealed (the created id)."""
        return plan

    version_header: str | None = None
    idempotency_header: str | None = None  # e.g. Stripe's Idempotency-Key: sent with undo steps

    def check_request(self, plan: UndoPlan) -> PlannedRequest | None:
        """A read to run before an undo step, to detect a concurrent change (None: no check)."""
        return None

    def undo_already_done(self, plan: UndoPlan, status: int, body: Any) -> bool:
        """Does this answer (to the read before an undo step, or to the step itself) show the step's
        effect is already there (deleted, canceled, voided)? Default: a delete step meeting 404/410."""
        return plan.kind == "delete" and status in (404, 410)

    def precondition_headers(self, plan: UndoPlan, headers: Mapping[str, str], current: Any) -> dict[str, str]:
        """Headers that make the undo fail instead of overwriting a concurrent change (If-Match from the
        record's version, as read just before the undo)."""
        vh = self.version_header
        if vh:
            v = {k.lower(): x for k, x in headers.items()}.get(vh.lower())
            if v:
                return {"If-Match": v}
        return {}

    def looks_unapplied(self, plan: UndoPlan, current: Any) -> bool:
        """After a crash between forwarding and recording the outcome: does the record still hold its
        pre-image for every field the write touched (so the write never applied)?"""
        if plan.pre_image is None or not plan.expect or not isinstance(current, dict):
            return False
        return all(current.get(k) == plan.pre_image.get(k) for k in plan.expect) \
            and not self.current_matches(plan, current)

    def current_matches(self, plan: UndoPlan, current: Any) -> bool:
        """Before restoring a pre-image: does the record still hold what the agent wrote?"""
        if not plan.expect or not isinstance(current, dict):
            return True
        return all(current.get(k) == v for k, v in plan.expect.items())

    # -- provenance -----------------------------------------------------------------------------

    def stamp_provenance(self, op: Operation, fields: dict[str, str]) -> Any:
        """Return the body with provenance fields added (``fields`` maps record field -> value), or None
        where this upstream has no place for it. Default: top-level fields of a JSON object."""
        if not isinstance(op.body, dict) or not fields:
            return None
        return {**op.body, **fields}

    def stamp_composite(self, outer: Operation, ops: list[Operation], fields: dict[str, str]) -> Any:
        """The composite/batch body with provenance stamped into each written record, or None."""
        return None

    # -- helpers for composite unpacking ----------------------------------------------------------

    @staticmethod
    def sub_operation(method: str, url: str, body: Any, index: int, ref: str | None = None,
                      content_type: str | None = JSON_CT, base_prefix: str = "") -> Operation:
        """Build a sub-request's Operation from the URL it names, validated exactly like a top-level
        request target (so a sub-request cannot smuggle what the outer request could not).

        ``url`` is upstream-relative (``/services/data/...``) or relative to ``base_prefix``."""
        from proxy.errors import TetherError
        from proxy.normalise import decode_segments, split_target

        if not isinstance(method, str) or method.upper() != method or method not in (
                "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
            raise TetherError("ambiguous_request", f"sub-request {index}: method {method!r} refused")
        if not isinstance(url, str) or not url:
            raise TetherError("unsupported_composite", f"sub-request {index} has no url")
        if not url.startswith("/"):
            url = base_prefix.rstrip("/") + "/" + url
        path, query = split_target(url, 8192)
        segments = decode_segments(path)
        return Operation(method=method, path=path, query=query, segments=segments, body=body,
                         content_type=content_type, index=index, ref=ref)
