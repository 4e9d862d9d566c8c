"""Talking to upstreams: one pooled client (proxy.upstream_http), streamed bodies, precise failure codes.

The upstream URL is always the upstream's configured base plus the *validated* request path (and the
query string, byte for byte). It is never produced by joining the client's target onto a base URL, so
an absolute-form target or ``//host/...`` can never send injected credentials to another host.

Response bodies are streamed back chunk by chunk with back-pressure (a 100 MB download never sits in
memory); small write responses are read whole because transactions and adapters need their content.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .errors import TetherError
from .headers import REQUEST_ID, STRIPPED_RESPONSE
from .upstream_http import OriginPool, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from .config import Timeouts

log = logging.getLogger("tether.forward")

WHOLE_BODY_LIMIT = 4 * 1024 * 1024  # write responses up to this size are read whole
SMALL_BODY = 64 * 1024  # read responses with a Content-Length up to this are read whole, not streamed


def make_session(limit: int = 0) -> aiohttp.ClientSession:
    """The session for Tether's auxiliary calls (OAuth token fetches, alert webhooks): pooled, no
    cookie jar (cookies never cross agents). Agent traffic goes through :mod:`proxy.upstream_http`."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def build_target(path: str, query: str) -> str:
    """The validated path (+ '?' + raw query), already percent-encoded: never re-encoded. The pool puts
    the upstream's base path in front of it."""
    return path + ("?" + query if query else "")


def as_tether_error(exc: UpstreamError, timeouts: Timeouts, *, mid_response: bool = False) -> TetherError:
    """Transport failures in Tether's vocabulary (``applied: False`` only where provably not sent).
    ``mid_response``: the head had arrived, so the failure broke off a response under way."""
    kind = exc.kind
    if kind == "read_timeout":
        return TetherError("upstream_timeout", "the upstream stopped sending its response" if mid_response
                           else f"the upstream did not answer within {timeouts.read:g}s")
    if kind == "too_large":
        return TetherError("upstream_response_too_large", str(exc))
    if kind == "pool_timeout":  # upstreams.<name>.max_connections all busy: nothing was sent
        return TetherError("upstream_busy", str(exc), headers={"Retry-After": "1"}, details={"applied": False})
    if exc.applied is False:
        return TetherError("upstream_unavailable", str(exc), details={"applied": False})
    if mid_response:
        return TetherError("upstream_unavailable", f"the upstream broke the connection mid-response: {exc}")
    return TetherError("upstream_unavailable", f"the upstream connection failed: {exc}")


async def send(pool: OriginPool, method: str, target: str, headers: CIMultiDict[str] | dict[str, str], body: Any,
               timeouts: Timeouts) -> UpstreamResponse:
    """Open the upstream request and return once its status and headers arrived."""
    try:
        return await pool.request(method, target, headers, body, connect_timeout=timeouts.connect,
                                  read_timeout=timeouts.read)
    except UpstreamError as exc:
        raise as_tether_error(exc, timeouts) from None


def response_headers(raw: list[tuple[str, str]]) -> CIMultiDict[str]:
    """End-to-end headers of an upstream response given as received (hop-by-hop and the headers its
    Connection header names are dropped)."""
    drop: Any = STRIPPED_RESPONSE
    for k, v in raw:
        if k.lower() == "connection":
            if drop is STRIPPED_RESPONSE:
                drop = set(drop)
            drop.update(t.strip().lower() for t in v.split(",") if t.strip())
    return CIMultiDict([(k, v) for k, v in raw if k.lower() not in drop])


async def read_whole(resp: UpstreamResponse, limit: int, timeouts: Timeouts) -> bytes:
    """Read a response body up to ``limit`` bytes (502 upstream_response_too_large past it)."""
    cl = resp.content_length
    if cl is not None and cl > limit:
        resp.close()
        raise TetherError("upstream_response_too_large", f"the upstream's response is {cl} bytes; limit {limit}")
    try:
        return await resp.read(limit)
    except UpstreamError as exc:
        resp.close()
        raise as_tether_error(exc, timeouts, mid_response=True) from None


async def relay(request: web.BaseRequest, resp: UpstreamResponse, headers: CIMultiDict[str],
                limit: int | None) -> tuple[web.StreamResponse, int, str | None]:
    """Stream an upstream response to the client. Returns (response, bytes sent, error code or None).

    Once the first byte is sent an error can no longer be reported as JSON; the connection is then
    closed so the client sees a truncated response rather than a silently short one."""
    cl = resp.content_length
    if limit is not None and cl is not None and cl > limit:
        resp.close()
        raise TetherError("upstream_response_too_large", f"the upstream's response is {cl} bytes; limit {limit}")
    out = web.StreamResponse(status=resp.status, reason=resp.reason or None, headers=headers)
    if cl is not None:
        out.content_length = cl
    await out.prepare(request)
    sent = 0
    error: str | None = None
    try:
        async for chunk in resp.chunks():
            sent += len(chunk)
            if limit is not None and sent > limit:
                error = "upstream_response_too_large"
                break
            try:
                await out.write(chunk)
            except (ConnectionResetError, BrokenPipeError):  # incl. aiohttp's ClientConnectionResetError
                error = "client_closed"  # the agent went away while we were writing to it
                break
    except UpstreamError as exc:
        error = "upstream_timeout" if exc.kind == "read_timeout" else "upstream_unavailable"
    finally:
        resp.release() if error is None else resp.close()
    if error is not None:
        # Abort: the client must not mistake a truncated body for a complete one.
        if request.transport is not None:
            request.transport.close()
        return out, sent, error
    try:
        await out.write_eof()
    except (ConnectionResetError, BrokenPipeError):
        return out, sent, "client_closed"
    return out, sent, None


class Timer:
    __slots__ = ("t0",)

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000.0, 3)


__all__ = ["REQUEST_ID", "SMALL_BODY", "Timer", "as_tether_error", "build_target", "make_session", "read_whole", "relay",
           "response_headers", "send", "WHOLE_BODY_LIMIT"]
