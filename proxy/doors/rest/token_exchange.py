"""``POST /_tether/token``: RFC 8693 token exchange — a person's token plus the agent's becomes a
short-lived delegation token whose human is *verified*.

When a person delegates a task, the agent's application holds that person's token from the company
IdP (an ID token, or an access token for the application). The agent sends it here as
``subject_token`` together with its own token (``actor_token``, or its ``Authorization`` header).
Tether verifies both — the person's against an issuer with ``use: user``, the agent's like any agent
token — and answers with a JWT it signs with ``identity.token_exchange.signing_secret``:
``sub`` = the person, ``act: {sub: <agent>}`` = the agent, ``iss`` = ``token_exchange.issuer``,
``exp`` no later than the person's own token. The agent then calls with that token alone; its
records say ``on_behalf_of_proof: verified``.

Every exchange, granted or refused, is journaled (durably, before the token is handed out). Answers
follow RFC 6749 §5 (``access_token``, ``issued_token_type``, ``token_type``, ``expires_in``; errors as
``{"error": "invalid_request", "error_description": ...}``) so that an OAuth library can call it; each
error also carries Tether's own ``error_code`` and the ``request_id``.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import jwt
import orjson
from aiohttp import web

from ...errors import AuthError, TetherError
from ...headers import REQUEST_ID
from ...journal.writer import JournalUnavailable, base_record
from ...policy.identity import Identity, TokenVerifier
from ...secret import SecretUnavailable

if TYPE_CHECKING:
    from ...core.runtime import Runtime

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
_SUBJECT_TYPES = frozenset({"urn:ietf:params:oauth:token-type:id_token", "urn:ietf:params:oauth:token-type:access_token",
                            TOKEN_TYPE_JWT})
_MAX_BODY = 64 * 1024


class ExchangeError(Exception):
    """A refused exchange: the OAuth error, Tether's code, the HTTP status."""

    def __init__(self, oauth: str, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.oauth, self.code, self.message, self.status = oauth, code, message, status


async def handle_token(gw: "Runtime", request: web.BaseRequest, rid: str) -> web.StreamResponse:
    verifier: TokenVerifier = gw.state.verifier
    agent: Identity | None = None
    user: Identity | None = None
    try:
        if request.method != "POST":
            raise ExchangeError("invalid_request", "method_not_allowed", "use POST", 405)
        tx = verifier.cfg.token_exchange
        if tx is None:
            raise ExchangeError("unsupported_grant_type", "not_found",
                                "token exchange is not configured (identity.token_exchange)", 404)
        form = await _form(request)
        if form.get("grant_type") != GRANT_TYPE:
            raise ExchangeError("unsupported_grant_type", "bad_request", f"grant_type must be {GRANT_TYPE}")
        subject = form.get("subject_token")
        if not subject:
            raise ExchangeError("invalid_request", "bad_request", "subject_token (the person's token) is required")
        if form.get("subject_token_type") not in _SUBJECT_TYPES:
            raise ExchangeError("invalid_request", "bad_request",
                                "subject_token_type must be an id_token, access_token or jwt token type")
        rtt = form.get("requested_token_type")
        if rtt not in (None, TOKEN_TYPE_JWT, "urn:ietf:params:oauth:token-type:access_token"):
            raise ExchangeError("invalid_request", "bad_request", f"requested_token_type {rtt!r} cannot be issued")
        aud = verifier.cfg.audience or "tether"
        for name in ("audience", "resource"):
            if form.get(name) not in (None, aud):
                raise ExchangeError("invalid_target", "bad_request", f"{name} must be {aud!r} (Tether's own) or absent")
        actor = form.get("actor_token")
        from_header = actor is None
        if actor is not None:
            if form.get("actor_token_type") not in _SUBJECT_TYPES:
                raise ExchangeError("invalid_request", "bad_request", "actor_token_type is required with actor_token")
            authorization = "Bearer " + actor
        else:
            authorization = request.headers.get("Authorization")
            if not authorization:
                raise ExchangeError("invalid_request", "token_missing",
                                    "actor_token (or Authorization: Bearer) with the agent's token is required")
        try:
            agent = await verifier.identify(authorization)
        except AuthError as err:
            raise ExchangeError("invalid_client" if from_header else "invalid_request", err.code,
                                f"actor_token: {err.message}", 401 if from_header else 400) from None
        if agent.on_behalf_of is not None:
            raise ExchangeError("invalid_request", "bad_request",
                                "actor_token already acts for someone; exchange the agent's own token")
        if agent.agent not in gw.state.rules.agents:
            raise ExchangeError("unauthorized_client", "agent_unknown",
                                f"agent {agent.agent!r} is not declared in the rules", 403)
        try:
            user = await verifier.verify_user(subject)
        except AuthError as err:
            raise ExchangeError("invalid_request", err.code, f"subject_token: {err.message}") from None
        token, exp, jti = _mint(verifier, agent, user)
    except ExchangeError as err:
        await _journal(gw, rid, request, agent, user, decision="denied", reason=err.code,
                       extra={"status": err.status, "error": err.code, "message": err.message})
        return _oauth_error(err, rid)
    except TetherError as err:  # identity_unavailable, ambiguous form, ...
        await _journal(gw, rid, request, agent, user, decision="denied", reason=err.code,
                       extra={"status": err.status, "error": err.code, "message": err.message})
        oauth = "temporarily_unavailable" if err.status >= 500 else "invalid_request"
        return _oauth_error(ExchangeError(oauth, err.code, err.message, err.status), rid)
    assert agent is not None and user is not None
    if not await _journal(gw, rid, request, agent, user, decision="allowed", reason="token_exchange",
                          extra={"status": 200, "jti": jti, "expires_at": exp, "user_issuer": user.user_issuer}):
        return _oauth_error(ExchangeError("temporarily_unavailable", "journal_unavailable",
                                          "the audit journal could not be written; no token was issued", 503), rid)
    return web.Response(body=orjson.dumps({
        "access_token": token, "issued_token_type": TOKEN_TYPE_JWT, "token_type": "Bearer",
        "expires_in": max(0, int(exp - time.time())),
    }), content_type="application/json", headers={REQUEST_ID: rid, "Cache-Control": "no-store", "Pragma": "no-cache"})


async def _form(request: web.BaseRequest) -> dict[str, str]:
    ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise ExchangeError("invalid_request", "bad_request", "send the parameters as application/x-www-form-urlencoded")
    if request.content_length is not None and request.content_length > _MAX_BODY:
        raise ExchangeError("invalid_request", "body_too_large", f"the body exceeds {_MAX_BODY} bytes", 413)
    body = await request.content.read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise ExchangeError("invalid_request", "body_too_large", f"the body exceeds {_MAX_BODY} bytes", 413)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise ExchangeError("invalid_request", "bad_request", "the body is not a valid form") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise ExchangeError("invalid_request", "ambiguous_request", f"parameter {k!r} is repeated")
        out[k] = v
    return out


def _mint(verifier: TokenVerifier, agent: Identity, user: Identity) -> tuple[str, float, str]:
    cfg = verifier.cfg
    tx = cfg.token_exchange
    assert tx is not None and user.on_behalf_of is not None
    now = int(time.time())
    user_exp = user.claims.get("exp")
    exp = now + int(tx.ttl)
    if isinstance(user_exp, (int, float)):
        exp = min(exp, int(user_exp))  # never outlive the person's own token
    jti = secrets.token_urlsafe(16)
    claims: dict[str, Any] = {
        "iss": tx.issuer, "aud": cfg.audience or "tether", "sub": user.on_behalf_of, "act": {"sub": agent.agent},
        "iat": now, "nbf": now, "exp": exp, "jti": jti,
    }
    if user.user_issuer:
        claims["tether_user_iss"] = user.user_issuer
    from ...secret import Secret

    try:
        key = Secret(tx.signing_secret, "identity.token_exchange.signing_secret").get().encode()
    except SecretUnavailable as exc:
        raise TetherError("identity_unavailable", f"Tether cannot read its delegation key ({exc})") from None
    return jwt.encode(claims, key, algorithm="HS256"), float(exp), jti


async def _journal(gw: "Runtime", rid: str, request: web.BaseRequest, agent: Identity | None, user: Identity | None,
                   *, decision: str, reason: str, extra: dict[str, Any]) -> bool:
    rec = base_record("request", request_id=rid, agent=agent.agent if agent else None,
                      on_behalf_of=user.on_behalf_of if user else None, method=request.method, path="/_tether/token",
                      decision=decision, reason=reason)
    rec["on_behalf_of_proof"] = "verified" if user else None
    rec.update(extra)
    try:
        await gw.journal.write(rec)
        return True
    except JournalUnavailable:
        return False


def _oauth_error(err: ExchangeError, rid: str) -> web.Response:
    headers = {REQUEST_ID: rid, "Cache-Control": "no-store"}
    if err.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tether", error="invalid_token"'
    return web.Response(body=orjson.dumps({"error": err.oauth, "error_description": err.message,
                                           "error_code": err.code, "request_id": rid}),
                        status=err.status, content_type="application/json", headers=headers)
