"""Salesforce REST API (``/services/data/vXX.X/...``): what the gateway cannot know generically.

Paths
    Object names are case-insensitive (``sobjects/opportunity`` is ``sobjects/Opportunity``), so a grant or
    a deny holds for every spelling. ``{id}`` parameters must be Salesforce ids (15 or 18 letters and
    digits), ``{version}`` a version segment such as ``v59.0``. ``POST ...?_HttpMethod=PATCH`` executes a
    PATCH, so it is matched as one; the override is honoured on POST only, spelled exactly ``_HttpMethod``
    with an upper-case method, and anything else that looks like an override is refused as ambiguous.

Operations (from a capability's template, after ``/sobjects/``)
    ``POST {Type}`` create; ``PATCH {Type}/{id}`` update; ``PATCH {Type}/{extField}/{value}`` upsert by
    external id; ``DELETE`` delete; GETs (records, ``query``, ``queryAll``) read; anything else an action.

Composite requests (every sub-request matched, granted and validated on its own)
    * ``/composite``: ``compositeRequest`` items. A reference ``@{ref.field}`` to an *earlier* item's
      ``referenceId`` is replaced, for matching only, by a syntactically valid placeholder id (with the key
      prefix of the object that item creates); a reference to anything else is refused
      (``unresolved_reference``), as are duplicate or malformed reference ids.
    * ``/composite/batch``: ``batchRequests`` with URLs relative to ``/services/data/``.
    * ``/composite/sobjects``: POST/PATCH ``records`` (one create/update per record, typed by
      ``attributes.type``), PATCH ``/composite/sobjects/{Type}/{extField}`` (one upsert per record),
      DELETE ``?ids=a,b`` (one delete per id, typed by the id's key prefix — an id whose prefix is unknown
      is refused, since its object cannot be told), GET ``?ids=`` and POST ``{"ids": [...]}`` (one read per id).
    * ``/composite/tree/{Type}``: one create per record, children included.
    Nested composites (a collections request inside ``/composite``), the graph API, binary batch parts and
    sub-request headers that carry credentials or method overrides are refused, never forwarded unread.

Dry-run answers are shaped as Salesforce's: create ``201 {"id", "success", "errors"}`` with an 18-character
id carrying the object's key prefix; update and delete ``204``; upsert ``201 {..., "created": true}`` (a
dry-run cannot tell whether the record exists, so it answers as the create it may be); and the composite,
batch, collections and tree envelopes.

Undo plans (inside a transaction)
    * create → DELETE the created record;
    * update → PATCH back the touched fields (plus ``restore_fields``, e.g. the provenance record fields)
      from a pre-image read with ``?fields=``;
    * upsert → the pre-image is a SOQL query on the external id: no match → delete what it creates, one
      match → restore that record's fields (re-decided when armed, from ``created`` in the response);
    * delete → **not compensable**: Salesforce's REST API cannot undelete (the recycle bin is reachable
      only through SOAP or Apex). With ``recreate_on_delete: true`` the record is re-created from its
      pre-image instead — as a *new* record with a *new* id, related records not re-attached.
    * composite: one undo per sub-request when the envelope is atomic (``/composite`` and
      ``/composite/sobjects`` with ``allOrNone: true``, ``/composite/tree`` always); otherwise
      (``/composite/batch``, ``allOrNone`` false) a partial failure could leave some sub-requests applied
      and others not, which Tether could not undo exactly, so each sub-request is non-compensable and the
      request is refused live inside a transaction. A sub-request whose target is a record created earlier
      in the same request needs no undo of its own (deleting the record undoes it); one whose target is
      only known from another sub-request's *result* (``@{q.records[0].Id}``) is non-compensable.

Conflict checks compare the fields the agent wrote with the record as it is before an undo
(``check_request`` + ``current_matches``; numbers numerically, date-times as instants). Salesforce's
ETag/If-Match works for Account records only and its If-Unmodified-Since needs the date read at undo
time, which the gateway's version mechanism (a response header sent back as If-Match) cannot express; so
``version_header`` is unset and :meth:`SalesforceAdapter.precondition_headers` says what an undo could
carry once the gateway asks for it.

Options (``adapter_options``): ``id_pattern``, ``api_version_pattern``, ``recreate_on_delete`` (bool),
``key_prefixes`` ({ObjectName: 3-character prefix}, added to the built-in table), ``restore_fields``
(field names always restored from the pre-image when undoing an update), ``readonly_fields`` (more
fields never written when re-creating).
"""

from __future__ import annotations

import copy
import re
import secrets
from dataclasses import dataclass, fields as dc_fields
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any, Iterator, Mapping
from urllib.parse import quote, urlencode

from proxy.errors import TetherError

from .base import (
    STANDARD_QUOTA_HEADERS,
    QuotaReading,
    QuotaWindow,
    standard_quota,
    Adapter,
    AdapterOptionsError,
    NotCompensable,
    Operation,
    PlannedRequest,
    SyntheticResponse,
    UndoPlan,
)

DEFAULT_ID_PATTERN = r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?"
DEFAULT_VERSION_PATTERN = r"v[0-9]{2,3}\.[0-9]"
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")  # sObject and field API names (Foo__c, ns__Bar__c)
_REFID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,79}")
_REF_RE = re.compile(r"@\{([^{}.\s]*)(?:\.([^{}]*))?\}")  # @{referenceId.field.path}
_PREFIX_RE = re.compile(r"[a-zA-Z0-9]{3}")
_SUFFIX_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_OVERRIDE_PARAMS = frozenset({"_httpmethod", "_method", "x-http-method-override"})
_OVERRIDE_TARGETS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
# Sub-request headers Salesforce takes from the outer request, and headers that would change the method.
_REFUSED_SUB_HEADERS = frozenset({"authorization", "accept", "content-type", "cookie", "proxy-authorization",
                                  "x-http-method-override", "x-method-override", "x-http-method"})

