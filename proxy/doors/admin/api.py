"""The admin listener: a separate port for reviewers, operators and metrics — never for agents.

Every route except the health probes requires a reviewer: a token (a JWT carrying the configured
reviewer role, verified like agent tokens) or a console session from signing in with the identity
provider (:mod:`proxy.doors.admin.signin`; state-changing calls then need its CSRF token). An agent's token is
refused with 403 ``reviewer_required``; a token Tether cannot read is 401, never a 500.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ...core.exchange import new_request_id
from ...errors import AuthError, TetherError
from ...headers import REQUEST_ID
from ...policy.identity import Identity
from ..responses import error_response, json_response
from .stats import StatsCache

if TYPE_CHECKING:
    from ...core.runtime import Runtime

GATEWAY = web.AppKey("gateway", object)
SLACK = web.AppKey("slack", object)
STATS = web.AppKey("stats", object)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


IDENTITY_KEY = web.RequestKey("identity", object)


def reviewer(request: web.Request) -> Identity:
    """Authenticate the caller as a reviewer, or raise. (The token or session was verified by
    :func:`identity_middleware`, which may have had to fetch an identity provider's keys.)"""
    gw: "Runtime" = request.app[GATEWAY]  # type: ignore[assignment]
    verifier = gw.state.verifier
    got = request.get(IDENTITY_KEY)
    if got is None:
        got = verifier.authenticate(request.headers.get("Authorization"))
    if isinstance(got, TetherError):
        raise got
    ident: Identity = got  # type: ignore[assignment]
    if not verifier.is_reviewer(ident):
        raise TetherError("reviewer_required",
                          f"this token has no {verifier.cfg.reviewer_role!r} role; the admin API is for reviewers")
    return ident


@web.middleware
async def errors_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    rid = new_request_id()
    request[REQUEST_ID_KEY] = rid
    try:
        check_host(request)
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


@web.middleware
async def identity_middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
    """Who calls the admin API: an ``Authorization: Bearer`` token, else the console's session cookie."""
    if request.path.startswith("/api/"):
        request[IDENTITY_KEY] = await _caller(request)
    return await handler(request)


async def _caller(request: web.Request) -> "Identity | TetherError":
    gw: "Runtime" = request.app[GATEWAY]  # type: ignore[assignment]
    try:
        auth = request.headers.getall("Authorization", ())
        if len(auth) > 1:
            raise TetherError("ambiguous_request", "more than one Authorization header")
        if auth:
            return await gw.state.verifier.identify(auth[0])
        from .signin import SIGNIN, check_csrf

        holder = request.app.get(SIGNIN)
        signin = holder.get() if holder is not None else None
        got = signin.session_identity(request) if signin is not None else None
        if got is None:
            raise AuthError("token_missing")
        check_csrf(request, got[1])
        return got[0]
    except TetherError as err:
        return err


def check_host(request: web.Request) -> None:
    """Bound to loopback, the admin listener answers only loopback Host names: a web page whose DNS name
    an attacker re-points at 127.0.0.1 (DNS rebinding) cannot script the reviewer API or the console.
    Bound to a pod IP or a wildcard it is reached through a Service under any name; who may connect is
    then the NetworkPolicy's and the egress lock's decision."""
    gw: "Runtime" = request.app[GATEWAY]  # type: ignore[assignment]
    policy = gw.admin_host_policy
    if policy is None:
        return
    host = request.headers.get("Host", "")
    if not policy(host):
        raise TetherError("ambiguous_request", f"Host {host!r} does not belong to the admin listener")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw: "Runtime" = request.app[GATEWAY]  # type: ignore[assignment]
    ok, checks = await gw.readiness()
    return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)


def _gw(request: web.Request) -> "Runtime":
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


REVIEW_STATES = ("pending", "approved", "replayed", "replay_failed", "rejected", "expired")


async def review_list(request: web.Request) -> web.Response:
    reviewer(request)
    q = request.query
    age = _float(q.get("min_age"), "min_age")
    gw = _gw(request)
    state = q.get("state") or None
    if state == "all":
        state = None
    elif state is not None and state not in REVIEW_STATES:
        raise TetherError("bad_request", f"state is one of {', '.join(REVIEW_STATES)} or all")
    items = await gw.store.review_list(
        state=state, agent=q.get("agent") or None, capability=q.get("capability") or None,
        upstream=q.get("upstream") or None, older_than=(time.time() - age) if age else None,
        limit=int(_float(q.get("limit"), "limit") or 200))
    from ...safety.headline import headline_of

    for it in items:
        _add_upstream_url(gw, it)
        it["headline"] = headline_of(gw, it)
    return json_response({"items": items, "count": len(items), "pending": await gw.store.review_count("pending")})


