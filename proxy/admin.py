"""The admin listener: a separate port for reviewers, operators and metrics — never for agents.

Every route except the health probes requires a reviewer token (a JWT carrying the configured reviewer
role, verified like agent tokens). An agent's token is refused with 403 ``reviewer_required``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from .errors import TetherError
from .exchange import new_request_id
from .headers import REQUEST_ID
from .identity import Identity
from .responses import error_response, json_response

if TYPE_CHECKING:
    from .gateway import Gateway

GATEWAY = web.AppKey("gateway", object)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


def reviewer(request: web.Request) -> Identity:
    """Authenticate the caller as a reviewer, or raise."""
    gw: "Gateway" = request.app[GATEWAY]  # type: ignore[assignment]
    verifier = gw.state.verifier
    ident = verifier.authenticate(request.headers.get("Authorization"))
    if not verifier.is_reviewer(ident):
        raise TetherError("reviewer_required",
                          f"this token has no {verifier.cfg.reviewer_role!r} role; the admin API is for reviewers")
    return ident


@web.middleware
async def errors_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    rid = new_request_id()
    request[REQUEST_ID_KEY] = rid
    try:
        resp = await handler(request)
    except TetherError as err:
        return error_response(err, rid)
    except web.HTTPException as exc:
        if exc.status >= 400:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
            return error_response(TetherError(code, exc.reason, status=exc.status), rid)
        raise
    resp.headers.setdefault(REQUEST_ID, rid)
    return resp


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw: "Gateway" = request.app[GATEWAY]  # type: ignore[assignment]
    ok, checks = await gw.readiness()
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)


def _gw(request: web.Request) -> "Gateway":
    return request.app[GATEWAY]  # type: ignore[return-value]


async def _json_body(request: web.Request) -> dict:
    if not request.body_exists:
        return {}
    try:
        doc = await request.json(loads=orjson.loads)
    except ValueError:
        raise TetherError("malformed_json", "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise TetherError("bad_request", "the request body must be a JSON object")
    return doc


def _float(v: str | None, name: str) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise TetherError("bad_request", f"{name} must be a number") from None


async def review_list(request: web.Request) -> web.Response:
    reviewer(request)
    q = request.query
    age = _float(q.get("min_age"), "min_age")
    items = await _gw(request).store.review_list(
        state=q.get("state") or None, agent=q.get("agent") or None, capability=q.get("capability") or None,
        upstream=q.get("upstream") or None, older_than=(time.time() - age) if age else None,
        limit=int(_float(q.get("limit"), "limit") or 200))
    return json_response({"items": items, "count": len(items)})


async def review_show(request: web.Request) -> web.Response:
    reviewer(request)
    return json_response(await _gw(request).review.get(request.match_info["id"]))


async def review_approve(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    item = await _gw(request).review.approve(request.match_info["id"], who, edit=doc.get("edit"), note=doc.get("note"))
    return json_response(item)


async def review_reject(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    item = await _gw(request).review.reject(request.match_info["id"], who, str(doc.get("reason") or ""))
    return json_response(item)


async def tx_list(request: web.Request) -> web.Response:
    reviewer(request)
    q = request.query
    txs = await _gw(request).store.tx_list(state=q.get("state") or None, agent=q.get("agent") or None,
                                           limit=int(_float(q.get("limit"), "limit") or 200))
    return json_response({"transactions": txs, "count": len(txs)})


async def tx_show(request: web.Request) -> web.Response:
    reviewer(request)
    return json_response(await _gw(request).transactions.describe(request.match_info["id"]))


async def tx_rollback(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    resolve = doc.get("resolve_conflicts")
    if resolve not in (None, "skip", "overwrite"):
        raise TetherError("bad_request", "resolve_conflicts is skip or overwrite")
    action = request.match_info["action"]
    tx = await _gw(request).transactions.rollback(request.match_info["id"], reason=f"{action} by reviewer {who.agent}",
                                                  by=who.agent, resolve_conflicts=resolve)
    return json_response(tx)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (no token: the admin listener is reachable only from the operator's side)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    body = _gw(request).governance.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def agents_status(request: web.Request) -> web.Response:
    reviewer(request)
    return json_response({"agents": await _gw(request).governance.agents_status()})


async def agent_action(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    reason = str(doc.get("reason") or "")
    gov = _gw(request).governance
    agent = request.match_info["agent"]
    if request.match_info["action"] == "release":
        await gov.release(agent, by=who.agent, reason=reason)
        return json_response({"agent": agent, "quarantined": False})
    if not reason.strip():
        raise TetherError("bad_request", "a quarantine needs a reason")
    row = await gov.quarantine(agent, by=who.agent, reason=reason)
    return json_response({"agent": agent, "quarantined": row})


async def grants_status(request: web.Request) -> web.Response:
    reviewer(request)
    return json_response({"grants": await _gw(request).governance.grants_status()})


async def promotions_list(request: web.Request) -> web.Response:
    reviewer(request)
    q = request.query
    rows = await _gw(request).store.promotions(agent=q.get("agent") or None, capability=q.get("capability") or None,
                                               history=q.get("history") in ("1", "true"))
    return json_response({"promotions": rows})


async def promotions_create(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    for k in ("agent", "capability", "to"):
        if not isinstance(doc.get(k), str):
            raise TetherError("bad_request", f"{k} is required")
    row = await _gw(request).governance.promote(doc["agent"], doc["capability"], doc["to"], by=who.agent,
                                                force=bool(doc.get("force")), reason=doc.get("reason"))
    return json_response(row, 201)


async def promotion_evidence(request: web.Request) -> web.Response:
    reviewer(request)
    q = request.query
    gov = _gw(request).governance
    agent, cap = q.get("agent", ""), q.get("capability", "")
    if _gw(request).state.registry.grant(agent, cap) is None:
        raise TetherError("not_found", f"capability {cap!r} is not granted to agent {agent!r}")
    ev = await gov.evidence(agent, cap)
    return json_response({"evidence": ev, "missing": gov.gate_problems(ev)})


def build_admin_app(gw: "Gateway") -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=gw.limits.max_body_bytes)
    app[GATEWAY] = gw
    app.router.add_get("/_tether/healthz", healthz)
    app.router.add_get("/_tether/readyz", readyz)
    app.router.add_get("/api/review/items", review_list)
    app.router.add_get("/api/review/items/{id}", review_show)
    app.router.add_post("/api/review/items/{id}/approve", review_approve)
    app.router.add_post("/api/review/items/{id}/reject", review_reject)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/agents", agents_status)
    app.router.add_post("/api/agents/{agent}/{action:release|quarantine}", agent_action)
    app.router.add_get("/api/grants", grants_status)
    app.router.add_get("/api/promotions", promotions_list)
    app.router.add_post("/api/promotions", promotions_create)
    app.router.add_get("/api/promotions/evidence", promotion_evidence)
    app.router.add_get("/api/transactions", tx_list)
    app.router.add_get("/api/transactions/{id}", tx_show)
    app.router.add_post("/api/transactions/{id}/{action:rollback|retry}", tx_rollback)
    return app
