"""The MCP client Tether uses to reach an upstream MCP server: one :class:`McpUpstream` per upstream.

Tether is the only client a vendor's MCP server sees. It holds its *own* session with the server
(``initialize``, version negotiation, ``notifications/initialized``; a new session when the server
forgets the old one), its own credential (the agent's token is never forwarded: the transport builds
every request's headers from the rules alone), and its own JSON-RPC ids: every request gets the next
number of a per-upstream counter, and an agent's JSON-RPC id, progress token or ``_meta`` never reaches
the server as such. Calls of many agents therefore share one upstream session without colliding, and
one agent cannot address another's call (cancel it, answer for it).

The client speaks the handshake revisions (2024-11-05 to 2025-11-25: it offers the newest and accepts
any of them) over two transports, :mod:`.http` (Streamable HTTP) and :mod:`.stdio` (a command Tether
starts and supervises); this module is the protocol half both share:

* **requests** — each waits for its answer at most its timeout (``timeouts.call`` for ``tools/call``,
  ``timeouts.request`` otherwise, or less when the caller asks): a slow or dead server is an
  :class:`UpstreamTimeout`, never a hang; the server is told with ``notifications/cancelled``. The
  caller's ``cancelled`` event (the agent's ``notifications/cancelled``) does the same and raises
  :class:`CallCancelled`; so does cancelling the caller's task.
* **answers** are checked by the official SDK's per-version models (``mcp_types.methods``); a message
  over ``max_result_bytes`` is refused (:class:`ResultTooLarge`) — it never reaches the journal or the
  agent; JSON is parsed by Tether's strict parser (duplicate keys, excessive depth refused).
* **notifications** — progress for a call goes to that call's ``progress`` callback (Tether sends its
  own progress token and maps it back), log messages on a call's stream to its ``on_log``, anything
  else (``tools/list_changed``, logs outside a call) to the upstream's ``on_notification``. Callbacks of
  one call run in order, in a task of their own, so a slow agent never stalls the reader.
* **server→client requests** (sampling, elicitation, roots) go to a handler that decides — the call's
  ``on_server_request``, else the upstream's, else refusal (JSON-RPC error -1). A request for a
  capability Tether did not declare (``client_capabilities``) is refused without asking anyone. Every
  one is reported to ``on_event`` (the journal). ``ping`` is answered.
* **sessions** — lost (HTTP 404, the process exited) means the next request initializes a new one; a
  request refused for an unknown session was not processed and is sent once more in the new session.

Nothing here decides policy: which tools exist for whom, pins, modes, the journal — the core does that
around :meth:`McpUpstream.call_tool` (see docs/mcp-upstreams.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mcp_types
import orjson
from mcp_types import methods as mcp_methods
from pydantic import ValidationError

from .. import __version__
from ..policy.bodies import parse_json
from ..transport.jsonrpc import HANDSHAKE_VERSIONS, LATEST_HANDSHAKE, EnvelopeError, classify
from .errors import (
    CallCancelled,
    McpUpstreamError,
    ResultTooLarge,
    ServerRequestRefused,
    SessionExpired,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger("tether.mcp_upstream")

MAX_JSON_DEPTH = 128  # tool results nest deeper than agents' request bodies may
MAX_LIST_PAGES = 1000  # a server whose cursor never ends is cut off
MAX_LISTED = 10000  # tools (resources, prompts) in one listing
MAX_SERVER_REQUESTS = 16  # server→client requests handled at once per upstream; more are refused
CALLBACK_QUEUE = 256  # notifications waiting for a call's callbacks; progress beyond it is dropped
CALLBACK_DRAIN_S = 5.0  # how long a result waits for its call's callbacks to be delivered
_CAPABILITY_OF = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}

ProgressCallback = Callable[[float, "float | None", "str | None"], Awaitable[None]]
LogCallback = Callable[[dict[str, Any]], Awaitable[None]]
NotificationCallback = Callable[[str, dict[str, Any]], Any]
EventCallback = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class ServerRequest:
    """A request the server sent to Tether (sampling, elicitation, roots). ``params`` were checked
    against the session's protocol version. ``tool``/``call_id`` name the tool call whose stream it
    arrived on (Streamable HTTP), or are None when it cannot be tied to one (stdio, the GET stream):
    such a request is never attributed to a call by guesswork."""

    upstream: str
    method: str
    params: dict[str, Any]
    request_id: str | int
    tool: str | None
    call_id: int | None


ServerRequestHandler = Callable[[ServerRequest], Awaitable[Mapping[str, Any]]]


async def refuse_server_request(request: ServerRequest) -> Mapping[str, Any]:
    """The default handler: refuse, with the spec's "user rejected" error."""
    raise ServerRequestRefused(f"refused by Tether: {request.method} from upstream {request.upstream!r} is not "
                               "relayed")


