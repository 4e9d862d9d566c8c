"""Credential injection: the only module that touches upstream secrets.

Each upstream gets one :class:`Injector`. ``apply(headers)`` adds the upstream's real credential to an
outgoing header set (the agent's own credentials were stripped before). Static credentials are
rebuilt only when their secret changes (a rotated file mount); OAuth2 client-credentials tokens are
fetched with the shared client session, cached, refreshed ``refresh_before`` seconds before expiry, and
fetched by one request at a time (single flight) however many requests are waiting.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import aiohttp
import orjson

from ..config import (
    ApiKeyCredentials,
    BasicCredentials,
    BearerCredentials,
    NoCredentials,
    OAuth2ClientCredentials,
)
from ..secret import Secret


class CredentialError(Exception):
    """The upstream's credential cannot be produced (secret missing, token endpoint failing)."""


class Injector:
    """Adds nothing; base for the credential kinds."""

    header_names: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"

    async def apply(self, headers: dict[str, str]) -> None:
        return None

    def header_now(self) -> tuple[tuple[str, str], ...] | None:
        """The (name, value) pairs :meth:`apply` would set, when they are at hand without I/O; None means
        call :meth:`apply`. Spares the hot path a coroutine per request. The base adds nothing: ()."""
        return ()

    def check(self) -> None:
        """Raise CredentialError if the secret cannot be read now (readiness)."""


class _StaticInjector(Injector):
    def __init__(self, header: str, secret: Secret, render: Any) -> None:
        self.header_names = (header.lower(),)
        self._header = header
        self._secret = secret
        self._render = render
        self._version = -1
        self._value = ""

    async def apply(self, headers: dict[str, str]) -> None:
        headers[self._header] = self._current()

    def header_now(self) -> tuple[tuple[str, str], ...] | None:
        return ((self._header, self._current()),)

    def _current(self) -> str:
        try:
            raw = self._secret.get()
        except Exception as exc:  # SecretUnavailable
            raise CredentialError(str(exc)) from None
        if self._secret.version != self._version or not self._value:
            self._value = self._render(raw)
            self._version = self._secret.version
        return self._value

    def check(self) -> None:
        self._current()


class OAuth2Injector(Injector):
    header_names = ("authorization",)

    def __init__(self, cfg: OAuth2ClientCredentials, where: str, session_getter: Any) -> None:
        self.cfg = cfg
        self._secret = Secret(cfg.client_secret, f"{where}.client_secret")
        self._session_getter = session_getter
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def apply(self, headers: dict[str, str]) -> None:
        headers["Authorization"] = f"Bearer {await self.token()}"

    def header_now(self) -> tuple[tuple[str, str], ...] | None:
        if self._token is not None and time.monotonic() < self._expires_at - self.cfg.refresh_before:
            return (("Authorization", f"Bearer {self._token}"),)
        return None

    def check(self) -> None:
        try:
            self._secret.get()
        except Exception as exc:
            raise CredentialError(str(exc)) from None

    async def token(self) -> str:
        if self._token is not None and time.monotonic() < self._expires_at - self.cfg.refresh_before:
            return self._token
        async with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at - self.cfg.refresh_before:
                return self._token
            await self._fetch()
            assert self._token is not None
            return self._token

    async def _fetch(self) -> None:
        try:
            secret = self._secret.get()
        except Exception as exc:
            raise CredentialError(str(exc)) from None
        form = {"grant_type": "client_credentials"}
        if self.cfg.scope:
            form["scope"] = self.cfg.scope
        if self.cfg.audience:
            form["audience"] = self.cfg.audience
        headers = {"Accept": "application/json"}
        if self.cfg.auth_method == "basic":
            raw = f"{self.cfg.client_id}:{secret}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        else:
            form["client_id"] = self.cfg.client_id
            form["client_secret"] = secret
        session: aiohttp.ClientSession = self._session_getter()
        try:
            async with session.post(self.cfg.token_url, data=form, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=15)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise CredentialError(f"token endpoint answered {resp.status}")
                doc = orjson.loads(body)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise CredentialError(f"token endpoint unreachable: {type(exc).__name__}") from None
        except orjson.JSONDecodeError:
            raise CredentialError("token endpoint answered with something that is not JSON") from None
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise CredentialError("token endpoint answered without an access_token")
        expires_in = doc.get("expires_in", 3600)
        try:
            expires_in = float(expires_in)
        except (TypeError, ValueError):
            expires_in = 3600.0
        self._token = token
        self._expires_at = time.monotonic() + expires_in


def build_injector(cfg: Any, where: str, session_getter: Any) -> Injector:
    """One injector for an upstream's ``credentials`` block (``where`` names it in errors)."""
    if isinstance(cfg, NoCredentials):
        return Injector()
    if isinstance(cfg, BearerCredentials):
        return _StaticInjector("Authorization", Secret(cfg.token, f"{where}.token"), lambda v: f"Bearer {v}")
    if isinstance(cfg, BasicCredentials):
        user = cfg.username

        def render_basic(pw: str) -> str:
            return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()

        return _StaticInjector("Authorization", Secret(cfg.password, f"{where}.password"), render_basic)
    if isinstance(cfg, ApiKeyCredentials):
        prefix = cfg.prefix
        return _StaticInjector(cfg.header, Secret(cfg.value, f"{where}.value"), lambda v: f"{prefix}{v}")
    if isinstance(cfg, OAuth2ClientCredentials):
        return OAuth2Injector(cfg, where, session_getter)
    raise TypeError(f"unknown credentials {cfg!r}")
