"""MCP Streamable HTTP, client side, on aiohttp.

Each JSON-RPC message is one POST to the server's endpoint (``Accept: application/json,
text/event-stream``). A request is answered with ``application/json`` (its response) or
``text/event-stream`` (notifications and server→client requests about it, then its response); a
notification or a response Tether sends is answered 202. The ``Mcp-Session-Id`` the server gives at
``initialize`` goes on every later request with ``MCP-Protocol-Version``; a 404 for a request that
carried it means the server forgot the session (:class:`SessionExpired`: the client opens a new one and
sends the request again — it was not processed). A stream that ends before the response, after the
server gave its events ids, is resumed with ``GET`` and ``Last-Event-ID`` (the server may close streams
on purpose, SEP-1699 polling), a few times at the server's ``retry`` interval. The ``GET`` stream for
messages outside any request (``tools/list_changed``) is opened after ``initialize`` when ``listen`` is
on, reconnected with backoff, and given up for good on 405. ``close()`` sends ``DELETE`` to end the session.

Headers are built from the rules only: ``Content-Type``, ``Accept``, the session headers, and the
upstream's credential from :mod:`proxy.credentials` (bearer, OAuth 2.0 client credentials, basic, or a
static header) — nothing of the agent's request, so the agent's token can never be passed through (the
spec's token-passthrough prohibition). Redirects are not followed.

Why aiohttp's ``ClientSession`` and not :mod:`proxy.upstream_http`: the lean forwarder is built to relay
REST bodies byte for byte; this transport reads SSE streams incrementally and answers in between, for
which the session's streaming reader is the simpler tool, and a tool call's cost is dominated by the
server. Why not the SDK's transport: it runs on httpx and anyio task groups, which the gateway's hot
path (aiohttp + uvloop) does not otherwise carry (docs/mcp.md says the same of the server side).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any

import aiohttp

from .. import __version__
from ..policy.credentials import CredentialError, Injector
from .errors import (
    ResultTooLarge,
    SessionExpired,
    UpstreamAuthFailed,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamUnavailable,
)
from .sse import EventTooLarge, SseParser

if TYPE_CHECKING:
    from .client import McpUpstream, PendingCall

log = logging.getLogger("tether.mcp_upstream")

_SESSION_ID_RE = re.compile(r"[\x21-\x7e]{1,512}")  # visible ASCII (spec), bounded
MAX_RESUMES = 5
DEFAULT_RETRY_S = 1.0
MAX_RETRY_S = 10.0
LISTEN_BACKOFF_MAX_S = 30.0


class _TooLarge(Exception):
    pass


class StreamableHttpTransport:
    kind = "http"

    def __init__(self, name: str, url: str, injector: Injector, *, connect_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, proxy: str | None = None,
                 proxy_headers: Any = None, max_connections: int | None = 100, listen: bool = True,
                 server_name: str | None = None) -> None:
        self.name = name
        self.url = url
        self.injector = injector
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.proxy = proxy
        self.proxy_headers = proxy_headers  # a callable returning headers (a rotated password applies) or None
        self.max_connections = max_connections
        self.listen = listen
        self.server_name = server_name  # TLS SNI and the name the certificate must carry
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._client: McpUpstream | None = None
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def bind(self, client: "McpUpstream") -> None:
        self._client = client

    @property
    def client(self) -> "McpUpstream":
        assert self._client is not None
        return self._client

    def http_session(self) -> aiohttp.ClientSession:
        """The transport's own aiohttp session (also what the OAuth injector fetches tokens with)."""
        if self._http is None or self._http.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context is not None else True,
                                             limit=self.max_connections or 0)
            self._http = aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=True,
                                               timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout))
        return self._http

    async def start(self) -> None:
        self.http_session()

    async def open(self, timeout: float) -> None:
        self.http_session()

    def begin_session(self) -> None:
        self.session_id = None
        self.protocol_version = None
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    def session_ready(self, protocol_version: str) -> None:
        self.protocol_version = protocol_version

    def session_open(self, gen: int) -> None:
        if self.listen and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(gen))

    async def _headers(self, accept: str = "application/json, text/event-stream") -> dict[str, str]:
        h = {"Accept": accept, "User-Agent": f"tether/{__version__}"}
        if self.session_id is not None:
            h["Mcp-Session-Id"] = self.session_id
        if self.protocol_version is not None:
            h["MCP-Protocol-Version"] = self.protocol_version
        try:
            now = self.injector.header_now()
            if now is None:
                await self.injector.apply(h)
            else:
                h.update(now)
        except CredentialError as exc:
            raise UpstreamUnavailable(f"Tether's credential for the MCP server is unavailable: {exc}",
                                      upstream=self.name, applied=False) from None
        return h

    def _request_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"allow_redirects": False}
        if self.server_name is not None:
            kw["server_hostname"] = self.server_name
        if self.proxy is not None:
            kw["proxy"] = self.proxy
            if self.proxy_headers is not None:
                kw["proxy_headers"] = self.proxy_headers()
        return kw

    # ------------------------------------------------------------------ requests

    async def send_request(self, message: bytes, call: "PendingCall") -> None:
        headers = await self._headers()
        headers["Content-Type"] = "application/json"
        call.transport_task = asyncio.get_running_loop().create_task(self._post(message, headers, call))

    async def _post(self, message: bytes, headers: dict[str, str], call: "PendingCall") -> None:
        sent_session = headers.get("Mcp-Session-Id")
        parser: SseParser | None = None
        try:
            for attempt in (0, 1):
                try:
                    async with self.http_session().post(self.url, data=message, headers=headers,
                                                        **self._request_kwargs()) as resp:
                        if call.method == "initialize" and resp.status == 200:
                            sid = resp.headers.get("Mcp-Session-Id")
                            if sid is not None:
                                if not _SESSION_ID_RE.fullmatch(sid):
                                    raise UpstreamProtocolError("the server's Mcp-Session-Id is not visible ASCII of "
                                                                "at most 512 characters", upstream=self.name)
                                self.session_id = sid
                        await self._check_status(resp, sent_session, call)
                        parser = await self._read_answer(resp, call)
                    break
                except aiohttp.ClientOSError as exc:
                    # aiohttp could not even write the request (a pooled connection the server had closed):
                    # the server never read a whole message, so sending it again on a new connection is safe
                    if attempt or "write request" not in str(exc):
                        raise
            if not call.done:
                await self._resume(call, parser)
            if not call.done:
                call.fail(UpstreamUnavailable(f"the server ended the {call.method} stream without answering",
                                              upstream=self.name, applied=None))
        except asyncio.CancelledError:
            raise
        except (UpstreamAuthFailed, UpstreamProtocolError, UpstreamRpcError, UpstreamUnavailable, ResultTooLarge,
                SessionExpired) as exc:
            call.fail(exc)
        except _TooLarge as exc:
            call.fail(ResultTooLarge(str(exc), upstream=self.name, applied=None))
        except aiohttp.ClientConnectorError as exc:
            call.fail(UpstreamUnavailable(f"cannot connect to the MCP server: {exc}", upstream=self.name, applied=False))
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            call.fail(UpstreamUnavailable(f"the connection to the MCP server broke: {type(exc).__name__}: {exc}",
                                          upstream=self.name, applied=None))
        except Exception as exc:  # noqa: BLE001 - never leave a call waiting
            log.exception("MCP upstream %s: unexpected failure of a request", self.name)
            call.fail(UpstreamProtocolError(f"unexpected failure: {type(exc).__name__}", upstream=self.name))

    async def _check_status(self, resp: aiohttp.ClientResponse, sent_session: str | None,
                            call: "PendingCall | None") -> None:
        status = resp.status
        if status == 200 or status == 202:
            return
        body = await self._read_capped(resp, 64 * 1024)
        err = _rpc_error(body)
        if sent_session is not None and (status == 404 or (status == 400 and err is not None and "session" in
                                                            err[1].lower())):
            # 404: the spec's "session not found"; 400 naming the session: the TypeScript reference server
            raise SessionExpired()
        if status in (401, 403):
            raise UpstreamAuthFailed(f"the MCP server refused Tether's credential ({status})", upstream=self.name,
                                     applied=False)
        if err is not None:
            raise UpstreamRpcError(err[0], err[1], upstream=self.name, applied=False if status < 500 else None)
        raise UpstreamUnavailable(f"the MCP server answered HTTP {status}", upstream=self.name,
                                  applied=False if 400 <= status < 500 else None)

    async def _read_answer(self, resp: aiohttp.ClientResponse, call: "PendingCall") -> SseParser | None:
        client = self.client
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if resp.status == 202:
            raise UpstreamProtocolError(f"the server accepted {call.method} (202) without answering it",
                                        upstream=self.name)
        if ctype == "application/json":
            body = await self._read_capped(resp, client.max_result_bytes)
            obj = client.parse_message(body)
            for m in obj if isinstance(obj, list) else [obj]:  # a 2025-03-26 server may batch
                client._on_message(m, call)
            return None
        if ctype == "text/event-stream":
            parser = SseParser(client.max_result_bytes)
            await self._read_sse(resp, parser, call)
            return parser
        raise UpstreamProtocolError(f"the server answered {ctype or 'no Content-Type'}, not JSON or an event stream",
                                    upstream=self.name)

    async def _read_sse(self, resp: aiohttp.ClientResponse, parser: SseParser, call: "PendingCall | None") -> None:
        """Dispatch the stream's messages until it ends or (for a call) its response has come."""
        client = self.client
        total = 0
        limit = 2 * client.max_result_bytes + (1 << 20)
        try:
            async for chunk in resp.content.iter_any():
                total += len(chunk)
                if call is not None and total > limit:
                    raise _TooLarge(f"the {call.method} stream passed {limit} bytes")
                for ev in parser.feed(chunk):
                    if ev.event != "message" or not ev.data.strip():
                        continue
                    client._on_message(client.parse_message(ev.data.encode()), call)
                if call is not None and call.done:
                    return
        except EventTooLarge as exc:
            raise _TooLarge(f"an event over max_result_bytes ({client.max_result_bytes}): {exc}") from None

    async def _read_capped(self, resp: aiohttp.ClientResponse, cap: int) -> bytes:
        if resp.content_length is not None and resp.content_length > cap:
            raise _TooLarge(f"an answer of {resp.content_length} bytes, over the limit ({cap})")
        buf = bytearray()
        async for chunk in resp.content.iter_any():
            buf += chunk
            if len(buf) > cap:
                raise _TooLarge(f"an answer over the limit ({cap} bytes)")
        return bytes(buf)

    async def _resume(self, call: "PendingCall", parser: SseParser | None) -> None:
        """The call's stream ended before its response: resume it with GET and Last-Event-ID, when the
        server numbered its events (otherwise there is nothing to resume from)."""
        for _ in range(MAX_RESUMES):
            if call.done or parser is None or parser.last_event_id is None:
                return
            delay = min(MAX_RETRY_S, (parser.retry_ms / 1000.0) if parser.retry_ms is not None else DEFAULT_RETRY_S)
            await asyncio.sleep(delay)
            headers = await self._headers("text/event-stream")
            headers["Last-Event-ID"] = parser.last_event_id
            async with self.http_session().get(self.url, headers=headers, **self._request_kwargs()) as resp:
                if resp.status != 200:
                    await self._check_status(resp, headers.get("Mcp-Session-Id"), call)
                    raise UpstreamUnavailable(f"the server cannot resume the {call.method} stream ({resp.status})",
                                              upstream=self.name, applied=None)
                await self._read_sse(resp, parser, call)

    async def send(self, message: bytes) -> None:
        """A notification or a response: POST, expect 202 (or 200 with nothing that matters)."""
        headers = await self._headers()
        headers["Content-Type"] = "application/json"
        try:
            async with self.http_session().post(self.url, data=message, headers=headers,
                                                **self._request_kwargs()) as resp:
                if resp.status not in (200, 202):
                    await self._check_status(resp, headers.get("Mcp-Session-Id"), None)
                await resp.read()
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(f"cannot connect to the MCP server: {exc}", upstream=self.name,
                                      applied=False) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(f"the connection broke: {type(exc).__name__}", upstream=self.name) from None
        except SessionExpired:
            self.client._session_lost(self.client.session_gen, "the server no longer knows the session")
            raise UpstreamUnavailable("the server no longer knows the session", upstream=self.name,
                                      applied=False) from None

    # ------------------------------------------------------------------ the GET stream

    async def _listen(self, gen: int) -> None:
        """Messages outside any request, for the session of generation ``gen``; ends with the session."""
        client = self.client
        backoff = 0.5
        parser = SseParser(client.max_result_bytes)
        while not client._closed and client.session_gen == gen and self.session_id is not None:
            try:
                headers = await self._headers("text/event-stream")
                if parser.last_event_id is not None:
                    headers["Last-Event-ID"] = parser.last_event_id
                async with self.http_session().get(self.url, headers=headers, **self._request_kwargs()) as resp:
                    if resp.status == 405:
                        log.debug("MCP upstream %s offers no GET stream", self.name)
                        return
                    if resp.status != 200:
                        await self._check_status(resp, headers.get("Mcp-Session-Id"), None)
                        raise UpstreamUnavailable(f"GET stream answered {resp.status}", upstream=self.name)
                    backoff = 0.5
                    await self._read_sse(resp, parser, None)
            except asyncio.CancelledError:
                raise
            except SessionExpired:
                client._session_lost(gen, "the server no longer knows the session")
                return
            except Exception as exc:  # noqa: BLE001 - the stream is an optional convenience: retry, later
                log.info("MCP upstream %s: GET stream: %s", self.name, exc)
            await asyncio.sleep(backoff)
            backoff = min(LISTEN_BACKOFF_MAX_S, backoff * 2)

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None
        if self._http is not None and not self._http.closed:
            if self.session_id is not None:
                try:
                    headers = await self._headers()
                    async with self._http.delete(self.url, headers=headers, timeout=aiohttp.ClientTimeout(total=2),
                                                 **self._request_kwargs()) as resp:
                        await resp.read()
                except Exception as exc:  # noqa: BLE001 - best effort: the server expires it anyway
                    log.debug("MCP upstream %s: DELETE of the session failed: %s", self.name, exc)
            await self._http.close()
        self.session_id = None


def _rpc_error(body: bytes) -> tuple[int, str] | None:
    """(code, message) of a JSON-RPC error body, if that is what ``body`` is."""
    import orjson

    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and type(err.get("code")) is int:
        return err["code"], str(err.get("message") or "")[:2000]
    return None