class Transport(Protocol):
    """What :class:`McpUpstream` needs from a transport (:mod:`.http`, :mod:`.stdio`). Messages the server
    sends reach the client through ``client._on_message(obj, via)``; a request's failure through
    ``call.fail(exc)``; a lost process through ``client._transport_lost(reason)``."""

    kind: str

    def bind(self, client: "McpUpstream") -> None: ...
    async def start(self) -> None: ...
    async def open(self, timeout: float) -> None: ...
    def begin_session(self) -> None: ...
    def session_ready(self, protocol_version: str) -> None: ...
    def session_open(self, gen: int) -> None: ...
    async def send_request(self, message: bytes, call: "PendingCall") -> None: ...
    async def send(self, message: bytes) -> None: ...
    async def close(self) -> None: ...


class PendingCall:
    """One request in flight: its future, and where the server's messages about it go."""

    __slots__ = ("id", "method", "tool", "future", "progress", "on_log", "on_server_request", "transport_task",
                 "_queue", "_pump", "_handlers", "session_gen")

    def __init__(self, rid: int, method: str, tool: str | None, *, progress: ProgressCallback | None = None,
                 on_log: LogCallback | None = None, on_server_request: ServerRequestHandler | None = None,
                 session_gen: int = 0) -> None:
        self.id = rid
        self.method = method
        self.tool = tool
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.progress = progress
        self.on_log = on_log
        self.on_server_request = on_server_request
        self.transport_task: asyncio.Task[Any] | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.session_gen = session_gen

    @property
    def done(self) -> bool:
        return self.future.done()

    def resolve(self, message: dict[str, Any]) -> None:
        if not self.future.done():
            self.future.set_result(message)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # retrieved: a call nobody awaits any more must not log "never retrieved"

    def deliver(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run ``fn(*args)`` after this call's earlier callbacks, in the call's own task."""
        if self._queue is None:
            self._queue = asyncio.Queue(CALLBACK_QUEUE)
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())
        try:
            self._queue.put_nowait((fn, args))
        except asyncio.QueueFull:
            log.debug("a notification for call %s was dropped: its callbacks are behind", self.id)

    async def _run_pump(self) -> None:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                await fn(*args)
            except Exception:  # noqa: BLE001 - a callback's failure must not end the call
                log.exception("an MCP upstream callback failed")

    async def finish(self, drain: bool) -> None:
        """Stop this call's server-request handlers and its transport task; with ``drain`` (the call
        answered) first let its queued callbacks run, at most CALLBACK_DRAIN_S, so progress precedes the
        result; without (it failed, timed out, was cancelled) drop them."""
        for t in list(self._handlers):
            t.cancel()
        if self._pump is not None and self._queue is not None:
            if drain:
                try:
                    self._queue.put_nowait(None)
                    await asyncio.wait_for(asyncio.shield(self._pump), CALLBACK_DRAIN_S)
                except (asyncio.QueueFull, asyncio.TimeoutError):
                    pass
            self._pump.cancel()
        if self.transport_task is not None and not self.transport_task.done():
            self.transport_task.cancel()


class McpUpstream:
    """Tether's client for one MCP server. Build it with :func:`proxy.mcp_upstream.build_mcp_upstream`;
    call :meth:`start` once (on the event loop), then any of the request methods from any task;
    :meth:`close` at shutdown. Every request method raises :class:`McpUpstreamError` subclasses only."""

    def __init__(self, name: str, transport: Transport, *, max_result_bytes: int = 4 << 20,
                 call_timeout: float = 60.0, request_timeout: float = 30.0, connect_timeout: float = 10.0,
                 client_capabilities: Sequence[str] = (), on_server_request: ServerRequestHandler | None = None,
                 on_notification: NotificationCallback | None = None, on_event: EventCallback | None = None,
                 client_name: str = "tether", client_version: str = __version__) -> None:
        self.name = name
        self.transport = transport
        self.max_result_bytes = max_result_bytes
        self.call_timeout = call_timeout
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.client_capabilities = frozenset(client_capabilities)
        self.on_server_request = on_server_request
        self.on_notification = on_notification
        self.on_event = on_event
        self.client_info = {"name": client_name, "version": client_version}
        self.protocol_version: str | None = None
        self.server_info: mcp_types.Implementation | None = None
        self.server_capabilities: mcp_types.ServerCapabilities | None = None
        self.instructions: str | None = None
        self.session_gen = 0  # bumped by every new session
        self._ready = False
        self._init_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, PendingCall] = {}
        self._server_requests: dict[str | int, asyncio.Task[Any]] = {}
        self._closed = False
        self._connector: asyncio.Task[None] | None = None
        transport.bind(self)

    def __repr__(self) -> str:
        return f"<McpUpstream {self.name} {self.transport.kind} {'ready' if self._ready else 'not connected'}>"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the transport (a stdio server's process) and connect in the background. Never raises for
        a server that is down: requests fail until it is back (a REST upstream that is down does not
        stop Tether either)."""
        await self.transport.start()
        self._connector = asyncio.get_running_loop().create_task(self._connect_quietly())

    async def _connect_quietly(self) -> None:
        try:
            await self.connect()
        except McpUpstreamError as exc:
            log.warning("MCP upstream %s: not connected yet: %s", self.name, exc)

    async def connect(self) -> None:
        """Make sure a session is open (initialize now if none is); raise if the server cannot be reached."""
        await self._ensure_session(self.connect_timeout)

    async def close(self) -> None:
        """End the session (HTTP DELETE; a stdio server's stdin closed, then SIGTERM, then SIGKILL) and fail
        the requests still in flight."""
        self._closed = True
        if self._connector is not None:
            self._connector.cancel()
        for call in list(self._pending.values()):
            call.fail(UpstreamUnavailable("Tether is closing its connection to the MCP server", upstream=self.name))
        for t in list(self._server_requests.values()):
            t.cancel()
        await self.transport.close()
        if self._ready:
            self._emit({"event": "mcp_upstream_session", "upstream": self.name, "state": "closed"})
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ the public requests

    async def list_tools(self, *, timeout: float | None = None) -> list[mcp_types.Tool]:
        """Every tool the server lists (all pages). The server's word, unfiltered: what an agent may see
        is decided by the capabilities and their pins (:func:`proxy.mcp_upstream.pins.check_pins`)."""
        return await self._list("tools/list", "tools", timeout)  # type: ignore[return-value]

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None, *,
                        meta: Mapping[str, Any] | None = None, progress: ProgressCallback | None = None,
                        on_log: LogCallback | None = None, on_server_request: ServerRequestHandler | None = None,
                        timeout: float | None = None, cancelled: asyncio.Event | None = None) -> mcp_types.CallToolResult:
        """Call ``name`` with ``arguments`` and return its result (``isError`` results are results: the
        tool ran and said it failed). ``meta`` becomes ``params._meta`` without any ``progressToken``
        (Tether sends its own when ``progress`` is given, and maps the server's progress back to it).
        ``timeout`` (default ``timeouts.call``, never more) bounds the whole call including a session
        re-initialization; ``cancelled`` set by the caller (the agent's cancellation) stops waiting and
        tells the server. Raises :class:`McpUpstreamError`; ``applied`` on it says whether the call may
        have reached the server."""
        params: dict[str, Any] = {"name": name, "arguments": dict(arguments or {})}
        if meta:
            clean = {k: v for k, v in meta.items() if k != "progressToken"}
            if clean:
                params["_meta"] = clean
        raw = await self._request("tools/call", params, timeout=self._bounded(timeout, self.call_timeout),
                                  tool=name, progress=progress, on_log=on_log, on_server_request=on_server_request,
                                  cancelled=cancelled)
        result = self._parse_result("tools/call", raw)
        if not isinstance(result, mcp_types.CallToolResult):
            raise UpstreamProtocolError("tools/call answered with something that is not a tool result",
                                        upstream=self.name)
        return result

    async def list_resources(self, *, timeout: float | None = None) -> list[mcp_types.Resource]:
        return await self._list("resources/list", "resources", timeout)  # type: ignore[return-value]

    async def list_resource_templates(self, *, timeout: float | None = None) -> list[mcp_types.ResourceTemplate]:
        return await self._list("resources/templates/list", "resource_templates", timeout)  # type: ignore[return-value]

    async def read_resource(self, uri: str, *, timeout: float | None = None,
                            cancelled: asyncio.Event | None = None) -> mcp_types.ReadResourceResult:
        """``resources/read`` of ``uri``, sent as given (what it may be is the caller's decision)."""
        raw = await self._request("resources/read", {"uri": uri}, timeout=self._bounded(timeout, self.request_timeout),
                                  cancelled=cancelled)
        res = self._parse_result("resources/read", raw)
        if not isinstance(res, mcp_types.ReadResourceResult):
            raise UpstreamProtocolError("resources/read answered with something else", upstream=self.name)
        return res

    async def list_prompts(self, *, timeout: float | None = None) -> list[mcp_types.Prompt]:
        return await self._list("prompts/list", "prompts", timeout)  # type: ignore[return-value]

    async def get_prompt(self, name: str, arguments: Mapping[str, str] | None = None, *,
                         timeout: float | None = None, cancelled: asyncio.Event | None = None) -> mcp_types.GetPromptResult:
        params: dict[str, Any] = {"name": name}
        if arguments:
            params["arguments"] = dict(arguments)
        raw = await self._request("prompts/get", params, timeout=self._bounded(timeout, self.request_timeout),
                                  cancelled=cancelled)
        res = self._parse_result("prompts/get", raw)
        if not isinstance(res, mcp_types.GetPromptResult):
            raise UpstreamProtocolError("prompts/get answered with something else", upstream=self.name)
        return res

    async def ping(self, *, timeout: float | None = None) -> None:
        await self._request("ping", None, timeout=self._bounded(timeout, self.request_timeout))

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _bounded(asked: float | None, limit: float) -> float:
        return limit if asked is None or asked <= 0 else min(asked, limit)

    async def _list(self, method: str, field: str, timeout: float | None) -> list[Any]:
        """All pages of a list method. A cursor that repeats, or more than MAX_LIST_PAGES pages or
        MAX_LISTED items, is a protocol error (a hostile server must not keep Tether listing forever)."""
        items: list[Any] = []
        cursor: str | None = None
        seen: set[str] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._bounded(timeout, self.request_timeout)
        for _ in range(MAX_LIST_PAGES):
            params = {"cursor": cursor} if cursor is not None else None
            raw = await self._request(method, params, timeout=max(0.001, deadline - loop.time()))
            page = self._parse_result(method, raw)
            items.extend(getattr(page, field))
            if len(items) > MAX_LISTED:
                raise UpstreamProtocolError(f"{method}: more than {MAX_LISTED} items", upstream=self.name)
            cursor = getattr(page, "next_cursor", None)
            if cursor is None:
                return items
            if cursor in seen:
                raise UpstreamProtocolError(f"{method}: the server repeated a pagination cursor", upstream=self.name)
            seen.add(cursor)
        raise UpstreamProtocolError(f"{method}: more than {MAX_LIST_PAGES} pages", upstream=self.name)

    def _parse_result(self, method: str, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise UpstreamProtocolError(f"{method}: the result is not a JSON object", upstream=self.name)
        try:
            return mcp_methods.parse_server_result(method, self.protocol_version or LATEST_HANDSHAKE, raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0] if exc.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise UpstreamProtocolError(f"{method}: the result does not match the MCP schema ({where}: "
                                        f"{first.get('msg', exc)})", upstream=self.name) from None

    async def _request(self, method: str, params: dict[str, Any] | None, *, timeout: float, tool: str | None = None,
                       progress: ProgressCallback | None = None, on_log: LogCallback | None = None,
                       on_server_request: ServerRequestHandler | None = None,
                       cancelled: asyncio.Event | None = None) -> Any:
        """Send one request in the current session (opening one first if needed) and return its result."""
        if self._closed:
            raise UpstreamUnavailable("the MCP upstream client is closed", upstream=self.name, applied=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sent_id: int | None = None
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in (0, 1):
                    await self._ensure_session(max(0.001, min(self.connect_timeout, deadline - loop.time())))
                    call = PendingCall(next(self._ids), method, tool, progress=progress, on_log=on_log,
                                       on_server_request=on_server_request, session_gen=self.session_gen)
                    try:
                        sent_id = call.id
                        return await self._roundtrip(call, params, cancelled)
                    except SessionExpired:
                        sent_id = None  # not processed: the server did not know the session
                        self._session_lost(call.session_gen, "the server no longer knows the session")
                        if attempt:
                            raise UpstreamUnavailable("the server forgot the session twice in a row",
                                                      upstream=self.name, applied=False) from None
        except TimeoutError:
            if sent_id is not None:
                self._cancel_upstream(sent_id, "timeout")
            raise UpstreamTimeout(f"{method}{' ' + repr(tool) if tool else ''}: no answer within {timeout:g}s",
                                  upstream=self.name, applied=False if sent_id is None else None) from None
        except CallCancelled:
            if sent_id is not None:
                self._cancel_upstream(sent_id, "cancelled by the client")
            raise
        except asyncio.CancelledError:
            if sent_id is not None:
                self._cancel_upstream(sent_id, "cancelled")
            raise
        raise AssertionError("unreachable")

    async def _roundtrip(self, call: PendingCall, params: dict[str, Any] | None,
                         cancelled: asyncio.Event | None = None) -> Any:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": call.id, "method": call.method}
        if params is not None:
            if call.progress is not None:
                params = {**params, "_meta": {**(params.get("_meta") or {}), "progressToken": call.id}}
            msg["params"] = params
        self._pending[call.id] = call
        try:
            await self.transport.send_request(orjson.dumps(msg), call)
            if cancelled is None:
                response = await call.future
            else:
                waiter = asyncio.ensure_future(cancelled.wait())
                try:
                    await asyncio.wait((call.future, waiter), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if not call.future.done():
                    raise CallCancelled(f"{call.method} {call.tool or ''}: cancelled by the caller".strip(),
                                        upstream=self.name)
                response = call.future.result()
        except BaseException:
            self._pending.pop(call.id, None)
            await call.finish(drain=False)
            raise
        self._pending.pop(call.id, None)
        await call.finish(drain=True)
        if "error" in response:
            err = response["error"] if isinstance(response["error"], dict) else {}
            code = err.get("code")
            raise UpstreamRpcError(code if type(code) is int else -32603, str(err.get("message") or "")[:2000],
                                   err.get("data"), upstream=self.name)
        return response.get("result")

    def _cancel_upstream(self, rid: int, reason: str) -> None:
        """Tell the server to stop request ``rid`` (spec: notifications/cancelled); best effort, not awaited."""
        call = self._pending.pop(rid, None)
        if call is not None:
            call.fail(CallCancelled(reason, upstream=self.name))
        if self._ready:
            msg = orjson.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                "params": {"requestId": rid, "reason": reason}})
            asyncio.get_running_loop().create_task(self._send_quietly(msg, "notifications/cancelled"))

    async def _send_quietly(self, message: bytes, what: str) -> None:
        try:
            await asyncio.wait_for(self.transport.send(message), self.request_timeout)
        except Exception as exc:  # noqa: BLE001 - best effort by nature
            log.info("MCP upstream %s: could not send %s: %s", self.name, what, exc)

    # ------------------------------------------------------------------ sessions

    async def _ensure_session(self, timeout: float) -> None:
        if self._ready:
            return
        try:
            async with asyncio.timeout(timeout):
                async with self._init_lock:
                    if self._ready:
                        return
                    if self._closed:
                        raise UpstreamUnavailable("the MCP upstream client is closed", upstream=self.name,
                                                  applied=False)
                    await self.transport.open(timeout)
                    await self._initialize()
        except TimeoutError:
            raise UpstreamUnavailable(f"no MCP session within {timeout:g}s (connecting and initialize)",
                                      upstream=self.name, applied=False) from None

    async def _initialize(self) -> None:
        caps: dict[str, Any] = {}
        if "sampling" in self.client_capabilities:
            caps["sampling"] = {}
        if "elicitation" in self.client_capabilities:
            caps["elicitation"] = {"form": {}}
        if "roots" in self.client_capabilities:
            caps["roots"] = {"listChanged": False}
        self.transport.begin_session()
        self.protocol_version = None
        call = PendingCall(next(self._ids), "initialize", None, session_gen=self.session_gen)
        raw = await self._roundtrip(call, {"protocolVersion": LATEST_HANDSHAKE, "capabilities": caps,
                                           "clientInfo": self.client_info})
        version = raw.get("protocolVersion") if isinstance(raw, dict) else None
        if version not in HANDSHAKE_VERSIONS:
            raise UpstreamProtocolError(f"the server answered protocol version {str(version)[:40]!r}; Tether speaks "
                                        f"{', '.join(HANDSHAKE_VERSIONS)}", upstream=self.name, applied=False)
        self.protocol_version = version
        result = self._parse_result("initialize", raw)
        self.server_info = result.server_info
        self.server_capabilities = result.capabilities
        self.instructions = result.instructions
        self.transport.session_ready(version)
        await self.transport.send(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        reinit = self.session_gen > 0
        self.session_gen += 1
        self._ready = True
        self.transport.session_open(self.session_gen)
        self._emit({"event": "mcp_upstream_session", "upstream": self.name,
                    "state": "reinitialized" if reinit else "opened", "protocol_version": version,
                    "server_name": (result.server_info.name or "")[:200],
                    "server_version": (result.server_info.version or "")[:100]})

    def _session_lost(self, gen: int, reason: str) -> None:
        """The session of generation ``gen`` is gone; the next request opens a new one (once: a stale
        report about an older session does not end the current one)."""
        if gen == self.session_gen and self._ready:
            self._ready = False
            self._emit({"event": "mcp_upstream_session", "upstream": self.name, "state": "lost", "reason": reason})

    def _transport_lost(self, reason: str) -> None:
        """The transport lost the server (a stdio process exited): every request in flight fails — it may
        or may not have been applied — and the next one opens a new session."""
        for call in list(self._pending.values()):
            call.fail(UpstreamUnavailable(f"{reason} while {call.method} was in flight: it may or may not have been "
                                          "applied", upstream=self.name, applied=None))
        self._session_lost(self.session_gen, reason)

    # ------------------------------------------------------------------ what the server sends

    def _on_message(self, obj: Any, via: PendingCall | None) -> None:
        """One JSON-RPC message from the server. ``via`` is the call whose response stream carried it
        (Streamable HTTP), or None (stdio, the GET stream)."""
        try:
            msg = classify(obj)
        except EnvelopeError as exc:
            log.warning("MCP upstream %s sent a message that is not JSON-RPC: %s", self.name, exc.message)
            self._emit({"event": "mcp_upstream_unexpected", "upstream": self.name, "what": "not JSON-RPC",
                        "detail": exc.message})
            return
        if msg.kind == "response":
            call = self._pending.get(msg.id) if type(msg.id) is int else None
            if call is None or (via is not None and via is not call):
                # an id Tether never sent, one already answered, or another call's answer on this stream
                self._emit({"event": "mcp_upstream_unexpected", "upstream": self.name,
                            "what": "a response to no request in flight", "id": str(msg.id)[:64]})
                return
            call.resolve(obj)
        elif msg.kind == "notification":
            self._on_notification(msg.method or "", msg.params or {}, via)
        else:
            self._on_server_request(msg.method or "", msg.params, msg.id, via)

    def _on_notification(self, method: str, params: dict[str, Any], via: PendingCall | None) -> None:
        version = self.protocol_version or LATEST_HANDSHAKE
        try:
            mcp_methods.parse_server_notification(method, version, params or None)
        except KeyError:
            log.debug("MCP upstream %s: notification %s ignored (not defined for %s)", self.name, method[:80], version)
            return
        except (ValidationError, ValueError) as exc:
            log.info("MCP upstream %s: malformed %s dropped: %s", self.name, method, str(exc)[:200])
            return
        if method == "notifications/progress":
            token = params.get("progressToken")
            call = self._pending.get(token) if type(token) is int else None
            if call is not None and call.progress is not None and (via is None or via is call):
                call.deliver(call.progress, float(params["progress"]),
                             float(params["total"]) if params.get("total") is not None else None,
                             params.get("message") if isinstance(params.get("message"), str) else None)
            return
        if method == "notifications/cancelled":
            t = self._server_requests.get(params.get("requestId"))  # type: ignore[arg-type]
            if t is not None:
                t.cancel()
            return
        if method == "notifications/message" and via is not None and via.on_log is not None:
            via.deliver(via.on_log, dict(params))
            return
        cb = self.on_notification
        if cb is not None:
            try:
                out = cb(method, dict(params))
                if asyncio.iscoroutine(out):
                    asyncio.get_running_loop().create_task(out)
            except Exception:  # noqa: BLE001
                log.exception("MCP upstream %s: on_notification failed", self.name)

    def _on_server_request(self, method: str, params: dict[str, Any] | None, rid: Any, via: PendingCall | None) -> None:
        version = self.protocol_version or LATEST_HANDSHAKE
        if method == "ping":
            self._spawn_reply(rid, {"jsonrpc": "2.0", "id": rid, "result": {}})
            return
        cap = _CAPABILITY_OF.get(method)
        ev: dict[str, Any] = {"event": "mcp_upstream_server_request", "upstream": self.name, "method": method[:100],
                              "tool": via.tool if via else None, "call_id": via.id if via else None,
                              "request_id": str(rid)[:64]}
        if cap is None:
            self._refuse(rid, -32601, f"Tether does not serve {method[:100]!r}", ev, "unknown_method")
            return
        if cap not in self.client_capabilities:
            self._refuse(rid, -32601, f"Tether did not declare the {cap} capability to this server", ev, "undeclared")
            return
        try:
            mcp_methods.parse_server_request(method, version, params)
        except KeyError:
            self._refuse(rid, -32601, f"{method} is not part of protocol {version}", ev, "unknown_method")
            return
        except (ValidationError, ValueError) as exc:
            self._refuse(rid, -32602, f"invalid params: {str(exc)[:200]}", ev, "invalid")
            return
        if len(self._server_requests) >= MAX_SERVER_REQUESTS or rid in self._server_requests:
            self._refuse(rid, -32603, "too many requests from the server at once", ev, "overloaded")
            return
        handler = (via.on_server_request if via and via.on_server_request else None) or self.on_server_request \
            or refuse_server_request
        req = ServerRequest(self.name, method, dict(params or {}), rid, via.tool if via else None, via.id if via else None)
        task = asyncio.get_running_loop().create_task(self._answer(handler, req, ev))
        self._server_requests[rid] = task
        task.add_done_callback(lambda _t, rid=rid: self._server_requests.pop(rid, None))
        if via is not None:
            via._handlers.add(task)
            task.add_done_callback(via._handlers.discard)

    async def _answer(self, handler: ServerRequestHandler, req: ServerRequest, ev: dict[str, Any]) -> None:
        rid = req.request_id
        try:
            result = await handler(req)
            mcp_methods.parse_client_result(req.method, self.protocol_version or LATEST_HANDSHAKE, dict(result))
        except ServerRequestRefused as exc:
            self._refuse(rid, exc.code, exc.message, ev, "refused")
            return
        except asyncio.CancelledError:
            self._emit({**ev, "decision": "abandoned"})
            raise
        except (ValidationError, ValueError, KeyError) as exc:
            self._refuse(rid, -32603, "Tether could not produce a valid answer", ev, "failed", detail=str(exc)[:200])
            return
        except Exception as exc:  # noqa: BLE001 - a handler's bug is a refusal, never a crash
            log.exception("MCP upstream %s: on_server_request failed", self.name)
            self._refuse(rid, -32603, "Tether could not produce an answer", ev, "failed", detail=type(exc).__name__)
            return
        self._emit({**ev, "decision": "answered"})
        await self._send_quietly(orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": dict(result)}), req.method)

    def _refuse(self, rid: Any, code: int, message: str, ev: dict[str, Any], decision: str, detail: str | None = None) -> None:
        self._emit({**ev, "decision": decision, "code": code, "reason": message[:300],
                    **({"detail": detail} if detail else {})})
        self._spawn_reply(rid, {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}})

    def _spawn_reply(self, rid: Any, body: dict[str, Any]) -> None:
        asyncio.get_running_loop().create_task(self._send_quietly(orjson.dumps(body), f"the answer to request {rid!r}"))

    def _fail_call(self, rid: int, exc: McpUpstreamError) -> None:
        call = self._pending.get(rid)
        if call is not None:
            call.fail(exc)

    def parse_message(self, body: bytes) -> Any:
        """Strictly parse one message from the server (Tether's parser: no duplicate keys, bounded depth)."""
        if len(body) > self.max_result_bytes:
            raise ResultTooLarge(f"a message of {len(body)} bytes, over max_result_bytes ({self.max_result_bytes})",
                                 upstream=self.name)
        try:
            return parse_json(body, MAX_JSON_DEPTH)
        except Exception as exc:  # TetherError from the strict parser
            raise UpstreamProtocolError(f"the server sent invalid JSON: {getattr(exc, 'message', exc)}",
                                        upstream=self.name) from None

    def _emit(self, event: dict[str, Any]) -> None:
        cb = self.on_event
        if cb is None:
            log.info("MCP upstream event: %s", event)
            return
        try:
            out = cb(event)
            if asyncio.iscoroutine(out):
                asyncio.get_running_loop().create_task(out)
        except Exception:  # noqa: BLE001
            log.exception("MCP upstream %s: on_event failed", self.name)


__all__ = ["McpUpstream", "PendingCall", "ServerRequest", "ServerRequestHandler", "ProgressCallback", "LogCallback",
           "NotificationCallback", "EventCallback", "Transport", "refuse_server_request", "McpUpstreamError"]
