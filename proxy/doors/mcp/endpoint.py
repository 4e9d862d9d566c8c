"""MCP's Streamable HTTP transport on Tether's aiohttp listener: one endpoint, POST / GET / DELETE.

:class:`McpEndpoint` is a request handler the main listener dispatches to when the path is the MCP
endpoint (``server.mcp.path``, default ``/mcp``) or its RFC 9728 metadata document. Per request:

1. **Host and Origin** (DNS-rebinding defence): the Host must belong to the listener; an ``Origin``
   header, when present, must be one of ``allowed_origins`` (non-browser clients send none) — else 403.
2. **Authentication** on every request, by the backend (the REST door's JWT check): 401 with
   ``WWW-Authenticate: Bearer resource_metadata="…"`` on failure. Sessions never authenticate.
3. **Framing**: ``Content-Type: application/json`` (415), an ``Accept`` that allows JSON or SSE (406),
   the body read under the size and time limits (413, 408), parsed strictly (-32700 on bad JSON).
4. **Version and session**: a ``MCP-Protocol-Version`` of the stateless 2026-07-28 revision hands the
   request to :mod:`.stateless`. Otherwise ``initialize`` creates a session (``Mcp-Session-Id`` in the
   answer, the version negotiated: 2024-11-05 to 2025-11-25); every other message needs it (400
   without, 404 when unknown, expired, deleted — or opened by another principal, indistinguishably).
   ``MCP-Protocol-Version``, when sent, must name a version this endpoint speaks (400 and -32022
   otherwise); the session's negotiated version governs what a message may be (a client quoting
   another supported version in the header — the conformance suite does — is served by its session's
   version, not refused).
5. **Dispatch**: ``ping``, ``tools/list`` (cursor pagination), ``tools/call`` (to the backend),
   ``notifications/initialized`` and ``notifications/cancelled``; batches only on 2025-03-26 sessions.
   For a backend that serves them (:class:`~.backend.ResourceBackend`, :class:`~.backend.PromptBackend`,
   ``relays_logs``): ``resources/list``, ``resources/templates/list``, ``resources/read``,
   ``prompts/list``, ``prompts/get`` and ``logging/setLevel`` (the session's log level), each declared
   in the capabilities.
6. **Answer**: ``application/json``, or ``text/event-stream`` from the moment a call reports progress or
   a log message (so the common call stays one JSON write). ``GET`` opens the session's one
   server→client stream, which carries ``notifications/tools/list_changed`` (and the resources' and
   prompts' ``list_changed``) when the backend's versions move; ``DELETE`` ends the session.

HTTP-level refusals carry a JSON-RPC error with no id (or the message's id when it was read) whose
``data`` holds Tether's stable ``code`` and the ``request_id`` the backend journaled it under.

Not offered (each is optional in the spec): SSE resumability (``Last-Event-ID`` replay — Tether never
sends event ids, so a client never asks), server→client requests (sampling, elicitation, roots),
resource subscriptions, completions, tasks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from mcp_types import (
    CallToolResult,
    GetPromptResult,
    Implementation,
    InitializeResult,
    LoggingCapability,
    PromptsCapability,
    ReadResourceResult,
    ResourcesCapability,
    ServerCapabilities,
    TextContent,
    ToolsCapability,
)
from mcp_types.methods import (
    serialize_server_result,
    validate_client_notification,
    validate_client_request,
)
from pydantic import ValidationError

from ...errors import TetherError
from ...policy.bodies import media_type, parse_json
from ...transport import jsonrpc as J
from .backend import (
    LogSink,
    McpAuthError,
    McpRefused,
    McpSessionInfo,
    PromptGet,
    Principal,
    ProgressSink,
    ResourceRead,
    ToolBackend,
    ToolCall,
    UnknownPrompt,
    UnknownResource,
    UnknownTool,
)
from .sessions import Session, SessionStore, TooManySessions
from .stateless import Stateless, looks_modern
from .wire import (
    _CHANGED,
    _SSE_HEADERS,
    LIST_OF_METHOD,
    LISTS,
    LOG_RANK,
    _Ctx,
    _first_error,
    _Log,
    _Progress,
    _Refuse,
    _Reply,
    _sse_event,
    validate_request,
)

log = logging.getLogger("tether.mcp")

WELL_KNOWN = "/.well-known/oauth-protected-resource"
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
REQUEST_ID_HEADER = "X-Tether-Request-Id"

_ALLOW = "GET, POST, DELETE"
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_SERVED_REQUESTS = frozenset({"initialize", "ping", "tools/list", "tools/call"})
RESOURCE_METHODS = frozenset({"resources/list", "resources/templates/list", "resources/read"})
PROMPT_METHODS = frozenset({"prompts/list", "prompts/get"})


@dataclass(frozen=True)
class McpSettings:
    """The endpoint's settings, fixed at construction (from ``server.mcp`` and ``server.limits``)."""

    path: str = "/mcp"
    allowed_origins: tuple[str, ...] = ()
    session_idle_timeout: float = 1800.0
    max_sessions_per_agent: int = 16
    max_sessions: int = 10000
    page_size: int = 100
    keepalive: float = 15.0
    public_url: str | None = None
    instructions: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    body_timeout: float = 30.0
    max_json_depth: int = 64
    max_batch: int = 32
    server_name: str = "tether"
    server_version: str = "0"