def _add_upstream_url(gw: "Runtime", item: dict) -> dict:
    """The URL the call would go to (the configured base, never credentials)."""
    up = gw.state.upstreams.get(item.get("upstream", ""))
    req = item.get("request") or {}
    if up is not None and req:
        item["upstream_url"] = up.base_url + req.get("path", "") + ("?" + req["query"] if req.get("query") else "")
    return item


async def _decorated(gw: "Runtime", item: dict[str, Any], *, read: bool = False) -> dict[str, Any]:
    """An item as every view shows it: the upstream URL, its journal record's number, its headline
    (completed with a read of the record when ``read`` and the notifier has not got to it yet)."""
    from ...safety.headline import headline_of
    from .review_notify import complete_headline

    _add_upstream_url(gw, item)
    if item.get("intent_seq") is None and item.get("request_id"):
        rows = await gw.store.journal_query(filters={"request_id": item["request_id"], "kind": "request"}, limit=1)
        item["intent_seq"] = rows[0].seq if rows else None
    hl = headline_of(gw, item)
    if read and item.get("state") == "pending" and not hl.get("complete"):
        hl = await complete_headline(gw, item, read=True)  # a reviewer opened it: read it, as the diff does
    item["headline"] = hl
    return item


async def review_show(request: web.Request) -> web.Response:
    reviewer(request)
    gw = _gw(request)
    return json_response(await _decorated(gw, await gw.review.get(request.match_info["id"]), read=True))


