"""The MCP endpoint's wire pieces, shared by both halves of the endpoint: the 2025 session-based
transport (:mod:`.endpoint`) and the stateless 2026-07-28 revision (:mod:`.stateless`) — the error
vocabulary, refusals, answering a POST as JSON or SSE, progress events, a request's context.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import orjson
from aiohttp import web
from pydantic import ValidationError

from ...transport import jsonrpc as J
from mcp_types import LoggingMessageNotificationParams
from mcp_types.methods import CLIENT_REQUESTS, validate_client_request

from .backend import Principal
from .sessions import Session

# MCP logging: the spec's severities, lowest first (RFC 5424's, as the spec names them)
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
LOG_RANK: dict[str, int] = {name: i for i, name in enumerate(LOG_LEVELS)}
MAX_LOG_DATA = 16 * 1024  # bytes of one log message's data (as JSON) relayed; more is cut
MAX_LOGS_PER_REQUEST = 1000  # log messages relayed for one request; more are dropped
MAX_LOGGER = 256  # characters of a logger name

MCP_ERROR_CODES: dict[str, tuple[int, str]] = {
    "jsonrpc_invalid": (400, "the body is not a valid JSON-RPC 2.0 message for MCP"),
    "header_mismatch": (400, "an MCP routing header (2026-07-28) is missing or differs from the body"),
    "mcp_batch_not_supported": (400, "a JSON-RPC batch on a session whose MCP version has no batches"),
    "mcp_session_required": (400, "a message other than initialize without Mcp-Session-Id"),
    "mcp_session_exists": (400, "initialize sent with an Mcp-Session-Id (it opens a new session)"),
    "mcp_protocol_version_unsupported": (400, "MCP-Protocol-Version names a version this endpoint does not speak"),
    "ambiguous_request": (400, "a header Tether relies on is repeated"),
    "origin_not_allowed": (403, "the Origin header names an origin not in server.mcp.allowed_origins"),
    "host_not_allowed": (403, "the Host header does not name this listener"),
    "mcp_session_not_found": (404, "no such session: unknown, expired, ended, or opened by another principal"),
    "method_not_allowed": (405, "the MCP endpoint takes GET, POST and DELETE"),
    "not_acceptable": (406, "the Accept header allows neither application/json nor text/event-stream"),
    "mcp_stream_conflict": (409, "the session already has its GET stream open"),
    "unsupported_media_type": (415, "the body must be application/json"),
    "too_many_sessions": (503, "no room for another MCP session or listen stream; see Retry-After"),
    "internal_error": (500, "an unexpected error inside Tether (logged)"),
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache, no-transform",
                "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class _ListKind:
    """One of the lists the endpoint pages: the method, its result's member, the backend's methods, and
    which ``list_changed`` notification tells a client it moved."""

    method: str
    member: str
    items: str
    version: str
    notify: str


LISTS: dict[str, _ListKind] = {
    "tools": _ListKind("tools/list", "tools", "tools_for", "tools_version", "tools"),
    "resources": _ListKind("resources/list", "resources", "resources_for", "resources_version", "resources"),
    "templates": _ListKind("resources/templates/list", "resourceTemplates", "resource_templates_for",
                           "resources_version", "resources"),
    "prompts": _ListKind("prompts/list", "prompts", "prompts_for", "prompts_version", "prompts"),
}
LIST_OF_METHOD = {k.method: name for name, k in LISTS.items()}
_CHANGED = {n: orjson.dumps({"jsonrpc": "2.0", "method": f"notifications/{n}/list_changed"})
            for n in ("tools", "resources", "prompts")}


class _Refuse(Exception):
    """An HTTP-level refusal; turned into a response (and a journal event) by McpEndpoint.handle."""

    def __init__(self, code: str, message: str, *, rpc_code: int = J.INVALID_REQUEST, rid: Any = None,
                 headers: Mapping[str, str] | None = None, status: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else MCP_ERROR_CODES[code][0]
        self.rpc_code = rpc_code
        self.rid = rid
        self.headers = dict(headers or {})
        self.data = data


def _sse_event(payload: bytes) -> bytes:
    return b"event: message\ndata: " + payload + b"\n\n"


class _Reply:
    """The answer to one POST: JSON unless something must be streamed first, then SSE."""

    __slots__ = ("request", "json_ok", "sse_ok", "headers", "stream", "broken", "on_broken", "_lock")

    def __init__(self, request: web.BaseRequest, json_ok: bool, sse_ok: bool, headers: dict[str, str]) -> None:
        self.request = request
        self.json_ok = json_ok
        self.sse_ok = sse_ok
        self.headers = headers
        self.stream: web.StreamResponse | None = None
        self.broken = False
        self.on_broken: Callable[[], None] | None = None
        self._lock: asyncio.Lock | None = None

    async def _open(self) -> web.StreamResponse:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.stream is None:
                stream = web.StreamResponse(status=200, headers={**self.headers, **_SSE_HEADERS})
                await stream.prepare(self.request)
                self.stream = stream
        return self.stream

    async def event(self, payload: bytes) -> None:
        """A server message before the response (progress): upgrades the answer to SSE."""
        if self.broken:
            return
        try:
            stream = self.stream or await self._open()
            await stream.write(_sse_event(payload))
        except (ConnectionError, RuntimeError):
            self._break()

    def _break(self) -> None:
        """The client went away. The call still runs to its end (2025: a disconnect is not a cancellation;
        2026-07-28 says it is, and ``on_broken`` tells the call so)."""
        self.broken = True
        if self.on_broken is not None:
            self.on_broken()

    async def finish(self, payload: bytes | None, status: int = 200) -> web.StreamResponse:
        if self.stream is None:
            if payload is None:
                return web.Response(status=202, headers=self.headers)
            if self.json_ok:
                return web.Response(body=payload, status=status,
                                    headers={**self.headers, "Content-Type": "application/json"})
        try:
            stream = self.stream or await self._open()
            if payload is not None and not self.broken:
                await stream.write(_sse_event(payload))
            await stream.write_eof()
        except (ConnectionError, RuntimeError):
            self._break()
        if self.stream is None:  # the client left before the stream could even open
            return web.Response(status=status)
        return self.stream


class _Progress:
    """ProgressSink for one call: notifications/progress on the call's own response stream."""

    __slots__ = ("reply", "token", "with_message", "last")

    def __init__(self, reply: _Reply, token: str | int, with_message: bool) -> None:
        self.reply = reply
        self.token = token
        self.with_message = with_message
        self.last: float | None = None

    async def __call__(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        if self.last is not None and not progress > self.last:
            return  # the spec: progress MUST increase
        self.last = progress
        params: dict[str, Any] = {"progressToken": self.token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None and self.with_message:
            params["message"] = message
        await self.reply.event(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                             "params": params}))