# Key prefixes of the standard objects an agent most often writes (the first 3 characters of their ids).
KEY_PREFIXES: dict[str, str] = {
    "Account": "001", "Note": "002", "Contact": "003", "User": "005", "Opportunity": "006",
    "Attachment": "00P", "Lead": "00Q", "Task": "00T", "Event": "00U", "Group": "00G",
    "OpportunityContactRole": "00K", "OpportunityLineItem": "00k", "CampaignMember": "00v",
    "RecordType": "012", "Pricebook2": "01s", "Product2": "01t", "PricebookEntry": "01u",
    "Asset": "02i", "ContentVersion": "068", "ContentDocument": "069", "AccountContactRelation": "07k",
    "Quote": "0Q0", "Case": "500", "Solution": "501", "Entitlement": "550", "Campaign": "701",
    "Contract": "800", "Order": "801",
}
# Fields a record read returns that are never written back (system and audit fields).
SYSTEM_FIELDS = frozenset({
    "attributes", "Id", "IsDeleted", "MasterRecordId", "CreatedDate", "CreatedById", "LastModifiedDate",
    "LastModifiedById", "SystemModstamp", "LastActivityDate", "LastViewedDate", "LastReferencedDate",
    "IsClosed", "IsWon", "ExpectedRevenue", "ForecastCategory", "FiscalQuarter", "FiscalYear", "Fiscal",
    "HasOpportunityLineItem", "HasOpenActivity", "HasOverdueTask", "PushCount", "LastStageChangeDate",
    "LastAmountChangedHistoryId", "LastCloseDateChangedHistoryId", "PhotoUrl", "Jigsaw", "JigsawCompanyId",
    "JigsawContactId", "CleanStatus", "IsEmailBounced", "EmailBouncedReason", "EmailBouncedDate", "Name_ext",
})


def to_18(id15: str) -> str:
    """The case-safe 18-character form of a 15-character id (the standard 3-character checksum)."""
    suffix = ""
    for i in range(3):
        bits = sum(1 << j for j, c in enumerate(id15[i * 5:i * 5 + 5]) if "A" <= c <= "Z")
        suffix += _SUFFIX_CHARS[bits]
    return id15 + suffix


@dataclass(slots=True)
class SalesforceOperation(Operation):
    """A sub-request of a composite request, with what the adapter learnt while unpacking it.

    (An adapter-private ``meta`` dict on :class:`Operation` would do the same; see the report.)"""

    envelope: str = ""  # composite | batch | collection | tree
    atomic: bool = False  # does the envelope apply whole or not at all (allOrNone, tree)?
    target_ref: str | None = None  # referenceId whose result names this sub-request's target record
    target_ref_creates: bool = False  # ... and that sub-request creates the record (reference to its .id)
    ref_type: str | None = None  # object type a tree/collection record declares in attributes.type


@dataclass(frozen=True, slots=True)
class _Path:
    """A request path read as Salesforce reads it."""

    version: str
    rest: tuple[str, ...]  # decoded segments after the version

    @property
    def low(self) -> tuple[str, ...]:
        return tuple(s.lower() for s in self.rest)

    def sobject(self) -> tuple[str, tuple[str, ...]] | None:
        """(object name, segments after it) for ``/sobjects/{Type}/...``."""
        if len(self.rest) >= 2 and self.rest[0].lower() == "sobjects":
            return self.rest[1], self.rest[2:]
        return None


def _meta(op: Operation) -> SalesforceOperation | None:
    return op if isinstance(op, SalesforceOperation) else None


def _wrap(op: Operation, **meta: Any) -> SalesforceOperation:
    base = {f.name: getattr(op, f.name) for f in dc_fields(Operation)}
    return SalesforceOperation(**base, **meta)


def _kind(op: Operation) -> str:
    return str(getattr(op.capability, "operation", "") or "")


def _ambiguous(message: str) -> TetherError:
    return TetherError("ambiguous_request", message)


def _unsupported(message: str) -> TetherError:
    return TetherError("unsupported_composite", message)


def _walk_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _walk_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_strings(v)


def _parse_instant(value: str) -> datetime | None:
    """Salesforce date-times (``2024-05-01T10:00:00.000+0000``, ``...Z``) as aware datetimes."""
    v = value.strip()
    if len(v) < 19 or v[10] != "T":
        return None
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    elif re.search(r"[+-]\d{4}$", v):
        v = v[:-2] + ":" + v[-2:]
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def same_value(written: Any, current: Any) -> bool:
    """Does the record still hold what was written, allowing for Salesforce's normalisation (1200 is
    1200.0; ``2024-05-01T10:00:00Z`` is ``2024-05-01T10:00:00.000+0000``)?"""
    if isinstance(written, bool) or isinstance(current, bool):
        return written is current
    if written == current:
        return True
    if isinstance(written, (int, float)) and isinstance(current, (int, float)):
        return float(written) == float(current)
    if isinstance(written, str) and isinstance(current, str):
        a, b = _parse_instant(written), _parse_instant(current)
        return a is not None and b is not None and a == b
    return False


def _soql_string(value: str) -> str:
    """A SOQL string literal (backslash escapes, as SOQL defines them)."""
    out = value.replace("\\", "\\\\").replace("'", "\\'")
    for raw, esc in (("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\b", "\\b"), ("\f", "\\f"), ('"', '\\"')):
        out = out.replace(raw, esc)
    return "'" + out + "'"


_LIMIT_INFO = re.compile(r"([a-z-]+)=(\d+)/(\d+)")


