"""Talking to upstreams: one pooled client (proxy.transport.upstream_http), streamed bodies, precise failure codes.

The upstream URL is always the upstream's configured base plus the *validated* request path (and the
query string, byte for byte). It is never produced by joining the client's target onto a base URL, so
an absolute-form target or ``//host/...`` can never send injected credentials to another host.

Response bodies are streamed back chunk by chunk with back-pressure (a 100 MB download never sits in
memory). A write's answer is never refused for its size: a small one with a known length is read whole
(transactions and adapters need its content), any other streams through like a read's while
:class:`AnswerPrefix` keeps its first ``WHOLE_BODY_LIMIT`` bytes for what Tether needs from it (created
ids, failure flags). Response heads are written back with the header bytes the upstream sent, non-UTF-8
ones included (:class:`ExactResponse`).
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from ..errors import TetherError
from ..headers import REQUEST_ID, STRIPPED_RESPONSE
from .upstream_http import OriginPool, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from ..config import Timeouts

log = logging.getLogger("tether.forward")

WHOLE_BODY_LIMIT = 4 * 1024 * 1024  # write answers up to this size are read whole; past it, this much is kept
SMALL_BODY = 64 * 1024  # read responses with a Content-Length up to this are read whole, not streamed


def make_session(limit: int = 0) -> aiohttp.ClientSession:
    """The session for Tether's auxiliary calls (OAuth token fetches, alert webhooks): pooled, no
    cookie jar (cookies never cross agents). Agent traffic goes through :mod:`proxy.transport.upstream_http`."""
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


async def send(pool: OriginPool, method: str, target: str, headers: Any, body: Any, timeouts: Timeouts,
               content_length: int | None = None) -> UpstreamResponse:
    """Open the upstream request and return once its status and headers arrived (``content_length``:
    the exact size of a streamed body, sent as is instead of chunked)."""
    try:
        return await pool.request(method, target, headers, body, connect_timeout=timeouts.connect,
                                  read_timeout=timeouts.read, content_length=content_length)
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


async def read_prefix(resp: UpstreamResponse, limit: int, timeouts: Timeouts) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a body and whether that was all of it; a longer one is then dropped
    (the connection closed). Releases the response either way."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.chunks():
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                resp.close()
                return b"".join(parts)[:limit], False
    except UpstreamError as exc:
        resp.close()
        raise as_tether_error(exc, timeouts, mid_response=True) from None
    resp.release()
    return b"".join(parts), True


async def relay(request: web.BaseRequest, resp: UpstreamResponse, headers: CIMultiDict[str],
                limit: int | None, needles: "Needles | None" = None, found: list[bool] | None = None,
                tap: Any = None) -> tuple[web.StreamResponse, int, str | None]:
    """Stream an upstream response to the client. Returns (response, bytes sent, error code or None).
    With ``needles`` the injected credential is masked on the way (``found[0]`` tells whether it was).
    ``tap``, when given, is called with each chunk before it is sent (see :class:`AnswerPrefix`).

    Once the first byte is sent an error can no longer be reported as JSON; the connection is then
    aborted so the client sees a broken response rather than a silently short one."""
    cl = resp.content_length
    if limit is not None and cl is not None and cl > limit:
        resp.close()
        raise TetherError("upstream_response_too_large", f"the upstream's response is {cl} bytes; limit {limit}")
    out = (ExactStreamResponse if resp.raw_bytes else web.StreamResponse)(
        status=resp.status, reason=resp.reason or None, headers=headers)
    if cl is not None:
        out.content_length = cl
    await out.prepare(request)
    sent = 0
    error: str | None = None
    source = resp.chunks() if not needles else redacted_chunks(resp.chunks(), needles, found or [False])
    try:
        async for chunk in source:
            sent += len(chunk)
            if limit is not None and sent > limit:
                error = "upstream_response_too_large"
                break
            if tap is not None:
                tap(chunk)
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
        # Abort (RST, not FIN): the client must not mistake a truncated body for a complete one.
        if request.transport is not None:
            request.transport.abort()
        return out, sent, error
    try:
        await out.write_eof()
    except (ConnectionResetError, BrokenPipeError):
        return out, sent, "client_closed"
    return out, sent, None


# --------------------------------------------------------------------------- reflected credentials

MIN_NEEDLE = 8  # shorter secrets are not searched for (they would mask ordinary text); use real secrets


class Needles:
    """The injected credential as it could come back in an answer: the header value, its token after
    the scheme (``Bearer x`` -> ``x``), a Basic password, an API key without its prefix. Longest first,
    as bytes (bodies) and as text (headers)."""

    __slots__ = ("raw", "text", "keep")

    def __init__(self, values: list[str]) -> None:
        uniq = sorted({v for v in values if len(v) >= MIN_NEEDLE}, key=len, reverse=True)
        self.raw = tuple(v.encode("utf-8", "surrogateescape") for v in uniq)
        self.text = tuple(uniq)
        self.keep = max((len(b) for b in self.raw), default=1) - 1  # bytes held back across chunks

    def __bool__(self) -> bool:
        return bool(self.raw)


NO_NEEDLES = Needles([])


def credential_needles(pairs: Any, prefix: str = "") -> Needles:
    import base64

    values: list[str] = []
    for _, value in pairs:
        values.append(value)
        scheme, sep, rest = value.partition(" ")
        if sep and rest.strip():
            values.append(rest.strip())
            if scheme.lower() == "basic":
                try:
                    values.append(base64.b64decode(rest.strip(), validate=True).decode().partition(":")[2])
                except ValueError:
                    pass
        if prefix and value.startswith(prefix):
            values.append(value[len(prefix):])
    return Needles(values)


def redact_bytes(data: bytes, needles: Needles) -> tuple[bytes, bool]:
    """``data`` with every occurrence of the credential masked by as many ``*`` (lengths, and so any
    Content-Length, stay right); True when something was masked."""
    hit = False
    for n in needles.raw:
        if n in data:
            data = data.replace(n, b"*" * len(n))
            hit = True
    return data, hit


def redact_headers(headers: CIMultiDict[str], needles: Needles) -> bool:
    """Mask the credential in response header values, in place; True when one held it."""
    texts = needles.text
    if not any(n in v for v in headers.values() for n in texts):
        return False
    items = []
    for k, v in headers.items():
        for n in texts:
            v = v.replace(n, "*" * len(n))
        items.append((k, v))
    headers.clear()
    headers.extend(items)
    return True


async def redacted_chunks(chunks: Any, needles: Needles, found: list[bool]) -> Any:
    """A streamed body with the credential masked, also where it straddles two chunks: the last
    ``needles.keep`` bytes of each chunk wait for the next one. ``found[0]`` is set on a hit."""
    keep = needles.keep
    carry = b""
    async for chunk in chunks:
        buf = carry + chunk if carry else chunk
        buf, hit = redact_bytes(buf, needles)
        if hit:
            found[0] = True
        if keep and len(buf) > keep:
            carry = buf[-keep:]
            out = buf[:-keep]
        elif keep:
            carry, out = buf, b""
        else:
            carry, out = b"", buf
        if out:
            yield out
    if carry:
        yield carry


def answer(resp: UpstreamResponse, headers: CIMultiDict[str], body: bytes | None) -> web.Response:
    """A whole upstream answer for the client, its head as the upstream sent it. A HEAD answer keeps the
    upstream's Content-Length (aiohttp would write none for an empty body)."""
    if body is None and resp.content_length is not None:
        headers["Content-Length"] = str(resp.content_length)
    return (ExactResponse if resp.raw_bytes else web.Response)(
        body=body, status=resp.status, reason=resp.reason or None, headers=headers)


