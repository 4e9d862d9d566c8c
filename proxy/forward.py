"""Talking to upstreams: one shared pooled client session, streamed bodies, precise failure codes.

The upstream URL is always the upstream's configured base plus the *validated* request path (and the
query string, byte for byte). It is never produced by joining the client's target onto a base URL, so
an absolute-form target or ``//host/...`` can never send injected credentials to another host.

Response bodies are streamed back chunk by chunk with back-pressure (a 100 MB download never sits in
memory); small write responses are read whole because transactions and adapters need their content.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .errors import TetherError
from .headers import REQUEST_ID, STRIPPED_RESPONSE

log = logging.getLogger("tether.forward")

CHUNK = 64 * 1024
WHOLE_BODY_LIMIT = 4 * 1024 * 1024  # write responses up to this size are read whole
SMALL_BODY = 64 * 1024  # read responses with a Content-Length up to this are read whole, not streamed


def make_session(limit: int = 0) -> aiohttp.ClientSession:
    """The one client session: pooled keep-alive connections, no cookie jar (cookies never cross
    agents), bodies passed through as the upstream encoded them."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def build_url(base: str, path: str, query: str) -> URL:
    """base + validated path (+ '?' + raw query), already percent-encoded: never re-encoded."""
    return URL(base + path + ("?" + query if query else ""), encoded=True)


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str] | dict[str, str],
    body: Any,
    timeout: aiohttp.ClientTimeout,
    ssl: Any = None,
) -> aiohttp.ClientResponse:
    """Open the upstream request and return once its status and headers arrived."""
    try:
        return await session.request(method, url, headers=headers, data=body, allow_redirects=False,
                                     timeout=timeout, ssl=ssl if ssl is not None else True,
                                     compress=False, chunked=None)
    except aiohttp.ConnectionTimeoutError:
        raise TetherError("upstream_unavailable", f"could not connect to the upstream within "
                                                  f"{timeout.sock_connect:g}s", details={"applied": False}) from None
    except (aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError, asyncio.TimeoutError):
        raise TetherError("upstream_timeout", f"the upstream did not answer within {timeout.sock_read:g}s") from None
    except aiohttp.ClientConnectorError as exc:
        raise TetherError("upstream_unavailable", f"cannot connect to the upstream: {exc.os_error or exc}",
                          details={"applied": False}) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise TetherError("upstream_unavailable", f"the upstream connection failed: {type(exc).__name__}") from None


def response_headers(upstream_headers: Any) -> CIMultiDict[str]:
    """End-to-end headers of the upstream response (hop-by-hop and those Connection names dropped)."""
    drop = set(STRIPPED_RESPONSE)
    for v in upstream_headers.getall("Connection", ()):
        drop.update(t.strip().lower() for t in v.split(",") if t.strip())
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in upstream_headers.items():
        if k.lower() not in drop:
            out.add(k, v)
    return out


async def read_whole(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a response body up to ``limit`` bytes (502 upstream_response_too_large past it)."""
    cl = resp.content_length
    if cl is not None and cl > limit:
        resp.close()
        raise TetherError("upstream_response_too_large", f"the upstream's response is {cl} bytes; limit {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > limit:
                resp.close()
                raise TetherError("upstream_response_too_large", f"the upstream's response exceeds {limit} bytes")
            chunks.append(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError) as exc:
        raise TetherError("upstream_unavailable", f"the upstream broke the connection mid-response: "
                                                  f"{type(exc).__name__}") from None
    except (asyncio.TimeoutError, aiohttp.SocketTimeoutError):
        raise TetherError("upstream_timeout", "the upstream stopped sending its response") from None
    return b"".join(chunks)


async def relay(request: web.BaseRequest, resp: aiohttp.ClientResponse, headers: CIMultiDict[str],
                limit: int | None) -> tuple[web.StreamResponse, int, str | None]:
    """Stream an upstream response to the client. Returns (response, bytes sent, error code or None).

    Once the first byte is sent an error can no longer be reported as JSON; the connection is then
    closed so the client sees a truncated response rather than a silently short one."""
    cl = resp.content_length
    if limit is not None and cl is not None and cl > limit:
        resp.close()
        raise TetherError("upstream_response_too_large", f"the upstream's response is {cl} bytes; limit {limit}")
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if cl is not None:
        out.content_length = cl
    await out.prepare(request)
    sent = 0
    error: str | None = None
    try:
        async for chunk in resp.content.iter_chunked(CHUNK):
            sent += len(chunk)
            if limit is not None and sent > limit:
                error = "upstream_response_too_large"
                break
            try:
                await out.write(chunk)
            except (ConnectionResetError, BrokenPipeError):  # incl. aiohttp's ClientConnectionResetError
                error = "client_closed"  # the agent went away while we were writing to it
                break
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, OSError):
        error = "upstream_unavailable"
    except (asyncio.TimeoutError, aiohttp.SocketTimeoutError):
        error = "upstream_timeout"
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


__all__ = ["REQUEST_ID", "SMALL_BODY", "Timer", "build_url", "make_session", "read_whole", "relay", "response_headers",
           "send", "WHOLE_BODY_LIMIT"]