class SalesforceAdapter(Adapter):
    """Salesforce's REST API behind the adapter interface (see the module docstring for every decision)."""

    name = "salesforce"
    credential_headers = frozenset({"x-sfdc-session"})  # a session id in a header (Bulk API, older clients)
    case_insensitive_paths = True
    case_insensitive_fields = True
    id_pattern = DEFAULT_ID_PATTERN
    id_param_names = frozenset({"id", "recordId", "record_id"})
    name_param_names = frozenset({"sobject", "sobjectName", "object", "type", "field", "extField", "externalIdField"})
    version_header = None  # see precondition_headers
    quota_headers = STANDARD_QUOTA_HEADERS | {"sforce-limit-info"}

    def read_quota(self, status: int, headers: Mapping[str, str]) -> QuotaReading | None:
        """``Sforce-Limit-Info: api-usage=14999/15000`` (calls used of the org's rolling 24-hour allowance;
        ``per-app-api-usage=17/250(appName=x)`` too): Salesforce never says when it refills."""
        reading = standard_quota(status, headers) or QuotaReading()
        for part in (headers.get("sforce-limit-info") or "").split(";"):
            m = _LIMIT_INFO.match(part.strip())
            if m:
                used, limit = float(m.group(2)), float(m.group(3))
                reading.windows.append(QuotaWindow(m.group(1), max(0.0, limit - used), limit, None))
        return reading if reading.windows or reading.retry_after is not None else None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("id_pattern", "api_version_pattern", "recreate_on_delete", "key_prefixes", "restore_fields",
                "readonly_fields")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        o = dict(options or {})
        for opt in ("id_pattern", "api_version_pattern"):  # checked before the base class compiles id_pattern
            if opt in o:
                if not isinstance(o[opt], str) or not o[opt]:
                    raise AdapterOptionsError(f"{opt} must be a regular expression (a non-empty string)")
                try:
                    re.compile(o[opt])
                except re.error as exc:
                    raise AdapterOptionsError(f"{opt}: invalid regular expression: {exc}") from None
        super().__init__(o)
        self._version_re = re.compile(o.get("api_version_pattern") or DEFAULT_VERSION_PATTERN)
        self._id_re = re.compile(o.get("id_pattern") or DEFAULT_ID_PATTERN)
        recreate = o.get("recreate_on_delete", False)
        if not isinstance(recreate, bool):
            raise AdapterOptionsError("recreate_on_delete must be true or false")
        self.recreate_on_delete: bool = recreate
        prefixes = o.get("key_prefixes", {})
        if not isinstance(prefixes, dict):
            raise AdapterOptionsError("key_prefixes maps object names to 3-character key prefixes")
        table = dict(KEY_PREFIXES)
        for obj, pfx in prefixes.items():
            if not isinstance(obj, str) or not _NAME_RE.fullmatch(obj):
                raise AdapterOptionsError(f"key_prefixes: {obj!r} is not an object API name")
            if not isinstance(pfx, str) or not _PREFIX_RE.fullmatch(pfx):
                raise AdapterOptionsError(f"key_prefixes.{obj}: {pfx!r} is not a 3-character key prefix")
            table = {k: v for k, v in table.items() if k.lower() != obj.lower()}
            table[obj] = pfx
        self._prefix_of = {k.lower(): v for k, v in table.items()}
        self._type_of_prefix = {pfx: obj for obj, pfx in table.items()}  # options come last, so they win
        self.restore_fields = self._field_list("restore_fields")
        self.readonly_fields = frozenset(SYSTEM_FIELDS | set(self._field_list("readonly_fields")))
        # The gateway may set this to the upstream's provenance record fields (restored on undo too).
        self.record_fields: tuple[str, ...] = ()

    def _field_list(self, opt: str) -> tuple[str, ...]:
        value = self.options.get(opt, [])
        if not isinstance(value, list) or not all(isinstance(f, str) and _NAME_RE.fullmatch(f) for f in value):
            raise AdapterOptionsError(f"{opt} must be a list of field API names")
        return tuple(value)

    # -- matching -------------------------------------------------------------------------------

    def param_pattern(self, name: str) -> re.Pattern[str] | None:
        """``{version}`` is ``vNN.N``; id parameters are Salesforce ids; object and field names are API names."""
        if name == "version":
            return self._version_re
        if name in self.id_param_names or ((name.endswith("_id") or name.endswith("Id"))
                                           and not name.lower().startswith("ext")):
            return self._id_re
        if name in self.name_param_names:
            return _NAME_RE
        return None

    def infer_operation(self, method: str, template: str, effect: str) -> str:
        if effect == "read":
            return "read"
        segs = [s for s in template.strip("/").split("/") if s]
        low = [s.lower() for s in segs]
        if "composite" in low or "sobjects" not in low:
            return "action"
        tail = segs[low.index("sobjects") + 1:]
        n = len(tail)
        if n == 1:
            return "create" if method == "POST" else "action"
        if n == 2:
            if method == "POST":  # POST /sobjects/{Type}/Id: Id as the external id with no value creates
                return "create"
            if method in ("PATCH", "PUT"):
                return "update"
            if method == "DELETE":
                return "delete"
        if n == 3:
            second = tail[1]
            relationship = second.startswith("{") and self.param_pattern(second[1:-1]) is self._id_re
            if relationship:  # /sobjects/{Type}/{id}/{relationship}: the related record
                return {"PATCH": "update", "DELETE": "delete"}.get(method, "action")
            if method in ("PATCH", "POST"):
                return "upsert"
            if method == "DELETE":
                return "delete"
        return "action"

    def method_override(self, method: str, query: list[tuple[str, str]]) -> str | None:
        """Salesforce runs ``POST ...?_HttpMethod=PATCH`` as a PATCH; only that exact spelling, on POST."""
        found = [(k, v) for k, v in query if k.lower() in _OVERRIDE_PARAMS]
        if not found:
            return None
        if method != "POST":
            raise _ambiguous("Salesforce honours _HttpMethod on POST only; send the real method")
        if len(found) > 1:
            raise _ambiguous("more than one method-override query parameter")
        key, value = found[0]
        if key != "_HttpMethod":
            raise _ambiguous(f"query parameter {key!r}: Salesforce's override is spelled _HttpMethod")
        if value not in _OVERRIDE_TARGETS:
            raise _ambiguous(f"_HttpMethod={value!r} is not an upper-case HTTP method")
        return value

    def _path(self, segments: tuple[str, ...]) -> _Path | None:
        if len(segments) >= 3 and segments[0].lower() == "services" and segments[1].lower() == "data" \
                and self._version_re.fullmatch(segments[2]):
            return _Path(segments[2], segments[3:])
        return None

    # -- composite ------------------------------------------------------------------------------

    def is_composite(self, op: Operation) -> bool:
        """Every ``.../composite...`` resource (tooling's too): unknown shapes are refused, not forwarded."""
        p = self._path(op.segments)
        if p is None or not p.rest:
            return False
        low = p.low
        return low[0] == "composite" or (low[0] == "tooling" and len(low) > 1 and low[1] == "composite")

    def unpack(self, op: Operation) -> list[Operation] | None:
        p = self._path(op.segments)
        if p is None or not self.is_composite(op):
            return None
        low = p.low
        base = f"/services/data/{p.version}"
        if low[0] == "tooling":
            raise _unsupported("tooling composite requests are not unpacked by Tether")
        if low == ("composite",):
            self._need_method(op, "POST")
            return self._unpack_composite(op)
        if low == ("composite", "batch"):
            self._need_method(op, "POST")
            return self._unpack_batch(op)
        if low[:2] == ("composite", "sobjects"):
            return self._unpack_collection(op, p, base)
        if low[:2] == ("composite", "tree") and len(low) == 3:
            self._need_method(op, "POST")
            return self._unpack_tree(op, p.rest[2], base)
        raise _unsupported(f"{op.method} {op.path}: Tether does not unpack this composite resource "
                           "(composite, composite/batch, composite/sobjects and composite/tree are supported)")

    @staticmethod
    def _need_method(op: Operation, method: str) -> None:
        if op.method != method:
            raise _unsupported(f"{op.path} takes {method}, not {op.method}")

    @staticmethod
    def _body(op: Operation) -> dict[str, Any]:
        if not isinstance(op.body, dict):
            raise _unsupported("the composite request's body must be a JSON object")
        return op.body

    def _sub(self, method: Any, url: Any, body: Any, index: int, ref: str | None = None,
             base_prefix: str = "", **meta: Any) -> SalesforceOperation:
        """Build and check one sub-operation (validated like a top-level target by ``sub_operation``)."""
        if isinstance(url, str) and url.startswith("/") and not url.lower().startswith("/services/data/"):
            raise _unsupported(f"sub-request {index}: url {url!r} must start with /services/data/")
        sub = self.sub_operation(method, url, body, index, ref=ref, base_prefix=base_prefix)
        if sub.query:
            from proxy.normalise import parse_query

            if any(k.lower() in _OVERRIDE_PARAMS for k, _ in parse_query(sub.query)):
                raise _ambiguous(f"sub-request {index}: a method override inside a composite request is refused; "
                                 "give the real method")
        if self._path(sub.segments) is None:
            raise _unsupported(f"sub-request {index}: {sub.path} is not a /services/data/vNN.N/ resource")
        if self.is_composite(sub):
            raise _unsupported(f"sub-request {index}: a composite request inside a composite request is not "
                               "unpacked by Tether; send it on its own")
        return _wrap(sub, **meta)

    def _check_sub_headers(self, index: int, headers: Any) -> None:
        if headers is None:
            return
        if not isinstance(headers, dict):
            raise _unsupported(f"sub-request {index}: httpHeaders must be an object")
        from proxy.headers import canonical_name

        for name in headers:
            canon = canonical_name(str(name))
            if canon in _REFUSED_SUB_HEADERS or canon.startswith("x-tether-"):
                raise _ambiguous(f"sub-request {index}: header {name!r} may not be set on a sub-request")

    def _unpack_composite(self, op: Operation) -> list[Operation]:
        doc = self._body(op)
        items = doc.get("compositeRequest")
        if not isinstance(items, list) or not items:
            raise _unsupported("compositeRequest must be a non-empty list")
        atomic = doc.get("allOrNone") is True
        earlier: dict[str, str | None] = {}  # referenceId -> object type it creates (None: not a create)
        subs: list[Operation] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _unsupported(f"sub-request {i} is not an object")
            ref = item.get("referenceId")
            if not isinstance(ref, str) or not _REFID_RE.fullmatch(ref):
                raise _unsupported(f"sub-request {i}: referenceId must start with a letter and hold letters, "
                                   "digits and '_'")
            if ref.lower() in {r.lower() for r in earlier}:
                raise _ambiguous(f"sub-request {i}: referenceId {ref!r} is used twice")
            self._check_sub_headers(i, item.get("httpHeaders"))
            url = item.get("url")
            if not isinstance(url, str):
                raise _unsupported(f"sub-request {i} has no url")
            body = item.get("body")
            for text in _walk_strings(body):
                for name, _ in _REF_RE.findall(text):
                    self._resolve(earlier, name, i)
            path_part, sep, query_part = url.partition("?")
            target_ref: str | None = None
            target_creates = False

            def placeholder(m: re.Match[str]) -> str:
                nonlocal target_ref, target_creates
                name, field = m.group(1), m.group(2) or ""
                created = self._resolve(earlier, name, i)
                target_ref = name
                target_creates = created is not None and field.lower() == "id"
                return to_18((self._prefix_of.get(created.lower(), "000") if created else "000") + "0" * 12)

            for name, _ in _REF_RE.findall(query_part):
                self._resolve(earlier, name, i)
            url_for_matching = _REF_RE.sub(placeholder, path_part) + sep + query_part
            sub = self._sub(item.get("method"), url_for_matching, body, i, ref=ref, envelope="composite",
                            atomic=atomic, target_ref=target_ref, target_ref_creates=target_creates)
            earlier[ref] = self._created_type(sub)
            subs.append(sub)
        return subs

    @staticmethod
    def _resolve(earlier: dict[str, str | None], name: str, index: int) -> str | None:
        for ref, created in earlier.items():
            if ref == name:
                return created
        raise TetherError("unresolved_reference",
                          f"sub-request {index} refers to @{{{name}...}}, which is not the referenceId of an earlier "
                          "sub-request; the whole composite request is refused")

    def _created_type(self, op: Operation) -> str | None:
        """The object type a sub-request creates (POST /sobjects/{Type}), else None."""
        p = self._path(op.segments)
        so = p.sobject() if p else None
        if op.method == "POST" and so is not None and (not so[1] or (len(so[1]) == 1 and so[1][0].lower() == "id")):
            return so[0]
        return None

    def _unpack_batch(self, op: Operation) -> list[Operation]:
        doc = self._body(op)
        items = doc.get("batchRequests")
        if not isinstance(items, list) or not items:
            raise _unsupported("batchRequests must be a non-empty list")
        subs: list[Operation] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _unsupported(f"sub-request {i} is not an object")
            if item.get("binaryPartName") is not None or item.get("binaryPartNameAlias") is not None:
                raise _unsupported(f"sub-request {i}: binary parts cannot be inspected")
            url = item.get("url")
            if isinstance(url, str) and _REF_RE.search(url):
                raise TetherError("unresolved_reference", f"sub-request {i}: batch requests have no references")
            subs.append(self._sub(item.get("method"), url, item.get("richInput"), i,
                                  base_prefix="/services/data", envelope="batch", atomic=False))
        return subs

    def _record_type(self, rec: dict[str, Any], index: int) -> str:
        attrs = rec.get("attributes")
        rtype = attrs.get("type") if isinstance(attrs, dict) else None
        if not isinstance(rtype, str) or not _NAME_RE.fullmatch(rtype):
            raise _unsupported(f"record {index}: attributes.type must name the record's object")
        return rtype

    def _unpack_collection(self, op: Operation, p: _Path, base: str) -> list[Operation]:
        extra = p.rest[2:]
        method = op.method
        if method == "DELETE" and not extra:
            return self._unpack_collection_delete(op, base)
        if method in ("GET", "POST") and len(extra) == 1:
            return self._unpack_collection_retrieve(op, base, extra[0])
        if method not in ("POST", "PATCH") or (method == "POST" and extra) or \
                (method == "PATCH" and len(extra) not in (0, 2)):
            raise _unsupported(f"{method} {op.path} is not an sObject Collections request Tether unpacks")
        doc = self._body(op)
        records = doc.get("records")
        if not isinstance(records, list) or not records:
            raise _unsupported("records must be a non-empty list")
        atomic = doc.get("allOrNone") is True
        subs: list[Operation] = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise _unsupported(f"record {i} is not an object")
            rtype = self._record_type(rec, i)
            fields = {k: v for k, v in rec.items() if k != "attributes"}
            if method == "POST":
                url = f"{base}/sobjects/{rtype}"
            elif not extra:
                ids = [k for k in fields if k.lower() == "id"]
                if len(ids) != 1 or not isinstance(fields[ids[0]], str):
                    raise _unsupported(f"record {i}: an update needs exactly one id")
                rid = fields.pop(ids[0])
                url = f"{base}/sobjects/{rtype}/{rid}"
            else:
                obj, ext = extra
                if rtype.lower() != obj.lower():
                    raise _unsupported(f"record {i}: attributes.type {rtype!r} is not {obj!r} named in the URL")
                keys = [k for k in fields if k.lower() == ext.lower()]
                if len(keys) != 1 or not isinstance(fields[keys[0]], (str, int)) or isinstance(fields[keys[0]], bool):
                    raise _unsupported(f"record {i}: an upsert needs exactly one value of {ext}")
                value = str(fields.pop(keys[0]))
                url = f"{base}/sobjects/{obj}/{ext}/{quote(value, safe='')}"
            subs.append(self._sub(method, url, fields, i, envelope="collection", atomic=atomic, ref_type=rtype))
        return subs

    def _ids_param(self, op: Operation) -> tuple[list[str], dict[str, str]]:
        from proxy.normalise import parse_query

        pairs = parse_query(op.query)
        names = [k for k, _ in pairs]
        if len(names) != len({n.lower() for n in names}):
            raise _ambiguous("a query parameter is repeated")
        params = {k: v for k, v in pairs}
        ids = [x for x in params.get("ids", "").split(",")]
        if not ids or any(not self._id_re.fullmatch(x) for x in ids):
            raise _unsupported("ids must be a comma-separated list of record ids")
        return ids, params

    def _unpack_collection_delete(self, op: Operation, base: str) -> list[Operation]:
        ids, params = self._ids_param(op)
        atomic = params.get("allOrNone", "false").lower() == "true"
        subs: list[Operation] = []
        for i, rid in enumerate(ids):
            rtype = self._type_of_prefix.get(rid[:3])
            if rtype is None:
                raise _unsupported(f"id {rid}: its key prefix {rid[:3]!r} names no object Tether knows, so the "
                                   "delete cannot be matched to a capability (add it to adapter option key_prefixes)")
            subs.append(self._sub("DELETE", f"{base}/sobjects/{rtype}/{rid}", None, i, envelope="collection",
                                  atomic=atomic, ref_type=rtype))
        return subs

    def _unpack_collection_retrieve(self, op: Operation, base: str, obj: str) -> list[Operation]:
        if op.method == "GET":
            ids, params = self._ids_param(op)
            fields = params.get("fields")
        else:
            doc = self._body(op)
            ids, fields = doc.get("ids"), doc.get("fields")
            if not isinstance(ids, list) or not ids or not all(isinstance(x, str) and self._id_re.fullmatch(x)
                                                               for x in ids):
                raise _unsupported("ids must be a non-empty list of record ids")
            fields = ",".join(fields) if isinstance(fields, list) and all(isinstance(f, str) for f in fields) else None
        query = "?" + urlencode({"fields": fields}) if fields else ""
        return [self._sub("GET", f"{base}/sobjects/{obj}/{rid}{query}", None, i, envelope="collection", atomic=True,
                          ref_type=obj) for i, rid in enumerate(ids)]

    def _unpack_tree(self, op: Operation, obj: str, base: str) -> list[Operation]:
        doc = self._body(op)
        records = doc.get("records")
        if not isinstance(records, list) or not records:
            raise _unsupported("records must be a non-empty list")
        subs: list[Operation] = []
        refs: set[str] = set()

        def walk(recs: Any, expected: str | None) -> None:
            if not isinstance(recs, list):
                raise _unsupported("child records must be {\"records\": [...]}")
            for rec in recs:
                i = len(subs)
                if not isinstance(rec, dict):
                    raise _unsupported(f"record {i} is not an object")
                rtype = self._record_type(rec, i)
                if expected is not None and rtype.lower() != expected.lower():
                    raise _unsupported(f"record {i}: attributes.type {rtype!r} is not {expected!r} named in the URL")
                ref = rec["attributes"].get("referenceId")
                if not isinstance(ref, str) or not _REFID_RE.fullmatch(ref):
                    raise _unsupported(f"record {i}: attributes.referenceId is required")
                if ref.lower() in refs:
                    raise _ambiguous(f"record {i}: referenceId {ref!r} is used twice")
                refs.add(ref.lower())
                children = {k: v for k, v in rec.items()
                            if k != "attributes" and isinstance(v, dict) and "records" in v}
                fields = {k: v for k, v in rec.items() if k != "attributes" and k not in children}
                subs.append(self._sub("POST", f"{base}/sobjects/{rtype}", fields, i, ref=ref, envelope="tree",
                                      atomic=True, ref_type=rtype))
                for rel in children.values():
                    walk(rel.get("records"), None)

        walk(records, obj)
        return subs

    # -- dry-run --------------------------------------------------------------------------------

    def _object(self, op: Operation) -> tuple[str, str, tuple[str, ...]] | None:
        """(version, object name, segments after it) of an ``/sobjects/`` operation."""
        p = self._path(op.segments)
        so = p.sobject() if p else None
        return (p.version, so[0], so[1]) if p and so else None

    def key_prefix(self, object_name: str) -> str:
        if object_name.lower() in self._prefix_of:
            return self._prefix_of[object_name.lower()]
        return "a00" if object_name.lower().endswith("__c") else "000"

    def new_id(self, op: Operation) -> str:
        obj = self._object(op)
        prefix = self.key_prefix(obj[1]) if obj else "000"
        return to_18(prefix + "TT0" + "".join(secrets.choice(_BASE62) for _ in range(9)))

    def _synthetic(self, op: Operation) -> tuple[int, Any, dict[str, str], str | None]:
        """(status, body, headers, record id) of one operation's synthetic answer."""
        kind = _kind(op)
        obj = self._object(op)
        if kind in ("create", "upsert"):
            rid = self.new_id(op)
            body: dict[str, Any] = {"id": rid, "success": True, "errors": []}
            if kind == "upsert":
                body["created"] = True
            loc = f"/services/data/{obj[0]}/sobjects/{obj[1]}/{rid}" if obj else None
            return 201, body, ({"Location": loc} if loc else {}), rid
        target = obj[2][0] if obj and len(obj[2]) == 1 else op.params.get("id")
        if kind in ("update", "delete"):
            return 204, None, {}, target
        if kind == "read":
            if obj is not None and len(obj[2]) == 1:
                return 200, {"attributes": {"type": obj[1], "url": op.path}, "Id": obj[2][0]}, {}, target
            return 200, {"totalSize": 0, "done": True, "records": []}, {}, None
        return 200, {"success": True, "errors": []}, {}, None

    # -- what it does, in words -----------------------------------------------------------------

    name_fields = ("Name", ("FirstName", "LastName"), "Subject", "CaseNumber", "Title", "Email")
    _FIELD_LABELS = {"stagename": "stage", "closedate": "close date", "accountid": "account", "ownerid": "owner",
                     "leadsource": "lead source", "nextstep": "next step", "recordtypeid": "record type",
                     "forecastcategoryname": "forecast category"}

    def record_kind(self, op: Operation) -> str:
        """The sObject type: as the capability's template spells it when it names one, else the request."""
        for source in (getattr(getattr(op.capability, "config", None), "path", None), op.path):
            segs = [s for s in (source or "").split("/") if s]
            low = [s.lower() for s in segs]
            if "sobjects" in low[:-1]:
                name = segs[low.index("sobjects") + 1]
                if not name.startswith("{"):
                    return name
        sub = _meta(op)
        return (sub.ref_type if sub is not None and sub.ref_type else None) or "record"

    def field_label(self, field_name: str) -> str:
        """``StageName`` -> ``stage``; a custom field's ``__c`` suffix is dropped (``Renewal_Risk__c`` ->
        ``renewal risk``)."""
        from .base import humanise

        known = self._FIELD_LABELS.get(field_name.lower())
        if known:
            return known
        return humanise(re.sub(r"__c$", "", field_name))

    def synthetic_response(self, op: Operation, item_id: str) -> SyntheticResponse:
        status, body, _, _ = self._synthetic(op)  # a plain create answers with its body only (no Location)
        return SyntheticResponse(status, body)

    def synthetic_composite(self, outer: Operation, ops: list[Operation], item_id: str) -> SyntheticResponse:
        meta = _meta(ops[0]) if ops else None
        envelope = meta.envelope if meta else ""
        answers = [self._synthetic(op) for op in ops]
        if envelope == "composite":
            return SyntheticResponse(200, {"compositeResponse": [
                {"body": body, "httpHeaders": headers, "httpStatusCode": status, "referenceId": op.ref}
                for op, (status, body, headers, _) in zip(ops, answers)]})
        if envelope == "batch":
            return SyntheticResponse(200, {"hasErrors": False, "results": [
                {"statusCode": status, "result": body} for status, body, _, _ in answers]})
        if envelope == "tree":
            return SyntheticResponse(201, {"hasErrors": False, "results": [
                {"referenceId": op.ref, "id": rid} for op, (_, _, _, rid) in zip(ops, answers)]})
        out = []
        for op, (status, body, _, rid) in zip(ops, answers):
            if _kind(op) == "read":
                out.append(body)
                continue
            item: dict[str, Any] = {"id": rid, "success": True, "errors": []}
            if _kind(op) == "upsert":
                item["created"] = True
            out.append(item)
        return SyntheticResponse(200, out)

    # -- outcome --------------------------------------------------------------------------------

    def is_failure(self, status: int, body: Any) -> bool:
        """4xx/5xx; 300 (several records match an external id: nothing was written); and composite bodies
        that report a failed sub-request although the request as a whole answered 200."""
        if status >= 300:
            return True
        if isinstance(body, dict):
            if body.get("hasErrors") is True or body.get("success") is False:
                return True
            cr = body.get("compositeResponse")
            if isinstance(cr, list) and any(isinstance(x, dict) and isinstance(x.get("httpStatusCode"), int)
                                            and x["httpStatusCode"] >= 400 for x in cr):
                return True
        if isinstance(body, list) and body and all(isinstance(x, dict) and "success" in x for x in body):
            return any(x.get("success") is not True for x in body)
        return False

    def _result_for(self, op: Operation, status: int, body: Any) -> tuple[int, Any] | None:
        """This operation's own (status, body) inside the response to its request."""
        meta = _meta(op)
        if meta is None or not meta.envelope:
            return status, body
        env = meta.envelope
        if env == "composite" and isinstance(body, dict) and isinstance(body.get("compositeResponse"), list):
            for item in body["compositeResponse"]:
                if isinstance(item, dict) and item.get("referenceId") == op.ref:
                    code = item.get("httpStatusCode")
                    return (code if isinstance(code, int) else 500), item.get("body")
            return None
        if env == "batch" and isinstance(body, dict) and isinstance(body.get("results"), list):
            results = body["results"]
            if op.index is not None and op.index < len(results) and isinstance(results[op.index], dict):
                r = results[op.index]
                code = r.get("statusCode")
                return (code if isinstance(code, int) else 500), r.get("result")
            return None
        if env == "tree" and isinstance(body, dict) and isinstance(body.get("results"), list):
            for r in body["results"]:
                if isinstance(r, dict) and r.get("referenceId") == op.ref:
                    ok = isinstance(r.get("id"), str) and not r.get("errors")
                    return (201 if ok else 400), {"id": r.get("id"), "success": ok, "errors": r.get("errors") or []}
            return None
        if env == "collection" and isinstance(body, list):
            if op.index is not None and op.index < len(body) and isinstance(body[op.index], dict):
                r = body[op.index]
                ok = r.get("success") is True
                return (201 if ok and _kind(op) == "create" else 200 if ok else 400), r
            return None
        return None

    def created_ids(self, op: Operation, status: int, headers: dict[str, str], body: Any) -> list[str]:
        found = self._result_for(op, status, body)
        if found is None:
            return []
        code, b = found
        if code >= 300 or not isinstance(b, dict) or b.get("success") is False:
            return []
        kind = _kind(op)
        if kind == "create" or (kind == "upsert" and b.get("created") is True):
            rid = b.get("id")
            return [rid] if isinstance(rid, str) and rid else []
        return []

    # -- compensation ---------------------------------------------------------------------------

    def _touched(self, op: Operation) -> dict[str, Any] | None:
        """The fields a write sets, or None when they cannot be named safely (then: no field list)."""
        body = op.body if isinstance(op.body, dict) else {}
        fields = {k: v for k, v in body.items() if k != "attributes"}
        if not all(_NAME_RE.fullmatch(k) for k in fields):
            return None
        return fields

    def _restore_names(self, touched: dict[str, Any]) -> list[str]:
        names = list(touched)
        lower = {n.lower() for n in names}
        for f in (*self.restore_fields, *self.record_fields):
            if f.lower() not in lower:
                names.append(f)
                lower.add(f.lower())
        return names

    def pre_image_request(self, op: Operation) -> PlannedRequest | None:
        kind = _kind(op)
        meta = _meta(op)
        if meta is not None and meta.target_ref is not None:
            return None  # the target is only known when Salesforce runs the request
        obj = self._object(op)
        if obj is None:
            return None
        version, otype, tail = obj
        touched = self._touched(op)
        if kind == "update":
            query = urlencode({"fields": ",".join(self._restore_names(touched))}) if touched else ""
            return PlannedRequest("GET", op.path, query, content_type=None)
        if kind == "upsert" and len(tail) == 2:
            if touched is None or not _NAME_RE.fullmatch(tail[0]):
                return None
            names = ["Id"] + [n for n in self._restore_names(touched) if n.lower() != "id"]
            soql = f"SELECT {', '.join(names)} FROM {otype} WHERE {tail[0]} = {_soql_string(tail[1])}"
            return PlannedRequest("GET", f"/services/data/{version}/query", urlencode({"q": soql}),
                                  content_type=None)
        if kind == "delete" and self.recreate_on_delete:
            return PlannedRequest("GET", op.path, content_type=None)
        return None

    def plan_undo(self, op: Operation, pre_image: Any) -> UndoPlan:
        kind = _kind(op)
        meta = _meta(op)
        if meta is not None and meta.envelope and not meta.atomic:
            what = "composite/batch" if meta.envelope == "batch" else f"this {meta.envelope} request without allOrNone: true"
            raise NotCompensable(
                f"{what} may apply some sub-requests and not others, which Tether cannot undo exactly; inside a "
                "transaction use /composite or /composite/sobjects with allOrNone: true, or send the writes one by one")
        obj = self._object(op)
        if obj is None:
            raise NotCompensable(f"the salesforce adapter cannot undo {op.method} {op.path}")
        version, otype, tail = obj
        touched = self._touched(op)
        if meta is not None and meta.target_ref is not None and kind in ("update", "delete", "upsert"):
            if meta.target_ref_creates:
                return UndoPlan("covered", None, note=f"the record is created by sub-request {meta.target_ref!r} of "
                                                      "the same request; undoing that create deletes it")
            raise NotCompensable(f"the target record comes from sub-request {meta.target_ref!r}'s result, known only "
                                 "when Salesforce runs the request, so its pre-image cannot be read beforehand")
        item = f"/services/data/{version}/sobjects/{otype}"
        if kind == "create":
            if tail and not (len(tail) == 1 and tail[0].lower() == "id"):
                raise NotCompensable(f"cannot tell which record {op.method} {op.path} creates")
            return UndoPlan("delete", PlannedRequest("DELETE", item + "/{created_id}", content_type=None),
                            expect=touched or None, note=f"delete the {otype} the write created")
        if kind == "update":
            if touched is None:
                raise NotCompensable("the write names fields that are not Salesforce field names")
            if not isinstance(pre_image, dict):
                raise NotCompensable(f"no pre-image of {op.path} to restore")
            return self._restore_plan(op.path.rstrip("/"), touched, pre_image)
        if kind == "upsert":
            if touched is None or not isinstance(pre_image, dict) or not isinstance(pre_image.get("records"), list):
                raise NotCompensable("the upsert's target could not be looked up by its external id")
            records = pre_image["records"]
            if not records:
                return UndoPlan("delete", PlannedRequest("DELETE", item + "/{created_id}", content_type=None),
                                expect=touched or None,
                                note=f"no {otype} has {tail[0]} = {tail[1]!r}: the upsert creates one; delete it")
            if len(records) > 1:
                return UndoPlan("none", None, note=f"several {otype} records have {tail[0]} = {tail[1]!r}: "
                                                   "Salesforce refuses the upsert (300), so nothing changes")
            rec = records[0]
            if not isinstance(rec, dict) or not self.valid_id(rec.get("Id")):
                raise NotCompensable("the record matching the upsert has no valid Id")
            return self._restore_plan(f"{item}/{rec['Id']}", touched, rec)
        if kind == "delete":
            if not self.recreate_on_delete:
                raise NotCompensable(
                    "Salesforce's REST API has no undelete (the recycle bin is reachable only through SOAP or Apex); "
                    "set adapter option recreate_on_delete: true to re-create deleted records from their pre-image "
                    "with a new id")
            if not isinstance(pre_image, dict):
                raise NotCompensable(f"no pre-image of {op.path} to re-create")
            body = {k: v for k, v in pre_image.items()
                    if k not in self.readonly_fields and not isinstance(v, (dict, list))}
            return UndoPlan("recreate", PlannedRequest("POST", item, body=body), pre_image=pre_image,
                            note=f"re-create the {otype} from its pre-image as a NEW record with a NEW id (Salesforce's "
                                 "REST API cannot undelete); records that pointed to the old id are not re-attached")
        raise NotCompensable(f"the salesforce adapter cannot undo a {kind or 'custom'} operation ({op.method} {op.path})")

    def _restore_plan(self, path: str, touched: dict[str, Any], pre_image: dict[str, Any]) -> UndoPlan:
        current = {k.lower(): v for k, v in pre_image.items()}
        restore: dict[str, Any] = {}
        for name in self._restore_names(touched):
            if name in self.readonly_fields:
                continue
            restore[name] = current.get(name.lower())
        return UndoPlan("restore", PlannedRequest("PATCH", path, body=restore), pre_image=pre_image,
                        expect=dict(touched) or None, note=f"restore {', '.join(restore) or 'nothing'}")

    def arm_undo(self, plan: UndoPlan, op: Operation, status: int, headers: dict[str, str], body: Any) -> UndoPlan:
        found = self._result_for(op, status, body)
        if found is None:
            raise NotCompensable("the response does not say what this sub-request did")
        code, sub = found
        if code >= 300 or (isinstance(sub, dict) and sub.get("success") is False):
            return UndoPlan("none", None, note=f"the sub-request failed ({code}); nothing to undo")
        kind = _kind(op)
        created = isinstance(sub, dict) and sub.get("created") is True
        if plan.request is not None and "{created_id}" in plan.request.path:
            if kind == "upsert" and not created:
                raise NotCompensable("the upsert updated a record that did not exist when the undo was planned; "
                                     "its earlier values are unknown")
            ids = self.created_ids(op, status, headers, body)
            if not ids:
                raise NotCompensable("the response named no created id")
            if not self.valid_id(ids[0]):
                raise NotCompensable(f"the response names the created id {ids[0][:80]!r}, which is not a Salesforce id")
            plan.request.path = plan.request.path.replace("{created_id}", ids[0])
        elif kind == "upsert" and created:
            obj = self._object(op)
            ids = self.created_ids(op, status, headers, body)
            if obj is None or not ids or not self.valid_id(ids[0]):
                raise NotCompensable("the upsert created a record whose id the response did not name")
            return UndoPlan("delete", PlannedRequest("DELETE", f"/services/data/{obj[0]}/sobjects/{obj[1]}/{ids[0]}",
                                                     content_type=None),
                            expect=plan.expect, note="the upsert created a new record; delete it")
        return plan

    def check_request(self, plan: UndoPlan) -> PlannedRequest | None:
        """Read the fields the agent wrote, before undoing (restore, or delete of a created record)."""
        if plan.request is None or plan.kind not in ("restore", "delete"):
            return None
        names = [k for k in (plan.expect or {}) if _NAME_RE.fullmatch(k)]
        query = urlencode({"fields": ",".join(names)}) if names else ""
        return PlannedRequest("GET", plan.request.path, query, content_type=None)

    def current_matches(self, plan: UndoPlan, current: Any) -> bool:
        if not plan.expect or not isinstance(current, dict):
            return True
        now = {k.lower(): v for k, v in current.items()}
        return all(k.lower() in now and same_value(v, now[k.lower()]) for k, v in plan.expect.items())

    def precondition_headers(self, plan: UndoPlan, headers: dict[str, str], current: Any) -> dict[str, str]:
        """The conditional headers an undo PATCH could carry after the check read (not yet called by the
        gateway): ``If-Match`` with the Account's ETag, else ``If-Unmodified-Since`` from LastModifiedDate
        (rounded up to whole seconds, as HTTP dates are: a change in the same second goes unseen, which is
        why Salesforce calls it weak validation). Salesforce supports neither on DELETE."""
        if plan.request is None or plan.request.method != "PATCH":
            return {}
        etag = {k.lower(): v for k, v in headers.items()}.get("etag")
        if etag:
            return {"If-Match": etag}
        last = current.get("LastModifiedDate") if isinstance(current, dict) else None
        when = _parse_instant(last) if isinstance(last, str) else None
        if when is None:
            return {}
        when = when.astimezone(timezone.utc)
        if when.microsecond:  # HTTP dates have whole seconds: round up, or the record would look newer
            when = when.replace(microsecond=0) + timedelta(seconds=1)
        return {"If-Unmodified-Since": format_datetime(when, usegmt=True)}

    # -- provenance -----------------------------------------------------------------------------

    def stamp_provenance(self, op: Operation, fields: dict[str, str]) -> Any:
        """Provenance as top-level fields of a create/update/upsert body. A field the agent sent under the
        same name in any letter case is dropped first (Salesforce field names are case-insensitive, and two
        spellings of one field would leave the winner to Salesforce)."""
        if not isinstance(op.body, dict) or not fields or _kind(op) not in ("create", "update", "upsert"):
            return None
        return self._stamp_record(op.body, fields)

    @staticmethod
    def _stamp_record(record: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
        lower = {f.lower() for f in fields}
        out = {k: v for k, v in record.items() if k.lower() not in lower}
        out.update(fields)
        return out

    def stamp_composite(self, outer: Operation, ops: list[Operation], fields: dict[str, str]) -> Any:
        """The composite body with provenance stamped into every record it creates or updates (for a
        gateway hook not yet there: today composite bodies are forwarded unstamped)."""
        if not fields or not isinstance(outer.body, dict) or not ops:
            return None
        writes = {op.index for op in ops if _kind(op) in ("create", "update", "upsert")}
        if not writes:
            return None
        doc = copy.deepcopy(outer.body)
        meta = _meta(ops[0])
        env = meta.envelope if meta is not None else ""
        if env == "composite":
            for i, item in enumerate(doc.get("compositeRequest") or []):
                if i in writes and isinstance(item, dict) and isinstance(item.get("body"), dict):
                    item["body"] = self._stamp_record(item["body"], fields)
        elif env == "batch":
            for i, item in enumerate(doc.get("batchRequests") or []):
                if i in writes and isinstance(item, dict) and isinstance(item.get("richInput"), dict):
                    item["richInput"] = self._stamp_record(item["richInput"], fields)
        elif env == "collection":
            doc["records"] = [self._stamp_record(r, fields) if i in writes and isinstance(r, dict) else r
                              for i, r in enumerate(doc.get("records") or [])]
        elif env == "tree":
            def walk(recs: list[Any]) -> list[Any]:
                out = []
                for rec in recs:
                    if isinstance(rec, dict):
                        rec = self._stamp_record(rec, fields)
                        for k, v in rec.items():
                            if k != "attributes" and isinstance(v, dict) and isinstance(v.get("records"), list):
                                v["records"] = walk(v["records"])
                    out.append(rec)
                return out

            doc["records"] = walk(doc.get("records") or [])
        else:
            return None
        return doc


__all__ = ["DEFAULT_ID_PATTERN", "KEY_PREFIXES", "SalesforceAdapter", "SalesforceOperation", "same_value", "to_18"]