class _ExactHead:
    """Writes the response head with the bytes the upstream sent: aiohttp's serialiser writes UTF-8 and
    silently drops what does not encode (a latin-1 ``filename="caf\xe9.txt"`` would lose its é). Used only
    for answers whose head holds such bytes (``UpstreamResponse.raw_bytes``); relies on aiohttp's
    StreamWriter keeping the serialised head in ``_headers_buf`` until the body's first write, which
    tests/test_transport_fidelity.py checks against a real server."""

    async def _write_headers(self) -> None:
        request = self._req  # type: ignore[attr-defined]
        writer = self._payload_writer  # type: ignore[attr-defined]
        version = request.version
        status_line = f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}"  # type: ignore[attr-defined]
        headers = self._headers  # type: ignore[attr-defined]
        await writer.write_headers(status_line, headers)  # aiohttp's own checks (CR, LF, controls)
        if getattr(writer, "_headers_buf", None) and not getattr(writer, "_headers_written", True):
            head = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
            writer._headers_buf = (status_line.encode("latin-1", "replace") + b"\r\n"
                                   + head.encode("utf-8", "surrogateescape") + b"\r\n")
        if self._send_headers_immediately:  # type: ignore[attr-defined]
            writer.send_headers()


class ExactResponse(_ExactHead, web.Response):
    pass


