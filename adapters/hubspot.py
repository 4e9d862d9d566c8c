"""HubSpot CRM v3: objects, numeric object type ids, idProperty lookups, batch endpoints, search.

What this adapter knows about HubSpot that the gateway cannot guess:

* **Object types have several spellings.** ``/crm/v3/objects/deals`` and ``/crm/v3/objects/0-3`` are
  the same endpoint (``0-1`` contacts, ``0-2`` companies, ``0-3`` deals, ... — :data:`STANDARD_TYPES`;
  custom objects through the ``type_aliases`` option), and a grant or a deny must hold for every
  spelling. :meth:`HubSpotAdapter.canonical_segments` rewrites the type segment of a request *and* of a
  rules template to one canonical name (lower-case plural), so matching — literal or ``{objectType}``
  with a pattern — sees one spelling. The path forwarded upstream is never rewritten. Literal segments
  are matched case-insensitively (``case_insensitive_paths``): folding spellings together can only
  tie a request to the capability of the object it names, never to another one. Batch sub-requests are
  matched by their canonical segments already; top-level requests, rules templates and review
  re-checks need the core to call this hook (proposed: in ``Registry.match``). Until then a type id
  meets literal templates as a different word: refused by default deny, unless an ``{objectType}``
  pattern admits it — so rules should list every spelling in their patterns (rules/hubspot.yaml does)
  and never use a negative one (``(?!deals$).+`` would let ``0-3`` through).
* **Record ids are numeric** (``\\d+``), except when the request names ``?idProperty=email`` (or any
  unique property): then the id segment is a property value. The canonical form of such a segment is
  ``email=jane@acme.com`` — so a lookup by property matches the *same* capability as a lookup by id,
  and a rules author can restrict which properties may address records (``params: {contactId:
  '\\d+|email=.+'}``). A raw id segment holding ``=`` without ``idProperty`` is refused.
* **POST can read.** ``POST .../search`` and ``POST .../batch/read`` are reads (``infer_operation``
  says ``read``; rules should say ``effect: read``, as ``rules import-openapi`` does). ``batch/read``
  is a plain read capability, not unpacked: it writes nothing, and its body only names ids and
  properties of the one type in the path.
* **Batch writes are unpacked per input**: ``batch/create`` → ``POST /crm/v3/objects/{type}``,
  ``batch/update`` → ``PATCH .../{type}/{id}`` (``?idProperty=`` when the input names one),
  ``batch/archive`` → ``DELETE .../{type}/{id}``, ``batch/upsert`` → ``PUT .../{type}/{id}?idProperty=``
  (HubSpot has no single-record upsert; ``PUT`` on the item is Tether's name for "create or update
  this record", a capability of its own: an agent granted only ``update`` cannot create through an
  upsert). Each sub-operation's body is the input as the single-record endpoint would receive it
  (its addressing keys ``id``/``idProperty`` moved into the URL), so one capability's field rules
  hold for single and batch writes alike.
* **Dry-run answers look like HubSpot's**: ``SimplePublicObject`` (201 create, 200 update), 204
  archive, and batch envelopes ``{"status": "COMPLETE", "results": [...], "startedAt", "completedAt"}``.
* **Failures include multi-status**: a 207, or a batch body with ``errors``/``numErrors``, failed.
* **Undo** (what HubSpot executes is decided from the request's shape, not from the capability's
  declared operation): create → archive the created record; update → PATCH back, by numeric id, the
  properties the write touched, from a pre-image read with ``?properties=`` (a property that was empty
  is cleared with ``""``, HubSpot's way); upsert → a pre-image through ``batch/read`` by idProperty
  decides: restore if the record existed, archive the created record if not; archive → **not
  compensable**: HubSpot restores archived records only in its UI (within 90 days), not through the v3
  objects API. With ``archive_undo: recreate`` the record is re-created from its pre-image instead —
  with a *new* id, without its associations and without properties the pre-image did not read.

Options (``adapter_options``):

* ``type_aliases`` — extra spellings of object types: ``{"2-3456789": "p_cars", "cars": "p_cars"}``;
* ``id_pattern`` — the pattern id parameters must fully match (default: a numeric id or an
  ``idProperty`` lookup, ``\\d+|[A-Za-z0-9_]+=[^/]+``);
* ``archive_undo`` — ``none`` (default) or ``recreate``;
* ``recreate_properties`` — properties read before an archive to re-create from (default: the object
  type's default properties, which is all a bare GET returns);
* ``provenance_properties`` — the HubSpot properties Tether stamps (the values of
  ``provenance.record_fields``): undo restores them with the agent's properties, so a rolled-back
  record does not keep the agent's stamp;
* ``max_batch_inputs`` — inputs accepted in one batch request (default 100, HubSpot's limit).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping
from urllib.parse import quote

from .base import Adapter, AdapterOptionsError, NotCompensable, Operation, PlannedRequest, SyntheticResponse, UndoPlan
from .quota import STANDARD_HEADERS as STANDARD_QUOTA_HEADERS
from .quota import QuotaReading, QuotaWindow, standard_quota

# canonical name -> other spellings HubSpot accepts for a standard object type
STANDARD_TYPES: dict[str, tuple[str, ...]] = {
    "contacts": ("0-1", "contact"),
    "companies": ("0-2", "company"),
    "deals": ("0-3", "deal"),
    "tickets": ("0-5", "ticket"),
    "products": ("0-7", "product"),
    "line_items": ("0-8", "line_item"),
    "quotes": ("0-14", "quote"),
    "communications": ("0-18", "communication"),
    "feedback_submissions": ("0-19", "feedback_submission"),
    "tasks": ("0-27", "task"),
    "notes": ("0-46", "note"),
    "meetings": ("0-47", "meeting"),
    "calls": ("0-48", "call"),
    "emails": ("0-49", "email"),
    "goal_targets": ("0-74", "goal_target"),
    "postal_mail": ("0-116",),
    "leads": ("0-136", "lead"),
}

# Properties HubSpot computes; never written back when re-creating a record.
READONLY_PROPERTIES = frozenset({"hs_object_id", "createdate", "lastmodifieddate", "hs_lastmodifieddate",
                                 "hs_createdate", "hs_object_source", "hs_object_source_id",
                                 "hs_object_source_label", "hs_all_owner_ids", "hs_updated_by_user_id",
                                 "hs_created_by_user_id"})

# What a GET without ?properties= returns, per type (re-create default).
DEFAULT_PROPERTIES: dict[str, tuple[str, ...]] = {
    "contacts": ("firstname", "lastname", "email"),
    "companies": ("name", "domain"),
    "deals": ("dealname", "amount", "dealstage", "pipeline", "closedate"),
}

BATCH_ACTIONS = ("create", "update", "archive", "upsert")
_ITEM_WORDS = frozenset({"search", "batch", "merge", "gdpr-delete"})  # collection sub-resources, not ids
_TYPE_PARAMS = frozenset({"objecttype", "objecttypeid", "toobjecttype", "fromobjecttype", "object_type",
                          "to_object_type", "from_object_type"})
_DATED_VERSION = re.compile(r"\d{4}-\d{2}")
_PROPERTY_NAME = re.compile(r"[A-Za-z0-9_]+")
_NUMERIC = re.compile(r"\d+")
DEFAULT_ID_PATTERN = r"\d+|[A-Za-z0-9_]+=[^/]+"
TYPE_PATTERN = r"[A-Za-z][A-Za-z0-9_]*|\d+-\d+"


def _now() -> str:
    """HubSpot's timestamp format (ISO 8601, milliseconds, UTC)."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _text(value: Any) -> str:
    """A property value as HubSpot stores it (every property value is a string)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _same(a: Any, b: Any) -> bool:
    """Equal as HubSpot values: strings, empty and absent alike; e-mail addresses compared without case
    (HubSpot stores them lower-cased)."""
    x, y = _text(a).strip(), _text(b).strip()
    if x == y:
        return True
    return "@" in x and x.casefold() == y.casefold()


def _query_pairs(query: str) -> list[tuple[str, str]]:
    from proxy.normalise import parse_query

    return parse_query(query)


@dataclass(frozen=True, slots=True)
class Target:
    """A HubSpot objects path, read once: ``/{prefix...}/{type}[/{rest...}]``."""

    prefix: tuple[str, ...]  # ('crm', 'v3', 'objects') or ('crm', 'objects', '2026-03')
    type_raw: str
    type: str  # canonical
    rest: tuple[str, ...]
    id_property: str | None

    @property
    def collection_path(self) -> str:
        """The collection URL in the agent's own type spelling (what sub-requests, pre-image reads and
        undo steps address: the upstream accepted it; the dated API takes type ids only)."""
        return "/" + "/".join((*self.prefix, quote(self.type_raw, safe="")))

    def item_path(self, rid: str) -> str:
        return f"{self.collection_path}/{quote(str(rid), safe='')}"

    @property
    def kind(self) -> str:
        """collection | item | search | batch:<action> | other."""
        r = tuple(s.lower() for s in self.rest)
        if not r:
            return "collection"
        if len(r) == 1 and r[0] == "search":
            return "search"
        if len(r) == 2 and r[0] == "batch":
            return f"batch:{r[1]}"
        if len(r) == 1 and r[0] not in _ITEM_WORDS:
            return "item"
        return "other"

    @property
    def item_id(self) -> str | None:
        return self.rest[0] if self.kind == "item" else None


_HS = "x-hubspot-ratelimit-"


class HubSpotAdapter(Adapter):
    name = "hubspot"
    credential_params = ("hapikey",)  # the legacy developer API key in the query
    case_insensitive_paths: ClassVar[bool] = True
    quota_headers = STANDARD_QUOTA_HEADERS | {_HS + s for s in (
        "daily", "daily-remaining", "max", "remaining", "interval-milliseconds", "secondly", "secondly-remaining")}

    def read_quota(self, status: int, headers: Mapping[str, str]) -> QuotaReading | None:
        """HubSpot's ``X-HubSpot-RateLimit-*``: the daily allowance (resets at midnight in the account's
        time zone, which Tether does not know), the per-interval burst (``-Max``/``-Remaining`` over
        ``-Interval-Milliseconds``) and the per-second one."""
        reading = standard_quota(status, headers) or QuotaReading()

        def num(name: str) -> float | None:
            try:
                return float(headers[_HS + name])
            except (KeyError, ValueError):
                return None

        interval = num("interval-milliseconds")
        for window, remaining, limit, reset in (
                ("daily", num("daily-remaining"), num("daily"), None),
                ("interval", num("remaining"), num("max"), interval / 1000.0 if interval else None),
                ("secondly", num("secondly-remaining"), num("secondly"), 1.0)):
            if remaining is not None:
                reading.windows.append(QuotaWindow(window, remaining, limit, reset))
        return reading if reading.windows or reading.retry_after is not None else None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("id_pattern", "type_aliases", "archive_undo", "recreate_properties", "provenance_properties",
                "max_batch_inputs")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        aliases: dict[str, str] = {}
        for canon, others in STANDARD_TYPES.items():
            aliases[canon] = canon
            for o in others:
                aliases[o.lower()] = canon
        extra = self.options.get("type_aliases") or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                                  for k, v in extra.items()):
            raise AdapterOptionsError("type_aliases must map spellings to object type names (strings)")
        for alias, canon in extra.items():
            target = aliases.get(canon.lower(), canon.lower())
            aliases[alias.lower()] = target
            aliases.setdefault(canon.lower(), target)
        self._aliases = aliases
        self._id_re = re.compile(self.options.get("id_pattern") or DEFAULT_ID_PATTERN)
        self._type_re = re.compile(TYPE_PATTERN)
        mode = self.options.get("archive_undo", "none")
        if mode not in ("none", "recreate"):
            raise AdapterOptionsError("archive_undo must be none or recreate")
        self.archive_undo: str = mode
        self.recreate_properties: tuple[str, ...] | None = self._names("recreate_properties")
        self.provenance_properties: tuple[str, ...] = self._names("provenance_properties") or ()
        n = self.options.get("max_batch_inputs", 100)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise AdapterOptionsError("max_batch_inputs must be a positive integer")
        self.max_batch_inputs: int = n

    def _names(self, option: str) -> tuple[str, ...] | None:
        v = self.options.get(option)
        if v is None:
            return None
        if not isinstance(v, list) or not all(isinstance(x, str) and _PROPERTY_NAME.fullmatch(x) for x in v):
            raise AdapterOptionsError(f"{option} must be a list of HubSpot property names")
        return tuple(v)

    # -- spellings ------------------------------------------------------------------------------

    def canonical_type(self, segment: str) -> str:
        """``0-3``, ``deal``, ``Deals`` -> ``deals``; an unknown type keeps its spelling."""
        return self._aliases.get(segment.lower(), segment)

    @staticmethod
    def _type_positions(low: tuple[str, ...]) -> list[int]:
        """Indexes of the segments that name an object type, in the HubSpot paths that have them."""
        n = len(low)
        if n < 4 or low[0] != "crm":
            return []
        pos: list[int] = []
        if low[1] in ("v3", "v4") and low[2] in ("objects", "properties", "pipelines", "schemas"):
            pos.append(3)
        elif low[1] in ("v3", "v4") and low[2] == "associations":
            pos.extend(i for i in (3, 4) if i < n)
        elif low[1] == "objects" and _DATED_VERSION.fullmatch(low[2]):
            pos.append(3)
        if pos and "objects" in (low[1], low[2]):
            pos.extend(i + 1 for i in range(5, n - 1) if low[i] == "associations")
        return pos

    def canonical_segments(self, segments: tuple[str, ...], query: str | None = None) -> tuple[str, ...]:
        """The segments to *match* (never to forward): object types in their canonical spelling and,
        for a request (``query`` is a string; ``None`` means a rules template), an item id looked up
        by ``?idProperty=P`` as ``P=value``.

        Raises TetherError for a request HubSpot would read differently from how Tether matches it
        (two ``idProperty`` parameters, an empty or malformed one, ``=`` in an id without one)."""
        low = tuple(s.lower() for s in segments)
        positions = self._type_positions(low)
        if not positions:
            return segments
        segs = list(segments)
        for i in positions:
            if query is None and segs[i].startswith("{"):
                continue  # a template's {objectType} parameter
            segs[i] = self.canonical_type(segs[i])
        if query is not None:
            target = self._target_of(tuple(segs), query)
            if target is not None and target.kind == "item":
                segs[-1] = self._id_key(segs[-1], target.id_property)
        return tuple(segs)

    def _id_key(self, rid: str, id_property: str | None) -> str:
        from proxy.errors import TetherError

        if id_property is not None:
            return f"{id_property}={rid}"
        if "=" in rid:
            raise TetherError("ambiguous_request",
                              f"object id {rid!r} holds '=' but the request names no idProperty")
        return rid

    def _id_property(self, query: str) -> str | None:
        from proxy.errors import TetherError

        values = [v for k, v in _query_pairs(query) if k == "idProperty"] if query else []
        if not values:
            return None
        if len(values) > 1:
            raise TetherError("ambiguous_request", "more than one idProperty parameter")
        if not _PROPERTY_NAME.fullmatch(values[0]):
            raise TetherError("bad_request", f"idProperty {values[0]!r} is not a property name")
        return values[0]

    def _target_of(self, segments: tuple[str, ...], query: str) -> Target | None:
        low = tuple(s.lower() for s in segments)
        if len(low) < 4 or low[0] != "crm":
            return None
        if low[1] == "v3" and low[2] == "objects":
            pass
        elif low[1] == "objects" and _DATED_VERSION.fullmatch(low[2]):
            pass
        else:
            return None
        prefix = tuple(low[:3])
        return Target(prefix=prefix, type_raw=segments[3], type=self.canonical_type(segments[3]),
                      rest=tuple(segments[4:]), id_property=self._id_property(query))

    def target(self, op: Operation) -> Target | None:
        """The objects path an operation addresses (None: not an objects path).

        Read from the path as forwarded (``op.segments`` may hold the canonical spelling)."""
        from proxy.normalise import decode_segments

        return self._target_of(decode_segments(op.path), op.query)

    # -- matching -------------------------------------------------------------------------------

    def param_pattern(self, name: str) -> re.Pattern[str] | None:
        """Type parameters take a type name or id; id parameters a numeric id or an idProperty lookup."""
        low = name.lower()
        if low in _TYPE_PARAMS:
            return self._type_re
        if low == "id" or name.endswith("Id") or low.endswith("_id"):
            return self._id_re
        return None

    def infer_operation(self, method: str, template: str, effect: str) -> str:
        """From the shape of a HubSpot path: a POST to ``search`` or ``batch/read`` reads."""
        segs = tuple(s.lower() for s in template.strip("/").split("/") if s)
        if method == "POST" and segs and (segs[-1] == "search" or segs[-2:] == ("batch", "read")):
            return "read"
        if effect == "read" or method in ("GET", "HEAD", "OPTIONS"):
            return "read"
        if method == "POST" and len(segs) >= 2 and segs[-2] == "batch":
            return {"create": "create", "update": "update", "archive": "delete",
                    "upsert": "upsert"}.get(segs[-1], "action")
        if len(segs) >= 4 and segs[0] == "crm" and (segs[1] == "v3" and segs[2] == "objects" or
                                                   segs[1] == "objects"):
            rest = segs[4:]
            if not rest:
                return "create" if method == "POST" else "action"
            if len(rest) == 1 and rest[0] not in _ITEM_WORDS:
                return {"PATCH": "update", "DELETE": "delete", "PUT": "upsert"}.get(method, "action")
            return "action"
        return super().infer_operation(method, template, effect)

    # -- what an operation does ---------------------------------------------------------------

    def kind_of(self, op: Operation) -> str:
        """What HubSpot executes: create | update | upsert | delete | read | batch:<action> | action."""
        t = self.target(op)
        if t is None:
            return getattr(op.capability, "operation", None) or "action"
        k = t.kind
        m = op.method
        if k == "collection":
            return "create" if m == "POST" else "read" if m in ("GET", "HEAD") else "action"
        if k == "item":
            return {"GET": "read", "HEAD": "read", "PATCH": "update", "DELETE": "delete", "PUT": "upsert"}.get(m, "action")
        if k == "search" and m == "POST":
            return "read"
        if k == "batch:read":
            return "read"
        if k.startswith("batch:") and m == "POST":
            return k
        return "action"

    # -- composite ------------------------------------------------------------------------------

    def is_composite(self, op: Operation) -> bool:
        """``POST .../{type}/batch/{create|update|archive|upsert}``; ``batch/read`` is a plain read."""
        if op.method != "POST":
            return False
        t = self.target(op)
        return t is not None and t.kind in tuple(f"batch:{a}" for a in BATCH_ACTIONS)

    def unpack(self, op: Operation) -> list[Operation] | None:
        """One sub-operation per input, each matched and granted on its own (see module docstring)."""
        from proxy.errors import TetherError

        if not self.is_composite(op):
            return None
        t = self.target(op)
        assert t is not None
        action = t.kind.split(":", 1)[1]
        body = op.body
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise TetherError("unsupported_composite", f"a HubSpot batch/{action} body is a JSON object with an "
                                                       "'inputs' array")
        extra = set(body) - {"inputs"}
        if extra:
            raise TetherError("unsupported_composite",
                              f"batch/{action}: unknown top-level field(s) {', '.join(sorted(extra))}; "
                              "Tether cannot tell what they would do")
        inputs = body["inputs"]
        if len(inputs) > self.max_batch_inputs:
            raise TetherError("unsupported_composite",
                              f"batch/{action} holds {len(inputs)} inputs; at most {self.max_batch_inputs}")
        subs: list[Operation] = []
        for i, item in enumerate(inputs):
            if not isinstance(item, dict):
                raise TetherError("unsupported_composite", f"batch/{action} input {i} is not a JSON object")
            if action == "create":
                if "id" in item or "idProperty" in item:
                    raise TetherError("unsupported_composite", f"batch/create input {i} names an id")
                sub = self.sub_operation("POST", t.collection_path, dict(item), i)
            else:
                rid = item.get("id")
                if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
                    raise TetherError("unsupported_composite", f"batch/{action} input {i} has no id")
                prop = item.get("idProperty")
                if prop is not None and (not isinstance(prop, str) or not _PROPERTY_NAME.fullmatch(prop)):
                    raise TetherError("unsupported_composite", f"batch/{action} input {i}: idProperty "
                                                               f"{prop!r} is not a property name")
                if action == "upsert" and prop is None:
                    raise TetherError("unsupported_composite",
                                      f"batch/upsert input {i} names no idProperty (the unique property to "
                                      "look the record up by)")
                if action == "archive" and prop is not None:
                    raise TetherError("unsupported_composite", f"batch/archive input {i}: archive takes record "
                                                               "ids only")
                url = t.item_path(str(rid)) + (f"?idProperty={quote(prop, safe='')}" if prop else "")
                rest = {k: v for k, v in item.items() if k not in ("id", "idProperty")}
                if action == "archive" and rest:
                    raise TetherError("unsupported_composite",
                                      f"batch/archive input {i}: unknown field(s) {', '.join(sorted(rest))}")
                method = {"update": "PATCH", "archive": "DELETE", "upsert": "PUT"}[action]
                sub = self.sub_operation(method, url, rest if action != "archive" else None, i,
                                         content_type="application/json" if action != "archive" else None)
            # matched by its canonical spelling (the upstream receives the outer request unchanged)
            sub.segments = self.canonical_segments(sub.segments, sub.query)
            subs.append(sub)
        return subs

    # -- dry-run --------------------------------------------------------------------------------

    def new_id(self, op: Operation) -> str:
        """A numeric string, like HubSpot's record ids."""
        return str(10**10 + secrets.randbelow(9 * 10**10))

    @staticmethod
    def _modified_name(type_name: str) -> str:
        return "lastmodifieddate" if type_name == "contacts" else "hs_lastmodifieddate"

    def _record(self, type_name: str, rid: str, props: dict[str, Any], created: bool) -> dict[str, Any]:
        now = _now()
        out = {k: _text(v) for k, v in props.items()}
        if _NUMERIC.fullmatch(rid):
            out["hs_object_id"] = rid
        if created:
            out["createdate"] = now
        out[self._modified_name(type_name)] = now
        return {"id": rid, "properties": out, "createdAt": now, "updatedAt": now, "archived": False}

    @staticmethod
    def _props(body: Any) -> dict[str, Any]:
        props = body.get("properties") if isinstance(body, dict) else None
        return dict(props) if isinstance(props, dict) else {}

    # -- what it does, in words -----------------------------------------------------------------

    name_fields = ("properties.dealname", ("properties.firstname", "properties.lastname"), "properties.name",
                   "properties.subject", "properties.hs_ticket_subject", "properties.email", "properties.domain",
                   "dealname", ("firstname", "lastname"), "name", "email")

    def record_kind(self, op: Operation) -> str:
        """``deal``, ``contact``, ``company`` (also for a type id such as ``0-3``)."""
        t = self.target(op)
        if t is None:
            return super().record_kind(op)
        for single in STANDARD_TYPES.get(t.type, ()):
            if not single[0].isdigit():
                return single.replace("_", " ")
        word = t.type
        return word[:-3] + "y" if word.endswith("ies") else word[:-1] if word.endswith("s") else word

    def field_label(self, field_name: str) -> str:
        """``properties.dealstage`` -> ``deal stage``."""
        from .base import humanise

        name = field_name.removeprefix("properties.")
        return {"dealstage": "deal stage", "dealname": "deal name", "closedate": "close date",
                "firstname": "first name", "lastname": "last name", "hubspot_owner_id": "owner",
                "lifecyclestage": "lifecycle stage"}.get(name, humanise(name))

    def synthetic_response(self, op: Operation, item_id: str) -> SyntheticResponse:
        t = self.target(op)
        kind = self.kind_of(op)
        type_name = t.type if t is not None else "objects"
        props = self._props(op.body)
        if kind == "create":
            return SyntheticResponse(201, self._record(type_name, self.new_id(op), props, created=True))
        if kind in ("update", "upsert"):
            rid = (t.item_id if t is not None else None) or self.new_id(op)
            if t is not None and t.id_property:
                props.setdefault(t.id_property, rid)
                if kind == "upsert":
                    rid = self.new_id(op)
            rec = self._record(type_name, rid, props, created=False)
            if kind == "upsert":
                rec["new"] = False
            return SyntheticResponse(200, rec)
        if kind == "delete":
            return SyntheticResponse(204)
        if kind == "read":
            return SyntheticResponse(200, {"total": 0, "results": []})
        return super().synthetic_response(op, item_id)

    def synthetic_composite(self, outer: Operation, ops: list[Operation], item_id: str) -> SyntheticResponse:
        """HubSpot's batch envelope: 201 for create, 200 for update/upsert, 204 for archive."""
        kind = self.kind_of(outer)
        if kind == "batch:archive":
            return SyntheticResponse(204)
        started = _now()
        results = []
        for op in ops:
            r = self.synthetic_response(op, item_id)
            if isinstance(r.body, dict):
                results.append(r.body)
        body = {"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": _now()}
        return SyntheticResponse(201 if kind == "batch:create" else 200, body)

    # -- outcome --------------------------------------------------------------------------------

    def is_failure(self, status: int, body: Any) -> bool:
        """4xx/5xx, and multi-status: a 207, or a batch answer listing errors, did not fully apply."""
        if status >= 400 or status == 207:
            return True
        if isinstance(body, dict):
            if body.get("status") == "CANCELED":
                return True
            n = body.get("numErrors")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return True
            errs = body.get("errors")
            if isinstance(errs, list) and errs:
                return True
        return False

    def result_for(self, op: Operation, body: Any) -> dict[str, Any] | None:
        """The result of one batch input in a batch answer, or None when it cannot be told for sure.

        HubSpot does not promise results in input order. An input is tied to its result by
        ``objectWriteTraceId`` when it sent one; else by its id (update) or idProperty value (upsert);
        else (create) by position when that result holds the input's properties, or by the only result
        that holds them."""
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or op.index is None:
            return None
        results = [r for r in results if isinstance(r, dict)]
        item = op.body if isinstance(op.body, dict) else {}
        trace = item.get("objectWriteTraceId")
        if trace is not None:
            hits = [r for r in results if r.get("objectWriteTraceId") == trace]
            return hits[0] if len(hits) == 1 else None
        t = self.target(op)
        kind = self.kind_of(op)
        if kind in ("update", "upsert") and t is not None and t.item_id is not None:
            rid = t.item_id
            if t.id_property:
                hits = [r for r in results if isinstance(r.get("properties"), dict)
                        and _same(r["properties"].get(t.id_property), rid)]
            else:
                hits = [r for r in results if str(r.get("id")) == rid]
            return hits[0] if len(hits) == 1 else None
        props = self._props(item)

        def holds(r: dict[str, Any]) -> bool:
            have = r.get("properties")
            return isinstance(have, dict) and all(_same(have.get(k), v) for k, v in props.items())

        if op.index < len(results) and holds(results[op.index]):
            return results[op.index]
        hits = [r for r in results if holds(r)]
        return hits[0] if len(hits) == 1 else None

    def created_ids(self, op: Operation, status: int, headers: dict[str, str], body: Any) -> list[str]:
        if status >= 300 or not isinstance(body, dict):
            return []
        kind = self.kind_of(op)
        if op.index is None:
            if kind == "create" and body.get("id") is not None:
                return [str(body["id"])]
            return []
        if kind not in ("create", "upsert"):
            return []
        r = self.result_for(op, body)
        if r is None or r.get("id") is None or (kind == "upsert" and r.get("new") is not True):
            return []
        return [str(r["id"])]

    # -- compensation ---------------------------------------------------------------------------

    def _touched(self, op: Operation) -> list[str]:
        names = list(self._props(op.body))
        return names + [p for p in (*self.provenance_properties, *self.record_fields) if p not in names]

    def pre_image_ok(self, plan: PlannedRequest, status: int, body: Any) -> bool:
        """A batch/read naming a record that does not exist answers 207: an answer, not a failure."""
        return status < 400

    def pre_image_request(self, op: Operation) -> PlannedRequest | None:
        """Update: GET the record with the touched properties; upsert: ``batch/read`` by idProperty (a
        missing record is an answer, not an error); archive: only when ``archive_undo: recreate``."""
        t = self.target(op)
        if t is None:
            return None
        kind = self.kind_of(op)
        if kind == "update" and t.item_id is not None:
            q = [f"properties={quote(','.join(self._touched(op)), safe=',')}"] if self._touched(op) else []
            if t.id_property:
                q.insert(0, f"idProperty={quote(t.id_property, safe='')}")
            return PlannedRequest("GET", t.item_path(t.item_id), "&".join(q), content_type=None)
        if kind == "upsert" and t.item_id is not None and t.id_property:
            return PlannedRequest("POST", t.collection_path + "/batch/read", body={
                "idProperty": t.id_property, "inputs": [{"id": t.item_id}],
                "properties": self._touched(op) + ([t.id_property] if t.id_property not in self._touched(op) else []),
                "propertiesWithHistory": []})
        if kind == "delete" and t.item_id is not None and self.archive_undo == "recreate":
            names = self.recreate_properties or DEFAULT_PROPERTIES.get(t.type)
            q = f"properties={quote(','.join(names), safe=',')}" if names else ""
            return PlannedRequest("GET", t.item_path(t.item_id), q, content_type=None)
        return None

    def plan_undo(self, op: Operation, pre_image: Any) -> UndoPlan:
        t = self.target(op)
        kind = self.kind_of(op)
        if t is None:
            raise NotCompensable(f"{op.method} {op.path} is not a HubSpot objects path this adapter can undo")
        written = {k: _text(v) for k, v in self._props(op.body).items()}
        if kind == "create":
            return UndoPlan("delete", PlannedRequest("DELETE", t.collection_path + "/{created_id}", content_type=None),
                            expect=written or None, note=f"archive the {t.type} record the write created")
        if kind == "update":
            return self._restore_plan(t, op, pre_image, written)
        if kind == "upsert":
            results = pre_image.get("results") if isinstance(pre_image, dict) else None
            if not isinstance(results, list):
                raise NotCompensable(f"no pre-image of the {t.type} record {t.id_property}={t.item_id}")
            if len(results) > 1:
                raise NotCompensable(f"{t.id_property}={t.item_id} names {len(results)} {t.type} records")
            if results:
                return self._restore_plan(t, op, results[0], written)
            return UndoPlan("delete", PlannedRequest("DELETE", t.collection_path + "/{created_id}", content_type=None),
                            pre_image={"results": []}, expect=written or None,
                            note=f"archive the {t.type} record the upsert created ({t.id_property}={t.item_id})")
        if kind == "delete":
            if self.archive_undo != "recreate":
                raise NotCompensable(
                    f"archiving a HubSpot {t.type} record cannot be undone through the API (HubSpot restores "
                    "archived records only in its UI, within 90 days); set archive_undo: recreate to re-create "
                    "it from a pre-image with a new id")
            if not isinstance(pre_image, dict) or not isinstance(pre_image.get("properties"), dict):
                raise NotCompensable(f"no pre-image of {op.path} to re-create")
            props = {k: _text(v) for k, v in pre_image["properties"].items()
                     if k not in READONLY_PROPERTIES and v not in (None, "")}
            return UndoPlan("recreate", PlannedRequest("POST", t.collection_path, body={"properties": props}),
                            pre_image=pre_image,
                            note=f"re-create the archived {t.type} record {pre_image.get('id')} from its pre-image: "
                                 "it gets a NEW id; associations and unread properties are lost")
        raise NotCompensable(f"the hubspot adapter cannot undo {op.method} {op.path} ({kind})")

    def _restore_plan(self, t: Target, op: Operation, pre_image: Any, written: dict[str, str]) -> UndoPlan:
        if not isinstance(pre_image, dict) or not isinstance(pre_image.get("properties"), dict) \
                or not _NUMERIC.fullmatch(str(pre_image.get("id", ""))):
            raise NotCompensable(f"no pre-image of the {t.type} record {op.path} to restore")
        before = pre_image["properties"]
        restore = {k: _text(before.get(k)) for k in self._touched(op)}
        rid = str(pre_image["id"])
        return UndoPlan("restore", PlannedRequest("PATCH", t.item_path(rid), body={"properties": restore}),
                        pre_image=pre_image, expect=written or None,
                        note=f"restore {', '.join(sorted(restore)) or 'nothing'} of {t.type} {rid}")

    def arm_undo(self, plan: UndoPlan, op: Operation, status: int, headers: dict[str, str], body: Any) -> UndoPlan:
        if plan.request is None or "{created_id}" not in plan.request.path:
            return plan
        if op.index is None:
            rid = body.get("id") if isinstance(body, dict) else None
        else:
            r = self.result_for(op, body)
            if r is not None and self.kind_of(op) == "upsert" and r.get("new") is not True:
                raise NotCompensable("the upsert updated a record that did not exist when Tether read it "
                                     "(someone created it meanwhile); archiving it would destroy their record")
            rid = r.get("id") if r is not None else None
        if rid is None or not _NUMERIC.fullmatch(str(rid)):
            raise NotCompensable("HubSpot's answer does not tell which record this write created")
        plan.request.path = plan.request.path.replace("{created_id}", str(rid))
        return plan

    def check_request(self, plan: UndoPlan) -> PlannedRequest | None:
        """Before restoring or archiving: read the properties the agent wrote."""
        if plan.kind in ("restore", "delete") and plan.request is not None:
            names = sorted(plan.expect or {})
            q = f"properties={quote(','.join(names), safe=',')}" if names else ""
            return PlannedRequest("GET", plan.request.path, q, content_type=None)
        return None

    def current_matches(self, plan: UndoPlan, current: Any) -> bool:
        if not plan.expect:
            return True
        props = current.get("properties") if isinstance(current, dict) else None
        if not isinstance(props, dict):
            return False
        return all(_same(props.get(k), v) for k, v in plan.expect.items())

    # -- provenance -----------------------------------------------------------------------------

    def stamp_provenance(self, op: Operation, fields: dict[str, str]) -> Any:
        """Provenance goes into ``properties`` (the configured names are HubSpot properties)."""
        if not fields or not isinstance(op.body, dict) or self.kind_of(op) not in ("create", "update", "upsert"):
            return None
        props = op.body.get("properties", {})
        if not isinstance(props, dict):
            return None
        return {**op.body, "properties": {**props, **fields}}

    def stamp_composite(self, outer: Operation, ops: list[Operation], fields: dict[str, str]) -> Any:
        """The batch body with provenance in every input's ``properties`` (create/update/upsert), or None.

        Proposed core hook: the gateway skips stamping composite requests today."""
        if not fields or not isinstance(outer.body, dict) or not isinstance(outer.body.get("inputs"), list):
            return None
        if self.kind_of(outer) not in ("batch:create", "batch:update", "batch:upsert"):
            return None
        inputs = []
        for item in outer.body["inputs"]:
            if not isinstance(item, dict):
                return None
            props = item.get("properties", {})
            if not isinstance(props, dict):
                return None
            inputs.append({**item, "properties": {**props, **fields}})
        return {**outer.body, "inputs": inputs}
