"""Who is calling: the agent, the human it acts for (verified or merely asserted), and the reviewer.

Tokens are JWTs verified with PyJWT. Three kinds of key can vouch for one:

* the **local key** of the rules file (``identity.hs_secret`` / ``public_key_file`` / ``jwks_file``,
  tokens with ``iss: identity.issuer``) — development and ``tether token mint``;
* **issuers** (``identity.issuers``): the company's identity providers and Kubernetes clusters, whose
  keys come from OIDC discovery or a JWKS (:mod:`proxy.policy.jwks`). A token is routed to its entry by its
  ``iss`` *and* by where it was presented: ``Authorization`` is an agent's token (``use: agent``),
  ``X-Tether-User-Token`` a person's (``use: user``), so a person's token can never pass as an agent's
  nor the reverse;
* Tether's own **delegation tokens** from ``POST /_tether/token`` (:mod:`proxy.doors.rest.token_exchange`).

The accepted algorithms are pinned in configuration per key and never taken from the token: ``none``
is never accepted, an HMAC secret never verifies an RS/ES token and a public key never verifies an HMAC
token (algorithm confusion), and with a JWKS the ``kid`` selects the key. A header Tether cannot use —
``crit`` (Tether implements no JWS extension), a non-string ``kid``, a registered field of the wrong
type — is ``401 token_malformed``, never a 500; so are numeric dates that are not plain numbers.

Two-dimensional identity follows RFC 8693 (token exchange): when a token has an ``act`` claim,
``act.sub`` is the agent (the actor) and ``sub`` is the human on whose behalf it acts; without ``act``,
``sub`` is the agent acting for itself. A human named by a development token is only **asserted**
(whoever minted the token chose it); one proven by the IdP — a verified user token alongside, or a
delegation token Tether issued after verifying one — is **verified**, and only that satisfies a grant's
``require_verified_user``. Names that end up in provenance headers (agent, human) must be free of
control, bidi and line-separator characters: such a token is refused before anything is forwarded.

Verified tokens are cached (bounded) so that an agent reusing its token pays for the signature check
once; expiry and not-before are re-checked on every hit, and a hit is dropped when the key that
verified it is gone (a rotated secret, a kid the issuer withdrew).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import jwt
import orjson
from jwt import PyJWK
from jwt.utils import base64url_decode

from ..config import IdentityConfig, IssuerConfig
from ..errors import AuthError, TetherError
from ..secret import Secret, SecretUnavailable
from ..text import UNSAFE_TEXT
from .jwks import KeySet, KeySets, KeysUnavailable

USER_TOKEN = "X-Tether-User-Token"
"""The header carrying the person's own token from the company IdP (never forwarded: ``X-Tether-*``)."""

MAX_NAME = 256
_BAD_NAME = UNSAFE_TEXT  # proxy.text: control, separator and bidi characters
# registered JOSE header parameters and the JSON type each must have
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "alg": str, "kid": str, "typ": str, "cty": str, "x5t": str, "x5t#S256": str, "jku": str, "x5u": str,
    "jwk": dict, "x5c": list,
}
_NUMERIC_DATES = ("exp", "nbf", "iat")
_MAX_DATE = 1e11  # year 5138: a date beyond it is not a date
_CACHE_MAX = 20000


@dataclass(frozen=True, slots=True)
class Identity:
    agent: str
    on_behalf_of: str | None
    roles: tuple[str, ...] = ()
    token_id: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    user_verified: bool = False  # on_behalf_of proven by an IdP (not just named by the agent's token)
    issuer: str | None = None  # who vouched for the agent
    user_issuer: str | None = None  # who vouched for the human, when verified

    @property
    def principal(self) -> str:
        """The identity that acts: the agent name (or the reviewer's subject)."""
        return self.agent

    @property
    def on_behalf_of_proof(self) -> str | None:
        """``verified`` (an IdP proved the human), ``asserted`` (the agent's token only names one) or None."""
        if self.on_behalf_of is None:
            return None
        return "verified" if self.user_verified else "asserted"


