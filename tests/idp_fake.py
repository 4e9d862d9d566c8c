"""A fake identity provider for the issuer tests: a real aiohttp server on 127.0.0.1 serving an OpenID
discovery document and a JWKS (with Cache-Control), signing tokens with keys it can rotate, counting
the fetches Tether makes and able to go down (503) on demand.

It is deliberately small: the protocol-level proof with a certified provider is tests/test_oidc_provider.py
(``oidc-provider`` from npm); this one lets a test count fetches and time rotations exactly.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.fakes import serve_app


class FakeIdP:
    def __init__(self, *, alg: str = "RS256", max_age: int = 300, issuer_path: str = "") -> None:
        self.alg = alg
        self.max_age = max_age
        self.issuer_path = issuer_path
        self.keys: list[tuple[str, Any]] = []  # (kid, private key), newest first: the first one signs
        self.published: list[str] | None = None  # kids in the JWKS (None: all of self.keys)
        self.discovery_fetches = 0
        self.jwks_fetches = 0
        self.down = False
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.rotate()

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.issuer_path}"

    def new_key(self) -> Any:
        if self.alg.startswith("ES"):
            return ec.generate_private_key(ec.SECP256R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def rotate(self, *, keep_old: bool = True) -> str:
        """A new signing key (published at once); the old ones stay published unless keep_old is False."""
        kid = f"k-{uuid.uuid4().hex[:8]}"
        self.keys.insert(0, (kid, self.new_key()))
        if not keep_old:
            self.keys = self.keys[:1]
        return kid

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys:
            if self.published is not None and kid not in self.published:
                continue
            algo = jwt.algorithms.ECAlgorithm if self.alg.startswith("ES") else jwt.algorithms.RSAAlgorithm
            jwk = json.loads(algo.to_jwk(key.public_key()))
            jwk.update({"kid": kid, "alg": self.alg, "use": "sig"})
            out.append(jwk)
        return {"keys": out}

    def token(self, claims: dict[str, Any] | None = None, *, kid: str | None = None, key: Any = None,
              ttl: int = 600, headers: dict[str, Any] | None = None, **kw: Any) -> str:
        now = int(time.time())
        c: dict[str, Any] = {"iss": self.issuer, "iat": now, "nbf": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
        c.update(claims or {})
        c.update(kw)
        use_kid, use_key = self.keys[0]
        if kid is not None:
            use_kid = kid
            use_key = key or dict(self.keys).get(kid, use_key)
        h = {"kid": use_kid, "typ": "JWT"}
        h.update(headers or {})
        return jwt.encode({k: v for k, v in c.items() if v is not None}, use_key, algorithm=self.alg, headers=h)

    async def start(self) -> "FakeIdP":
        app = web.Application()
        app.router.add_get(self.issuer_path + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"http://127.0.0.1:{self.port}/jwks",
                                  "id_token_signing_alg_values_supported": [self.alg]})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response(self.jwks(), headers={"Cache-Control": f"public, max-age={self.max_age}"})
