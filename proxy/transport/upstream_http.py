"""The forwarding transport: a lean pooled HTTP/1.1 client for calls to upstreams.

Why not aiohttp's ClientSession (which Tether still uses for its auxiliary calls: OAuth token
fetches, alert webhooks, the CLI)? Measured on loopback against nginx, a forwarder built on
ClientSession spends ~90 µs of Python per request in the client alone (request/response objects,
timer contexts, auto headers, tracing hooks, cookie plumbing); the same forwarder on this module
serves 3× the requests per second. Upstream forwarding is the one call made for every agent request,
so it gets a transport that does only what a reverse proxy needs:

- one keep-alive pool per upstream origin, connections reused LIFO (warm sockets first), idle ones
  closed after ``KEEPALIVE_S``; at most ``max_connections`` per origin (:class:`ConnectOptions`): past it a
  request waits, first come first served, for a connection another request gives back, at most
  ``pool_timeout`` (then ``UpstreamError('pool_timeout')``, nothing sent). Under the limit the check is
  one comparison, no allocation;
- connecting (:meth:`OriginPool._connect`): the name resolved, then RFC 8305 happy eyeballs through
  ``aiohappyeyeballs`` (aiohttp's own; uvloop's ``create_connection`` has no ``happy_eyeballs_delay``): the
  next address family is tried 250 ms after the first, so a dead IPv6 address does not eat the connect
  timeout; optionally a ``CONNECT`` tunnel through a forward proxy (for http and https upstreams alike,
  so the request line stays origin-form and keep-alive works as without a proxy); then TLS with the
  upstream's own context (CA bundle, client certificate) and SNI name;
- responses parsed by llhttp (through ``httptools``, the parser uvicorn uses): status, headers, body,
  chunked and read-until-close bodies, 1xx skipped, HEAD/204/304 without a body, keep-alive rules;
- framing as RFC 9112 §6.3 has it: a body is chunked only when ``chunked`` is the *last* transfer coding
  (otherwise it runs until the connection closes, and :attr:`UpstreamResponse.transfer_coding` names the
  codings left on it); a read-until-close body is complete only when the connection ends cleanly — a
  reset, or a TLS close without ``close_notify``, is a broken body, never a short complete one;
- header values kept as the bytes the upstream sent (non-UTF-8 bytes survive as surrogate escapes, and
  :attr:`UpstreamResponse.raw_bytes` says so, so that the forward path writes them back byte for byte);
- flow control both ways: request bodies streamed as chunked with back-pressure, response bodies
  buffered up to ``HIGH_WATER`` then the socket is paused until the consumer catches up;
- timeouts: ``connect`` for opening a connection, ``read`` for the longest silence while waiting for
  the response head or the next body bytes (the same meaning the rules file documents);
- a request found on a stale pooled connection (the upstream closed it while idle) is retried once on a
  new connection when it is safe to: the connection failed before a single byte of the answer, the body
  can be sent again (not streamed), and the request is idempotent — GET, HEAD, OPTIONS, PUT, DELETE
  (RFC 9110 §9.2.2) or any request carrying an ``Idempotency-Key``. Other writes are never retried here
  (their fate is for the journal and transactions to record);
- an upstream's ``Keep-Alive: timeout=N`` hint is honoured: its connection is not reused once it has
  idled for ``N - KEEPALIVE_MARGIN_S`` seconds, so Tether lets go of it before the server does;
- a request body of known length is streamed with that ``Content-Length`` (object stores answer 411 to
  chunked uploads); one of unknown length is sent chunked.

Failures are :class:`UpstreamError` with a ``kind`` the caller maps to Tether's error codes, and
``applied=False`` where the request provably never left Tether (connection refused or timed out).
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl as ssl_mod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict

KEEPALIVE_S = 30.0  # an idle pooled connection older than this is closed rather than reused
MAX_IDLE = 256  # idle connections kept per origin; more are closed when released
HIGH_WATER = 256 * 1024  # response bytes buffered before the socket is paused
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # a response head larger than this is a protocol error
CHUNK = 64 * 1024
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})  # idempotent (RFC 9110 §9.2.2)
IDEMPOTENCY_KEY = "idempotency-key"  # a request carrying one may be retried whatever its method
KEEPALIVE_MARGIN_S = 1.0  # stop reusing a connection this long before the upstream's Keep-Alive timeout
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when bodiless
# After these exchanges the connection is closed, never pooled: an answer that comes late on it (a HEAD
# "body" held back, the answer to a request a lenient server read out of a GET/DELETE body or a chunked
# body it did not understand) would otherwise be taken for the next request's answer.
MANAGED = frozenset({"host", "content-length", "transfer-encoding", "connection"})
HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305 §5's recommended Connection Attempt Delay
DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_POOL_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ProxyTunnel:
    """A forward proxy reached at ``host:port`` and asked to ``CONNECT`` to the origin. ``authorization``
    returns the ``Proxy-Authorization`` value (read when a connection opens, so a rotated secret file
    applies) or None; it never prints. ``display`` (``http://host:port``) is what messages show."""

    host: str
    port: int
    display: str
    authorization: Callable[[], str | None] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How an :class:`OriginPool` reaches its origin (built once per rules version, by proxy.transport.egress).

    ``server_name``: TLS SNI and the name the certificate must carry (default: the URL's host).
    ``host_header``: the Host sent (default: the URL's host[:port]). ``proxy``: a CONNECT tunnel.
    ``max_connections``: per origin (None: no limit); ``pool_timeout``: the longest wait for one."""

    server_name: str | None = None
    host_header: str | None = None
    proxy: ProxyTunnel | None = None
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    pool_timeout: float = DEFAULT_POOL_TIMEOUT


DEFAULT_OPTIONS = ConnectOptions()


class UpstreamError(Exception):
    """``kind``: connect | connect_timeout | pool_timeout | read_timeout | broken | protocol | bad_request."""

    def __init__(self, kind: str, message: str, *, applied: bool | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.applied = applied


def _dec(b: bytes) -> str:
    # as aiohttp's parsers do: bytes survive a round trip through str
    return b.decode("utf-8", "surrogateescape")


def _keepalive_timeout(value: bytes) -> float | None:
    """``timeout=N`` of a Keep-Alive header (``timeout=5, max=100``), or None."""
    for part in value.split(b","):
        k, _, v = part.partition(b"=")
        if k.strip().lower() == b"timeout":
            v = v.strip().strip(b'"')
            return float(v) if v.isdigit() else None
    return None


class UpstreamResponse:
    """Status and headers of an upstream answer; the body is read with :meth:`read` or :meth:`chunks`.

    Call :meth:`release` when done (the connection goes back to the pool if the body was read to the
    end) or :meth:`close` to drop the connection."""

    __slots__ = ("status", "reason", "raw_headers", "_headers", "content_length", "_conn", "_chunks", "_buffered",
                 "_done", "_error", "_waiter", "_keep_alive", "_finished", "transfer_coding", "raw_bytes")

    def __init__(self, conn: "_Connection", status: int, reason: str, raw_headers: list[tuple[str, str]],
                 content_length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers  # as received, in order: the forward path filters this list once
        self._headers: CIMultiDict[str] | None = None
        self.content_length = content_length
        self._conn: _Connection | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_alive = False
        self._finished = False  # released or closed
        self.transfer_coding: str | None = None  # codings other than chunked left on the body, e.g. "gzip"
        self.raw_bytes = False  # a header value or the reason holds bytes that are not UTF-8

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still sit in the buffer)."""
        return self._done

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet taken."""
        return self._buffered

    @property
    def headers(self) -> CIMultiDict[str]:
        """The response headers (built on first use)."""
        h = self._headers
        if h is None:
            h = self._headers = CIMultiDict(self.raw_headers)
        return h

    # -- fed by the connection
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        conn = self._conn
        if self._buffered > HIGH_WATER and conn is not None:
            conn.pause_reading()
        self._wake()

    def _complete(self, keep_alive: bool) -> None:
        self._done = True
        self._keep_alive = keep_alive
        self._wake()

    def _fail(self, err: UpstreamError) -> None:
        if not self._done:
            self._error = err
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def _more(self) -> None:
        conn = self._conn
        if conn is None:
            raise UpstreamError("broken", "the response was already released")
        self._waiter = conn.loop.create_future()
        await conn.wait(self._waiter)

    def _take(self) -> bytes:
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered < LOW_WATER and self._conn is not None:
            self._conn.resume_reading()
        return data

    # -- read by the caller
    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (raises UpstreamError if the upstream breaks off)."""
        while True:
            if self._chunks:
                yield self._take()
            elif self._done:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._more()

    async def read(self, limit: int) -> bytes:
        """The whole body; UpstreamError('too_large') past ``limit`` bytes."""
        if self._done:  # the usual case: the whole answer came with its head
            if self._buffered > limit:
                raise UpstreamError("too_large", f"the upstream's response exceeds {limit} bytes")
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return data
        parts: list[bytes] = []
        size = 0
        while True:
            while self._chunks:  # taking (not peeking) keeps the socket unpaused
                chunk = self._take()
                size += len(chunk)
                if size > limit:
                    raise UpstreamError("too_large", f"the upstream's response exceeds {limit} bytes")
                parts.append(chunk)
            if self._done:
                return b"".join(parts)
            if self._error is not None:
                raise self._error
            await self._more()

    def release(self) -> None:
        """Done with the response: reuse the connection when the body was read to its end."""
        if self._finished:
            return
        self._finished = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._keep_alive and not self._chunks:
            conn.reusable()
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (the body is abandoned)."""
        if self._finished:
            return
        self._finished = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; carries one request at a time."""

    def __init__(self, pool: "OriginPool") -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.read_timeout: float | None = None
        self.head_request = False
        self.got_bytes = False
        self.informational = False
        self.reset_parser = False
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.until_close = False
        self.must_close = False  # e.g. a request body abandoned half-way: the stream is out of step
        self.in_head = False
        self._head_raw = 0
        self._hdrs: list[tuple[str, str]] = []
        self._reason = ""
        self._head_bytes = 0
        self._length: int | None = None
        self._chunked = False
        self._codings: list[bytes] = []  # the Transfer-Encoding codings, in order, over every such header
        self._raw = False
        self._idle_hint: float | None = None
        self.server_idle: float | None = None  # seconds the upstream keeps this connection idle (Keep-Alive)
        self.clean_eof = False  # the upstream ended the connection in order (TLS: with close_notify)

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        resp = self.response
        if resp is not None and not resp._done:
            if self.until_close and exc is None and (self.clean_eof or not self.pool.tls):
                resp._complete(keep_alive=False)  # the body's end is the connection's end
            elif self.until_close:
                # a reset (or a TLS close without close_notify) cuts a read-until-close body short: it
                # must never pass for the whole body
                resp._fail(UpstreamError("broken", "the upstream's connection was reset before the body ended"
                                         if exc is not None else "the upstream closed TLS without close_notify "
                                         "before the body ended"))
            else:
                resp._fail(UpstreamError("broken", "the upstream broke the connection mid-response"))
        hw = self.head_waiter
        if hw is not None and not hw.done():
            hw.set_exception(UpstreamError("broken", "the upstream closed the connection without answering"))
        dw = self.drain_waiter
        if dw is not None and not dw.done():
            dw.set_exception(UpstreamError("broken", "the upstream closed the connection"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        dw = self.drain_waiter
        if dw is not None:
            self.drain_waiter = None
            if not dw.done():
                dw.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._protocol_error(str(exc.__context__ or exc))
        except httptools.HttpParserUpgrade:
            self._protocol_error("the upstream switched protocols unasked")
        except httptools.HttpParserError as exc:
            self._protocol_error(f"malformed response: {exc}")
        else:
            if self.in_head:  # a head (or one endless line) still incomplete: bound what the parser holds
                self._head_raw += len(data)
                if self._head_raw > 2 * MAX_HEAD_BYTES:
                    self._protocol_error(f"the response head exceeds {MAX_HEAD_BYTES} bytes")
        if self.reset_parser:  # after a HEAD answer: the next message starts afresh
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        if self.pool.tls and self.transport is not None:
            # Over TLS only a close_notify ends a body in order: after one the SSL object reads b"" (an
            # asyncio transport also calls this on a bare TCP FIN, when the read fails instead; uvloop
            # does not call it at all then).
            sslobj = self.transport.get_extra_info("ssl_object")
            try:
                rest = sslobj.read(1) if sslobj is not None else b""
            except ssl_mod.SSLError:
                return False
            if rest:  # never seen in practice (the transport hands over all data first): keep it anyway
                self.data_received(rest)
                return False
        self.clean_eof = True
        return False  # close the transport; connection_lost settles what was in flight

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.head_waiter is None and not self.informational:
            # bytes on a connection with no request in flight (a server's "408" before it closes an
            # idle connection): taking them for the next request's answer would be a desync
            raise UpstreamError("protocol", "the upstream answered a request it was not sent")
        self.in_head = True
        self._head_raw = 0
        self._hdrs = []
        self._reason = ""
        self._head_bytes = 0
        self._length = None
        self._chunked = False
        self._codings = []
        self._raw = False
        self._idle_hint = None

    def on_status(self, reason: bytes) -> None:
        if not reason.isascii():
            self._raw = True
        self._reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field after a chunked body: never a response header
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise UpstreamError("protocol", f"the upstream's response head exceeds {MAX_HEAD_BYTES} bytes")
        if len(name) in (10, 14, 17):
            lname = name.lower()
            if lname == b"content-length":
                self._length = int(value) if value.isdigit() else None  # llhttp already refused bad ones
            elif lname == b"transfer-encoding":
                # RFC 9112 §6.3: chunked frames the body only as the last coding (of all such headers)
                self._codings.extend(c for c in (t.strip() for t in value.lower().split(b",")) if c)
                self._chunked = bool(self._codings) and self._codings[-1] == b"chunked"
            elif lname == b"keep-alive":
                self._idle_hint = _keepalive_timeout(value)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:  # latin-1 filenames and the like: kept as bytes, written back as bytes
            text = _dec(value)
            self._raw = True
        self._hdrs.append((_dec(name), text))

    def on_headers_complete(self) -> None:
        self.in_head = False
        status = self.parser.get_status_code()
        if status < 200:
            self.informational = True  # 100 Continue, 103 Early Hints: not the answer
            return
        resp = UpstreamResponse(self, status, self._reason, self._hdrs, self._length)
        no_body = self.head_request or status in (204, 304)
        if self._codings and not no_body:
            left = [c for c in (self._codings[:-1] if self._chunked else self._codings) if c != b"identity"]
            if left:
                resp.transfer_coding = b", ".join(left).decode("latin-1")
        resp.raw_bytes = self._raw
        self.server_idle = None if self._idle_hint is None else self._idle_hint - KEEPALIVE_MARGIN_S
        self.response = resp
        self.until_close = not no_body and self._length is None and not self._chunked
        hw, self.head_waiter = self.head_waiter, None
        if hw is not None and not hw.done():
            hw.set_result(resp)
        if self.head_request:
            self.reset_parser = True
            resp._complete(keep_alive=self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp is not None and not resp._done:
            resp._feed(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        resp = self.response
        if resp is not None and not resp._done:
            resp._complete(keep_alive=self.parser.should_keep_alive() and not self.until_close)

    # -- helpers
    def _protocol_error(self, message: str) -> None:
        err = UpstreamError("protocol", f"the upstream's response is not valid HTTP/1.1: {message}")
        hw = self.head_waiter
        if hw is not None and not hw.done():
            hw.set_exception(err)
        if self.response is not None:
            self.response._fail(err)
        self.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.last_activity = self.loop.time()
            self.transport.resume_reading()

    async def wait(self, fut: asyncio.Future[Any]) -> Any:
        """Await ``fut`` under the read timeout: silence (no bytes) for that long fails it."""
        timeout = self.read_timeout
        if timeout is None:
            return await fut
        self.last_activity = max(self.last_activity, self.loop.time())
        handle = self.loop.call_later(timeout, self._check_silence, fut)
        try:
            return await fut
        finally:
            handle.cancel()

    def _check_silence(self, fut: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        assert self.read_timeout is not None
        left = self.last_activity + self.read_timeout - self.loop.time()
        if left > 0.001:
            self.loop.call_later(left, self._check_silence, fut)  # bytes came meanwhile: wait the rest
            return
        fut.set_exception(UpstreamError("read_timeout", f"the upstream did not answer within {self.read_timeout:g}s"))
        self.close()

    async def drain(self) -> None:
        """Wait until the upstream takes more of the request body (silence past the read timeout fails)."""
        if self.write_paused and not self.closed:
            self.drain_waiter = self.loop.create_future()
            self.last_activity = self.loop.time()
            await self.wait(self.drain_waiter)
        if self.closed:
            raise UpstreamError("broken", "the upstream closed the connection while Tether was sending")

    def reusable(self) -> None:
        self.response = None
        self.read_timeout = None
        if self.closed or self.reading_paused or self.must_close or (self.server_idle is not None
                                                                      and self.server_idle <= 0):
            self.close()
            return
        self.pool.put_back(self)

    def idle_too_long(self, now: float) -> bool:
        """Idle past our own limit, or close to the upstream's announced ``Keep-Alive: timeout``."""
        idle = now - self.idle_since
        return idle > KEEPALIVE_S or (self.server_idle is not None and idle > self.server_idle)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()


class OriginPool:
    """Keep-alive connections to one ``scheme://host:port``."""

    def __init__(self, base_url: str, ssl: Any, loop: asyncio.AbstractEventLoop,
                 options: ConnectOptions = DEFAULT_OPTIONS) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.loop = loop
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        if parts.port is not None and parts.port == (443 if self.tls else 80):
            self.host_header = self.host_header.rsplit(":", 1)[0]
        if options.host_header:
            self.host_header = options.host_header
        self.server_name = options.server_name or self.host
        self.proxy = options.proxy
        self.limit = options.max_connections
        self.pool_timeout = options.pool_timeout
        self.opening = 0  # connections being opened (they count against the limit like live ones)
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.prefix = parts.path.rstrip("/")
        self.ssl: Any = None
        if self.tls:
            if ssl is False:
                ctx = ssl_mod.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl_mod.CERT_NONE
                self.ssl = ctx
            elif isinstance(ssl, ssl_mod.SSLContext):
                self.ssl = ssl
            else:
                self.ssl = ssl_mod.create_default_context()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.live: set[_Connection] = set()
        self.retired = False

    # -- connections
    async def _open(self, connect_timeout: float | None) -> _Connection:
        """A new connection; at the origin's connection limit, the first one another request gives back
        (or a new one once a connection closes), waiting at most ``pool_timeout``."""
        limit = self.limit
        while True:
            if limit is None or len(self.live) + self.opening < limit:
                self.opening += 1
                break
            handed = await self._wait_turn()
            if handed is None:
                break  # a slot was reserved for this request (counted in self.opening)
            if not handed.closed:
                return handed
            # closed while being handed over: its slot is free again; look once more
        try:
            _, conn = await asyncio.wait_for(self._connect(), connect_timeout)
        except BaseException as exc:
            self.opening -= 1
            self._slot_freed()
            if isinstance(exc, UpstreamError):
                raise
            where = f"the proxy {self.proxy.display}" if self.proxy is not None else "the upstream"
            if isinstance(exc, asyncio.TimeoutError):
                raise UpstreamError("connect_timeout", f"could not connect to {where} within {connect_timeout:g}s",
                                    applied=False) from None
            if isinstance(exc, ssl_mod.SSLError):
                why = getattr(exc, "verify_message", None) or exc.reason or exc  # e.g. the name it is not valid for
                raise UpstreamError("connect", f"TLS handshake with the upstream failed: {why}",
                                    applied=False) from None
            if isinstance(exc, OSError):
                raise UpstreamError("connect", f"cannot connect to {where}: {exc.strerror or exc}",
                                    applied=False) from None
            raise
        self.opening -= 1
        self.live.add(conn)
        return conn

    async def _connect(self) -> tuple[asyncio.BaseTransport, _Connection]:
        """Resolve, connect (happy eyeballs across the addresses), tunnel through the proxy if any, then
        hand the socket to the event loop (which does TLS when the origin is https)."""
        loop = self.loop
        proxy = self.proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (self.host, self.port)
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"{host} has no address")
        sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                                                       interleave=1, loop=loop)
        if proxy is not None:
            try:
                await self._tunnel(sock, proxy)
            except BaseException:
                sock.close()
                raise
        return await loop.create_connection(lambda: _Connection(self), sock=sock, ssl=self.ssl,
                                            server_hostname=self.server_name if self.tls else None)

    async def _tunnel(self, sock: socket.socket, proxy: ProxyTunnel) -> None:
        """``CONNECT host:port`` through the proxy; returns once it answered 2xx (the socket is then a
        byte pipe to the origin). The proxy's credentials go in Proxy-Authorization and nowhere else."""
        loop = self.loop
        host = f"[{self.host}]" if ":" in self.host else self.host
        target = f"{host}:{self.port}"
        lines = [f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"]
        if proxy.authorization is not None:
            try:
                auth = proxy.authorization()
            except Exception as exc:  # noqa: BLE001 - an unreadable secret: reported without its value
                raise UpstreamError("connect", f"the credentials for the proxy {proxy.display} are unavailable: "
                                               f"{exc}", applied=False) from None
            if auth:
                lines.append(f"Proxy-Authorization: {auth}\r\n")
        lines.append("\r\n")
        await loop.sock_sendall(sock, "".join(lines).encode("latin-1"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise UpstreamError("connect", f"the proxy {proxy.display} closed the connection instead of "
                                               f"answering CONNECT {target}", applied=False)
            buf += data
            if len(buf) > MAX_HEAD_BYTES:
                raise UpstreamError("connect", f"the proxy {proxy.display}'s answer to CONNECT is too large",
                                    applied=False)
        head, _, rest = buf.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError("connect", f"the proxy {proxy.display} answered CONNECT with "
                                           f"{status_line[:100]!r}", applied=False)
        if not 200 <= int(parts[1]) < 300:
            raise UpstreamError("connect", f"the proxy {proxy.display} refused the tunnel to {target}: "
                                           f"{status_line[9:100]}", applied=False)
        if rest:  # nothing may come before Tether speaks: the tunnel's bytes would be out of step
            raise UpstreamError("connect", f"the proxy {proxy.display} sent data after its CONNECT answer",
                                applied=False)

    async def _wait_turn(self) -> _Connection | None:
        """Queue for a connection (FIFO): the result is a connection given back by another request, or
        None: a slot came free (already counted in ``opening``) and this request opens one."""
        fut: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(fut)
        timer = self.loop.call_later(self.pool_timeout, self._give_up, fut)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._pass_on(fut.result())  # handed over just as this request gave up: to the next one
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise
        finally:
            timer.cancel()

    def _give_up(self, fut: asyncio.Future[_Connection | None]) -> None:
        if not fut.done():
            fut.set_exception(UpstreamError(
                "pool_timeout", f"all {self.limit} connections to the upstream are busy and none came free within "
                                f"{self.pool_timeout:g}s", applied=False))

    def _hand(self, item: _Connection | None) -> bool:
        """Give a connection (or, None, a reserved slot) to the longest-waiting request; False if none waits."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(item)
                return True
        return False

    def _pass_on(self, item: _Connection | None) -> None:
        if item is not None:
            self.put_back(item)
        else:
            self.opening -= 1
            self._slot_freed()

    def _slot_freed(self) -> None:
        """A connection closed (or failed to open): the first waiter, if any, may open one."""
        if self.waiters and (self.limit is None or len(self.live) + self.opening < self.limit):
            self.opening += 1
            if not self._hand(None):
                self.opening -= 1

    def _acquire_idle(self) -> _Connection | None:
        now = self.loop.time()
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.close()
                continue
            if conn.idle_too_long(now):
                conn.close()
                continue
            return conn
        return None

    def put_back(self, conn: _Connection) -> None:
        if self.waiters and not self.retired and self._hand(conn):
            return  # straight to a request waiting at the connection limit
        if self.retired or len(self.idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        if conn in self.live:
            self.live.discard(conn)
            if self.waiters:
                self._slot_freed()
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamError("connect", "the gateway is stopping", applied=False))
        for conn in list(self.live):
            conn.close()
        self.idle.clear()

    def retire(self) -> None:
        """No rules version forwards here any more: close the idle connections now, and each busy one
        when its exchange ends (a request in flight when the rules changed still finishes)."""
        self.retired = True
        while self.idle:
            self.idle.pop().close()

    # -- requests
    def _head(self, method: str, target: str, headers: Any, length: int | None) -> bytes:
        lines = [f"{method} {self.prefix}{target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for k, v in (headers if isinstance(headers, list) else headers.items()):
            if k.lower() in MANAGED:
                continue
            lines.append(f"{k}: {v}\r\n")
        if length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif length or method in BODY_METHODS:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        # A header name or value carrying CR, LF or NUL would split the request: refuse it. Every
        # element above ends with one CRLF (the first with two), so any other count means injection.
        if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1 or "\x00" in head:
            raise UpstreamError("bad_request", "a header name or value contains CR, LF or NUL", applied=False)
        return head.encode("utf-8", "surrogateescape")

    async def request(self, method: str, target: str, headers: Any, body: Any, *,
                      connect_timeout: float | None, read_timeout: float | None,
                      content_length: int | None = None) -> UpstreamResponse:
        """Send ``method prefix+target`` and return once the response head arrived.

        ``body``: bytes, or an async iterable / aiohttp StreamReader streamed with back-pressure — with
        ``content_length`` (its exact size) as is, else chunked."""
        streamed = body is not None and not isinstance(body, (bytes, bytearray, memoryview, str))
        if isinstance(body, str):
            body = body.encode("utf-8")
        length = (content_length if streamed else (len(body) if body else 0))
        head = self._head(method, target, headers, length)
        conn = self._acquire_idle()
        reused = conn is not None
        while True:
            if conn is None:
                conn = await self._open(connect_timeout)
            try:
                return await self._exchange(conn, method, head, body, streamed, read_timeout, length)
            except UpstreamError as err:
                if (reused and err.kind == "broken" and not conn.got_bytes and not streamed
                        and _idempotent(method, headers)):
                    conn.close()
                    conn, reused = None, False  # a stale pooled connection: once more on a fresh one
                    continue
                conn.close()
                raise
            except BaseException:
                conn.close()
                raise

    async def _exchange(self, conn: _Connection, method: str, head: bytes, body: Any, streamed: bool,
                        read_timeout: float | None, length: int | None = None) -> UpstreamResponse:
        if method == "HEAD" or (body and not streamed and method not in BODY_METHODS):
            conn.must_close = True  # see BODY_METHODS: its next answer could be a late one
        conn.got_bytes = False
        conn.head_request = method == "HEAD"
        conn.read_timeout = read_timeout
        conn.response = None
        conn.until_close = False
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        conn.head_waiter = waiter
        transport = conn.transport
        if conn.closed or transport is None:
            raise UpstreamError("broken", "the upstream closed the connection")
        if streamed:
            transport.write(head)
            await self._send_stream(conn, transport, body, waiter, length)
        elif body:
            transport.write(head + bytes(body))
        else:
            transport.write(head)
        if waiter.done():
            return waiter.result()
        return await conn.wait(waiter)  # type: ignore[no-any-return]

    async def _send_stream(self, conn: _Connection, transport: asyncio.Transport, body: Any,
                           waiter: asyncio.Future[UpstreamResponse], length: int | None = None) -> None:
        """Stream the body: chunked, or as is when its ``length`` was announced (then exactly that many
        bytes, or the connection is dropped: a short or long body would desynchronise it)."""
        it = body.iter_chunked(CHUNK) if hasattr(body, "iter_chunked") else body
        sent = 0
        async for chunk in it:
            if waiter.done():
                conn.must_close = True  # answered early (e.g. 413): stop; the body's end was never sent
                return
            if chunk:
                sent += len(chunk)
                if length is None:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                elif sent > length:
                    conn.must_close = True
                    raise UpstreamError("bad_request", f"the request body is longer than its Content-Length "
                                                       f"({length})")
                else:
                    transport.write(chunk)
                await conn.drain()
        if conn.closed:
            return
        if length is None:
            transport.write(b"0\r\n\r\n")
        elif sent != length:
            conn.must_close = True
            raise UpstreamError("bad_request", f"the request body ended after {sent} of its {length} bytes")


def _idempotent(method: str, headers: Any) -> bool:
    """May this request be sent again after a connection failed before any byte of its answer?"""
    if method in RETRY_METHODS:
        return True
    return any(k.lower() == IDEMPOTENCY_KEY for k, _ in (headers if isinstance(headers, list) else headers.items()))


class UpstreamClient:
    """The gateway's one forwarding client: an :class:`OriginPool` per (base URL, TLS settings)."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, Any], OriginPool] = {}
        self.closed = False

    def pool(self, base_url: str, ssl: Any, tls_key: Any, options: ConnectOptions = DEFAULT_OPTIONS) -> OriginPool:
        """The pool for ``base_url``; ``tls_key`` names the TLS and connection settings (``ssl``,
        ``options``): a reload that keeps them keeps the pool."""
        key = (base_url, tls_key)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = OriginPool(base_url, ssl, asyncio.get_running_loop(), options)
        return pool

    def retire_except(self, keep: set[tuple[str, Any]]) -> int:
        """Retire the pools whose (base URL, TLS key) is not in ``keep`` (after a rules reload changed an
        upstream's URL or TLS settings); returns how many. A later rules version naming that origin again
        gets a fresh pool."""
        gone = [key for key in self._pools if key not in keep]
        for key in gone:
            self._pools.pop(key).retire()
        return len(gone)

    async def close(self) -> None:
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        await asyncio.sleep(0)


__all__ = ["ConnectOptions", "OriginPool", "ProxyTunnel", "UpstreamClient", "UpstreamError", "UpstreamResponse"]
