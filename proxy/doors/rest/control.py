"""Tether's own endpoints on the agent listeners, under the reserved ``/_tether/`` prefix.

* ``GET /_tether/healthz`` — the process is alive (liveness probe); no token needed.
* ``GET /_tether/readyz`` — store writable, journal healthy, upstream credentials readable; no token.
* ``/_tether/transactions[/{id}[/commit|/rollback]]`` — an agent's transactions (open, read, commit, roll back).
* ``GET /_tether/whoami`` — who Tether thinks the caller is and which capabilities it holds, in which
  mode: agents discover their tools here.
* ``POST /_tether/token`` — RFC 8693 token exchange: the person's token and the agent's become a
  delegation token with a verified human (:mod:`proxy.doors.rest.token_exchange`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ...core.exchange import new_request_id
from ...errors import TetherError
from ...headers import REQUEST_ID
from ...policy.identity import USER_TOKEN, Identity
from ...policy.registry import describe
from ...safety.transactions import TX_ID_RE, tx_name
from ..responses import error_response, json_response
from .protocol import send_continue

if TYPE_CHECKING:
    from ...core.listeners import Listener
    from ...core.runtime import Runtime


async def handle_control(gw: "Runtime", request: web.BaseRequest, lst: "Listener") -> web.StreamResponse:
    path = request.raw_path.partition("?")[0]
    rid = new_request_id()
    try:
        host = request.headers.get("Host", "")
        if not lst.host_allowed(host):  # the same Host policy as agent traffic (DNS rebinding)
            raise TetherError("ambiguous_request", f"Host {host!r} does not belong to this listener")
        if path == "/_tether/healthz" and request.method in ("GET", "HEAD"):
            return json_response({"status": "ok"}, headers={REQUEST_ID: rid})
        if path == "/_tether/readyz" and request.method in ("GET", "HEAD"):
            ok, checks = await gw.readiness()
            return json_response({"ready": ok, "checks": checks}, 200 if ok else 503, headers={REQUEST_ID: rid})
        if path == "/_tether/token":
            from .token_exchange import handle_token

            return await handle_token(gw, request, rid)
        state = gw.state
        auth = request.headers.getall("Authorization", ())
        if len(auth) > 1:
            raise TetherError("ambiguous_request", "more than one Authorization header")
        ident = await state.verifier.identify(auth[0] if auth else None, request.headers.getall(USER_TOKEN, ()))
        if ident.agent not in state.rules.agents:
            raise TetherError("agent_unknown", f"agent {ident.agent!r} is not declared in the rules")
        if path == "/_tether/whoami" and request.method == "GET":
            modes = await gw.governance.grant_modes(ident.agent) if hasattr(gw.governance, "grant_modes") else {}
            grants = []
            for g in state.registry.agent_grants.get(ident.agent, []):
                d = describe(g.capability)
                d["mode"] = modes.get(g.capability.name, g.mode)
                if lst.upstream_name is None:
                    d["base_path"] = f"/{g.capability.upstream}"
                grants.append(d)
            return json_response({
                "agent": ident.agent,
                "on_behalf_of": ident.on_behalf_of,
                "on_behalf_of_proof": ident.on_behalf_of_proof,
                "display": f"Agent {ident.agent} | on behalf of {ident.on_behalf_of or ident.agent}",
                "listener": lst.name,
                "capabilities": grants,
                "rules_version": state.registry.version,
            }, headers={REQUEST_ID: rid})
        resp = await transactions_endpoint(gw, request, ident, path, rid)
        if resp is not None:
            return resp
        raise TetherError("not_found", f"no Tether endpoint {request.method} {path}")
    except TetherError as err:
        return error_response(err, rid)


MAX_TX_REQUEST = 64 * 1024  # a transaction's opening document (id, name, deadline) is small


async def _read_small(request: web.BaseRequest, limit: int) -> bytes:
    """A small body, refused past ``limit`` (413) before more of it is read."""
    if request.content_length is not None and request.content_length > limit:
        raise TetherError("body_too_large", f"the body is {request.content_length} bytes; at most {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise TetherError("body_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def transactions_endpoint(gw: "Runtime", request: web.BaseRequest, ident: Identity, path: str,
                             rid: str) -> web.StreamResponse | None:
    """``/_tether/transactions[/{id}[/commit|/rollback]]`` on the agent listeners."""
    if not path.startswith("/_tether/transactions"):
        return None
    tm = gw.transactions  # proxy.safety.transactions.TransactionManager
    parts = path.split("/")[3:]
    h = {REQUEST_ID: rid}
    if parts in ([], [""]):
        if request.method != "POST":
            raise TetherError("method_not_allowed", "POST /_tether/transactions opens a transaction")
        doc: dict[str, Any] = {}
        await send_continue(request)  # (an agent waiting on Expect: 100-continue)
        raw = await _read_small(request, MAX_TX_REQUEST)
        if raw:
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise TetherError("malformed_json") from None
            if not isinstance(doc, dict):
                raise TetherError("bad_request", "the body must be a JSON object")
        deadline = None
        if doc.get("deadline") is not None:
            from ...config import parse_duration

            try:
                deadline = parse_duration(doc["deadline"])
            except ValueError as exc:
                raise TetherError("bad_request", f"deadline: {exc}") from None
        tx_id = doc.get("id")
        if tx_id is not None and (not isinstance(tx_id, str) or not TX_ID_RE.fullmatch(tx_id)):
            raise TetherError("bad_request", "id must be 1-128 characters of A-Z a-z 0-9 _ . : -")
        if tx_id is not None and await gw.store.tx_get(tx_id) is not None:
            raise TetherError("conflict", f"transaction {tx_id} already exists")
        tx = await tm.open(ident, tx_id=tx_id, name=tx_name(doc.get("name")), deadline=deadline)
        return json_response(tx, 201, headers=h)
    tx_id = parts[0]
    if len(parts) == 1 and request.method == "GET":
        await tm.owned(tx_id, ident)
        return json_response(await tm.describe(tx_id), headers=h)
    if len(parts) == 2 and request.method == "POST" and parts[1] == "commit":
        return json_response(await tm.commit(tx_id, ident), headers=h)
    if len(parts) == 2 and request.method == "POST" and parts[1] == "rollback":
        await tm.owned(tx_id, ident)
        return json_response(await tm.rollback(tx_id, reason="requested by the agent", by=ident.agent), headers=h)
    raise TetherError("not_found", f"no Tether endpoint {request.method} {path}")