def check_name(value: Any, what: str, *, prefix: str = "") -> str:
    """A claim that becomes an identity (and a provenance header): a non-empty string of printable
    characters, at most MAX_NAME long. Anything else is refused as 401 token_malformed."""
    if not isinstance(value, str) or not value:
        raise AuthError("token_missing_claim", f"{prefix}the token's {what} must be a non-empty string")
    if len(value) > MAX_NAME:
        raise AuthError("token_malformed", f"{prefix}the token's {what} is longer than {MAX_NAME} characters")
    if _BAD_NAME.search(value) or value != value.strip():
        raise AuthError("token_malformed", f"{prefix}the token's {what} holds control, separator or bidi "
                                           "characters (or surrounding spaces); refused")
    return value


def parse_unverified(token: str, prefix: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS, *unverified*, checked for what Tether can use: used only to
    route the token to its key, never to trust it."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise AuthError("token_malformed", f"{prefix}not a JWT (header.payload.signature)")
    try:
        header = orjson.loads(base64url_decode(parts[0]))
        payload = orjson.loads(base64url_decode(parts[1]))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise AuthError("token_malformed", f"{prefix}the token's header or payload is not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise AuthError("token_malformed", f"{prefix}the token's header and payload must be JSON objects")
    if "crit" in header:
        raise AuthError("token_malformed", f"{prefix}the token's header has 'crit': Tether implements no JWS "
                                           "extension, so it cannot honour one")
    for name, typ in _HEADER_TYPES.items():
        if name in header and not isinstance(header[name], typ):
            raise AuthError("token_malformed", f"{prefix}the token's header field {name!r} has the wrong type")
    if "b64" in header:
        raise AuthError("token_malformed", f"{prefix}unencoded payloads (b64) are not accepted")
    _check_dates(payload, prefix)
    return header, payload


def _check_dates(claims: dict[str, Any], prefix: str) -> None:
    for name in _NUMERIC_DATES:
        if name in claims:
            v = claims[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > _MAX_DATE:
                raise AuthError("token_malformed", f"{prefix}the token's {name} is not a date (seconds since 1970)")


# --------------------------------------------------------------------------- where a token's key comes from


class _Route:
    """One way of verifying tokens: which key, which algorithms and claims, how claims become an identity."""

    __slots__ = ("kind", "issuer", "audience", "algorithms", "leeway", "require", "entry", "keyset", "secret")

    def __init__(self, kind: str, *, issuer: str | None, audience: Any, algorithms: list[str], leeway: float,
                 require: list[str], entry: IssuerConfig | None = None, keyset: KeySet | None = None,
                 secret: Secret | None = None) -> None:
        self.kind = kind  # local / issuer / delegation
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.leeway = leeway
        self.require = require
        self.entry = entry
        self.keyset = keyset
        self.secret = secret


_NEED_FETCH = object()


class TokenVerifier:
    """Verifies JWTs for one IdentityConfig. Built once at startup (and on rules reload); the KeySets it
    draws issuer keys from outlive reloads."""

    _CACHE_MAX = _CACHE_MAX

    def __init__(self, cfg: IdentityConfig, keysets: KeySets | None = None) -> None:
        self.cfg = cfg
        self.keysets = keysets or KeySets()
        self._algorithms = list(cfg.algorithms)
        self._secret = Secret(cfg.hs_secret, "identity.hs_secret") if cfg.hs_secret else None
        self._public_key: Any = None
        self._jwks: dict[str | None, PyJWK] = {}
        if cfg.public_key_file:
            self._public_key = _load_public_key(Path(cfg.public_key_file))
        if cfg.jwks_file:
            self._jwks = _load_jwks(Path(cfg.jwks_file))
        self._local: _Route | None = None
        if cfg.has_local_key:
            self._local = _Route("local", issuer=cfg.issuer, audience=cfg.audience, algorithms=self._algorithms,
                                 leeway=cfg.leeway, require=["exp", "sub"] if cfg.require_exp else ["sub"],
                                 secret=self._secret)
        self._agent_routes: dict[str, _Route] = {}
        self._user_routes: dict[str, _Route] = {}
        for entry in cfg.issuers:
            ks = self.keysets.get(entry.issuer, jwks_url=entry.jwks_url, jwks_file=entry.jwks_file,
                                  ca_file=entry.ca_file, cache=entry.keys)
            route = _Route("issuer", issuer=entry.issuer, audience=list(entry.audiences),
                           algorithms=list(entry.algorithms), leeway=entry.leeway, require=["exp", "iss", "aud"],
                           entry=entry, keyset=ks)
            (self._agent_routes if entry.use == "agent" else self._user_routes)[entry.issuer] = route
        self._delegation: _Route | None = None
        tx = cfg.token_exchange
        if tx is not None:
            self._delegation = _Route("delegation", issuer=tx.issuer, audience=cfg.audience or "tether",
                                      algorithms=["HS256"], leeway=cfg.leeway, require=["exp", "sub", "jti"],
                                      secret=Secret(tx.signing_secret, "identity.token_exchange.signing_secret"))
        self._console_keys: KeySet | None = None
        if cfg.console is not None:
            self._console_keys = self.keysets.get(cfg.console.issuer, ca_file=cfg.console.ca_file)
        # token -> (claims, exp, nbf, identity, still-valid check); user tokens have their own cache
        self._cache: dict[str, tuple[dict[str, Any], float, float, Identity, tuple[Any, ...]]] = {}
        self._user_cache: dict[str, tuple[dict[str, Any], float, float, Identity, tuple[Any, ...]]] = {}
        self._pairs: dict[tuple[str, str], Identity] = {}  # (agent token, user token) -> combined identity

    # -- readiness -------------------------------------------------------------------------------

    @property
    def keysets_in_use(self) -> list[KeySet]:
        out = [r.keyset for r in (*self._agent_routes.values(), *self._user_routes.values()) if r.keyset]
        if self._console_keys is not None:
            out.append(self._console_keys)
        return out

    def check_ready(self) -> None:
        """Raise SecretUnavailable if the local verification key cannot be read (startup check)."""
        if self._secret is not None:
            self._secret.get()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Can every configured key be used now? One line per key source, for /readyz."""
        ok = True
        out: dict[str, str] = {}
        for where, secret in (("local", self._secret),
                              ("token_exchange", self._delegation.secret if self._delegation else None)):
            if secret is not None:
                try:
                    secret.get()
                    out[where] = "ok"
                except SecretUnavailable as exc:
                    out[where] = f"unavailable: {exc}"
                    ok = False
        for prefix, routes in (("agent", self._agent_routes), ("user", self._user_routes)):
            for iss, route in routes.items():
                assert route.keyset is not None
                status = route.keyset.status()
                out[f"{prefix} {iss}"] = status
                ok = ok and bool(route.keyset.keys)
        if self._console_keys is not None:
            out[f"console {self._console_keys.issuer}"] = self._console_keys.status()
            ok = ok and bool(self._console_keys.keys)
        return ok, out

    # -- entry points ----------------------------------------------------------------------------

    async def identify(self, authorization: str | None, user_tokens: Iterable[str] = ()) -> Identity:
        """From the Authorization header (and an ``X-Tether-User-Token``, if sent) to an Identity."""
        token = _bearer(authorization)
        ident = self._cached(self._cache, token, "")
        if ident is None:
            ident = await self._verify_new(token, "agent")
        users = list(user_tokens)
        if not users:
            return ident
        if len(users) > 1:
            raise TetherError("ambiguous_request", f"more than one {USER_TOKEN} header")
        user_token = users[0].strip()
        if user_token.lower().startswith("bearer "):
            user_token = user_token[7:].strip()
        pair = self._pairs.get((token, user_token))
        human = self._cached(self._user_cache, user_token, f"{USER_TOKEN}: ")
        if human is None:
            human = await self._verify_new(user_token, "user")
            pair = None
        if pair is not None:
            return pair
        return self._remember_pair(token, user_token, self._combine(ident, human))

    def authenticate(self, authorization: str | None) -> Identity:
        """Synchronous form for keys already at hand (local key, delegation secret, issuer keys held):
        a kid that would need a fetch is ``token_unknown_key``. The request paths use :meth:`identify`."""
        token = _bearer(authorization)
        ident = self._cached(self._cache, token, "")
        if ident is not None:
            return ident
        header, payload = parse_unverified(token)
        route = self._route(payload, "agent", "")
        key = self._key_now(route, header, "")
        if key is _NEED_FETCH:
            raise AuthError("token_unknown_key", f"no key with kid {header.get('kid')!r} is held for {route.issuer!r}")
        return self._finish(token, header, route, key, "agent", "")

    async def verify_user(self, token: str) -> Identity:
        """A person's token (``use: user`` issuers only) -> an Identity whose ``on_behalf_of`` is that
        person, verified. Used by the token exchange; the agent is left empty."""
        ident = self._cached(self._user_cache, token, "subject_token: ")
        return ident if ident is not None else await self._verify_new(token, "user", "subject_token: ")

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of an agent token verified with keys at hand (compatibility with older callers)."""
        return self.authenticate("Bearer " + token).claims

    def is_reviewer(self, ident: Identity) -> bool:
        return self.cfg.reviewer_role in ident.roles

    def is_delegation(self, ident: Identity) -> bool:
        return self._delegation is not None and ident.issuer == self._delegation.issuer

    @property
    def console_keys(self) -> KeySet | None:
        return self._console_keys

    # -- the work --------------------------------------------------------------------------------

    def _cached(self, cache: dict[str, Any], token: str, prefix: str) -> Identity | None:
        hit = cache.get(token)
        if hit is None:
            return None
        claims, exp, nbf, ident, check = hit
        if not _still_valid(check):
            del cache[token]
            return None
        now = time.time()
        leeway = self.cfg.leeway
        if exp and now > exp + leeway:
            del cache[token]
            raise AuthError("token_expired", f"{prefix}the token's exp is in the past" if prefix else None)
        if nbf and now + leeway < nbf:
            raise AuthError("token_not_yet_valid", f"{prefix}the token's nbf is in the future" if prefix else None)
        return ident

    async def _verify_new(self, token: str, use: str, prefix: str | None = None) -> Identity:
        if prefix is None:
            prefix = "" if use == "agent" else f"{USER_TOKEN}: "
        header, payload = parse_unverified(token, prefix)
        route = self._route(payload, use, prefix)
        key = self._key_now(route, header, prefix)
        if key is _NEED_FETCH:
            key = await self._fetch_key(route, header, prefix)
        return self._finish(token, header, route, key, use, prefix)

    def _route(self, payload: dict[str, Any], use: str, prefix: str) -> _Route:
        iss = payload.get("iss")
        if iss is not None and not isinstance(iss, str):
            raise AuthError("token_malformed", f"{prefix}the token's iss must be a string")
        if use == "user":
            route = self._user_routes.get(iss) if iss is not None else None
            if route is None:
                raise AuthError("token_issuer_mismatch", f"{prefix}{iss!r} is not an issuer of people's tokens "
                                                         "(identity.issuers with use: user)")
            return route
        if iss is not None:
            if self._delegation is not None and iss == self._delegation.issuer:
                return self._delegation
            route = self._agent_routes.get(iss)
            if route is not None:
                return route
        local = self._local
        if local is not None and (iss is None or local.issuer is None or iss == local.issuer):
            return local  # PyJWT then checks iss against identity.issuer
        raise AuthError("token_issuer_mismatch", f"{iss!r} is not a configured issuer of agent tokens")

    def _key_now(self, route: _Route, header: dict[str, Any], prefix: str) -> Any:
        alg = header.get("alg")
        if alg not in route.algorithms:
            raise AuthError("token_algorithm_not_allowed",
                            f"{prefix}alg {alg!r} is not allowed; {route.issuer or 'this gateway'!r} tokens use "
                            f"{', '.join(route.algorithms)}")
        kid = header.get("kid")
        if route.kind == "issuer":
            assert route.keyset is not None
            jwk = route.keyset.lookup(kid)
            if jwk is None:
                return _NEED_FETCH
            return _key_of(jwk, alg, kid, prefix)
        if route.kind == "delegation" or alg.startswith("HS"):
            secret = route.secret
            assert secret is not None  # config validation guarantees it
            try:
                return secret.get().encode()
            except SecretUnavailable as exc:
                raise TetherError("identity_unavailable", f"Tether cannot read its token key ({exc})") from None
        if self._jwks:
            jwk = next(iter(self._jwks.values())) if kid is None and len(self._jwks) == 1 else self._jwks.get(kid)
            if jwk is None:
                raise AuthError("token_unknown_key", f"no key with kid {kid!r}")
            return _key_of(jwk, alg, kid, prefix)
        if self._public_key is None:
            raise AuthError("token_unknown_key")
        return self._public_key

    async def _fetch_key(self, route: _Route, header: dict[str, Any], prefix: str) -> Any:
        assert route.keyset is not None
        kid = header.get("kid")
        try:
            jwk = await route.keyset.key_for(kid)
        except KeysUnavailable as exc:
            raise TetherError("identity_unavailable", f"{prefix}{exc}") from None
        if jwk is None:
            raise AuthError("token_unknown_key", f"{prefix}issuer {route.issuer!r} has no key with kid {kid!r}")
        return _key_of(jwk, header["alg"], kid, prefix)

    def _finish(self, token: str, header: dict[str, Any], route: _Route, key: Any, use: str, prefix: str) -> Identity:
        claims = self._decode(token, key, header["alg"], route, prefix)
        ident = self._identity(claims, route, use, prefix)
        check: tuple[Any, ...] = ()
        if route.secret is not None:
            check = ("secret", route.secret, route.secret.version)
        elif route.keyset is not None:
            check = ("jwks", route.keyset, header.get("kid"))
        cache = self._cache if use == "agent" else self._user_cache
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[token] = (claims, float(claims.get("exp") or 0), float(claims.get("nbf") or 0), ident, check)
        return ident

    def _decode(self, token: str, key: Any, alg: str, route: _Route, prefix: str) -> dict[str, Any]:
        options: dict[str, Any] = {"require": route.require, "verify_aud": route.audience is not None,
                                   "verify_iss": route.issuer is not None}
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=route.audience, issuer=route.issuer,
                                leeway=route.leeway, options=options)
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired", f"{prefix}the token's exp is in the past" if prefix else None) from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid", f"{prefix}the token's nbf is in the future" if prefix else None) from None
        except jwt.InvalidAudienceError:
            raise AuthError("token_audience_mismatch",
                            f"{prefix}the token's aud does not include {_one_of(route.audience)}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token_issuer_mismatch", f"{prefix}the token's iss is not {route.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("token_missing_claim", f"{prefix}the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token_invalid_signature", f"{prefix}the token's signature does not verify"
                            if prefix else None) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token_algorithm_not_allowed", f"{prefix}the key does not take {alg}") from None
        except (jwt.InvalidTokenError, jwt.PyJWTError) as exc:
            raise AuthError("token_malformed", f"{prefix}the token is not valid: {exc}") from None
        except (ValueError, TypeError, OverflowError) as exc:  # a key of the wrong type for alg, odd numbers
            raise AuthError("token_malformed", f"{prefix}the token cannot be verified: {type(exc).__name__}") from None
        return claims

    def _identity(self, claims: dict[str, Any], route: _Route, use: str, prefix: str) -> Identity:
        if route.kind == "issuer":
            entry = route.entry
            assert entry is not None
            if use == "user":
                if claims.get("gty") == "client-credentials" or claims.get("idtyp") == "app" or (
                        claims.get("sub") is not None and claims.get("sub") in
                        {claims.get("client_id"), claims.get("azp"), claims.get("cid")}):
                    raise AuthError("token_malformed", f"{prefix}this is a client's own token, not a person's")
                human = check_name(claims.get(entry.user_claim), f"{entry.user_claim} claim", prefix=prefix)
                return Identity(agent="", on_behalf_of=human, token_id=_jti(claims), claims=claims,
                                user_verified=True, user_issuer=route.issuer)
            value = check_name(claims.get(entry.agent_claim), f"{entry.agent_claim} claim", prefix=prefix)
            if entry.agents:
                agent = entry.agents.get(value)
                if agent is None:
                    what = "service account" if entry.kind == "kubernetes" else f"{entry.agent_claim}"
                    raise TetherError("agent_unknown", f"{what} {value!r} of {route.issuer!r} is not mapped to an "
                                                       "agent (identity.issuers[].agents)")
            else:
                agent = value
            return Identity(agent=agent, on_behalf_of=None, token_id=_jti(claims), claims=claims, issuer=route.issuer)
        act = claims.get("act")
        if route.kind == "delegation":
            if not isinstance(act, dict):
                raise AuthError("token_missing_claim", "a delegation token must carry act")
            agent = check_name(act.get("sub"), "act.sub")
            human = check_name(claims["sub"], "sub")
            return Identity(agent=agent, on_behalf_of=human, token_id=_jti(claims), claims=claims,
                            user_verified=True, issuer=route.issuer,
                            user_issuer=claims.get("tether_user_iss") if isinstance(claims.get("tether_user_iss"), str)
                            else None)
        # the local (development) key
        if act is not None:
            if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
                raise AuthError("token_missing_claim", "the act claim must be an object with a sub")
            agent, on_behalf_of = check_name(act["sub"], "act.sub"), check_name(claims["sub"], "sub")
        else:
            agent, on_behalf_of = check_name(claims["sub"], "sub"), None
        roles_claim = claims.get(self.cfg.reviewer_claim, ())
        if isinstance(roles_claim, str):
            roles: tuple[str, ...] = tuple(roles_claim.split())
        elif isinstance(roles_claim, list):
            roles = tuple(str(r) for r in roles_claim)
        else:
            roles = ()
        return Identity(agent=agent, on_behalf_of=on_behalf_of, roles=roles, token_id=_jti(claims), claims=claims,
                        issuer=route.issuer)

    def _combine(self, agent: Identity, user: Identity) -> Identity:
        """The agent's identity with the human a user token proved."""
        if agent.on_behalf_of is not None and agent.on_behalf_of != user.on_behalf_of:
            raise AuthError("token_user_mismatch",
                            f"the agent's token acts for {agent.on_behalf_of!r} but {USER_TOKEN} proves "
                            f"{user.on_behalf_of!r}")
        return replace(agent, on_behalf_of=user.on_behalf_of, user_verified=True, user_issuer=user.user_issuer)

    def _remember_pair(self, token: str, user_token: str, ident: Identity) -> Identity:
        if len(self._pairs) >= _CACHE_MAX:
            self._pairs.clear()
        self._pairs[(token, user_token)] = ident
        return ident


def _still_valid(check: tuple[Any, ...]) -> bool:
    if not check:
        return True
    if check[0] == "secret":
        secret: Secret = check[1]
        try:
            secret.get()  # cheap unless the re-check interval passed; picks up a rotated file
        except SecretUnavailable:
            return False
        return secret.version == check[2]
    keyset: KeySet = check[1]
    return keyset.lookup(check[2]) is not None


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError("token_missing")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("token_missing", "expected 'Authorization: Bearer <JWT>'")
    return token.strip()


def _key_of(jwk: PyJWK, alg: str, kid: Any, prefix: str) -> Any:
    declared = getattr(jwk, "_jwk_data", {}).get("alg")
    if declared and declared != alg:
        raise AuthError("token_algorithm_not_allowed", f"{prefix}key {kid!r} is for {declared}, not {alg}")
    return jwk.key


def _jti(claims: dict[str, Any]) -> str | None:
    jti = claims.get("jti")
    return jti if isinstance(jti, str) else None


def _one_of(audience: Any) -> str:
    if isinstance(audience, list):
        return " or ".join(repr(a) for a in audience)
    return repr(audience)


def _load_public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"identity.public_key_file: cannot read {path}: {exc.strerror}") from None
    try:
        return load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError(f"identity.public_key_file: {path} is not a PEM public key: {exc}") from None


def _load_jwks(path: Path) -> dict[str | None, PyJWK]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"identity.jwks_file: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"identity.jwks_file: {path} is not JSON: {exc}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"identity.jwks_file: {path} has no 'keys' list")
    out: dict[str | None, PyJWK] = {}
    for i, k in enumerate(keys):
        if not isinstance(k, dict):
            raise ValueError(f"identity.jwks_file: keys[{i}] is not an object")
        if k.get("kty") == "oct":
            raise ValueError(f"identity.jwks_file: keys[{i}] is a symmetric key; a JWKS here holds public keys only")
        try:
            out[k.get("kid")] = PyJWK(k)
        except jwt.PyJWKError as exc:
            raise ValueError(f"identity.jwks_file: keys[{i}]: {exc}") from None
    return out


