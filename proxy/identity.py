"""Who is calling: the agent, the human it acts for, and (for the admin API) the reviewer.

Tokens are JWTs verified with PyJWT against keys named in the rules file. The accepted algorithms are
pinned in configuration and never taken from the token: ``none`` is never accepted, an HMAC secret never
verifies an RS/ES token and a public key never verifies an HMAC token (the classic algorithm-confusion
attack), and with a JWKS the ``kid`` selects the key.

Two-dimensional identity follows RFC 8693 (token exchange): when the token has an ``act`` claim,
``act.sub`` is the agent (the actor) and ``sub`` is the human on whose behalf it acts; without ``act``,
``sub`` is the agent acting for itself.

Verified tokens are cached (bounded) so that an agent reusing its token pays for the signature check
once; expiry and not-before are re-checked on every hit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK

from .config import IdentityConfig
from .errors import AuthError
from .secret import Secret, SecretUnavailable


@dataclass(frozen=True, slots=True)
class Identity:
    agent: str
    on_behalf_of: str | None
    roles: tuple[str, ...] = ()
    token_id: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def principal(self) -> str:
        """The identity that acts: the agent name (or the reviewer's subject)."""
        return self.agent


class TokenVerifier:
    """Verifies JWTs for one IdentityConfig. Built once at startup (and on rules reload)."""

    _CACHE_MAX = 20000

    def __init__(self, cfg: IdentityConfig) -> None:
        self.cfg = cfg
        self._algorithms = list(cfg.algorithms)
        self._secret = Secret(cfg.hs_secret, "identity.hs_secret") if cfg.hs_secret else None
        self._public_key: Any = None
        self._jwks: dict[str | None, PyJWK] = {}
        if cfg.public_key_file:
            self._public_key = _load_public_key(Path(cfg.public_key_file))
        if cfg.jwks_file:
            self._jwks = _load_jwks(Path(cfg.jwks_file))
        self._cache: dict[str, tuple[dict[str, Any], float, float, int]] = {}
        self._identities: dict[str, Identity] = {}  # token -> Identity built from its (cached) claims
        self._options = {"require": ["exp", "sub"] if cfg.require_exp else ["sub"], "verify_aud": cfg.audience is not None,
                         "verify_iss": cfg.issuer is not None}

    def check_ready(self) -> None:
        """Raise SecretUnavailable if the verification key cannot be read (startup check)."""
        if self._secret is not None:
            self._secret.get()

    # -- verification -------------------------------------------------------------------------

    def verify(self, token: str) -> dict[str, Any]:
        """Return the token's claims or raise AuthError with a precise code."""
        secret_version = 0
        if self._secret is not None:
            try:
                self._secret.get()  # cheap unless the re-check interval passed; picks up a rotated file
            except SecretUnavailable:
                raise AuthError("token_unknown_key", "the gateway's token secret is unavailable") from None
            secret_version = self._secret.version
        hit = self._cache.get(token)
        now = time.time()
        if hit is not None and hit[3] == secret_version:
            claims, exp, nbf, _ = hit
            leeway = self.cfg.leeway
            if exp and now > exp + leeway:
                del self._cache[token]
                raise AuthError("token_expired")
            if nbf and now + leeway < nbf:
                raise AuthError("token_not_yet_valid")
            return claims
        claims = self._verify_uncached(token)
        if len(self._cache) >= self._CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (claims, float(claims.get("exp") or 0), float(claims.get("nbf") or 0), secret_version)
        return claims

    def _verify_uncached(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("token_malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("token_algorithm_not_allowed",
                            f"alg {alg!r} is not allowed; this gateway accepts {', '.join(self._algorithms)}")
        key = self._key_for(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token_expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token_audience_mismatch",
                            f"the token's aud does not include {self.cfg.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token_issuer_mismatch", f"the token's iss is not {self.cfg.issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("token_missing_claim", f"the token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token_invalid_signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token_algorithm_not_allowed") from None
        except (jwt.DecodeError, jwt.InvalidTokenError) as exc:
            raise AuthError("token_malformed", f"the token is not valid: {exc}") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise AuthError("token_missing_claim", "the token's sub must be a non-empty string")
        return claims

    def _key_for(self, alg: str, kid: Any) -> Any:
        if alg.startswith("HS"):
            assert self._secret is not None  # config validation guarantees it
            try:
                return self._secret.get().encode()
            except SecretUnavailable:
                raise AuthError("token_unknown_key", "the gateway's token secret is unavailable") from None
        if self._jwks:
            if kid is None and len(self._jwks) == 1:
                jwk = next(iter(self._jwks.values()))
            else:
                jwk = self._jwks.get(kid)
            if jwk is None:
                raise AuthError("token_unknown_key", f"no key with kid {kid!r}")
            if jwk.algorithm_name and jwk.algorithm_name != alg:
                raise AuthError("token_algorithm_not_allowed", f"key {kid!r} is for {jwk.algorithm_name}, not {alg}")
            return jwk.key
        if self._public_key is None:
            raise AuthError("token_unknown_key")
        return self._public_key

    # -- identity -----------------------------------------------------------------------------

    def identity(self, claims: dict[str, Any]) -> Identity:
        """Map claims to an Identity (RFC 8693 `act` for the agent, `sub` for the human)."""
        act = claims.get("act")
        if act is not None:
            if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
                raise AuthError("token_missing_claim", "the act claim must be an object with a sub")
            agent, on_behalf_of = act["sub"], claims["sub"]
        else:
            agent, on_behalf_of = claims["sub"], None
        roles_claim = claims.get(self.cfg.reviewer_claim, ())
        if isinstance(roles_claim, str):
            roles: tuple[str, ...] = tuple(roles_claim.split())
        elif isinstance(roles_claim, list):
            roles = tuple(str(r) for r in roles_claim)
        else:
            roles = ()
        return Identity(agent=agent, on_behalf_of=on_behalf_of, roles=roles, token_id=claims.get("jti"),
                        claims=claims)

    def authenticate(self, authorization: str | None) -> Identity:
        """From an Authorization header value to an Identity, or AuthError."""
        if not authorization:
            raise AuthError("token_missing")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("token_missing", "expected 'Authorization: Bearer <JWT>'")
        token = token.strip()
        claims = self.verify(token)  # checks exp/nbf on every call, cached or not
        ident = self._identities.get(token)
        if ident is None or ident.claims is not claims:
            if len(self._identities) >= self._CACHE_MAX:
                self._identities.clear()
            ident = self._identities[token] = self.identity(claims)
        return ident

    def is_reviewer(self, ident: Identity) -> bool:
        return self.cfg.reviewer_role in ident.roles


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
        assert cfg.hs_secret is not None
        key: Any = Secret(cfg.hs_secret, "identity.hs_secret").get().encode()
    else:
        if cfg.private_key_file is None:
            raise ValueError("identity.private_key_file is needed to mint RS/ES tokens")
        key = Path(cfg.private_key_file).read_bytes()
    return jwt.encode(claims, key, algorithm=alg, headers=headers)