async def review_approve(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    gw = _gw(request)
    item = await gw.review.approve(request.match_info["id"], who, edit=doc.get("edit"), note=doc.get("note"))
    return json_response(await _decorated(gw, item))


async def review_reject(request: web.Request) -> web.Response:
    who = reviewer(request)
    doc = await _json_body(request)
    gw = _gw(request)
    item = await gw.review.reject(request.match_info["id"], who, str(doc.get("reason") or ""))
    return json_response(await _decorated(gw, item))


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
    gw = _gw(request)
    return json_response({"agents": await gw.governance.agents_status(), "upstreams": gw.quota.status()})


async def upstream_quota(request: web.Request) -> web.Response:
    reviewer(request)
    return json_response({"upstreams": _gw(request).quota.status()})


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


_JOURNAL_FILTERS = (("decision", "decision"), ("kind", "kind"), ("request_id", "request_id"))
# matched as a case-insensitive part of the value ("jane" finds ae:jane@acme.example)
_JOURNAL_PARTIAL = (("agent", "agent"), ("user", "on_behalf_of"), ("capability", "capability"))


async def journal_list(request: web.Request) -> web.Response:
    """Newest first; ``before_seq`` pages back; ``q`` searches intent, path, reason and ids."""
    reviewer(request)
    from ...journal.search import journal_time

    q = request.query
    filters = {col: q[name] for name, col in _JOURNAL_FILTERS if q.get(name)}
    partial: dict[str, str] = {}
    for name, col in _JOURNAL_PARTIAL:
        value = (q.get(name) or "").strip()
        if not value:
            continue
        if await _gw(request).store.journal_query(filters={col: value}, limit=1, descending=True):
            filters[col] = value  # the journal holds this exact name: an indexed filter
        else:
            partial[col] = value.lower()
    limit = min(int(_float(q.get("limit"), "limit") or 100), 1000)
    before = int(q["before_seq"]) if q.get("before_seq", "").isdigit() else None
    text = (q.get("q") or "").strip().lower()
    scan = bool(text or partial)
    scanned = 0
    try:
        since, until = journal_time(q.get("since") or None), journal_time(q.get("until") or None)
    except ValueError as exc:
        raise TetherError("bad_request", f"since/until: {exc}") from None
    store = _gw(request).store
    out: list[dict] = []
    cursor = before
    while len(out) < limit:
        rows = await store.journal_query(before_seq=cursor, filters=filters, since=since, until=until,
                                         descending=True, limit=500 if scan else limit)
        if not rows:
            break
        for r in rows:
            scanned += 1
            if partial and not all(needle in str(r.columns.get(col) or "").lower() for col, needle in partial.items()):
                continue
            rec = r.record()
            if text and text not in orjson.dumps(rec).decode().lower():
                continue
            out.append({"seq": r.seq, "hash": r.hash, **rec})
            if len(out) >= limit:
                break
        cursor = rows[-1].seq
        if not scan or scanned >= JOURNAL_SCAN_LIMIT:
            break
    stopped = cursor if scan and scanned >= JOURNAL_SCAN_LIMIT and len(out) < limit else None
    return json_response({"records": out, "next_before_seq": stopped or (out[-1]["seq"] if out else None),
                          "more": bool(stopped) or len(out) >= limit, "scanned": scanned})


JOURNAL_SCAN_LIMIT = 50_000  # records one search reads before it answers with what it found (and a cursor)


async def journal_record(request: web.Request) -> web.Response:
    """One record with its context: the other records of its request, its review item, its transaction."""
    reviewer(request)
    gw = _gw(request)
    seq = int(request.match_info["seq"])
    rows = await gw.store.journal_query(after_seq=seq - 1, before_seq=seq + 1, limit=1)
    if not rows:
        raise TetherError("not_found", f"no journal record {seq}")
    rec = {"seq": rows[0].seq, "hash": rows[0].hash, "prev_hash": rows[0].prev_hash, **rows[0].record()}
    integrity = await _record_integrity(gw, rows[0])
    related = []
    if rec.get("request_id"):
        related = [{"seq": r.seq, **r.record()} for r in
                   await gw.store.journal_query(filters={"request_id": rec["request_id"]}, limit=50)]
    item_id = rec.get("review_item") or next((r["review_item"] for r in related if r.get("review_item")), None)
    item = await gw.store.review_get(item_id) if item_id else None
    tx = await gw.transactions.describe(rec["tx"]) if rec.get("tx") and await gw.store.tx_get(rec["tx"]) else None
    return json_response({"record": rec, "related": related, "review_item": item, "transaction": tx,
                          "integrity": integrity})


async def _record_integrity(gw: "Runtime", row: Any) -> dict[str, Any]:
    """Is this record as written? Its hash over its content, its link to the record before and the next
    record's link to it, its indexed columns (what `journal verify` checks, for this one record)."""
    from ...chain import INDEXED_FIELDS, record_hash

    problems = []
    if record_hash(row.prev_hash, row.seq, row.payload) != row.hash:
        problems.append("its hash does not match its content: the record was altered")
    try:
        doc = row.record()  # a compact record expanded: the columns hold the whole record's values
    except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError):
        doc = {}
        problems.append("its content is not JSON")
    for col in INDEXED_FIELDS:
        if col in row.columns and row.columns[col] != doc.get(col):
            problems.append(f"its {col} column ({row.columns[col]!r}) differs from the record ({doc.get(col)!r})")
    near = await gw.store.journal_query(after_seq=row.seq - 2, before_seq=row.seq + 2, limit=3)
    by_seq = {r.seq: r for r in near}
    before, after = by_seq.get(row.seq - 1), by_seq.get(row.seq + 1)
    anchor = (await gw.store.journal_anchor())[0]
    if before is not None and before.hash != row.prev_hash:
        problems.append(f"it does not link to record #{row.seq - 1}")
    elif before is None and row.seq - 1 > anchor:
        problems.append(f"record #{row.seq - 1} before it is missing")
    if after is not None and after.prev_hash != row.hash:
        problems.append(f"record #{row.seq + 1} does not link to it (it was replaced)")
    return {"ok": not problems, "problems": problems}


async def journal_verify(request: web.Request) -> web.Response:
    reviewer(request)
    from ...journal.writer import verify

    res = await verify(_gw(request).store)
    return json_response({"ok": res.ok, "checked": res.checked, "first_seq": res.first_seq, "last_seq": res.last_seq,
                          "broken_seq": res.broken_seq, "problem": res.problem})


async def journal_checkpoint(request: web.Request) -> web.Response:
    """A checkpoint of the chain head as it is now, signed with ``server.journal.checkpoint_key``: fetch it
    from outside (cron, a log pipeline) and keep it where the database's owner cannot rewrite it."""
    reviewer(request)
    gw = _gw(request)
    signer = gw.journal.signer
    if signer is None:
        raise TetherError("not_found", "no checkpoint key is configured (server.journal.checkpoint_key)")
    from ...journal.writer import now_iso

    seq, head = await gw.store.journal_head()
    return json_response(signer.sign(seq, head, now_iso()))


