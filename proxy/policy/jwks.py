"""Public keys of the identity providers Tether trusts, fetched without ever blocking a request.

A :class:`KeySet` holds the keys of one issuer, from one of three sources:

* **discovery** — ``<issuer>/.well-known/openid-configuration`` names ``jwks_uri`` (its ``issuer`` must
  equal the configured one, as OpenID Connect Discovery requires), then that JWKS is fetched;
* a **JWKS URL** given in the rules;
* a **JWKS file** (a Kubernetes cluster's keys mounted from a ConfigMap), re-read when it changes.

Fetched keys are cached for the response's ``Cache-Control: max-age``, clamped to
``[min_ttl, max_ttl]``, and refreshed in the background before they expire (Envoy's ``jwt_authn``
remote JWKS with ``async_fetch``). A refresh that fails keeps the keys already held: an unreachable
IdP does not stop tokens signed with known keys. A token naming an unknown ``kid`` triggers at most one
refresh per ``unknown_kid_interval`` — concurrent requests share that one fetch — so a stream of
random kids cannot make Tether hammer the IdP. With no keys at all, verification fails closed
(:class:`KeysUnavailable`: 503, and ``/readyz`` is not ready).

Key parsing is PyJWT's (:class:`jwt.PyJWK`); the HTTP is the gateway's aiohttp stack, so the event loop
never waits on a synchronous fetch (which is why PyJWT's own ``PyJWKClient``, built on ``urllib``, is
not used on the hot path).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
from jwt import PyJWK

from ..config import KeyCacheConfig

log = logging.getLogger("tether.jwks")

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.I)
_MAX_DOC = 1 << 20  # a discovery document or JWKS larger than 1 MiB is not one


class KeysUnavailable(Exception):
    """No key of this issuer could be obtained (never fetched, or the file is unreadable)."""


def parse_jwks(doc: Any, where: str) -> dict[str | None, PyJWK]:
    """The signing keys of a JWKS document, by kid. Keys Tether cannot use (encryption keys, symmetric
    keys, unknown types) are skipped; a document with no usable key at all is an error."""
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValueError(f"{where}: not a JWKS (no 'keys' list)")
    out: dict[str | None, PyJWK] = {}
    skipped: list[str] = []
    for i, k in enumerate(keys):
        if not isinstance(k, dict):
            skipped.append(f"keys[{i}] is not an object")
            continue
        kid = k.get("kid")
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"keys[{i}] has a non-string kid")
            continue
        if k.get("use", "sig") != "sig" or k.get("kty") == "oct":
            continue  # encryption keys and shared secrets never verify a token here
        try:
            out[kid] = PyJWK(k)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            skipped.append(f"keys[{i}] ({kid!r}): {exc}")
    if not out:
        raise ValueError(f"{where}: no usable signing key" + (f" ({'; '.join(skipped)})" if skipped else ""))
    if skipped:
        log.warning("%s: skipped keys: %s", where, "; ".join(skipped))
    return out


def cache_ttl(cache_control: str | None, cfg: KeyCacheConfig) -> float:
    """Seconds to keep a fetched JWKS: ``max-age`` clamped to [min_ttl, max_ttl]; min_ttl without one."""
    ttl = cfg.min_ttl
    if cache_control:
        if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
            return cfg.min_ttl
        m = _MAX_AGE.search(cache_control)
        if m:
            ttl = float(m.group(1))
    return min(max(ttl, cfg.min_ttl), cfg.max_ttl)


class KeySet:
    """The keys of one issuer (see the module docstring)."""

    def __init__(self, issuer: str, *, jwks_url: str | None, jwks_file: Path | None, ca_file: Path | None,
                 cache: KeyCacheConfig, owner: "KeySets") -> None:
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.jwks_file = jwks_file
        self.cache = cache
        self._owner = owner
        self._ssl: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self.keys: dict[str | None, PyJWK] = {}
        self.fetched_at: float | None = None  # wall clock of the last successful load
        self.expires_at = 0.0  # monotonic
        self.last_error: str | None = None
        self.fetches = 0
        self._jwks_uri: str | None = jwks_url
        self.discovery: dict[str, Any] | None = None  # the issuer's discovery document, once fetched
        self._inflight: asyncio.Future[None] | None = None
        self._last_unknown = -1e18
        self._file_stamp: tuple[float, int] | None = None
        self._file_checked = 0.0
        if jwks_file is not None:
            self._load_file()

    # -- lookups (hot path) ---------------------------------------------------------------------

    def lookup(self, kid: str | None) -> PyJWK | None:
        """The key for ``kid`` if held now (a token without kid matches when there is a single key)."""
        if self.jwks_file is not None:
            self._maybe_reload_file()
        keys = self.keys
        if kid is None:
            return next(iter(keys.values())) if len(keys) == 1 else None
        return keys.get(kid)

    async def key_for(self, kid: str | None) -> PyJWK | None:
        """The key for ``kid``, fetching the JWKS again when the kid is unknown and the last such fetch is
        older than ``unknown_kid_interval``. None: no such key. Raises KeysUnavailable without any key."""
        jwk = self.lookup(kid)
        if jwk is not None:
            return jwk
        if self.jwks_file is None:
            now = time.monotonic()
            if self._inflight is not None or now - self._last_unknown >= self.cache.unknown_kid_interval:
                if self._inflight is None:
                    self._last_unknown = now
                await self.refresh()
                jwk = self.lookup(kid)
                if jwk is not None:
                    return jwk
        if not self.keys:
            raise KeysUnavailable(self.describe_problem())
        return None

    def describe_problem(self) -> str:
        return f"no keys for issuer {self.issuer!r}" + (f": {self.last_error}" if self.last_error else "")

    def status(self) -> str:
        """One line for /readyz."""
        if not self.keys:
            return f"unavailable: {self.last_error or 'keys not fetched yet'}"
        if self.last_error:
            return f"ok ({len(self.keys)} keys; last refresh failed: {self.last_error})"
        return f"ok ({len(self.keys)} keys)"

    # -- files ----------------------------------------------------------------------------------

    def _maybe_reload_file(self) -> None:
        now = time.monotonic()
        if now - self._file_checked < 1.0 and self.keys:
            return
        self._file_checked = now
        self._load_file()

    def _load_file(self) -> None:
        path = self.jwks_file
        assert path is not None
        try:
            st = path.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._file_stamp and self.keys:
                return
            keys = parse_jwks(orjson.loads(path.read_bytes()), str(path))
        except OSError as exc:
            self.last_error = f"cannot read {path}: {exc.strerror}"
            return  # keep what was read before (a Kubernetes mount swaps its ..data link atomically)
        except (ValueError, orjson.JSONDecodeError) as exc:
            self.last_error = str(exc) if str(path) in str(exc) else f"{path}: not JSON: {exc}"
            return
        self.keys, self._file_stamp, self.last_error = keys, stamp, None
        self.fetched_at = time.time()

    # -- fetching -------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch the keys now; concurrent callers share one fetch. Never raises: a failure is kept in
        ``last_error`` and the keys held before stay in use."""
        if self.jwks_file is not None:
            self._load_file()
            return
        fut = self._inflight
        if fut is None:
            fut = self._inflight = asyncio.ensure_future(self._fetch())
            fut.add_done_callback(self._fetched)
        await asyncio.shield(fut)

    def _fetched(self, fut: "asyncio.Future[None]") -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is not None:  # _fetch catches its own; belt and braces
            self.last_error = str(fut.exception())

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            if self._jwks_uri is None:
                doc, _ = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                if not isinstance(doc, dict) or doc.get("issuer") != self.issuer:
                    raise ValueError(f"the discovery document names issuer {doc.get('issuer') if isinstance(doc, dict) else None!r}, "
                                     f"not {self.issuer!r}")
                uri = doc.get("jwks_uri")
                if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                    raise ValueError("the discovery document has no jwks_uri")
                self._jwks_uri = uri
                self.discovery = doc
            doc, cc = await self._get_json(self._jwks_uri)
            keys = parse_jwks(doc, self._jwks_uri)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            msg = str(exc) or type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                msg = f"no answer within {self.cache.timeout:g}s"
            self.last_error = msg
            if self.jwks_url is None:
                self._jwks_uri = None  # rediscover next time: the IdP may have moved its keys
            self.expires_at = time.monotonic() + self.cache.retry_interval
            log.warning("fetching the keys of issuer %s failed: %s%s", self.issuer, msg,
                        f" (keeping {len(self.keys)} known keys)" if self.keys else "")
            return
        added = set(keys) - set(self.keys)
        self.keys = keys
        self.last_error = None
        self.fetched_at = time.time()
        self.expires_at = time.monotonic() + cache_ttl(cc, self.cache)
        if added:
            log.info("issuer %s: keys %s", self.issuer, ", ".join(sorted(str(k) for k in keys)))

    def owner_session(self) -> aiohttp.ClientSession:
        """The client session for calls to this issuer (the console's token and UserInfo requests)."""
        return self._owner.session()

    def ssl_context(self) -> Any:
        return self._ssl if self._ssl is not None else True

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        session = self._owner.session()
        timeout = aiohttp.ClientTimeout(total=self.cache.timeout)
        async with session.get(url, ssl=self._ssl if self._ssl is not None else True, timeout=timeout,
                               allow_redirects=False, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url} answered {resp.status}")
            body = await resp.content.read(_MAX_DOC + 1)
            if len(body) > _MAX_DOC:
                raise ValueError(f"GET {url}: the document is larger than {_MAX_DOC} bytes")
            try:
                return orjson.loads(body), resp.headers.get("Cache-Control")
            except orjson.JSONDecodeError:
                raise ValueError(f"GET {url}: not JSON") from None

    async def maintain(self) -> None:
        """Background: refresh before the cache expires (and retry a failed fetch)."""
        while True:
            if self.jwks_file is not None:
                await asyncio.sleep(5.0)
                self._load_file()
                continue
            delay = self.expires_at - time.monotonic()
            if self.keys and delay > 0:
                # refresh a little early so that a rotation is seen before the old cache runs out
                await asyncio.sleep(max(delay * 0.9, 0.05))
            elif delay > 0:
                await asyncio.sleep(delay)
            await self.refresh()


