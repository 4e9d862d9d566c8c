"""A stateful fake of HubSpot's CRM v3 objects API: a real aiohttp server on 127.0.0.1.

It keeps contacts, companies and deals (also addressed as ``0-1``, ``0-2``, ``0-3``), answers with
HubSpot's response shapes (``SimplePublicObject``, batch envelopes, 207 multi-status with ``errors``
and ``numErrors``, ``{"status": "error", "category": ...}`` errors, search ``{"total", "results",
"paging"}``), and records every request it receives. Its type table is written out here on purpose,
independently of the adapter's, so the adapter is not tested against itself.

Endpoints: ``GET/POST /crm/v3/objects/{type}``, ``GET/PATCH/DELETE /crm/v3/objects/{type}/{id}``
(``?idProperty=``, ``?properties=``, ``?archived=``), ``POST .../batch/{create,read,update,archive,upsert}``
and ``POST .../search``. Contacts' ``email`` is unique (409 ``CONFLICT`` on a duplicate), as in HubSpot.

Knobs: ``token`` (the private-app token every request must carry, else 401), ``fail(method, prefix,
status, times)``, ``reverse_batch_results`` (HubSpot does not promise results in input order).
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.fakes import Received, send_extra_headers, serve_app

TYPES = {"contacts": "contacts", "0-1": "contacts", "companies": "companies", "0-2": "companies",
         "deals": "deals", "0-3": "deals"}
SINGULAR = {"contacts": "CONTACT", "companies": "COMPANY", "deals": "DEAL"}
DEFAULT_PROPERTIES = {
    "contacts": ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"),
    "companies": ("createdate", "domain", "hs_lastmodifieddate", "hs_object_id", "name"),
    "deals": ("amount", "closedate", "createdate", "dealname", "dealstage", "hs_lastmodifieddate",
              "hs_object_id", "pipeline"),
}
JSON_CT = "application/json;charset=utf-8"


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def modified_name(type_name: str) -> str:
    return "lastmodifieddate" if type_name == "contacts" else "hs_lastmodifieddate"


SYSTEM = frozenset({"hs_object_id", "createdate", "lastmodifieddate", "hs_lastmodifieddate"})


@dataclass
class _Failure:
    method: str
    prefix: str
    status: int
    times: int


class HubSpotError(Exception):
    def __init__(self, status: int, category: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4()),
                     "category": category, **extra}


@dataclass
class HubSpotFake:
    token: str = "pat-na1-11111111-2222-3333-4444-555555555555"
    received: list[Received] = field(default_factory=list)
    records: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"contacts": {}, "companies": {}, "deals": {}})
    failures: list[_Failure] = field(default_factory=list)
    reverse_batch_results: bool = False
    port: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(51001))
    _runner: web.AppRunner | None = None
    response_headers: dict[str, str] = field(default_factory=dict)  # sent with every response

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "HubSpotFake":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        send_extra_headers(app, self)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test helpers -------------------------------------------------------------------------------

    def fail(self, method: str, prefix: str, status: int = 500, times: int = 1) -> None:
        self.failures.append(_Failure(method, prefix, status, times))

    def seen(self, method: str | None = None, prefix: str = "") -> list[Received]:
        return [r for r in self.received if (method is None or r.method == method) and r.path.startswith(prefix)]

    def put(self, type_name: str, properties: dict[str, Any]) -> dict[str, Any]:
        """Seed a record directly (not a request)."""
        return self._create(TYPES[type_name], {"properties": properties})

    def visible(self) -> dict[str, dict[str, dict[str, str]]]:
        """Live records' properties without the ones HubSpot computes: the state a rollback restores."""
        return {t: {rid: {k: v for k, v in rec["properties"].items() if k not in SYSTEM}
                    for rid, rec in table.items() if not rec["archived"]}
                for t, table in self.records.items()}

    def props(self, type_name: str, rid: str) -> dict[str, str]:
        return copy.deepcopy(self.records[TYPES[type_name]][rid]["properties"])

    # -- records --------------------------------------------------------------------------------

    def _create(self, type_name: str, body: Any) -> dict[str, Any]:
        props = self._input_props(body)
        if type_name == "contacts" and props.get("email"):
            props["email"] = props["email"].lower()
            existing = self._find(type_name, "email", props["email"])
            if existing is not None:
                raise HubSpotError(409, "CONFLICT", f"Contact already exists. Existing ID: {existing['id']}")
        rid = str(next(self._ids))
        now = now_iso()
        rec = {"id": rid, "properties": {**{k: v for k, v in props.items() if v != ""}, "hs_object_id": rid,
                                         "createdate": now, modified_name(type_name): now},
               "createdAt": now, "updatedAt": now, "archived": False}
        if isinstance(body, dict) and "objectWriteTraceId" in body:
            rec["objectWriteTraceId"] = body["objectWriteTraceId"]
        self.records[type_name][rid] = rec
        return rec

    def _update(self, type_name: str, rec: dict[str, Any], body: Any) -> dict[str, Any]:
        props = self._input_props(body)
        for k, v in props.items():
            if k in SYSTEM:
                raise HubSpotError(400, "VALIDATION_ERROR", f"Property \"{k}\" is read-only")
            if v == "":
                rec["properties"].pop(k, None)
            else:
                rec["properties"][k] = v.lower() if (type_name, k) == ("contacts", "email") else v
        now = now_iso()
        rec["properties"][modified_name(type_name)] = now
        rec["updatedAt"] = now
        return rec

    @staticmethod
    def _input_props(body: Any) -> dict[str, str]:
        if not isinstance(body, dict) or not isinstance(body.get("properties", {}), dict):
            raise HubSpotError(400, "VALIDATION_ERROR", "Invalid input JSON: properties must be an object")
        out = {}
        for k, v in body.get("properties", {}).items():
            if isinstance(v, (dict, list)):
                raise HubSpotError(400, "VALIDATION_ERROR", f"Property values must be strings: {k}")
            out[k] = "" if v is None else ("true" if v is True else "false" if v is False else str(v))
        return out

    def _find(self, type_name: str, prop: str, value: str) -> dict[str, Any] | None:
        for rec in self.records[type_name].values():
            have = rec["properties"].get(prop)
            if not rec["archived"] and have is not None and have.lower() == value.lower():
                return rec
        return None

    def _get(self, type_name: str, rid: str, id_property: str | None, archived: bool = False) -> dict[str, Any]:
        if id_property and id_property != "hs_object_id":
            rec = self._find(type_name, id_property, rid)
        else:
            rec = self.records[type_name].get(rid)
            if rec is not None and rec["archived"] != archived:
                rec = None
        if rec is None:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", "resource not found")
        return rec

    def _view(self, type_name: str, rec: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
        wanted = list(names) if names else list(DEFAULT_PROPERTIES[type_name])
        for always in ("hs_object_id", "createdate", modified_name(type_name)):
            if always not in wanted:
                wanted.append(always)
        out = {k: v for k, v in rec.items() if k != "properties"}
        out["properties"] = {k: rec["properties"].get(k) for k in wanted}
        if not rec["archived"]:
            out.pop("archivedAt", None)
        return out

    # -- HTTP -----------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, dict(request.headers),
                                      list(request.headers.items()), body))
        try:
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                raise HubSpotError(401, "INVALID_AUTHENTICATION",
                                   "Authentication credentials not found. This API supports OAuth 2.0 authentication")
            for f in self.failures:
                if f.times > 0 and f.method in (request.method, "*") and request.path.startswith(f.prefix):
                    f.times -= 1
                    raise HubSpotError(f.status, "INTERNAL_ERROR", "injected failure")
            data = orjson.loads(body) if body else None
            status, out = self._route(request, data)
        except HubSpotError as err:
            return web.Response(status=err.status, body=orjson.dumps(err.body), content_type="application/json",
                                charset="utf-8")
        except orjson.JSONDecodeError:
            err = HubSpotError(400, "VALIDATION_ERROR", "Invalid input JSON")
            return web.Response(status=400, body=orjson.dumps(err.body), content_type="application/json")
        if out is None:
            return web.Response(status=status)
        return web.Response(status=status, body=orjson.dumps(out), content_type="application/json", charset="utf-8")

    def _route(self, request: web.Request, data: Any) -> tuple[int, Any]:
        parts = [p for p in request.path.split("/") if p]
        if len(parts) < 4 or parts[:3] != ["crm", "v3", "objects"]:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", "no such endpoint")
        type_name = TYPES.get(parts[3])
        if type_name is None:
            raise HubSpotError(400, "VALIDATION_ERROR", f"Unable to infer object type from: {parts[3]}")
        rest = parts[4:]
        q = request.query
        names = self._names(q.getall("properties", []))
        m = request.method
        if not rest:
            if m == "POST":
                return 201, self._create(type_name, data)
            if m == "GET":
                return 200, self._page(type_name, [r for r in self.records[type_name].values()
                                                   if r["archived"] == (q.get("archived") == "true")],
                                       names, int(q.get("limit", "10")), q.get("after"))
            raise HubSpotError(405, "VALIDATION_ERROR", "method not allowed")
        if rest == ["search"] and m == "POST":
            return 200, self._search(type_name, data or {})
        if len(rest) == 2 and rest[0] == "batch" and m == "POST":
            return self._batch(type_name, rest[1], data)
        if len(rest) != 1:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", "no such endpoint")
        rid = rest[0]
        id_property = q.get("idProperty")
        if m == "GET":
            rec = self._get(type_name, rid, id_property, archived=q.get("archived") == "true")
            return 200, self._view(type_name, rec, names)
        if m == "PATCH":
            rec = self._get(type_name, rid, id_property)
            self._update(type_name, rec, data)
            return 200, self._view(type_name, rec, list(rec["properties"]))
        if m == "DELETE":
            rec = self.records[type_name].get(rid)
            if rec is not None and not rec["archived"]:
                rec["archived"] = True
                rec["archivedAt"] = now_iso()
            return 204, None
        raise HubSpotError(405, "VALIDATION_ERROR", "method not allowed")

    @staticmethod
    def _names(values: list[str]) -> list[str] | None:
        out = [n for v in values for n in v.split(",") if n]
        return out or None

    def _page(self, type_name: str, recs: list[dict[str, Any]], names: list[str] | None, limit: int,
              after: str | None) -> dict[str, Any]:
        start = int(after or 0)
        page = recs[start:start + limit]
        out: dict[str, Any] = {"results": [self._view(type_name, r, names) for r in page]}
        if start + limit < len(recs):
            out["paging"] = {"next": {"after": str(start + limit), "link": "?after=" + str(start + limit)}}
        return out

    def _search(self, type_name: str, req: dict[str, Any]) -> dict[str, Any]:
        def test(rec: dict[str, Any], f: dict[str, Any]) -> bool:
            have = rec["properties"].get(f.get("propertyName", ""))
            op, value = f.get("operator", "EQ"), f.get("value")
            if op == "EQ":
                return have is not None and have.lower() == str(value).lower()
            if op == "NEQ":
                return have is None or have.lower() != str(value).lower()
            if op == "CONTAINS_TOKEN":
                return have is not None and str(value).strip("*").lower() in have.lower()
            if op == "HAS_PROPERTY":
                return have is not None
            if op == "NOT_HAS_PROPERTY":
                return have is None
            if op == "IN":
                return have is not None and have.lower() in [str(v).lower() for v in f.get("values", [])]
            raise HubSpotError(400, "VALIDATION_ERROR", f"unsupported operator {op}")

        groups = req.get("filterGroups") or []
        live = [r for r in self.records[type_name].values() if not r["archived"]]
        hits = [r for r in live if not groups or any(all(test(r, f) for f in g.get("filters", [])) for g in groups)]
        if req.get("query"):
            hits = [r for r in hits if any(str(req["query"]).lower() in (v or "").lower()
                                           for v in r["properties"].values())]
        limit = int(req.get("limit") or 10)
        page = self._page(type_name, hits, req.get("properties") or None, limit, req.get("after"))
        return {"total": len(hits), **page}

    def _batch(self, type_name: str, action: str, data: Any) -> tuple[int, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
            raise HubSpotError(400, "VALIDATION_ERROR", "Invalid input JSON: inputs is required")
        inputs = data["inputs"]
        started = now_iso()
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        if action == "create":
            emails = [self._input_props(i).get("email", "").lower() for i in inputs] if type_name == "contacts" else []
            for e in emails:
                if e and (self._find(type_name, "email", e) is not None or emails.count(e) > 1):
                    raise HubSpotError(409, "CONFLICT", f"Contact already exists: {e}")
            for item in inputs:
                rec = self._create(type_name, item)
                results.append(self._view(type_name, rec, list(rec["properties"])))
            status = 201
        elif action == "read":
            names = data.get("properties") or None
            missing = []
            for item in inputs:
                try:
                    rec = self._get(type_name, str(item.get("id")), data.get("idProperty"))
                except HubSpotError:
                    missing.append(str(item.get("id")))
                    continue
                results.append(self._view(type_name, rec, names))
            if missing:
                errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                               "message": f"Could not get some {SINGULAR[type_name]} objects, they may be deleted or "
                                          "not exist. Check that ids are valid.",
                               "context": {"ids": missing}, "errors": [], "links": {}})
            status = 200
        elif action == "update":
            for item in inputs:
                try:
                    rec = self._get(type_name, str(item.get("id")), item.get("idProperty"))
                except HubSpotError:
                    errors.append({"status": "error", "category": "OBJECT_NOT_FOUND",
                                   "message": f"Could not find {SINGULAR[type_name]} {item.get('id')}",
                                   "context": {"ids": [str(item.get("id"))]}, "errors": [], "links": {}})
                    continue
                self._update(type_name, rec, item)
                results.append(self._view(type_name, rec, list(rec["properties"])))
            status = 200
        elif action == "upsert":
            for item in inputs:
                prop = item.get("idProperty")
                rec = self._find(type_name, prop, str(item["id"])) if prop else None
                new = rec is None
                if new:
                    rec = self._create(type_name, {"properties": {**(item.get("properties") or {}),
                                                                  prop: str(item["id"])}})
                else:
                    self._update(type_name, rec, item)
                results.append({**self._view(type_name, rec, list(rec["properties"])), "new": new})
            status = 200
        elif action == "archive":
            for item in inputs:
                rec = self.records[type_name].get(str(item.get("id")))
                if rec is not None and not rec["archived"]:
                    rec["archived"] = True
                    rec["archivedAt"] = now_iso()
            return 204, None
        else:
            raise HubSpotError(404, "OBJECT_NOT_FOUND", "no such endpoint")
        if self.reverse_batch_results:
            results.reverse()
        out: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": started,
                               "completedAt": now_iso()}
        if errors:
            out["numErrors"] = len(errors)
            out["errors"] = errors
            status = 207
        return status, out
