"""MCP 2026-07-28 on the same endpoint: stateless requests, ``server/discover``, ``subscriptions/listen``.

The 2026-07-28 revision drops the handshake and sessions: each POST is one request carrying its protocol
version, client capabilities and (optionally) client info in ``params._meta``, with the version, method
and target mirrored into HTTP headers (``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name``, and
``Mcp-Param-*`` for tool arguments the tool's schema marks with ``x-mcp-header``). A request is routed
here when its ``MCP-Protocol-Version`` header names such a version; everything before that point —
Host, Origin, authentication, framing — is the endpoint's, unchanged.

Headers and body must agree (the spec's ``HeaderMismatch``, -32020, HTTP 400): an intermediary may have
routed or rate-limited on the header, so a request whose body says something else is refused, never
served by one reading or the other. JSON-RPC errors carry the HTTP status the revision gives them
(400 for malformed, invalid params, header mismatch, unsupported version; 404 for an unknown method).
``subscriptions/listen`` replaces the GET stream: the acknowledgement first, then
``notifications/tools/list_changed`` (and the resources' and prompts' when the backend serves them), each
if asked for, whenever the backend's versions move. Resources, prompts and logging are served as the
session-based half serves them; ``logging/setLevel`` is gone in this revision: a request asks for log
messages with ``_meta["io.modelcontextprotocol/logLevel"]`` and gets none without it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from mcp_types import PROTOCOL_VERSION_META_KEY
from mcp_types.methods import serialize_server_result
from pydantic import ValidationError

from ...transport import jsonrpc as J
from .backend import LogSink, McpSessionInfo, Principal, ProgressSink, ToolCall, UnknownTool
from .wire import LIST_OF_METHOD, LOG_RANK, _first_error, _Log, _Progress, _Refuse, _sse_event, validate_request

if TYPE_CHECKING:
    from .wire import _Ctx, _Reply

log = logging.getLogger("tether.mcp")

CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
CLIENT_CAPS_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_KEY = "io.modelcontextprotocol/subscriptionId"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
_SERVED = frozenset({"server/discover", "tools/list", "tools/call", "subscriptions/listen"})
# the params member each method mirrors into Mcp-Name
_NAMED = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# subscriptions/listen filter member -> the lists it is about
_FILTERS = {"toolsListChanged": "tools", "resourcesListChanged": "resources", "promptsListChanged": "prompts"}
_STATUS = {J.PARSE_ERROR: 400, J.INVALID_REQUEST: 400, J.INVALID_PARAMS: 400, J.HEADER_MISMATCH: 400,
           J.UNSUPPORTED_PROTOCOL_VERSION: 400, J.METHOD_NOT_FOUND: 404}
_SENTINEL = re.compile(r"=\?base64\?(.*)\?=")
_HEADER_SAFE = re.compile(r"[\x20-\x7E]*")


def looks_modern(obj: Any) -> bool:
    """A body that declares a per-request protocol version in ``_meta`` (a 2026-07-28 request)."""
    if type(obj) is not dict:
        return False
    params = obj.get("params")
    return type(params) is dict and type(params.get("_meta")) is dict and PROTOCOL_VERSION_META_KEY in params["_meta"]


def decode_header(value: str | None) -> str | None:
    """A mirrored header value, with the ``=?base64?…?=`` sentinel decoded; None when absent or when
    the value is malformed (bad base64, not canonical, not UTF-8, or unsafe characters), so that it can
    never match a body value by accident."""
    if value is None or not _HEADER_SAFE.fullmatch(value):
        return None
    m = _SENTINEL.fullmatch(value)
    if m is None:
        return value
    payload = m.group(1)
    try:
        raw = base64.b64decode(payload, validate=True)
        if base64.b64encode(raw).decode() != payload:
            return None
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _mismatch(header: str | None, value: Any) -> bool:
    """Does a decoded header value fail to say what the body says? (integers compare numerically)"""
    if header is None:
        return True
    if type(value) is bool:
        return header != ("true" if value else "false")
    if type(value) is int:
        try:
            return float(header) != value
        except ValueError:
            return True
    if type(value) is str:
        return header != value
    return True  # only string, integer and boolean parameters may be mirrored


def _value_at(arguments: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if type(node) is not dict:
            return None
        node = node.get(key)
    return node


class Stateless:
    """The 2026-07-28 half of an :class:`McpEndpoint` (shares its backend, settings, caches, answers)."""

    def __init__(self, ep: Any) -> None:  # the McpEndpoint whose half this is (.endpoint imports this module)
        self.ep = ep
        s = ep.settings
        self.server_info = {"name": s.server_name, "version": s.server_version}
        self.listeners: set[asyncio.Event] = set()
        self._listening: dict[str, int] = {}
        import mcp_types as types

        # what the endpoint serves besides tools (its backend's optional protocols), minus logging/setLevel
        self.served = _SERVED | (ep.served - {"initialize", "ping", "logging/setLevel"})
        self.filters = {f: n for f, n in _FILTERS.items() if n in ep.notify_kinds}
        discover = types.DiscoverResult(
            supported_versions=list(J.ALL_VERSIONS), instructions=s.instructions, capabilities=ep.capabilities,
            _meta={SERVER_INFO_KEY: self.server_info})
        self._discover = {v: orjson.dumps(serialize_server_result(
            "server/discover", v, discover.model_dump(by_alias=True, mode="json", exclude_none=True)))
            for v in J.MODERN_VERSIONS}

    def wake(self) -> None:
        for ev in self.listeners:
            ev.set()

    # -- answers ----------------------------------------------------------------------------------

    def _error(self, ctx: _Ctx, reply: _Reply, rid: Any, code: int, message: str, reason: str,
               data: dict[str, Any] | None = None) -> tuple[bytes, int]:
        status = _STATUS.get(code, 200)
        return self.ep._rpc_error(ctx, rid, code, message, reason, extra=data, status=status), status

    def _result(self, rid: Any, data: dict[str, Any]) -> tuple[bytes, int]:
        meta = data.get("_meta")
        data["_meta"] = {**meta, SERVER_INFO_KEY: self.server_info} if meta else {SERVER_INFO_KEY: self.server_info}
        return J.response_bytes(rid, orjson.dumps(data)), 200

    # -- POST -------------------------------------------------------------------------------------

    async def post(self, ctx: _Ctx, principal: Principal, obj: Any, pv: str, reply: _Reply) -> web.StreamResponse:

        if type(obj) is list:
            raise _Refuse("jsonrpc_invalid", f"JSON-RPC batches are not part of MCP {pv}")
        try:
            msg = J.classify(obj)
        except J.EnvelopeError as e:
            raise _Refuse("jsonrpc_invalid", e.message, rid=e.id) from None
        ctx.rpc_method, ctx.rpc_id = msg.method, msg.id
        if msg.kind == "response":
            raise _Refuse("jsonrpc_invalid", "this server sent no request, so it awaits no response", rid=msg.id)
        if msg.kind == "notification":
            return await reply.finish(None)  # none are defined for HTTP in this revision: accepted, ignored
        body, status = await self.request(ctx, principal, msg, pv, reply)
        if body is None:  # subscriptions/listen: the stream was the answer
            return reply.stream if reply.stream is not None else web.Response(status=200)
        return await reply.finish(body, status)

    async def request(self, ctx: _Ctx, principal: Principal, msg: J.Message, pv: str,
                      reply: _Reply) -> tuple[bytes | None, int]:
        request = ctx.request
        method = msg.method
        assert method is not None
        rid = msg.id
        if decode_header(request.headers.get("Mcp-Method")) != method:
            return self._error(ctx, reply, rid, J.HEADER_MISMATCH,
                               "Header mismatch: Mcp-Method is missing or differs from the body's method",
                               "header_mismatch")
        params = msg.params or {}
        meta = params.get("_meta")
        body_version = meta.get(PROTOCOL_VERSION_META_KEY) if type(meta) is dict else None
        if body_version is None:
            return self._error(ctx, reply, rid, J.INVALID_PARAMS,
                               f"Invalid params: _meta[{PROTOCOL_VERSION_META_KEY!r}] is required", "invalid_params")
        if body_version != pv:
            return self._error(ctx, reply, rid, J.HEADER_MISMATCH,
                               "Header mismatch: MCP-Protocol-Version differs from the body's protocol version",
                               "header_mismatch")
        named = _NAMED.get(method)
        if named is not None:
            name = params.get(named)
            if type(name) is str and decode_header(request.headers.get("Mcp-Name")) != name:
                return self._error(ctx, reply, rid, J.HEADER_MISMATCH,
                                   f"Header mismatch: Mcp-Name is missing or differs from the {named} in the body",
                                   "header_mismatch")
        if method not in self.served:
            return self._error(ctx, reply, rid, J.METHOD_NOT_FOUND, f"Method not found: {method[:100]}",
                               "method_not_found")
        try:
            validate_request(method, pv, params)
        except KeyError:
            return self._error(ctx, reply, rid, J.METHOD_NOT_FOUND, f"Method not found: {method}", "method_not_found")
        except ValidationError as e:
    
            return self._error(ctx, reply, rid, J.INVALID_PARAMS, f"Invalid params: {_first_error(e)}",
                               "invalid_params")
        if method == "tools/call":
            return await self._call(ctx, principal, msg, pv, params, reply)
        kind = LIST_OF_METHOD.get(method)
        if kind is not None:
            page = self.ep._page(ctx, principal, pv, msg, kind)
            if isinstance(page, bytes):
                return page, 400
            page.update(ttlMs=0, cacheScope="private", resultType="complete")
            return self._result(rid, page)
        if method == "resources/read" or method == "prompts/get":
            return await self._fetch(ctx, principal, msg, pv, params, reply)
        if method == "server/discover":
            return J.response_bytes(rid, self._discover[pv]), 200
        return await self._listen(ctx, principal, msg, params, reply)

    async def _call(self, ctx: _Ctx, principal: Principal, msg: J.Message, pv: str, params: dict[str, Any],
                    reply: _Reply) -> tuple[bytes | None, int]:

        rid = msg.id
        name = params["name"]
        arguments = params.get("arguments") or {}
        for path, token in self.ep._tools(principal, pv).header_params().get(name, ()):
            value = _value_at(arguments, path)
            if value is not None and _mismatch(decode_header(ctx.request.headers.get(f"Mcp-Param-{token}")), value):
                return self._error(ctx, reply, rid, J.HEADER_MISMATCH,
                                   f"Header mismatch: Mcp-Param-{token} is missing or differs from the argument "
                                   f"{'.'.join(path)!r}", "header_mismatch")
        meta = params["_meta"]
        info = self._info(meta, pv)
        sink: ProgressSink | None = None
        token = meta.get("progressToken")
        if reply.sse_ok and (type(token) is str or type(token) is int):
            sink = _Progress(reply, token, True)
        logs: LogSink | None = None
        level = LOG_RANK.get(meta.get(LOG_LEVEL_KEY))  # type: ignore[arg-type]
        if level is not None and reply.sse_ok and self.ep.serves_logging:  # no level asked for: no log messages
            logs = _Log(reply, lambda: level)  # type: ignore[return-value]
        cancelled = asyncio.Event()
        reply.on_broken = cancelled.set  # closing the response stream is this revision's cancellation
        call = ToolCall(principal, info, name, arguments, meta, rid, sink, cancelled, logs)
        try:
            result = await self.ep.backend.call_tool(call)
        except UnknownTool as e:
            return self._error(ctx, reply, rid, J.INVALID_PARAMS, f"Unknown tool: {e.name[:200]}", "unknown_tool")
        except Exception:  # noqa: BLE001 - answered as the server's error; details logged by the endpoint
            return self.ep._call_failed(ctx, rid, name), 200
        data = self.ep._result_data(ctx, rid, name, pv, result)
        if isinstance(data, bytes):
            return data, 200
        return self._result(rid, data)

    @staticmethod
    def _info(meta: dict[str, Any], pv: str) -> McpSessionInfo:
        client = meta.get(CLIENT_INFO_KEY) or {}
        return McpSessionInfo(None, pv, client.get("name"), client.get("version"), meta.get(CLIENT_CAPS_KEY) or {})

    async def _fetch(self, ctx: _Ctx, principal: Principal, msg: J.Message, pv: str, params: dict[str, Any],
                     reply: _Reply) -> tuple[bytes | None, int]:
        """``resources/read`` / ``prompts/get``: as the session-based half serves them, stateless."""
        cancelled = asyncio.Event()
        reply.on_broken = cancelled.set
        out = await self.ep._fetch(ctx, principal, self._info(params["_meta"], pv), msg, pv, cancelled)
        if isinstance(out, bytes):
            code = orjson.loads(out)["error"]["code"]
            return out, _STATUS.get(code, 200)
        return self._result(msg.id, out)

    async def _listen(self, ctx: _Ctx, principal: Principal, msg: J.Message, params: dict[str, Any],
                      reply: _Reply) -> tuple[bytes | None, int]:

        if not reply.sse_ok:
            raise _Refuse("not_acceptable", "subscriptions/listen answers text/event-stream; Accept must allow it")
        key = principal.key
        if self._listening.get(key, 0) >= self.ep.settings.max_sessions_per_agent:
            raise _Refuse("too_many_sessions", "this principal has as many listen streams open as it may",
                          rid=msg.id, headers={"Retry-After": "5"})
        rid = msg.id
        asked = params.get("notifications") or {}
        honored = {f: True for f in self.filters if asked.get(f) is True}  # resource subscriptions: none
        want = [self.filters[f] for f in honored]
        sub = {SUBSCRIPTION_KEY: rid}
        ack = {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged",
               "params": {"_meta": sub, "notifications": honored}}
        changed = {n: orjson.dumps({"jsonrpc": "2.0", "method": f"notifications/{n}/list_changed",
                                    "params": {"_meta": sub}}) for n in want}
        wake = asyncio.Event()
        self.listeners.add(wake)
        self._listening[key] = self._listening.get(key, 0) + 1
        request = ctx.request
        keepalive = self.ep.settings.keepalive
        tick = min(keepalive, 1.0)
        loop = asyncio.get_running_loop()
        try:
            await reply.event(orjson.dumps(ack))
            stream = reply.stream
            baseline = {n: self.ep.list_version(principal, n) for n in want}
            quiet_since = loop.time()
            while stream is not None and not (reply.broken or self.ep._closing):
                wake.clear()
                for n in want:
                    tv = self.ep.list_version(principal, n)
                    if tv != baseline[n]:
                        baseline[n] = tv
                        await stream.write(_sse_event(changed[n]))
                        quiet_since = loop.time()
                try:
                    await asyncio.wait_for(wake.wait(), tick)
                except TimeoutError:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    if loop.time() - quiet_since >= keepalive:
                        await stream.write(b": keep-alive\n\n")
                        quiet_since = loop.time()
            if self.ep._closing and stream is not None and not reply.broken:
                # the server ends the subscription: a completion result says it ended gracefully
                done = {"resultType": "complete", "_meta": {**sub, SERVER_INFO_KEY: self.server_info}}
                await stream.write(_sse_event(J.response_bytes(rid, orjson.dumps(done))))
            if stream is not None:
                await stream.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away: that is how it cancels a subscription
        except Exception:  # noqa: BLE001 - e.g. tools_version failed: end this stream
            log.exception("MCP listen stream ended by an error")
        finally:
            self.listeners.discard(wake)
            n = self._listening.get(key, 1) - 1
            if n:
                self._listening[key] = n
            else:
                self._listening.pop(key, None)
        return None, 200