class _Log:
    """LogSink for one request: ``notifications/message`` on the request's own response stream, at or
    above the level the client asked for (read at each message: a ``logging/setLevel`` sent while a call
    runs applies at once), the data capped, at most MAX_LOGS_PER_REQUEST messages."""

    __slots__ = ("reply", "threshold", "sent")

    def __init__(self, reply: _Reply, threshold: Callable[[], int]) -> None:
        self.reply = reply
        self.threshold = threshold
        self.sent = 0

    async def __call__(self, level: str, data: Any, logger: str | None = None) -> None:
        rank = LOG_RANK.get(level)
        if rank is None or rank < self.threshold() or self.sent >= MAX_LOGS_PER_REQUEST or self.reply.broken:
            return
        self.sent += 1
        try:
            raw = orjson.dumps(data)
        except TypeError:
            data, raw = str(data)[:MAX_LOG_DATA], b""
        if len(raw) > MAX_LOG_DATA:
            data = (f"(log data of {len(raw)} bytes, cut by Tether to {MAX_LOG_DATA // 4}) "
                    + raw[: MAX_LOG_DATA // 4].decode("utf-8", "replace"))
        params = LoggingMessageNotificationParams(
            level=level, data=data, logger=logger[:MAX_LOGGER] if isinstance(logger, str) else None,  # type: ignore[arg-type]
        ).model_dump(by_alias=True, mode="json", exclude_none=True)
        params["data"] = data  # a JSON null is data too
        await self.reply.event(orjson.dumps({"jsonrpc": "2.0", "method": "notifications/message", "params": params}))


@dataclass
class _Ctx:
    """What one HTTP request has established so far (for answers and the journal)."""

    request: web.BaseRequest
    cors: dict[str, str] = field(default_factory=dict)
    principal: Principal | None = None
    session: Session | None = None
    rpc_method: str | None = None
    rpc_id: Any = None


def _first_error(e: ValidationError) -> str:
    errs = e.errors()
    if not errs:
        return "invalid"
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("params",))
    return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))


# -- request validation, remembered -------------------------------------------------------------------

_VALID_MAX = 4096  # remembered valid requests (cleared when full: a flood of distinct ones costs what it did)
_VALID_KEY_MAX = 2048  # bytes of a remembered request's params (arguments aside); longer ones are not kept
_valid: set[tuple[str, str, bytes]] = set()


def _free_arguments() -> frozenset[str]:
    """The versions whose ``tools/call`` takes ``arguments`` as any JSON object (``dict[str, Any] | None``):
    for them the arguments cannot make a request invalid, so they are left out of what is remembered.
    Read from mcp_types' own models, so a version that ever types them otherwise is validated whole."""
    free = set()
    for (method, version), model in CLIENT_REQUESTS.items():
        if method != "tools/call":
            continue
        params = model.model_fields.get("params")
        fields = getattr(params.annotation, "model_fields", {}) if params is not None else {}
        arguments = fields.get("arguments")
        if arguments is not None and arguments.annotation == Optional[dict[str, Any]]:
            free.add(version)
    return frozenset(free)


_FREE_ARGUMENTS = _free_arguments()


def validate_request(method: str, version: str, params: dict[str, Any] | None) -> None:
    """mcp_types' ``validate_client_request`` (KeyError: no such method in ``version``; ValidationError:
    invalid params), remembering what it accepted.

    Why: validating a ``tools/call`` with pydantic was ~4% of the MCP door's time per call, and an agent
    sends the same ``_meta`` (version, client info, capabilities) with every call; only the arguments
    change, and the schema takes any object there. A request is remembered by its exact params (as JSON
    bytes, arguments left out where the version's schema takes any object), so a remembered request is
    one mcp_types accepted, byte for byte."""
    skeleton: Any = params
    if method == "tools/call" and version in _FREE_ARGUMENTS and type(params) is dict \
            and type(params.get("arguments")) is dict:
        skeleton = {**params, "arguments": {}}
    try:
        key = (method, version, orjson.dumps(skeleton))
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer past 64 bits: validate, remember nothing
        key = None
    if key is not None and key in _valid:
        return
    validate_client_request(method, version, params)
    if key is not None and len(key[2]) <= _VALID_KEY_MAX:
        if len(_valid) >= _VALID_MAX:
            _valid.clear()
        _valid.add(key)