def _origin_key(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin, ports defaulted; None when it is not an http(s) origin."""
    try:
        u = urlsplit(origin.strip())
        port = u.port
    except ValueError:
        return None
    scheme = u.scheme.lower()
    if scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
        return None
    return scheme, u.hostname.lower(), port if port is not None else (443 if scheme == "https" else 80)


class OriginPolicy:
    """``allowed_origins`` entries are ``scheme://host[:port]`` (default ports implied) or
    ``scheme://host:*`` (any port). A request without Origin is allowed (non-browser clients send
    none); ``Origin: null`` (sandboxed or file pages) never is."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self._exact: set[tuple[str, str, int | None]] = set()
        self._any_port: set[tuple[str, str]] = set()
        for e in entries:
            if e.endswith(":*"):
                k = _origin_key(e[:-2])
                if k is None:
                    raise ValueError(f"{e!r} is not an origin (scheme://host[:port|:*])")
                self._any_port.add((k[0], k[1]))
            else:
                k = _origin_key(e)
                if k is None:
                    raise ValueError(f"{e!r} is not an origin (scheme://host[:port|:*])")
                self._exact.add(k)
        self._cache: dict[str, bool] = {}

    def allows(self, origin: str) -> bool:
        ok = self._cache.get(origin)
        if ok is None:
            k = _origin_key(origin)
            ok = k is not None and (k in self._exact or (k[0], k[1]) in self._any_port)
            if len(self._cache) < 1024:
                self._cache[origin] = ok
        return ok


def _accepts(values: list[str]) -> tuple[bool, bool]:
    """(JSON acceptable, SSE acceptable) from Accept headers; no Accept at all means anything."""
    if not values:
        return True, True
    js = sse = False
    for v in values:
        for part in v.split(","):
            mt = part.split(";", 1)[0].strip().lower()
            if mt in ("application/json", "application/*", "*/*"):
                js = True
            if mt in ("text/event-stream", "text/*", "*/*"):
                sse = True
    return js, sse


def _one_header(request: web.BaseRequest, name: str) -> str | None:
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise _Refuse("ambiguous_request", f"the {name} header is given {len(values)} times")
    return values[0] if values else None


class _Listing:
    """One principal's list (tools, resources, templates or prompts), dumped for one protocol version;
    ``tag`` ties pagination cursors to it (and to its kind: a tools/list cursor pages no other list)."""

    __slots__ = ("version", "dumped", "tag", "_by_name", "_header_params")

    def __init__(self, version: object, dumped: list[dict[str, Any]], kind: str = "tools") -> None:
        self.version = version
        self.dumped = dumped
        self.tag = hashlib.sha256(repr((kind, version)).encode()).hexdigest()[:12]
        self._header_params: dict[str, list[tuple[tuple[str, ...], str]]] | None = None

    def header_params(self) -> dict[str, list[tuple[tuple[str, ...], str]]]:
        """Tool name -> the ``x-mcp-header`` annotations of its input schema (2026-07-28), as
        (property path, header token), read only on plain ``properties`` chains from the root."""
        if self._header_params is None:
            out: dict[str, list[tuple[tuple[str, ...], str]]] = {}
            for tool in self.dumped:
                found: list[tuple[tuple[str, ...], str]] = []
                stack: list[tuple[tuple[str, ...], Any]] = [((), tool.get("inputSchema"))]
                while stack:
                    path, schema = stack.pop()
                    if not isinstance(schema, dict):
                        continue
                    token = schema.get("x-mcp-header")
                    if path and isinstance(token, str):
                        found.append((path, token))
                    props = schema.get("properties")
                    if isinstance(props, dict):
                        stack.extend(((*path, k), v) for k, v in props.items() if isinstance(k, str))
                if found:
                    out[tool["name"]] = found
            self._header_params = out
        return self._header_params


# protocol version -> does plain_tool_result give exactly what mcp_types' serialisation gives? (checked on
# first use of each version, against the real thing)
_PLAIN_CHECKED: dict[str, bool] = {}


def _plain(version: str, result: CallToolResult) -> dict[str, Any] | None:
    if type(result) is not CallToolResult or result.is_error or result.model_extra or len(result.content) != 1:
        return None
    c = result.content[0]
    if type(c) is not TextContent or c.annotations is not None or c.meta is not None or c.model_extra:
        return None
    sc = result.structured_content
    if sc is not None and type(sc) is not dict:
        return None
    out: dict[str, Any] = {"content": [{"type": "text", "text": c.text}], "isError": False}
    if sc is not None:
        out["structuredContent"] = sc
    if result.meta:
        out["_meta"] = result.meta
    if version in J.MODERN_VERSIONS:
        out["resultType"] = "complete"
    return out


def plain_tool_result(version: str, result: CallToolResult) -> dict[str, Any] | None:
    """The usual tools/call result — one text block, a JSON object as ``structuredContent``, Tether's
    ``_meta`` — as a dict built directly, or None for anything else (then mcp_types serialises it).

    Why: mcp_types dumps the model, validates the dump against the version's schema and dumps that
    again — three pydantic passes that were ~6% of the MCP door's time per call, for a shape that is
    always the same. The first result of each protocol version is also serialised the slow way and
    compared: if they ever differ (a new mcp_types), that version keeps the slow way."""
    out = _plain(version, result)
    if out is None:
        return None
    ok = _PLAIN_CHECKED.get(version)
    if ok is None:
        slow = serialize_server_result("tools/call", version,
                                       result.model_dump(by_alias=True, mode="json", exclude_none=True))
        ok = _PLAIN_CHECKED[version] = slow == out
        if not ok:
            log.warning("MCP %s: plain tool results differ from mcp_types' (%r != %r); serialising each", version,
                        out, slow)
            return slow
    return out if ok else None


