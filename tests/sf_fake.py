"""A stateful fake Salesforce REST API: a real aiohttp server on 127.0.0.1 that records what it received.

It answers with Salesforce's shapes (Lightning Platform REST API, as documented and as in the public spec
``../shared/specs/salesforce.oas.json``):

* ``/services/data/vNN.N/sobjects/{Type}`` POST create → 201 ``{"id", "success", "errors"}``; GET basic info;
* ``.../sobjects/{Type}/{id}`` GET (``?fields=``), PATCH → 204, DELETE → 204; 15- and 18-character ids,
  with the object's key prefix (001 Account, 003 Contact, 006 Opportunity, 00Q Lead, ...);
* ``.../sobjects/{Type}/{extField}/{value}`` upsert: PATCH → 201 ``{..., "created": true}`` when new, 200
  ``{..., "created": false}`` when it updated (API 46.0 and later; 204 before), 300 when several match;
  GET and DELETE by external id; ``POST .../sobjects/{Type}/Id`` creates;
* ``query`` / ``queryAll`` with a small SOQL subset (``SELECT f, ... FROM T [WHERE f = 'v' [AND ...]]
  [LIMIT n]``, operators ``=``, ``!=``, ``IN``); queryAll also returns deleted records;
* ``composite`` (references ``@{ref.path}``, ``allOrNone`` with rollback), ``composite/batch``
  (``haltOnError``), ``composite/sobjects`` (POST/PATCH/DELETE ``?ids=``, GET, upsert by external id) and
  ``composite/tree/{Type}`` (all or nothing, children linked to their parent);
* ``POST ...?_HttpMethod=PATCH`` runs a PATCH; ``If-Match`` (ETag, Account only) and
  ``If-Unmodified-Since`` preconditions on PATCH answer 412 when they fail;
* errors are lists of ``{"message", "errorCode", "fields"}``; a missing or wrong bearer token is 401
  ``INVALID_SESSION_ID``; required fields (Account.Name, Contact.LastName, Opportunity.Name/StageName/
  CloseDate, Lead.LastName/Company) are checked; a lookup (``...Id`` field) must name an existing record.

``received`` lists every request; ``fail(method, prefix, status, times)`` injects failures.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from aiohttp import web

from tests.fakes import Received, send_extra_headers, serve_app

KEY_PREFIXES = {"Account": "001", "Contact": "003", "Opportunity": "006", "Lead": "00Q", "Case": "500",
                "Task": "00T", "Event": "00U", "User": "005", "Campaign": "701", "Contract": "800", "Order": "801",
                "Note": "002", "Product2": "01t"}
REQUIRED = {"account": ["Name"], "contact": ["LastName"], "opportunity": ["Name", "StageName", "CloseDate"],
            "lead": ["LastName", "Company"]}
SYSTEM = ("Id", "IsDeleted", "CreatedDate", "CreatedById", "LastModifiedDate", "LastModifiedById", "SystemModstamp")
NOT_WRITABLE = {s.lower() for s in SYSTEM}
UNCHECKED_LOOKUPS = {"ownerid", "createdbyid", "lastmodifiedbyid", "recordtypeid"}
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_FIELD_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_REF_RE = re.compile(r"@\{([A-Za-z0-9_]+)\.([^{}]+)\}")


def to_18(id15: str) -> str:
    out = ""
    for i in range(3):
        out += _SUFFIX[sum(1 << j for j, c in enumerate(id15[i * 5:i * 5 + 5]) if c.isupper())]
    return id15 + out


def sf_error(code: str, message: str, fields: list[str] | None = None) -> list[dict[str, Any]]:
    return [{"message": message, "errorCode": code, "fields": fields or []}]


class SFError(Exception):
    def __init__(self, status: int, code: str, message: str, fields: list[str] | None = None,
                 body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else sf_error(code, message, fields)


@dataclass
class _Failure:
    method: str
    prefix: str
    status: int
    times: int
    body: Any


@dataclass
class SalesforceFake:
    token: str = "SF-UPSTREAM-TOKEN"
    received: list[Received] = field(default_factory=list)
    tables: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # type (lower) -> id -> record
    deleted: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    type_names: dict[str, str] = field(default_factory=dict)  # lower -> canonical spelling
    failures: list[_Failure] = field(default_factory=list)
    port: int = 0
    _seq: Any = field(default_factory=lambda: itertools.count(1))
    _clock: datetime = field(default_factory=lambda: datetime(2026, 1, 5, 9, 0, 0, tzinfo=timezone.utc))
    _runner: web.AppRunner | None = None
    response_headers: dict[str, str] = field(default_factory=dict)  # sent with every response

    # -- harness --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "SalesforceFake":
        app = web.Application(client_max_size=20 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        send_extra_headers(app, self)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def fail(self, method: str, prefix: str, status: int = 500, times: int = 1, body: Any = None) -> None:
        self.failures.append(_Failure(method, prefix, status, times, body))

    def seen(self, method: str | None = None, contains: str = "") -> list[Received]:
        return [r for r in self.received if (method is None or r.method == method) and contains in r.raw_path]

    def writes(self) -> list[Received]:
        return [r for r in self.received if r.method != "GET"]

    def insert(self, type_name: str, **values: Any) -> dict[str, Any]:
        """Put a record in directly (test setup, not a request)."""
        return self._create(type_name, values, check=False)

    def record(self, type_name: str, rid: str) -> dict[str, Any] | None:
        rec = self._find(type_name, rid)
        return copy.deepcopy(rec) if rec is not None else None

    def state(self, *, system: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
        """Every live record by type and id; without system fields unless asked (they move on each write)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for t, table in self.tables.items():
            if table:
                out[self.type_names[t]] = {rid: {k: v for k, v in rec.items()
                                                 if system or k not in SYSTEM or k == "Id"}
                                           for rid, rec in table.items()}
        return copy.deepcopy(out)

    # -- records --------------------------------------------------------------------------------

    def _canonical_type(self, name: str) -> str:
        low = name.lower()
        if low not in self.type_names:
            known = {k.lower(): k for k in KEY_PREFIXES}
            self.type_names[low] = known.get(low, name)
        return self.type_names[low]

    def _new_id(self, type_name: str) -> str:
        prefix = KEY_PREFIXES.get(self._canonical_type(type_name),
                                  "a00" if type_name.lower().endswith("__c") else "0Xx")
        return to_18(f"{prefix}5g000{next(self._seq):06d}X")

    def _now(self) -> str:
        self._clock += timedelta(milliseconds=1500)
        return self._clock.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self._clock.microsecond // 1000:03d}+0000"

    def _find(self, type_name: str, rid: str) -> dict[str, Any] | None:
        table = self.tables.get(type_name.lower(), {})
        if len(rid) == 18:
            return table.get(rid) or next((r for k, r in table.items() if k.lower() == rid.lower()), None)
        if len(rid) == 15:
            return next((r for k, r in table.items() if k[:15] == rid), None)
        return None

    def _find_any(self, rid: str) -> dict[str, Any] | None:
        for t in list(self.tables):
            rec = self._find(t, rid)
            if rec is not None:
                return rec
        return None

    def _clean(self, type_name: str, data: Any, *, creating: bool, existing: dict[str, Any] | None = None,
               check: bool = True) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise SFError(400, "JSON_PARSER_ERROR", "The request body must be a JSON object")
        out: dict[str, Any] = {}
        for k, v in data.items():
            if k == "attributes":
                continue
            if not _FIELD_RE.fullmatch(k):
                raise SFError(400, "INVALID_FIELD", f"No such column '{k}' on entity '{type_name}'")
            if k.lower() in NOT_WRITABLE and check:
                raise SFError(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                              f"Unable to create/update fields: {k}. Please check the security settings of this "
                              "field and verify that it is read/write for your profile or permission set.", [k])
            if isinstance(v, (dict, list)):
                raise SFError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of {k} from an object or list")
            if check and k.lower().endswith("id") and k.lower() not in UNCHECKED_LOOKUPS and isinstance(v, str) and v:
                if self._find_any(v) is None:
                    raise SFError(400, "INVALID_CROSS_REFERENCE_KEY", f"{k}: id value of incorrect type: {v}", [k])
            key = next((e for e in (existing or {}) if e.lower() == k.lower()), k)
            out[key] = v
        if creating and check:
            missing = [f for f in REQUIRED.get(type_name.lower(), [])
                       if out.get(next((k for k in out if k.lower() == f.lower()), f)) in (None, "")]
            if missing:
                raise SFError(400, "REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]",
                              missing)
        return out

    def _create(self, type_name: str, data: Any, check: bool = True) -> dict[str, Any]:
        t = self._canonical_type(type_name)
        values = {k: v for k, v in self._clean(t, data, creating=True, check=check).items() if k.lower() != "id"}
        rid = self._new_id(t)
        now = self._now()
        rec = {"Id": rid, **values, "IsDeleted": False, "CreatedDate": now, "CreatedById": "005000000000001AAA",
               "LastModifiedDate": now, "LastModifiedById": "005000000000001AAA", "SystemModstamp": now}
        self.tables.setdefault(t.lower(), {})[rid] = rec
        return rec

    def _update(self, type_name: str, rec: dict[str, Any], data: Any, headers: dict[str, str]) -> None:
        values = self._clean(type_name, data, creating=False, existing=rec)
        self._preconditions(type_name, rec, headers)
        rec.update(values)
        now = self._now()
        rec["LastModifiedDate"] = now
        rec["SystemModstamp"] = now

    def _preconditions(self, type_name: str, rec: dict[str, Any], headers: dict[str, str]) -> None:
        h = {k.lower(): v for k, v in headers.items()}
        if "if-match" in h and type_name.lower() == "account":
            tags = [t.strip() for t in h["if-match"].split(",")]
            if self._etag(rec) not in tags and "*" not in tags:
                raise SFError(412, "PRECONDITION_FAILED", "The ETag does not match the record's")
        if "if-unmodified-since" in h:
            try:
                since = parsedate_to_datetime(h["if-unmodified-since"])
            except (TypeError, ValueError):
                raise SFError(400, "INVALID_HEADER_TYPE", "If-Unmodified-Since is not an HTTP date") from None
            last = datetime.strptime(rec["LastModifiedDate"][:23], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)
            if last > since:  # to the millisecond: a date rounded down would make every record look newer
                raise SFError(412, "PRECONDITION_FAILED", "The record was modified after If-Unmodified-Since")

    @staticmethod
    def _etag(rec: dict[str, Any]) -> str:
        return '"' + hashlib.sha256(orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)).hexdigest()[:27] + '=--gzip"'

    def _delete(self, type_name: str, rec: dict[str, Any]) -> None:
        t = type_name.lower()
        del self.tables[t][rec["Id"]]
        rec["IsDeleted"] = True
        self.deleted.setdefault(t, {})[rec["Id"]] = rec

    def _view(self, type_name: str, rec: dict[str, Any], version: str, fields: list[str] | None = None) -> dict[str, Any]:
        t = self._canonical_type(type_name)
        out: dict[str, Any] = {"attributes": {"type": t, "url": f"/services/data/{version}/sobjects/{t}/{rec['Id']}"}}
        if fields is None:
            out.update(rec)
            return out
        low = {k.lower(): k for k in rec}
        out["Id"] = rec["Id"]
        for f in fields:
            key = low.get(f.lower())
            out[key or f] = rec.get(key) if key else None
        return out

    # -- HTTP -----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, dict(request.headers),
                                      list(request.headers.items()), body))
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.token}":
            return web.json_response(sf_error("INVALID_SESSION_ID", "Session expired or invalid"), status=401)
        for f in self.failures:
            if f.times > 0 and f.method in (request.method, "*") and request.path.startswith(f.prefix):
                f.times -= 1
                return web.json_response(f.body if f.body is not None else
                                         sf_error("UNKNOWN_EXCEPTION", "injected failure"), status=f.status)
        method = request.method
        query = parse_qsl(request.query_string, keep_blank_values=True)
        override = [v for k, v in query if k == "_HttpMethod"]
        if override and method == "POST":
            method = override[0]
        data: Any = None
        if body:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                return web.json_response(sf_error("JSON_PARSER_ERROR", "Unexpected character in the request body"),
                                         status=400)
        path = request.raw_path.partition("?")[0]
        status, headers, out = self.execute(method, path, query, data, dict(request.headers))
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.json_response(out, status=status, headers=headers, dumps=lambda x: orjson.dumps(x).decode())

    def execute(self, method: str, path: str, query: list[tuple[str, str]], data: Any,
                headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        """One request (top-level or a composite's sub-request): (status, headers, body)."""
        try:
            return self._route(method, path, query, data, headers)
        except SFError as err:
            return err.status, {}, err.body

    def _route(self, method: str, path: str, query: list[tuple[str, str]], data: Any,
               headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        segs = [unquote(s) for s in path.strip("/").split("/") if s]
        if len(segs) < 3 or segs[0] != "services" or segs[1] != "data" or not re.fullmatch(r"v\d+\.\d", segs[2]):
            raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
        version, rest = segs[2], segs[3:]
        vnum = float(version[1:])
        low = [s.lower() for s in rest]
        q = dict(query)
        if low[:1] == ["sobjects"]:
            return self._sobjects(method, rest[1:], q, data, headers, version, vnum)
        if low in (["query"], ["queryall"]) and method == "GET":
            return 200, {}, self.query(q.get("q", ""), version, include_deleted=low[0] == "queryall")
        if low == ["composite"] and method == "POST":
            return 200, {}, self._composite(data, version)
        if low == ["composite", "batch"] and method == "POST":
            return 200, {}, self._batch(data, version)
        if low[:2] == ["composite", "sobjects"]:
            return self._collections(method, rest[2:], q, data, version)
        if low[:2] == ["composite", "tree"] and len(rest) == 3 and method == "POST":
            return self._tree(rest[2], data)
        raise SFError(404, "NOT_FOUND", "The requested resource does not exist")

    def _sobjects(self, method: str, rest: list[str], q: dict[str, str], data: Any, headers: dict[str, str],
                  version: str, vnum: float) -> tuple[int, dict[str, str], Any]:
        if not rest:
            return 200, {}, {"encoding": "UTF-8", "maxBatchSize": 200,
                             "sobjects": [{"name": n, "keyPrefix": p} for n, p in KEY_PREFIXES.items()]}
        t = self._canonical_type(rest[0])
        if len(rest) == 1 or (len(rest) == 2 and rest[1].lower() == "id" and method == "POST"):
            if method == "POST":
                rec = self._create(t, data)
                return 201, {}, {"id": rec["Id"], "success": True, "errors": []}
            if method == "GET":
                return 200, {}, {"objectDescribe": {"name": t, "keyPrefix": KEY_PREFIXES.get(t), "createable": True},
                                 "recentItems": []}
            raise SFError(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed. Allowed are HEAD,GET,POST")
        if len(rest) == 2 and rest[1].lower() == "describe":
            return 200, {}, {"name": t, "keyPrefix": KEY_PREFIXES.get(t), "fields": []}
        if len(rest) == 2:
            rec = self._find(t, rest[1])
            if rec is None:
                raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
            return self._row(method, t, rec, q, data, headers, version)
        if len(rest) == 3:
            return self._by_external_id(method, t, rest[1], rest[2], data, headers, version, vnum)
        raise SFError(404, "NOT_FOUND", "The requested resource does not exist")

    def _row(self, method: str, t: str, rec: dict[str, Any], q: dict[str, str], data: Any, headers: dict[str, str],
             version: str) -> tuple[int, dict[str, str], Any]:
        if method == "GET":
            fields = [f for f in q["fields"].split(",") if f] if q.get("fields") else None
            extra = {"ETag": self._etag(rec)} if t == "Account" else {}
            return 200, extra, self._view(t, rec, version, fields)
        if method == "PATCH":
            self._update(t, rec, data, headers)
            return 204, {}, None
        if method == "DELETE":
            self._delete(t, rec)
            return 204, {}, None
        raise SFError(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed. Allowed are HEAD,GET,PATCH,DELETE")

    def _by_external_id(self, method: str, t: str, ext: str, value: str, data: Any, headers: dict[str, str],
                        version: str, vnum: float) -> tuple[int, dict[str, str], Any]:
        matches = [r for r in self.tables.get(t.lower(), {}).values()
                   if str(next((v for k, v in r.items() if k.lower() == ext.lower()), None)) == value]
        if len(matches) > 1:
            raise SFError(300, "", "", body=[f"/services/data/{version}/sobjects/{t}/{r['Id']}" for r in matches])
        if method == "GET":
            if not matches:
                raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
            return 200, {}, self._view(t, matches[0], version)
        if method == "DELETE":
            if not matches:
                raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
            self._delete(t, matches[0])
            return 204, {}, None
        if method in ("PATCH", "POST"):
            return self._upsert(t, ext, value, data, headers, matches, vnum)
        raise SFError(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{method}' not allowed")

    def _upsert(self, t: str, ext: str, value: str, data: Any, headers: dict[str, str], matches: list[dict[str, Any]],
                vnum: float) -> tuple[int, dict[str, str], Any]:
        if isinstance(data, dict) and any(k.lower() == ext.lower() for k in data):
            raise SFError(400, "INVALID_FIELD", f"The external ID field {ext} must not be set in the body")
        if not matches:
            rec = self._create(t, {**(data or {}), ext: value})
            return 201, {}, {"id": rec["Id"], "success": True, "errors": [], "created": True}
        self._update(t, matches[0], data, headers)
        if vnum < 46:
            return 204, {}, None
        return 200, {}, {"id": matches[0]["Id"], "success": True, "errors": [], "created": False}

    # -- SOQL -----------------------------------------------------------------------------------

    _SOQL = re.compile(r"^\s*SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<obj>\w+)(?:\s+WHERE\s+(?P<where>.+?))?"
                       r"(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$", re.I | re.S)
    _COND = re.compile(r"^\s*(?P<f>\w+)\s*(?P<op>=|!=|\bIN\b)\s*(?P<v>.+?)\s*$", re.I | re.S)

    def query(self, soql: str, version: str, include_deleted: bool = False) -> dict[str, Any]:
        m = self._SOQL.match(soql)
        if m is None:
            raise SFError(400, "MALFORMED_QUERY", f"unexpected token in: {soql[:80]}")
        fields = [f.strip() for f in m.group("fields").split(",")]
        if not all(_FIELD_RE.fullmatch(f) or re.fullmatch(r"\w+\.\w+", f) for f in fields):
            raise SFError(400, "MALFORMED_QUERY", "unexpected token in the field list")
        t = self._canonical_type(m.group("obj"))
        conds = []
        if m.group("where"):
            for part in re.split(r"\s+AND\s+", m.group("where"), flags=re.I):
                c = self._COND.match(part)
                if c is None:
                    raise SFError(400, "MALFORMED_QUERY", f"unexpected token: {part[:40]}")
                conds.append((c.group("f"), c.group("op").upper(), self._literal(c.group("v"), c.group("op"))))
        rows = list(self.tables.get(t.lower(), {}).values())
        if include_deleted:
            rows += list(self.deleted.get(t.lower(), {}).values())
        out = []
        for rec in rows:
            low = {k.lower(): v for k, v in rec.items()}
            if all(self._test(low.get(f.lower()), op, v) for f, op, v in conds):
                out.append({"attributes": self._view(t, rec, version)["attributes"],
                            **{f: low.get(f.lower()) for f in fields}})
        if m.group("limit"):
            out = out[: int(m.group("limit"))]
        return {"totalSize": len(out), "done": True, "records": out}

    @staticmethod
    def _literal(text: str, op: str) -> Any:
        text = text.strip()
        if op.upper() == "IN":
            if not (text.startswith("(") and text.endswith(")")):
                raise SFError(400, "MALFORMED_QUERY", "IN needs a parenthesised list")
            return [SalesforceFake._literal(x, "=") for x in re.findall(r"'(?:[^'\\]|\\.)*'|[^,\s]+", text[1:-1])]
        if text.startswith("'") and text.endswith("'") and len(text) >= 2:
            return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1), m.group(1)), text[1:-1])
        if text.lower() == "null":
            return None
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            return float(text)
        except ValueError:
            raise SFError(400, "MALFORMED_QUERY", f"unexpected token: {text[:40]}") from None

    @staticmethod
    def _test(value: Any, op: str, want: Any) -> bool:
        def eq(a: Any, b: Any) -> bool:
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
                return float(a) == float(b)
            if isinstance(a, str) and isinstance(b, str) and len(b) in (15, 18) and len(a) == 18:
                return a[:15] == b[:15]  # ids compare by their 15-character form
            return a == b

        if op == "IN":
            return any(eq(value, w) for w in want)
        return eq(value, want) if op == "=" else not eq(value, want)

    # -- composite ------------------------------------------------------------------------------

    def _snapshot(self) -> Any:
        return copy.deepcopy((self.tables, self.deleted))

    def _restore(self, snap: Any) -> None:
        self.tables, self.deleted = snap

    @staticmethod
    def _dig(value: Any, path: str) -> Any:
        for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
            if part.startswith("["):
                i = int(part[1:-1])
                value = value[i] if isinstance(value, list) and i < len(value) else None
            else:
                value = value.get(part) if isinstance(value, dict) else None
        return value

    def _substitute(self, value: Any, results: dict[str, Any]) -> Any:
        if isinstance(value, str):
            def one(m: re.Match[str]) -> str:
                if m.group(1) not in results or results[m.group(1)] is None:
                    raise SFError(400, "PROCESSING_HALTED", f"Invalid reference specified. No value for "
                                                            f"{m.group(1)}.{m.group(2)} found")
                got = self._dig(results[m.group(1)], m.group(2))
                if got is None:
                    raise SFError(400, "PROCESSING_HALTED", f"Invalid reference specified. No value for "
                                                            f"{m.group(1)}.{m.group(2)} found")
                return str(got)
            return _REF_RE.sub(one, value)
        if isinstance(value, dict):
            return {k: self._substitute(v, results) for k, v in value.items()}
        if isinstance(value, list):
            return [self._substitute(v, results) for v in value]
        return value

    def _sub_request(self, method: str, url: str, data: Any, headers: dict[str, str],
                     base: str = "") -> tuple[int, dict[str, str], Any]:
        if not url.startswith("/"):
            url = base + url
        path, _, qs = url.partition("?")
        return self.execute(method, path, parse_qsl(qs, keep_blank_values=True), data, headers)

    def _composite(self, doc: Any, version: str) -> dict[str, Any]:
        if not isinstance(doc, dict) or not isinstance(doc.get("compositeRequest"), list):
            raise SFError(400, "JSON_PARSER_ERROR", "compositeRequest is required")
        all_or_none = doc.get("allOrNone") is True
        snap = self._snapshot() if all_or_none else None
        results: dict[str, Any] = {}
        out: list[dict[str, Any]] = []
        failed = False
        for item in doc["compositeRequest"]:
            ref = item.get("referenceId")
            if failed and all_or_none:
                out.append({"body": None, "httpHeaders": {}, "httpStatusCode": 0, "referenceId": ref})
                continue
            try:
                if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                    raise SFError(400, "JSON_PARSER_ERROR", "each subrequest needs method, url and referenceId")
                url = self._substitute(item["url"], results)
                data = self._substitute(item.get("body"), results)
                status, headers, body = self._sub_request(item["method"], url, data, item.get("httpHeaders") or {})
            except SFError as err:
                status, headers, body = err.status, {}, err.body
            if status == 201 and isinstance(body, dict) and body.get("id"):
                t = self._type_of_url(url)
                headers = {"Location": f"/services/data/{version}/sobjects/{t}/{body['id']}"}
            out.append({"body": body, "httpHeaders": headers, "httpStatusCode": status, "referenceId": ref})
            results[ref] = body if status < 400 else None
            failed = failed or status >= 400
        if all_or_none and failed:
            assert snap is not None
            self._restore(snap)
            halted = sf_error("PROCESSING_HALTED", "The transaction was rolled back since another operation in the "
                                                   "same transaction failed.")
            for item in out:
                if item["httpStatusCode"] < 400:
                    item.update({"body": halted, "httpHeaders": {}, "httpStatusCode": 400})
        return {"compositeResponse": out}

    @staticmethod
    def _type_of_url(url: str) -> str:
        segs = url.partition("?")[0].strip("/").split("/")
        low = [s.lower() for s in segs]
        return segs[low.index("sobjects") + 1] if "sobjects" in low else ""

    def _batch(self, doc: Any, version: str) -> dict[str, Any]:
        if not isinstance(doc, dict) or not isinstance(doc.get("batchRequests"), list):
            raise SFError(400, "JSON_PARSER_ERROR", "batchRequests is required")
        halt = doc.get("haltOnError") is True
        results = []
        stopped = False
        for item in doc["batchRequests"]:
            if stopped:
                results.append({"statusCode": 412, "result": sf_error("BATCH_PROCESSING_HALTED",
                                                                       "Batch processing halted per request")})
                continue
            status, _, body = self._sub_request(item["method"], item["url"], item.get("richInput"), {},
                                                base="/services/data/")
            results.append({"statusCode": status, "result": body})
            stopped = halt and status >= 400
        return {"hasErrors": any(r["statusCode"] >= 400 for r in results), "results": results}

    @staticmethod
    def _save_error(err: SFError) -> list[dict[str, Any]]:
        return [{"statusCode": e.get("errorCode"), "message": e.get("message"), "fields": e.get("fields", [])}
                for e in (err.body if isinstance(err.body, list) else [])]

    def _collections(self, method: str, rest: list[str], q: dict[str, str], data: Any,
                     version: str) -> tuple[int, dict[str, str], Any]:
        if method in ("GET", "POST") and len(rest) == 1:
            t = self._canonical_type(rest[0])
            if method == "GET":
                ids, fields = q.get("ids", "").split(","), q.get("fields")
            else:
                ids, fields = (data or {}).get("ids") or [], ",".join((data or {}).get("fields") or []) or None
            names = [f for f in fields.split(",") if f] if fields else None
            out = []
            for rid in ids:
                rec = self._find(t, rid)
                out.append(self._view(t, rec, version, names) if rec is not None else None)
            return 200, {}, out
        if method == "DELETE" and not rest:
            items = [("DELETE", rid, None) for rid in q.get("ids", "").split(",") if rid]
            all_or_none = q.get("allOrNone", "false").lower() == "true"
        elif method in ("POST", "PATCH") and len(rest) in (0, 2):
            if not isinstance(data, dict) or not isinstance(data.get("records"), list):
                raise SFError(400, "JSON_PARSER_ERROR", "records is required")
            items = [(method, None, r) for r in data["records"]]
            all_or_none = data.get("allOrNone") is True
        else:
            raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
        snap = self._snapshot() if all_or_none else None
        out: list[dict[str, Any]] = []
        failed = False
        for verb, rid, rec in items:
            try:
                out.append(self._collection_item(verb, rid, rec, rest))
            except SFError as err:
                failed = True
                out.append({"id": rid, "success": False, "errors": self._save_error(err)})
        if all_or_none and failed:
            assert snap is not None
            self._restore(snap)
            out = [r if not r["success"] else
                   {"id": None, "success": False, "errors": [{"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                                                               "message": "Record rolled back because not all records "
                                                                          "were valid and the request was using "
                                                                          "AllOrNone header", "fields": []}]}
                   for r in out]
        return 200, {}, out

    def _collection_item(self, verb: str, rid: str | None, rec: Any, rest: list[str]) -> dict[str, Any]:
        if verb == "DELETE":
            assert rid is not None
            found = next(((t, r) for t in list(self.tables) if (r := self._find(t, rid)) is not None), None)
            if found is None:
                raise SFError(404, "ENTITY_IS_DELETED", "entity is deleted")
            self._delete(found[0], found[1])
            return {"id": found[1]["Id"], "success": True, "errors": []}
        if not isinstance(rec, dict) or not isinstance((rec.get("attributes") or {}).get("type"), str):
            raise SFError(400, "INVALID_TYPE", "Must send a concrete entity type.")
        t = self._canonical_type(rec["attributes"]["type"])
        fields = {k: v for k, v in rec.items() if k != "attributes"}
        if verb == "POST":
            if any(k.lower() == "id" for k in fields):
                raise SFError(400, "INVALID_FIELD", "cannot specify Id in an insert call", ["Id"])
            made = self._create(t, fields)
            return {"id": made["Id"], "success": True, "errors": []}
        if rest:  # upsert by external id
            ext = rest[1]
            key = next((k for k in fields if k.lower() == ext.lower()), None)
            if key is None:
                raise SFError(400, "MISSING_ARGUMENT", f"{ext} not specified")
            value = str(fields.pop(key))
            matches = [r for r in self.tables.get(t.lower(), {}).values()
                       if str(next((v for k, v in r.items() if k.lower() == ext.lower()), None)) == value]
            if len(matches) > 1:
                raise SFError(300, "DUPLICATE_EXTERNAL_ID", f"{ext}: more than one record found")
            if not matches:
                made = self._create(t, {**fields, ext: value})
                return {"id": made["Id"], "success": True, "errors": [], "created": True}
            self._update(t, matches[0], fields, {})
            return {"id": matches[0]["Id"], "success": True, "errors": [], "created": False}
        key = next((k for k in fields if k.lower() == "id"), None)
        target = self._find(t, str(fields.pop(key))) if key else None
        if target is None:
            raise SFError(404, "ENTITY_IS_DELETED", "entity is deleted")
        self._update(t, target, fields, {})
        return {"id": target["Id"], "success": True, "errors": []}

    def _tree(self, obj: str, doc: Any) -> tuple[int, dict[str, str], Any]:
        if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
            raise SFError(400, "JSON_PARSER_ERROR", "records is required")
        snap = self._snapshot()
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []

        def walk(recs: list[Any], parent: tuple[str, str] | None) -> None:
            for rec in recs:
                attrs = rec.get("attributes") or {}
                ref, t = attrs.get("referenceId"), attrs.get("type")
                fields = {k: v for k, v in rec.items()
                          if k != "attributes" and not (isinstance(v, dict) and "records" in v)}
                if parent is not None:
                    fields[f"{parent[0]}Id"] = parent[1]
                try:
                    made = self._create(t, fields)
                except SFError as err:
                    errors.append({"referenceId": ref, "errors": self._save_error(err)})
                    continue
                results.append({"referenceId": ref, "id": made["Id"]})
                for k, v in rec.items():
                    if k != "attributes" and isinstance(v, dict) and isinstance(v.get("records"), list):
                        walk(v["records"], (self._canonical_type(t), made["Id"]))

        walk(doc["records"], None)
        if errors:
            self._restore(snap)
            return 400, {}, {"hasErrors": True, "results": errors}
        return 201, {}, {"hasErrors": False, "results": results}
