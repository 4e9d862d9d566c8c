"""Tether's own endpoints on the agent listeners, under the reserved ``/_tether/`` prefix.

* ``GET /_tether/healthz`` — the process is alive (liveness probe); no token needed.
* ``GET /_tether/readyz`` — store writable, journal healthy, upstream credentials readable; no token.
* ``GET /_tether/whoami`` — who Tether thinks the caller is and which capabilities it holds, in which
  mode: agents discover their tools here.
* ``POST /_tether/token`` — RFC 8693 token exchange: the person's token and the agent's become a
  delegation token with a verified human (:mod:`proxy.doors.rest.token_exchange`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ...core.exchange import new_request_id
from ...errors import TetherError
from ...headers import REQUEST_ID
from ...policy.identity import USER_TOKEN
from ...policy.registry import describe
from ..responses import error_response, json_response

if TYPE_CHECKING:
    from ...core.runtime import Runtime
    from ...core.listeners import Listener


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
        from ...safety.transactions import handle_tx_endpoint

        resp = await handle_tx_endpoint(gw, request, ident, path, rid)
        if resp is not None:
            return resp
        raise TetherError("not_found", f"no Tether endpoint {request.method} {path}")
    except TetherError as err:
        return error_response(err, rid)