class McpEndpoint:
    """The MCP endpoint and its metadata documents, for one listener. Build once; ``handle`` per request."""

    def __init__(self, backend: ToolBackend, settings: McpSettings | None = None) -> None:
        self.backend = backend
        self.settings = s = settings or McpSettings()
        self.path = s.path
        self._wk_path = WELL_KNOWN + s.path
        self.origins = OriginPolicy(s.allowed_origins)
        self.sessions = SessionStore(idle_timeout=s.session_idle_timeout, max_per_principal=s.max_sessions_per_agent,
                                     max_total=s.max_sessions, on_drop=self._on_drop)
        self._closing = False
        self._init_results: dict[str, bytes] = {}
        self._list_cache: dict[tuple[str, str, str], _Listing] = {}
        # what the backend serves besides tools (optional protocols, read once)
        self.serves_resources = callable(getattr(backend, "read_resource", None))
        self.serves_prompts = callable(getattr(backend, "get_prompt", None))
        self.serves_logging = bool(getattr(backend, "relays_logs", False))
        self.served = _SERVED_REQUESTS | (RESOURCE_METHODS if self.serves_resources else frozenset()) \
            | (PROMPT_METHODS if self.serves_prompts else frozenset()) \
            | (frozenset({"logging/setLevel"}) if self.serves_logging else frozenset())
        self.list_kinds = tuple(k for k, v in LISTS.items() if v.method in self.served)
        self.notify_kinds = tuple(dict.fromkeys(LISTS[k].notify for k in self.list_kinds))
        self.capabilities = caps = ServerCapabilities(
            tools=ToolsCapability(list_changed=True),
            resources=ResourcesCapability(list_changed=True) if self.serves_resources else None,
            prompts=PromptsCapability(list_changed=True) if self.serves_prompts else None,
            logging=LoggingCapability() if self.serves_logging else None)
        self.stateless = Stateless(self)
        info = Implementation(name=s.server_name, version=s.server_version)
        for v in J.HANDSHAKE_VERSIONS:
            res = InitializeResult(protocol_version=v, capabilities=caps, server_info=info, instructions=s.instructions)
            data = serialize_server_result("initialize", v, res.model_dump(by_alias=True, mode="json",
                                                                            exclude_none=True))
            self._init_results[v] = orjson.dumps(data)

    # -- routing ----------------------------------------------------------------------------------

    def owns(self, raw_path: str) -> bool:
        """Is this request target the MCP endpoint or its protected-resource metadata? Exact paths only:
        ``/mcp/``, ``/MCP`` or ``/%6dcp`` are not the endpoint (they go to the REST door and its default deny)."""
        path = raw_path.partition("?")[0] if "?" in raw_path else raw_path
        return path == self.path or path == self._wk_path or path == WELL_KNOWN

    def tools_changed(self) -> None:
        """Tell open GET streams to compare tool-list versions now (after a reload, promotion or
        quarantine), instead of at their next keep-alive tick."""
        for s in self.sessions:
            if s.stream is not None:
                s.outbox.set()
        self.stateless.wake()

    def close(self) -> None:
        """End every session and GET stream (gateway shutdown)."""
        self._closing = True
        self.sessions.close_all("shutdown")
        self.stateless.wake()

    async def handle(self, request: web.BaseRequest,
                     host_allowed: Callable[[str], bool] | None = None) -> web.StreamResponse:
        ctx = _Ctx(request)
        try:
            if host_allowed is not None and not host_allowed(request.headers.get("Host", "")):
                raise _Refuse("host_not_allowed", "the Host header does not name this listener")
            path = request.raw_path.partition("?")[0]
            if path != self.path:
                return self._metadata(request)
            origin = _one_header(request, "Origin")
            if origin is not None:
                if not self.origins.allows(origin):
                    raise _Refuse("origin_not_allowed", f"Origin {origin[:200]!r} is not allowed")
                ctx.cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                            "Access-Control-Expose-Headers": f"{SESSION_HEADER}, WWW-Authenticate"}
            method = request.method
            if method == "POST":
                return await self._post(ctx)
            if method == "GET":
                return await self._get(ctx)
            if method == "DELETE":
                return await self._delete(ctx)
            if method == "OPTIONS" and origin is not None:
                return web.Response(status=204, headers={
                    **ctx.cors, "Access-Control-Allow-Methods": _ALLOW, "Access-Control-Max-Age": "600",
                    "Access-Control-Allow-Headers": f"Authorization, Content-Type, Accept, {SESSION_HEADER}, "
                                                    f"{VERSION_HEADER}, Last-Event-ID"})
            raise _Refuse("method_not_allowed", f"{method} is not served here; use {_ALLOW}", headers={"Allow": _ALLOW})
        except _Refuse as r:
            return self._refusal(ctx, r)
        except Exception:  # noqa: BLE001 - a backend or layer failure: fail closed, say so, log it
            log.exception("MCP request failed inside Tether")
            return self._refusal(ctx, _Refuse("internal_error", "an unexpected error inside Tether; nothing was run "
                                                                "by this request unless journaled", status=500,
                                              rpc_code=J.INTERNAL_ERROR))

    # -- answers ----------------------------------------------------------------------------------

    def _record(self, event: dict[str, Any]) -> str | None:
        try:
            return self.backend.record(event)
        except Exception:  # noqa: BLE001 - the answer stands; the failure is logged
            log.exception("could not record MCP event %s", event.get("event"))
            return None

    def _refusal(self, ctx: _Ctx, r: _Refuse) -> web.Response:
        rid = self._record({
            "event": "mcp_refused", "status": r.status, "reason": r.code, "message": r.message,
            "http_method": ctx.request.method, "jsonrpc_method": ctx.rpc_method,
            "jsonrpc_id": ctx.rpc_id if ctx.rpc_id is not None else r.rid,
            "session": ctx.session.id if ctx.session is not None else None,
            "principal": ctx.principal.key if ctx.principal is not None else None})
        data: dict[str, Any] = {"code": r.code, "request_id": rid}
        if r.data is not None:
            data.update(r.data)
        headers = {**ctx.cors, **r.headers, "Content-Type": "application/json"}
        if rid:
            headers[REQUEST_ID_HEADER] = rid
        return web.Response(status=r.status, headers=headers, body=J.error_bytes(r.rid, r.rpc_code, r.message, data))

    def _rpc_error(self, ctx: _Ctx, rid: Any, code: int, message: str, reason: str,
                   extra: dict[str, Any] | None = None, status: int = 200) -> bytes:
        """A JSON-RPC error answering a well-formed request (HTTP 200 before 2026-07-28); journaled like
        a refusal."""
        req_id = self._record({
            "event": "mcp_refused", "status": status, "reason": reason, "message": message, "http_method": "POST",
            "jsonrpc_method": ctx.rpc_method, "jsonrpc_id": rid, "jsonrpc_code": code,
            "session": ctx.session.id if ctx.session is not None else None,
            "principal": ctx.principal.key if ctx.principal is not None else None})
        data = {"code": reason, "request_id": req_id}
        if extra:
            data.update(extra)
        return J.error_bytes(rid, code, message, data)

    def _resource_url(self, request: web.BaseRequest) -> str:
        """The endpoint's URL: ``public_url``, else from the request's Host — which then must be a plain
        host[:port], as it is written into the metadata document and the WWW-Authenticate challenge."""
        if self.settings.public_url:
            return self.settings.public_url
        host = request.headers.get("Host", "")
        if not _HOST_RE.fullmatch(host):
            raise _Refuse("host_not_allowed", "the Host header is not a plain host[:port]")
        return f"{'https' if request.secure else 'http'}://{host}{self.path}"

    def _metadata_url(self, request: web.BaseRequest) -> str:
        u = urlsplit(self._resource_url(request))
        return f"{u.scheme}://{u.netloc}{WELL_KNOWN}{u.path}"

    def _metadata(self, request: web.BaseRequest) -> web.Response:
        """RFC 9728 protected-resource metadata, at the root and at the path-suffixed well-known URI."""
        if request.method not in ("GET", "HEAD"):
            raise _Refuse("method_not_allowed", "the metadata document is read with GET", headers={"Allow": "GET"})
        resource = self._resource_url(request)
        doc: dict[str, Any] = {"resource": resource}
        doc.update(self.backend.resource_metadata(resource))
        doc["resource"] = resource
        doc.setdefault("bearer_methods_supported", ["header"])
        return web.Response(body=orjson.dumps(doc), headers={  # public: browser-based clients may read it
            "Content-Type": "application/json", "Cache-Control": "max-age=300", "Access-Control-Allow-Origin": "*"})

    async def _authenticate(self, ctx: _Ctx) -> Principal:
        try:
            principal = await self.backend.authenticate(ctx.request)
        except McpAuthError as e:
            challenge = f'Bearer resource_metadata="{self._metadata_url(ctx.request)}"'
            if e.status == 401 and e.token_presented:
                desc = e.message.replace("\\", "").replace('"', "'")
                challenge += f', error="invalid_token", error_description="{desc}"'
            headers = {"WWW-Authenticate": challenge} if e.status == 401 else {}
            raise _Refuse(e.code, e.message, status=e.status, headers=headers) from None
        ctx.principal = principal
        return principal

    # -- POST -------------------------------------------------------------------------------------

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limit = self.settings.max_body_bytes
        cl = request.content_length
        if cl is not None and cl > limit:
            raise _Refuse("body_too_large", f"the body is {cl} bytes; at most {limit} are accepted", status=413)
        content = request.content
        if content.is_eof():
            body = content.read_nowait(-1)
        else:
            chunks: list[bytes] = []
            size = 0
            try:
                async with asyncio.timeout(self.settings.body_timeout):
                    while chunk := await content.readany():
                        size += len(chunk)
                        if size > limit:
                            break
                        chunks.append(chunk)
            except TimeoutError:
                raise _Refuse("client_timeout", "the request body did not arrive in time", status=408) from None
            body = b"".join(chunks)
            if size > limit:
                raise _Refuse("body_too_large", f"the body exceeds {limit} bytes", status=413)
        if len(body) > limit:
            raise _Refuse("body_too_large", f"the body exceeds {limit} bytes", status=413)
        return body

    async def _post(self, ctx: _Ctx) -> web.StreamResponse:
        request = ctx.request
        principal = await self._authenticate(ctx)
        if media_type(request.headers.get("Content-Type")) != "application/json":
            raise _Refuse("unsupported_media_type", "the body must be Content-Type: application/json")
        json_ok, sse_ok = _accepts(request.headers.getall("Accept", []))
        if not (json_ok or sse_ok):
            raise _Refuse("not_acceptable", "Accept must allow application/json or text/event-stream")
        sid = _one_header(request, SESSION_HEADER)
        pv = _one_header(request, VERSION_HEADER)
        body = await self._read_body(request)
        try:
            obj = parse_json(body, self.settings.max_json_depth)
        except TetherError as e:
            raise _Refuse(e.code, e.message, status=400,
                          rpc_code=J.PARSE_ERROR if e.code == "malformed_json" else J.INVALID_REQUEST) from None

        if pv in J.MODERN_VERSIONS:
            return await self.stateless.post(ctx, principal, obj, pv, _Reply(request, json_ok, sse_ok, {**ctx.cors}))
        if type(obj) is dict and obj.get("method") == "initialize":
            return await self._initialize(ctx, obj, sid, json_ok, sse_ok)
        if pv is not None and pv not in J.HANDSHAKE_VERSIONS:
            raise self._unsupported_version(pv)
        if pv is None and looks_modern(obj):
            raise _Refuse("header_mismatch", "a request declaring its protocol version in _meta needs the "
                                             "MCP-Protocol-Version header", rpc_code=J.HEADER_MISMATCH)
        if sid is None:
            raise _Refuse("mcp_session_required",
                          "send initialize first; every other message carries the Mcp-Session-Id it returned")
        session = self.sessions.get(sid, principal)
        if session is None:
            raise _Refuse("mcp_session_not_found",
                          "no such MCP session (unknown, expired or ended): send initialize without Mcp-Session-Id")
        ctx.session = session
        reply = _Reply(request, json_ok, sse_ok, {**ctx.cors})
        if type(obj) is list:
            return await self._batch(ctx, session, principal, obj, reply)
        try:
            msg = J.classify(obj)
        except J.EnvelopeError as e:
            raise _Refuse("jsonrpc_invalid", e.message, rid=e.id) from None
        ctx.rpc_method, ctx.rpc_id = msg.method, msg.id
        if msg.kind == "request":
            return await reply.finish(await self._request(ctx, session, principal, msg, reply))
        if msg.kind == "notification":
            self._notification(session, msg)
            return await reply.finish(None)
        raise _Refuse("jsonrpc_invalid", "this server sent no request, so it awaits no response", rid=msg.id)

    async def _initialize(self, ctx: _Ctx, obj: dict[str, Any], sid: str | None, json_ok: bool,
                          sse_ok: bool) -> web.StreamResponse:
        assert ctx.principal is not None
        ctx.rpc_method = "initialize"
        try:
            msg = J.classify(obj)
        except J.EnvelopeError as e:
            raise _Refuse("jsonrpc_invalid", e.message, rid=e.id) from None
        ctx.rpc_id = msg.id
        if msg.kind != "request":
            raise _Refuse("jsonrpc_invalid", "initialize is a request: it needs an id")
        if sid is not None:
            raise _Refuse("mcp_session_exists", "initialize opens a new session: send it without Mcp-Session-Id",
                          rid=msg.id)
        reply = _Reply(ctx.request, json_ok, sse_ok, {**ctx.cors})
        params = msg.params or {}
        try:
            validate_client_request("initialize", J.LATEST_HANDSHAKE, params)
        except ValidationError as e:
            return await reply.finish(self._rpc_error(ctx, msg.id, J.INVALID_PARAMS, _first_error(e), "invalid_params"))
        requested = params["protocolVersion"]
        version = requested if requested in J.HANDSHAKE_VERSIONS else J.LATEST_HANDSHAKE
        client = params.get("clientInfo") or {}
        try:
            session = self.sessions.create(ctx.principal, version, client.get("name"), client.get("version"),
                                           params.get("capabilities") or {})
        except TooManySessions as e:
            raise _Refuse("too_many_sessions", str(e), rid=msg.id, headers={"Retry-After": "5"}) from None
        ctx.session = session
        session.listed = {n: self.list_version(ctx.principal, n) for n in self.notify_kinds}
        self._record({"event": "mcp_session_opened", "session": session.id, "principal": session.owner,
                      "protocol_version": version, "requested_version": requested,
                      "client_name": session.info.client_name, "client_version": session.info.client_version})
        reply.headers[SESSION_HEADER] = session.id
        return await reply.finish(J.response_bytes(msg.id, self._init_results[version]))

    async def _batch(self, ctx: _Ctx, session: Session, principal: Principal, items: list[Any],
                     reply: _Reply) -> web.StreamResponse:
        """A 2025-03-26 batch: every member checked first; nothing runs unless all are well-formed."""
        version = session.info.protocol_version
        if version not in J.BATCH_VERSIONS:
            raise _Refuse("mcp_batch_not_supported", f"JSON-RPC batches are not part of MCP {version}")
        if not items:
            raise _Refuse("jsonrpc_invalid", "an empty batch")
        if len(items) > self.settings.max_batch:
            raise _Refuse("jsonrpc_invalid", f"a batch of {len(items)} messages; at most {self.settings.max_batch}")
        msgs: list[J.Message] = []
        ids: set[Any] = set()
        for item in items:
            try:
                m = J.classify(item)
            except J.EnvelopeError as e:
                raise _Refuse("jsonrpc_invalid", f"batch member: {e.message}") from None
            if m.kind == "response":
                raise _Refuse("jsonrpc_invalid", "this server sent no request, so it awaits no response")
            if m.method == "initialize":
                raise _Refuse("jsonrpc_invalid", "initialize must not be part of a batch")
            name = m.method or ""
            if m.kind == "notification" and not name.startswith("notifications/"):
                raise _Refuse("jsonrpc_invalid", f"batch member {name[:80]!r} is not a notification: a request "
                                                 f"needs an id; nothing was run")
            if m.kind == "request":
                if m.id in ids or m.id in session.in_flight:
                    raise _Refuse("jsonrpc_invalid", f"the request id {m.id!r} is used twice; nothing was run")
                ids.add(m.id)
            msgs.append(m)
        answers: list[bytes] = []
        for m in msgs:
            if m.kind == "notification":
                try:
                    self._notification(session, m)
                except _Refuse:
                    pass  # a notification gets no answer, not even in a batch
            else:
                ctx.rpc_method, ctx.rpc_id = m.method, m.id
                answers.append(await self._request(ctx, session, principal, m, reply))
        if not answers:
            return await reply.finish(None)
        return await reply.finish(b"[" + b",".join(answers) + b"]")

    def _notification(self, session: Session, msg: J.Message) -> None:
        method = msg.method
        assert method is not None
        if method == "notifications/initialized":
            session.initialized = True
            return
        if not method.startswith("notifications/"):
            raise _Refuse("jsonrpc_invalid", f"{method[:80]!r} is not a notification: a request needs an id, "
                                             f"and nothing was run")
        version = session.info.protocol_version
        try:
            validate_client_notification(method, version, msg.params)
        except KeyError:
            return  # a notification this version does not define: ignored, as JSON-RPC asks
        except ValidationError as e:
            raise _Refuse("jsonrpc_invalid", f"{method}: {_first_error(e)}") from None
        if method == "notifications/cancelled":
            assert msg.params is not None
            target = msg.params.get("requestId")
            ev = session.in_flight.get(target) if type(target) is str or type(target) is int else None
            if ev is not None:
                ev.set()

    async def _request(self, ctx: _Ctx, session: Session, principal: Principal, msg: J.Message,
                       reply: _Reply) -> bytes:
        """One request's JSON-RPC response (bytes); progress and logs, if any, go out on ``reply`` before it."""
        method = msg.method
        assert method is not None
        version = session.info.protocol_version
        if method not in self.served:
            return self._rpc_error(ctx, msg.id, J.METHOD_NOT_FOUND, f"Method not found: {method[:100]}",
                                   "method_not_found")
        try:
            validate_request(method, version, msg.params)
        except KeyError:
            return self._rpc_error(ctx, msg.id, J.METHOD_NOT_FOUND, f"Method not found: {method}", "method_not_found")
        except ValidationError as e:
            return self._rpc_error(ctx, msg.id, J.INVALID_PARAMS, f"Invalid params: {_first_error(e)}",
                                   "invalid_params")
        if method == "tools/call":
            return await self._call(ctx, session, principal, msg, reply)
        kind = LIST_OF_METHOD.get(method)
        if kind is not None:
            return self._list(ctx, session, principal, msg, kind)
        if method == "resources/read" or method == "prompts/get":
            rid = msg.id
            if rid in session.in_flight:
                return self._rpc_error(ctx, rid, J.INVALID_REQUEST,
                                       f"the request id {rid!r} is already used by a request in flight", "duplicate_id")
            cancelled = session.in_flight[rid] = asyncio.Event()
            try:
                out = await self._fetch(ctx, principal, session.info, msg, version, cancelled)
            finally:
                session.in_flight.pop(rid, None)
                session.last_seen = time.monotonic()
            return out if isinstance(out, bytes) else J.response_bytes(rid, orjson.dumps(out))
        if method == "logging/setLevel":
            assert msg.params is not None
            session.log_level = LOG_RANK[msg.params["level"]]
            return J.response_bytes(msg.id, b"{}")
        if method == "ping":
            return J.response_bytes(msg.id, b"{}")
        return self._rpc_error(ctx, msg.id, J.INVALID_REQUEST, "this session is already initialized",
                               "mcp_session_exists")

    def list_version(self, principal: Principal, notify: str) -> object:
        """The backend's version of the ``notify`` lists (tools; resources and their templates; prompts)."""
        return getattr(self.backend, f"{notify}_version")(principal)

    def _listing(self, principal: Principal, version: str, kind: str = "tools") -> _Listing:
        """The principal's ``kind`` list as ``version`` shapes it, rebuilt when its version moves."""
        lk = LISTS[kind]
        tv = getattr(self.backend, lk.version)(principal)
        key = (kind, principal.key, version)
        entry = self._list_cache.get(key)
        if entry is None or entry.version != tv:
            items = getattr(self.backend, lk.items)(principal)
            listed: dict[str, Any] = {lk.member: [t.model_dump(by_alias=True, mode="json", exclude_none=True)
                                                  for t in items]}
            if version in J.MODERN_VERSIONS:
                listed["ttlMs"], listed["cacheScope"], listed["resultType"] = 0, "private", "complete"
            dumped = serialize_server_result(lk.method, version, listed)[lk.member]
            if len(self._list_cache) >= 4096:
                self._list_cache.clear()
            entry = self._list_cache[key] = _Listing(tv, dumped, kind)
        return entry

    def _tools(self, principal: Principal, version: str) -> _Listing:
        return self._listing(principal, version, "tools")

    def _page(self, ctx: _Ctx, principal: Principal, version: str, msg: J.Message,
              kind: str = "tools") -> dict[str, Any] | bytes:
        """One page of a list (a result dict), or the JSON-RPC error for a bad cursor (bytes)."""
        entry = self._listing(principal, version, kind)
        offset: int | None = 0
        cursor = (msg.params or {}).get("cursor")
        if cursor is not None:
            offset = _decode_cursor(cursor, entry.tag)
            if offset is None or offset > len(entry.dumped):
                return self._rpc_error(ctx, msg.id, J.INVALID_PARAMS,
                                       "Invalid params: the cursor is invalid or the list changed since; "
                                       "list again without a cursor", "invalid_cursor")
        assert offset is not None
        end = offset + self.settings.page_size
        member = LISTS[kind].member
        result: dict[str, Any] = {member: entry.dumped[offset:end]}
        if end < len(entry.dumped):
            result["nextCursor"] = _encode_cursor(end, entry.tag)
        return result

    def _list(self, ctx: _Ctx, session: Session, principal: Principal, msg: J.Message, kind: str = "tools") -> bytes:
        page = self._page(ctx, principal, session.info.protocol_version, msg, kind)
        if isinstance(page, bytes):
            return page
        session.listed[LISTS[kind].notify] = self._list_cache[(kind, principal.key, session.info.protocol_version)].version
        return J.response_bytes(msg.id, orjson.dumps(page))

    async def _fetch(self, ctx: _Ctx, principal: Principal, info: McpSessionInfo, msg: J.Message, version: str,
                     cancelled: asyncio.Event) -> dict[str, Any] | bytes:
        """A ``resources/read`` or ``prompts/get`` by the backend: the result as ``version`` shapes it, or
        the JSON-RPC error (bytes). Unknown (not granted) and refused ones are errors: these results have no
        ``isError``."""
        params = msg.params
        assert params is not None
        rid = msg.id
        method = msg.method
        meta = params.get("_meta")
        try:
            if method == "resources/read":
                res: Any = await self.backend.read_resource(  # type: ignore[attr-defined]
                    ResourceRead(principal, info, params["uri"], meta, rid, cancelled))
                expected: type = ReadResourceResult
            else:
                args = params.get("arguments") or {}
                res = await self.backend.get_prompt(  # type: ignore[attr-defined]
                    PromptGet(principal, info, params["name"], dict(args), meta, rid, cancelled))
                expected = GetPromptResult
        except UnknownResource as e:
            return self._rpc_error(ctx, rid, J.INVALID_PARAMS, f"Resource not found: {e.uri[:200]}",
                                   "unknown_resource")
        except UnknownPrompt as e:
            return self._rpc_error(ctx, rid, J.INVALID_PARAMS, f"Unknown prompt: {e.name[:200]}", "unknown_prompt")
        except McpRefused as e:  # journaled by the backend already
            return J.error_bytes(rid, e.rpc_code, e.message, e.data)
        except Exception:  # noqa: BLE001 - a backend failure is the server's error, answered as such
            log.exception("MCP %s failed inside the backend", method)
            return self._rpc_error(ctx, rid, J.INTERNAL_ERROR, f"Internal error: the {method} failed inside Tether",
                                   "internal_error")
        try:
            if not isinstance(res, expected):
                raise TypeError(f"{method} returned {type(res).__name__}, not {expected.__name__}")
            data = res.model_dump(by_alias=True, mode="json", exclude_none=True)
            if version in J.MODERN_VERSIONS:
                data.setdefault("resultType", "complete")
                if method == "resources/read":
                    data["ttlMs"], data["cacheScope"] = 0, "private"
            return serialize_server_result(method, version, data)  # type: ignore[arg-type]
        except (TypeError, ValueError, ValidationError):
            log.exception("MCP %s: the backend's result cannot be sent", method)
            return self._rpc_error(ctx, rid, J.INTERNAL_ERROR, "Internal error: the result is malformed",
                                   "internal_error")

    async def _call(self, ctx: _Ctx, session: Session, principal: Principal, msg: J.Message,
                    reply: _Reply) -> bytes:
        params = msg.params
        assert params is not None
        rid = msg.id
        if rid in session.in_flight:
            return self._rpc_error(ctx, rid, J.INVALID_REQUEST,
                                   f"the request id {rid!r} is already used by a call in flight", "duplicate_id")
        version = session.info.protocol_version
        meta = params.get("_meta")
        sink: ProgressSink | None = None
        if reply.sse_ok and meta is not None:
            token = meta.get("progressToken")
            if type(token) is str or type(token) is int:
                sink = _Progress(reply, token, version != "2024-11-05")
        logs: LogSink | None = _Log(reply, lambda: session.log_level) if reply.sse_ok and self.serves_logging else None
        cancelled = asyncio.Event()
        session.in_flight[rid] = cancelled
        call = ToolCall(principal, session.info, params["name"], params.get("arguments") or {}, meta, rid, sink,
                        cancelled, logs)
        try:
            result = await self.backend.call_tool(call)
        except UnknownTool as e:
            return self._rpc_error(ctx, rid, J.INVALID_PARAMS, f"Unknown tool: {e.name[:200]}", "unknown_tool")
        except Exception:  # noqa: BLE001 - a backend failure is the server's error, answered as such
            return self._call_failed(ctx, rid, params["name"])
        finally:
            session.in_flight.pop(rid, None)
            session.last_seen = time.monotonic()
        data = self._result_data(ctx, rid, params["name"], version, result)
        return data if isinstance(data, bytes) else J.response_bytes(rid, orjson.dumps(data))

    def _call_failed(self, ctx: _Ctx, rid: Any, name: str) -> bytes:
        log.exception("MCP tools/call %r failed inside the backend", name)
        return self._rpc_error(ctx, rid, J.INTERNAL_ERROR, "Internal error: the call failed inside Tether",
                               "internal_error")

    def _result_data(self, ctx: _Ctx, rid: Any, name: str, version: str, result: Any) -> dict[str, Any] | bytes:
        """The backend's CallToolResult as ``version`` shapes it, or the -32603 answer if it cannot be sent."""
        try:
            if not isinstance(result, CallToolResult):
                raise TypeError(f"call_tool returned {type(result).__name__}, not CallToolResult")
            plain = plain_tool_result(version, result)
            if plain is not None:
                return plain
            return serialize_server_result("tools/call", version,
                                           result.model_dump(by_alias=True, mode="json", exclude_none=True))
        except (TypeError, ValueError, ValidationError):
            log.exception("MCP tools/call %r: the backend's result cannot be sent", name)
            return self._rpc_error(ctx, rid, J.INTERNAL_ERROR, "Internal error: the call's result is malformed",
                                   "internal_error")

    # -- GET: the server→client stream ------------------------------------------------------------

    async def _session_for(self, ctx: _Ctx) -> Session:
        if _one_header(ctx.request, VERSION_HEADER) in J.MODERN_VERSIONS:
            raise _Refuse("method_not_allowed", f"MCP {J.MODERN_VERSIONS[-1]} has no sessions and no GET stream: "
                                                "use subscriptions/listen", headers={"Allow": "POST"})
        principal = await self._authenticate(ctx)
        sid = _one_header(ctx.request, SESSION_HEADER)
        if sid is None:
            raise _Refuse("mcp_session_required", "this request needs the Mcp-Session-Id that initialize returned")
        session = self.sessions.get(sid, principal)
        if session is None:
            raise _Refuse("mcp_session_not_found", "no such MCP session (unknown, expired or ended)")
        ctx.session = session
        pv = _one_header(ctx.request, VERSION_HEADER)
        if pv is not None and pv not in J.HANDSHAKE_VERSIONS:
            raise self._unsupported_version(pv)
        return session

    @staticmethod
    def _unsupported_version(pv: str) -> _Refuse:
        """400 with the -32022 error and data the 2026-07-28 spec defines ({supported, requested}): a client
        probing with a version this endpoint does not speak learns which ones it does (and falls back to
        the initialize handshake)."""
        return _Refuse("mcp_protocol_version_unsupported", f"MCP-Protocol-Version {pv[:40]!r} is not supported",
                       rpc_code=J.UNSUPPORTED_PROTOCOL_VERSION,
                       data={"supported": list(J.ALL_VERSIONS), "requested": pv[:40]})

    async def _get(self, ctx: _Ctx) -> web.StreamResponse:
        session = await self._session_for(ctx)
        _, sse_ok = _accepts(ctx.request.headers.getall("Accept", []))
        if not sse_ok:
            raise _Refuse("not_acceptable", "the GET stream is text/event-stream; Accept must allow it")
        if session.stream is not None:
            raise _Refuse("mcp_stream_conflict", "this session's GET stream is already open")
        stream = web.StreamResponse(status=200, headers={**ctx.cors, **_SSE_HEADERS, SESSION_HEADER: session.id})
        session.stream = stream
        request = ctx.request
        keepalive = self.settings.keepalive
        tick = min(keepalive, 1.0)  # how soon a client that went away frees the session
        loop = asyncio.get_running_loop()
        try:
            await stream.prepare(request)
            await stream.write(b": stream open\n\n")
            quiet_since = loop.time()
            while not (session.closed or self._closing):
                session.outbox.clear()
                for n in self.notify_kinds:
                    tv = self.list_version(session.principal, n)
                    if tv != session.listed.get(n) and tv != session.notified.get(n):
                        session.notified[n] = tv
                        await stream.write(_sse_event(_CHANGED[n]))
                        quiet_since = loop.time()
                try:
                    await asyncio.wait_for(session.outbox.wait(), tick)
                except TimeoutError:
                    transport = request.transport
                    if transport is None or transport.is_closing():
                        break
                    if loop.time() - quiet_since >= keepalive:
                        await stream.write(b": keep-alive\n\n")
                        quiet_since = loop.time()
            await stream.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        except Exception:  # noqa: BLE001 - e.g. tools_version failed: end this stream, keep the session
            log.exception("MCP GET stream ended by an error")
        finally:
            if session.stream is stream:
                session.stream = None
            session.last_seen = time.monotonic()
        return stream

    # -- DELETE -----------------------------------------------------------------------------------

    async def _delete(self, ctx: _Ctx) -> web.StreamResponse:
        session = await self._session_for(ctx)
        self.sessions.drop(session, "deleted")
        return web.Response(status=204, headers=ctx.cors)

    def _on_drop(self, s: Session, reason: str) -> None:
        self._record({"event": "mcp_session_closed", "session": s.id, "principal": s.owner, "reason": reason,
                      "age_s": round(time.monotonic() - s.created, 3)})


def _encode_cursor(offset: int, tag: str) -> str:
    return base64.urlsafe_b64encode(f"{offset}.{tag}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: Any, tag: str) -> int | None:
    if type(cursor) is not str or len(cursor) > 64:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except ValueError:
        return None
    off, _, t = raw.partition(".")
    if t != tag or not off.isdigit():
        return None
    return int(off)