class ExactStreamResponse(_ExactHead, web.StreamResponse):
    pass


class AnswerPrefix:
    """Keeps the first ``limit`` bytes of an answer relayed as a stream (a :func:`relay` tap): what Tether
    reads from a write's answer — created ids, failure flags — without holding the whole of it."""

    __slots__ = ("limit", "parts", "kept", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.kept = 0
        self.size = 0

    def __call__(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.limit - self.kept
        if room > 0:
            part = chunk if len(chunk) <= room else chunk[:room]
            self.parts.append(part)
            self.kept += len(part)

    @property
    def whole(self) -> bool:
        return self.size <= self.limit

    def data(self) -> bytes:
        return b"".join(self.parts)


PREFIX_SCAN = 64 * 1024  # how much of a too-large JSON answer json_prefix_fields looks at (bounded CPU)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_SCALAR = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_JSON_WS = re.compile(rb"[ \t\r\n]*")
_JSON_PLAIN = re.compile(rb'[^"\[\]{}]*')


def json_prefix_fields(data: bytes) -> dict[str, Any] | None:
    """The top-level scalar members (strings, numbers, booleans, null) of a JSON object that ``data``
    only begins — the first bytes of an answer too large to keep whole (where APIs put ``id``). Nested
    values are skipped; the scan stops where the prefix does, and after PREFIX_SCAN bytes (a pure-Python
    walk: bounded so that it never holds the event loop long). None when ``data`` is no JSON object."""
    data = data[:PREFIX_SCAN]
    ws = _JSON_WS.match
    i = ws(data, 0).end()
    if data[i:i + 1] != b"{":
        return None
    out: dict[str, Any] = {}
    i += 1
    n = len(data)
    while True:
        i = ws(data, i).end()
        m = _JSON_STRING.match(data, i)
        if m is None:
            return out
        key = orjson.loads(m.group())
        i = ws(data, m.end()).end()
        if data[i:i + 1] != b":":
            return out
        i = ws(data, i + 1).end()
        c = data[i:i + 1]
        if c in (b"{", b"["):
            depth = 0
            while i < n:  # skip the nested value, strings and all
                i = _JSON_PLAIN.match(data, i).end()  # type: ignore[union-attr]
                if i >= n:
                    return out
                c = data[i:i + 1]
                if c == b'"':
                    m = _JSON_STRING.match(data, i)
                    if m is None:
                        return out
                    i = m.end()
                    continue
                depth += 1 if c in (b"{", b"[") else -1
                i += 1
                if depth == 0:
                    break
            else:
                return out
        else:
            m = (_JSON_STRING if c == b'"' else _JSON_SCALAR).match(data, i)
            if m is None or m.end() >= n:  # a value cut by the prefix's end is not trusted
                return out
            try:
                out[key] = orjson.loads(m.group())
            except orjson.JSONDecodeError:
                return out
            i = m.end()
        i = ws(data, i).end()
        if data[i:i + 1] != b",":
            return out
        i += 1


class Timer:
    __slots__ = ("t0",)

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return round((time.perf_counter() - self.t0) * 1000.0, 3)


__all__ = ["NO_NEEDLES", "Needles", "REQUEST_ID", "SMALL_BODY", "AnswerPrefix", "ExactResponse", "ExactStreamResponse",
           "Timer", "answer", "as_tether_error", "build_target", "credential_needles", "json_prefix_fields",
           "make_session", "read_prefix", "read_whole", "redact_bytes", "redact_headers", "relay",
           "response_headers", "send", "WHOLE_BODY_LIMIT"]