class MintError(ValueError):
    """`tether token mint` cannot sign: the key is missing or unreadable (one clear line, no traceback)."""


def mint_token(
    cfg: IdentityConfig,
    subject: str,
    *,
    actor: str | None = None,
    roles: list[str] | None = None,
    ttl: float = 3600.0,
    extra: dict[str, Any] | None = None,
    kid: str | None = None,
) -> str:
    """Make a development token with the configured HS secret or private key (`tether token mint`)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": subject, "iat": now, "nbf": now, "exp": now + int(ttl)}
    if cfg.issuer:
        claims["iss"] = cfg.issuer
    if cfg.audience:
        claims["aud"] = cfg.audience
    if actor:
        claims["act"] = {"sub": actor}
    if roles:
        claims[cfg.reviewer_claim] = roles
    if extra:
        claims.update(extra)
    alg = cfg.algorithms[0]
    headers = {"kid": kid} if kid else None
    if alg.startswith("HS"):
        if cfg.hs_secret is None:
            raise MintError("identity.hs_secret is not configured: this rules file has no development key to mint with")
        try:
            key: Any = Secret(cfg.hs_secret, "identity.hs_secret").get().encode()
        except SecretUnavailable as exc:
            raise MintError(f"cannot mint: {exc}") from None
    else:
        if cfg.private_key_file is None:
            raise MintError("identity.private_key_file is needed to mint RS/ES tokens")
        try:
            key = Path(cfg.private_key_file).read_bytes()
        except OSError as exc:
            raise MintError(f"cannot mint: identity.private_key_file {cfg.private_key_file}: {exc.strerror}") from None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def require_verified_user_message(ident: Identity, capability: str) -> str:
    """Why a grant with ``require_verified_user`` refused this caller (the check_grant stage)."""
    if ident.on_behalf_of is None:
        why = "no person is named"
    else:
        why = f"{ident.on_behalf_of!r} is only asserted by the agent's token"
    return (f"capability {capability!r} needs a person verified by the identity provider ({why}): send the "
            f"person's token in {USER_TOKEN}, or exchange it at /_tether/token")