class KeySets:
    """Every KeySet of a gateway, shared across rules reloads (a reload keeps the keys it already has)
    and kept fresh by one background task each. Owns its own small client session for the IdPs."""

    def __init__(self) -> None:
        self._sets: dict[tuple[Any, ...], KeySet] = {}
        self._tasks: dict[tuple[Any, ...], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._running = False

    def get(self, issuer: str, *, jwks_url: str | None = None, jwks_file: Path | None = None,
            ca_file: Path | None = None, cache: KeyCacheConfig | None = None) -> KeySet:
        cache = cache or KeyCacheConfig()
        key = (issuer, jwks_url, str(jwks_file) if jwks_file else None, str(ca_file) if ca_file else None,
               cache.model_dump_json())
        ks = self._sets.get(key)
        if ks is None:
            ks = self._sets[key] = KeySet(issuer, jwks_url=jwks_url, jwks_file=jwks_file, ca_file=ca_file,
                                          cache=cache, owner=self)
            if self._running:
                self._tasks[key] = asyncio.ensure_future(ks.maintain())
        return ks

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8, ttl_dns_cache=60),
                headers={"User-Agent": f"tether/{os.environ.get('TETHER_VERSION', '0.1')} (jwks)"})
        return self._session

    async def start(self, sets: "list[KeySet] | None" = None, *, wait: float = 0.0) -> None:
        """Start refreshing in the background; with ``wait``, give the first fetches that long."""
        self._running = True
        for key, ks in self._sets.items():
            if key not in self._tasks:
                self._tasks[key] = asyncio.ensure_future(ks.maintain())
        todo = [ks for ks in (sets if sets is not None else self._sets.values()) if not ks.keys]
        if wait > 0 and todo:
            await asyncio.wait([asyncio.ensure_future(ks.refresh()) for ks in todo], timeout=wait)

    async def close(self) -> None:
        self._running = False
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
