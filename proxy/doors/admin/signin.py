"""Reviewers sign in to the console with the company's identity provider: OpenID Connect authorization
code flow with PKCE, and a session cookie on the admin listener.

Routes (admin listener only, present when ``identity.console`` is configured):

* ``GET /auth/login`` — a fresh ``state``, ``nonce`` and PKCE ``code_verifier`` go into a short-lived,
  signed login cookie (``SameSite=Lax``: it must come back on the IdP's cross-site redirect), and the
  browser is sent to the IdP's ``authorization_endpoint`` (``code_challenge_method=S256``).
* ``GET /auth/callback`` — the state is checked against the login cookie, the code exchanged at the
  ``token_endpoint`` with the code verifier (and the client secret, for a confidential client); the ID
  token's signature is verified with the issuer's keys (:mod:`proxy.policy.jwks`, the same cache the agents'
  tokens use) and its claims — ``iss``, ``aud``, ``exp``, ``nonce``, ``azp``, ``at_hash`` — by Authlib's
  ``CodeIDToken``. The reviewer role comes from ``reviewer_claim`` (in the ID token, else from the
  UserInfo endpoint). A reviewer gets a session cookie; anyone else an explanation.
* ``GET /auth/session`` — for the console: whether sign-in is configured, who is signed in, and the
  CSRF token that must accompany every state-changing call made with the cookie.
* ``POST /auth/logout`` — ends the session (the cookie is cleared and its id refused from then on).

The session cookie is ``HttpOnly``, ``SameSite=Strict``, ``Path=/``, host-only (no ``Domain``: the
browser sends it back to this host only; the agent listeners never read it and strip cookies before
forwarding), ``Secure`` when the console is reached over https. It holds a JWT signed with
``session_secret`` (else a key derived from the client secret, else a per-process random key). A
request authenticated by the cookie that changes anything must carry ``X-Tether-CSRF`` equal to the
session's CSRF token, and an ``Origin`` other than the admin listener's own is refused — SameSite
alone does not stop another port of the same host.

Protocol pieces come from Authlib (authorization URL, PKCE challenge, state check, token request,
ID token claim rules); the HTTP is aiohttp's, so the admin listener's event loop never blocks. Pasting
a token stays possible for development.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import orjson
from aiohttp import web
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.errors import OAuth2Error
from authlib.oauth2.rfc6749.parameters import (
    parse_authorization_code_response,
    prepare_grant_uri,
    prepare_token_request,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken

from ...config import ConsoleSignInConfig
from ...errors import AuthError, TetherError
from ...policy.identity import Identity, check_name, parse_unverified
from ...secret import Secret, SecretUnavailable

if TYPE_CHECKING:
    from ...core.runtime import Runtime

log = logging.getLogger("tether.signin")

SESSION_COOKIE = "tether_session"
LOGIN_COOKIE = "tether_login"
CSRF_HEADER = "X-Tether-CSRF"
_SESSION_ISS = "tether:console"
_LOGIN_TTL = 600
_NEXT = re.compile(r"/console/[A-Za-z0-9/#._~-]{0,200}")
_PROCESS_KEY = os.urandom(32)  # default session key of a single process (see session_key)


class SignIn:
    """The console's OIDC client for one ``identity.console`` configuration (rebuilt on reload)."""

    def __init__(self, gw: "Runtime", cfg: ConsoleSignInConfig) -> None:
        self.gw = gw
        self.cfg = cfg
        self._client_secret = Secret(cfg.client_secret, "identity.console.client_secret") if cfg.client_secret else None
        self._session_secret = Secret(cfg.session_secret, "identity.console.session_secret") if cfg.session_secret else None
        self._revoked: dict[str, float] = {}  # session jti -> its exp (signed out before expiry)

    # -- keys --------------------------------------------------------------------------------------

    def session_key(self) -> bytes:
        """``session_secret``, else a key derived from the client secret (shared by every replica that has
        it), else a random key of this process (sessions then end with the process)."""
        try:
            if self._session_secret is not None:
                return hashlib.sha256(b"tether-session\0" + self._session_secret.get().encode()).digest()
            if self._client_secret is not None:
                return hmac.new(self._client_secret.get().encode(), b"tether-console-session", hashlib.sha256).digest()
        except SecretUnavailable as exc:
            raise TetherError("identity_unavailable", f"the console's session key is unavailable ({exc})") from None
        return _PROCESS_KEY

    # -- sessions ------------------------------------------------------------------------------------

    def session_identity(self, request: web.Request) -> tuple[Identity, dict[str, Any]] | None:
        """The reviewer a valid session cookie names (None without a cookie); raises AuthError for a bad one."""
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            parse_unverified(raw)
            claims = jwt.decode(raw, self.session_key(), algorithms=["HS256"], audience=_SESSION_ISS,
                                issuer=_SESSION_ISS, options={"require": ["exp", "sub", "jti", "csrf"]})
        except AuthError:
            raise AuthError("token_malformed", "the console session cookie is malformed; sign in again") from None
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", "the console session has expired; sign in again") from None
        except jwt.PyJWTError:
            raise AuthError("token_invalid_signature", "the console session is not valid here; sign in again") from None
        if claims["jti"] in self._revoked:
            raise AuthError("token_expired", "this console session was signed out")
        roles = tuple(str(r) for r in claims.get("roles") or ())
        ident = Identity(agent=claims["sub"], on_behalf_of=None, roles=roles, token_id=claims["jti"], claims=claims,
                         issuer=claims.get("idp"))
        return ident, claims

    def _new_session(self, name: str, idp_claims: dict[str, Any]) -> tuple[str, int]:
        now = int(time.time())
        exp = now + int(self.cfg.session_ttl)
        claims = {"iss": _SESSION_ISS, "aud": _SESSION_ISS, "sub": name, "iat": now, "exp": exp,
                  "jti": secrets.token_urlsafe(16), "csrf": secrets.token_urlsafe(24),
                  "roles": [self.gw.state.rules.identity.reviewer_role], "idp": self.cfg.issuer,
                  "idp_sub": idp_claims.get("sub")}
        return jwt.encode(claims, self.session_key(), algorithm="HS256"), exp

    # -- the flow ------------------------------------------------------------------------------------

    def _redirect_uri(self, request: web.Request) -> str:
        if self.cfg.redirect_url:
            return self.cfg.redirect_url
        # the IdP only redirects to URIs registered for the client, so a forged Host gains nothing
        return f"{request.scheme}://{request.host}/auth/callback"

    async def _discovery(self) -> dict[str, Any]:
        keys = self.gw.state.verifier.console_keys
        assert keys is not None
        if keys.discovery is None:
            await keys.refresh()
        if keys.discovery is None:
            raise TetherError("identity_unavailable", f"the identity provider {self.cfg.issuer!r} cannot be reached: "
                                                      f"{keys.last_error or 'no discovery document'}")
        return keys.discovery

    async def login(self, request: web.Request) -> web.StreamResponse:
        disc = await self._discovery()
        endpoint = disc.get("authorization_endpoint")
        if not isinstance(endpoint, str):
            raise TetherError("identity_unavailable", "the discovery document has no authorization_endpoint")
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        redirect_uri = self._redirect_uri(request)
        nxt = request.query.get("next", "/console/")
        if not nxt.startswith("/console/") or not _NEXT.fullmatch(nxt):
            nxt = "/console/"  # never an open redirect
        url = prepare_grant_uri(endpoint, self.cfg.client_id, "code", redirect_uri=redirect_uri,
                                scope=self.cfg.scopes, state=state, nonce=nonce,
                                code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256")
        login = jwt.encode({"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri,
                            "next": nxt, "exp": int(time.time()) + _LOGIN_TTL, "aud": "tether:login"},
                           self.session_key(), algorithm="HS256")
        resp = _redirect(url)
        resp.set_cookie(LOGIN_COOKIE, login, max_age=_LOGIN_TTL, path="/auth/", httponly=True, samesite="Lax",
                        secure=_secure(request))
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def callback(self, request: web.Request) -> web.StreamResponse:
        raw = request.cookies.get(LOGIN_COOKIE)
        if request.query.get("error"):
            return self._failed(request, f"the identity provider refused the sign-in: {request.query.get('error')}"
                                         f" {request.query.get('error_description') or ''}".strip())
        if not raw:
            return self._failed(request, "the sign-in took too long or started in another browser; start again")
        try:
            login = jwt.decode(raw, self.session_key(), algorithms=["HS256"], audience="tether:login")
        except jwt.PyJWTError:
            return self._failed(request, "the sign-in expired; start again")
        try:
            params = parse_authorization_code_response(str(request.url), state=login["state"])
        except OAuth2Error as exc:
            return self._failed(request, f"the answer from the identity provider does not belong to this sign-in "
                                         f"({exc.error})")
        try:
            tokens = await self._exchange(params["code"], login)
            claims = await self._id_claims(tokens, login)
            name, reviewer = await self._who(claims, tokens)
        except TetherError as err:
            return self._failed(request, err.message)
        if not reviewer:
            await self._journal("console_sign_in_refused", name, reason=f"no {self.cfg.reviewer_role!r} in "
                                                                        f"{self.cfg.reviewer_claim!r}")
            return self._failed(request, f"{name} signed in, but is not a reviewer: the identity provider's "
                                         f"{self.cfg.reviewer_claim!r} claim does not include {self.cfg.reviewer_role!r}",
                                status=403)
        session, exp = self._new_session(name, claims)
        await self._journal("console_sign_in", name)
        resp = _redirect(login.get("next") or "/console/")
        resp.set_cookie(SESSION_COOKIE, session, max_age=int(exp - time.time()), path="/", httponly=True,
                        samesite="Strict", secure=_secure(request))
        resp.del_cookie(LOGIN_COOKIE, path="/auth/")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def _exchange(self, code: str, login: dict[str, Any]) -> dict[str, Any]:
        disc = await self._discovery()
        endpoint = disc.get("token_endpoint")
        if not isinstance(endpoint, str):
            raise TetherError("identity_unavailable", "the discovery document has no token_endpoint")
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        extra: dict[str, Any] = {}
        if self._client_secret is not None:  # client_secret_basic (RFC 6749 §2.3.1: form-encode, then Basic)
            from urllib.parse import quote

            pair = f"{quote(self.cfg.client_id, safe='')}:{quote(self._client_secret.get(), safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            extra["client_id"] = self.cfg.client_id
        body = prepare_token_request("authorization_code", code=code, redirect_uri=login["redirect_uri"],
                                     code_verifier=login["verifier"], **extra)
        doc = await self._call("POST", endpoint, data=body, headers=headers)
        if not isinstance(doc, dict) or not isinstance(doc.get("id_token"), str):
            raise TetherError("identity_unavailable", "the token endpoint answered without an id_token")
        return doc

    async def _call(self, method: str, url: str, **kw: Any) -> Any:
        keys = self.gw.state.verifier.console_keys
        assert keys is not None
        try:
            async with keys.owner_session().request(method, url, ssl=keys.ssl_context(), allow_redirects=False,
                                                    timeout=aiohttp.ClientTimeout(total=10), **kw) as resp:
                text = await resp.read()
                doc = orjson.loads(text) if text else None
                if resp.status != 200:
                    err = doc.get("error") if isinstance(doc, dict) else None
                    raise TetherError("identity_unavailable", f"{url} answered {resp.status}"
                                                              + (f" ({err})" if err else ""))
                return doc
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise TetherError("identity_unavailable", f"{url}: {type(exc).__name__}: {exc}") from None

    async def _id_claims(self, tokens: dict[str, Any], login: dict[str, Any]) -> dict[str, Any]:
        id_token = tokens["id_token"]
        try:
            header, _ = parse_unverified(id_token, "id_token: ")
        except AuthError as err:
            raise TetherError("bad_request", err.message) from None
        alg = header.get("alg")
        if alg not in self.cfg.algorithms:
            raise TetherError("bad_request", f"the ID token is signed with {alg!r}; expected {self.cfg.algorithms}")
        keys = self.gw.state.verifier.console_keys
        assert keys is not None
        jwk = await keys.key_for(header.get("kid"))
        if jwk is None:
            raise TetherError("bad_request", f"no key {header.get('kid')!r} for the ID token")
        try:
            claims = jwt.decode(id_token, jwk.key, algorithms=[alg], audience=self.cfg.client_id, issuer=self.cfg.issuer,
                                leeway=5, options={"require": ["exp", "iat", "sub", "iss", "aud"]})
            # OpenID Connect's own rules on top of the signature: nonce, azp, at_hash, auth_time (Authlib)
            CodeIDToken(claims, header, params={"nonce": login["nonce"], "client_id": self.cfg.client_id,
                                                "access_token": tokens.get("access_token")}).validate(leeway=5)
        except jwt.PyJWTError as exc:
            raise TetherError("bad_request", f"the ID token is not valid: {exc}") from None
        except Exception as exc:  # joserfc's claim errors
            raise TetherError("bad_request", f"the ID token's claims are not valid: {exc}") from None
        return claims

    async def _who(self, claims: dict[str, Any], tokens: dict[str, Any]) -> tuple[str, bool]:
        merged = dict(claims)
        need = (self.cfg.reviewer_claim, self.cfg.name_claim)
        disc = await self._discovery()
        if any(c not in merged for c in need) and isinstance(disc.get("userinfo_endpoint"), str) \
                and isinstance(tokens.get("access_token"), str):
            info = await self._call("GET", disc["userinfo_endpoint"],
                                    headers={"Authorization": f"Bearer {tokens['access_token']}",
                                             "Accept": "application/json"})
            if isinstance(info, dict) and info.get("sub") == claims.get("sub"):  # OIDC Core §5.3.2
                for k, v in info.items():
                    merged.setdefault(k, v)
        raw_name = merged.get(self.cfg.name_claim) or merged.get("sub")
        try:
            name = check_name(raw_name, self.cfg.name_claim)
        except AuthError as err:
            raise TetherError("bad_request", err.message) from None
        roles = merged.get(self.cfg.reviewer_claim)
        if isinstance(roles, str):
            roles = roles.split()
        ok = isinstance(roles, list) and self.cfg.reviewer_role in [str(r) for r in roles]
        return name, ok

    async def logout(self, request: web.Request) -> web.StreamResponse:
        got = None
        try:
            got = self.session_identity(request)
        except AuthError:
            pass
        if got is not None:
            ident, claims = got
            check_csrf(request, claims)
            self._revoked[claims["jti"]] = float(claims["exp"])
            now = time.time()
            for jti, exp in list(self._revoked.items()):
                if exp < now:
                    del self._revoked[jti]
            await self._journal("console_sign_out", ident.agent)
        disc = self.gw.state.verifier.console_keys
        end = (disc.discovery or {}).get("end_session_endpoint") if disc is not None else None
        resp = web.Response(body=orjson.dumps({"signed_out": True, "end_session_endpoint": end}),
                            content_type="application/json", headers={"Cache-Control": "no-store"})
        resp.del_cookie(SESSION_COOKIE, path="/")
        return resp

    async def session_info(self, request: web.Request) -> web.StreamResponse:
        out: dict[str, Any] = {"sign_in": True, "sign_in_url": "/auth/login", "issuer": self.cfg.issuer,
                               "signed_in": False}
        try:
            got = self.session_identity(request)
        except AuthError as err:
            got = None
            out["problem"] = err.message
        if got is not None:
            ident, claims = got
            out.update(signed_in=True, reviewer=ident.agent, csrf=claims["csrf"], expires_at=claims["exp"])
        return web.Response(body=orjson.dumps(out), content_type="application/json", headers={"Cache-Control": "no-store"})

    def _failed(self, request: web.Request, message: str, status: int = 400) -> web.Response:
        from html import escape

        page = ("<!doctype html><meta charset='utf-8'><title>Sign-in failed — Tether</title>"
                "<link rel='stylesheet' href='/console/app.css'><main class='signin'><h1>Sign-in failed</h1>"
                f"<p id='signin-failure'>{escape(message)}</p><p><a href='/console/'>Back to the console</a></p></main>")
        resp = web.Response(text=page, status=status, content_type="text/html",
                            headers={"Cache-Control": "no-store", "Content-Security-Policy":
                                     "default-src 'none'; style-src 'self'; frame-ancestors 'none'"})
        resp.del_cookie(LOGIN_COOKIE, path="/auth/")
        log.warning("console sign-in failed: %s", message)
        return resp

    async def _journal(self, event: str, reviewer: str, **fields: Any) -> None:
        from ...journal.writer import base_record

        try:
            await self.gw.journal.write(base_record("system", event=event, reviewer=reviewer, issuer=self.cfg.issuer,
                                                    **fields))
        except Exception as exc:  # noqa: BLE001 - a sign-in is not refused for want of its record
            log.error("could not journal %s: %s", event, exc)


def check_csrf(request: web.Request, claims: dict[str, Any]) -> None:
    """A cookie-authenticated call that changes state must prove it comes from the console's own page."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, str(claims.get("csrf", ""))):
        raise TetherError("forbidden", f"a call made with the console session needs the {CSRF_HEADER} header "
                                       "from /auth/session")
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null":
        o = urlsplit(origin)
        if o.netloc.lower() != request.host.lower():
            raise TetherError("forbidden", f"Origin {origin!r} is not this console")


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def _secure(request: web.Request) -> bool:
    return request.scheme == "https"


class SignInHolder:
    """The SignIn of the gateway's current rules: rebuilt when a reload changes ``identity.console``;
    signed-out sessions are remembered across rebuilds."""

    def __init__(self, gw: "Runtime") -> None:
        self.gw = gw
        self._cfg: ConsoleSignInConfig | None = None
        self._signin: SignIn | None = None
        self.revoked: dict[str, float] = {}

    def get(self) -> SignIn | None:
        cfg = self.gw.state.rules.identity.console
        if cfg is None:
            return None
        if self._signin is None or self._cfg is not cfg:
            self._cfg, self._signin = cfg, SignIn(self.gw, cfg)
            self._signin._revoked = self.revoked
        return self._signin


SIGNIN = web.AppKey("signin", SignInHolder)


def add_signin_routes(app: web.Application, gw: "Runtime") -> None:
    """Mount /auth/* (routes look the configuration up per request, so a rules reload applies)."""
    holder = app[SIGNIN] = SignInHolder(gw)

    def current() -> SignIn:
        s = holder.get()
        if s is None:
            raise TetherError("not_found", "console sign-in with an identity provider is not configured "
                                           "(identity.console)")
        return s

    async def login(request: web.Request) -> web.StreamResponse:
        return await current().login(request)

    async def callback(request: web.Request) -> web.StreamResponse:
        return await current().callback(request)

    async def logout(request: web.Request) -> web.StreamResponse:
        return await current().logout(request)

    async def session(request: web.Request) -> web.StreamResponse:
        s = holder.get()
        if s is None:
            return web.Response(body=b'{"sign_in":false,"signed_in":false}', content_type="application/json",
                                headers={"Cache-Control": "no-store"})
        return await s.session_info(request)

    app.router.add_get("/auth/login", login)
    app.router.add_get("/auth/callback", callback)
    app.router.add_post("/auth/logout", logout)
    app.router.add_get("/auth/session", session)