async def review_diff(request: web.Request) -> web.Response:
    """For an update: the current record (read now through the gateway) beside the captured change."""
    reviewer(request)
    gw = _gw(request)
    item = await gw.review.get(request.match_info["id"])
    return json_response(await gw.review.diff(item))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``journal`` event per commit (the console refreshes on it)."""
    reviewer(request)
    gw = _gw(request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    ev = gw.journal.subscribe()
    try:
        await resp.write(b"event: hello\ndata: {}\n\n")
        while not gw.draining:
            try:
                await asyncio.wait_for(ev.wait(), 15)
                ev.clear()
                head = (await gw.store.journal_head())[0]
                await resp.write(b"event: journal\ndata: " + orjson.dumps({"head": head}) + b"\n\n")
            except asyncio.TimeoutError:
                await resp.write(b": keep-alive\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        gw.journal.unsubscribe(ev)
    return resp


def build_admin_app(gw: "Runtime") -> web.Application:
    app = web.Application(middlewares=[errors_middleware, identity_middleware], client_max_size=gw.limits.max_body_bytes)
    app[GATEWAY] = gw
    app.router.add_get("/_tether/healthz", healthz)
    app.router.add_get("/_tether/readyz", readyz)
    app.router.add_get("/api/review/items", review_list)
    app.router.add_get("/api/review/items/{id}", review_show)
    app.router.add_post("/api/review/items/{id}/approve", review_approve)
    app.router.add_post("/api/review/items/{id}/reject", review_reject)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/journal", journal_list)
    app.router.add_get("/api/journal/verify", journal_verify)
    app.router.add_get("/api/journal/checkpoint", journal_checkpoint)
    app.router.add_get("/api/journal/{seq:[0-9]+}", journal_record)
    app.router.add_get("/api/review/items/{id}/diff", review_diff)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/agents", agents_status)
    app.router.add_get("/api/upstreams/quota", upstream_quota)
    app.router.add_post("/api/agents/{agent}/{action:release|quarantine}", agent_action)
    app.router.add_get("/api/grants", grants_status)
    app.router.add_get("/api/promotions", promotions_list)
    app.router.add_post("/api/promotions", promotions_create)
    app.router.add_get("/api/promotions/evidence", promotion_evidence)
    app.router.add_get("/api/transactions", tx_list)
    app.router.add_get("/api/transactions/{id}", tx_show)
    app.router.add_post("/api/transactions/{id}/{action:rollback|retry}", tx_rollback)
    app.router.add_get("/api/stats", stats)
    app.router.add_post("/slack/interactions", slack_interactions)
    from .console_routes import add_console_routes
    from .signin import add_signin_routes
    from .slack_review import SlackReviews

    add_console_routes(app)
    add_signin_routes(app, gw)
    app[SLACK] = SlackReviews(gw)
    app[STATS] = StatsCache()
    app.cleanup_ctx.append(_notifier)
    return app


async def _notifier(app: web.Application) -> Any:
    """The review notifier (headlines, Slack messages, review_pending alerts) runs beside the admin API."""
    from .review_notify import ReviewNotifier

    gw: "Runtime" = app[GATEWAY]  # type: ignore[assignment]
    task = asyncio.ensure_future(ReviewNotifier(gw, app[SLACK]).run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await app[SLACK].drain()


async def slack_interactions(request: web.Request) -> web.Response:
    """Slack's interaction callback: authenticated by Slack's request signature, not a reviewer token."""
    return await request.app[SLACK].handle(request)


async def stats(request: web.Request) -> web.Response:
    """Per agent and per upstream time series for the console's charts (see proxy/doors/admin/stats.py)."""
    reviewer(request)
    from ...config import parse_duration

    q = request.query
    try:
        since = parse_duration(q.get("since") or "24h")
    except ValueError:
        raise TetherError("bad_request", "since is a duration such as 24h or 7d") from None
    buckets = int(_float(q.get("buckets"), "buckets") or 24)
    if not 60 <= since <= 90 * 86400 or not 2 <= buckets <= 200:
        raise TetherError("bad_request", "since is 1m..90d and buckets 2..200")
    return json_response(await request.app[STATS].get(_gw(request), since, buckets))
