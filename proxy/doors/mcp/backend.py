"""The narrow interface between the MCP front door's protocol layer and the rest of Tether.

The protocol layer (:mod:`proxy.doors.mcp.endpoint`) speaks MCP's Streamable HTTP transport: JSON-RPC framing,
sessions, version negotiation, Origin checks, SSE, pagination, the RFC 9728 metadata. It decides nothing
about *policy*. Everything Tether decides — who the caller is, which tools it may see, what a call does —
comes through :class:`ToolBackend`, which the core implements with its one policy pipeline. The layer
never imports the core, and the core never sees JSON-RPC: a ``tools/call`` reaches it as a
:class:`ToolCall` and leaves it as an ``mcp_types.CallToolResult``.

Objects crossing the boundary::

    Principal        whatever authenticate() returns; the layer reads only .key
    McpSessionInfo   one MCP session as the backend may see it (id, negotiated version, client name)
    ToolCall         one tools/call: principal, session, tool name, arguments, _meta, JSON-RPC id,
                     a progress sink (None when the client cannot receive progress), a cancel signal
    ProgressSink     await sink(progress, total, message): one notifications/progress to the client
    LogSink          await sink(level, data, logger): one notifications/message to the client, if the
                     client's log level lets it through (the layer filters and caps it)
    ResourceRead     one resources/read: principal, session, URI, _meta, JSON-RPC id, a cancel signal
    PromptGet        one prompts/get: principal, session, prompt name, arguments, _meta, JSON-RPC id
    McpAuthError     raised by authenticate(): HTTP 401 (or 403) with the RFC 9728 challenge
    UnknownTool      raised by call_tool(): JSON-RPC -32602 "Unknown tool" (a protocol error, per spec)
    UnknownResource  raised by read_resource(): JSON-RPC -32602 "Resource not found"
    UnknownPrompt    raised by get_prompt(): JSON-RPC -32602 "Unknown prompt"
    McpRefused       raised by read_resource()/get_prompt(): a JSON-RPC error carrying Tether's code (these
                     results have no ``isError``)

Everything else a backend wants to say about a call — refusals, upstream failures, dry-run captures —
is an ordinary ``CallToolResult`` (``isError: true`` for refusals; see :func:`proxy.doors.mcp.results.error_result`),
so the model can read it and correct itself.

Resources and prompts are optional (:class:`ResourceBackend`, :class:`PromptBackend`): the layer declares
and serves them only for a backend that has their methods, and MCP logging only for one whose
``relays_logs`` is true — a tools-only backend gets a tools-only server (-32601 for the rest).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from aiohttp import web
from mcp_types import CallToolResult, GetPromptResult, Prompt, ReadResourceResult, Resource, ResourceTemplate, Tool

JsonRpcId = str | int
# the JSON-RPC code of a resources/read or prompts/get refused for another reason than its params (a rate
# limit, an upstream failure): an implementation-defined server error (JSON-RPC's -32000..-32019 band, of
# which the SDKs use -32000 and -32001); Tether's own code is in the error's data
REFUSED = -32010


@runtime_checkable
class Principal(Protocol):
    """The authenticated caller, as the layer needs it.

    ``key`` is the identity an MCP session is bound to and counted against (``max_sessions_per_agent``):
    a request presenting a session id that another key opened is answered 404, exactly as if the
    session did not exist. The core chooses what it spells — the agent alone, or agent and the human
    it acts for — and the layer compares it byte for byte.
    """

    @property
    def key(self) -> str: ...


class ProgressSink(Protocol):
    """Send one ``notifications/progress`` for the call being served.

    ``progress`` must increase from one call to the next (the spec's rule); a value that does not is
    dropped. Returns once the event is written to the client's stream (or the client has gone, in which
    case it returns quietly: a disconnect is not a cancellation, and the call runs to its end).
    """

    async def __call__(self, progress: float, total: float | None = None, message: str | None = None) -> None: ...


class LogSink(Protocol):
    """Send one ``notifications/message`` (MCP logging) for the request being served.

    ``level`` is one of the spec's eight (``debug`` … ``emergency``); a message below the level the client
    asked for (``logging/setLevel``, or 2026-07-28's per-request ``_meta`` log level) is dropped by the
    sink, as is one whose level is not a known one. ``data`` (any JSON value) is capped by the layer: an
    oversized one is replaced by a short text saying so. Returns quietly when the client has gone.
    """

    async def __call__(self, level: str, data: Any, logger: str | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class McpSessionInfo:
    """One MCP session, fixed at ``initialize``. ``client_name``/``client_version`` are what the client
    said about itself (unverified, for the journal); ``client_capabilities`` is its raw capabilities.
    Under the stateless 2026-07-28 revision there is no session: ``id`` is None and the rest comes from
    the request's own ``_meta``."""

    id: str | None
    protocol_version: str
    client_name: str | None
    client_version: str | None
    client_capabilities: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(slots=True)
class ToolCall:
    """One ``tools/call`` as the backend receives it.

    ``arguments`` is the parsed JSON object (``{}`` when the client sent none); ``meta`` is the request's
    ``params._meta`` (``progressToken`` and anything else the client put there, e.g. a transaction id),
    or None. ``request_id`` is the JSON-RPC id, unique among the session's calls in flight.
    ``cancelled`` is set when the client sends ``notifications/cancelled`` for this id: the layer never
    cancels the backend's coroutine itself (a write half done must finish and be journaled), so a
    backend that can stop early checks it at points where stopping is safe. ``log`` relays the
    server's log messages about this call to the client (None: the client cannot receive them — no SSE,
    or, under 2026-07-28, no log level asked for).
    """

    principal: Principal
    session: McpSessionInfo
    name: str
    arguments: dict[str, Any]
    meta: dict[str, Any] | None
    request_id: JsonRpcId
    progress: ProgressSink | None
    cancelled: asyncio.Event
    log: LogSink | None = None


@dataclass(slots=True)
class ResourceRead:
    """One ``resources/read``: ``uri`` exactly as the client sent it (the backend maps it to an upstream)."""

    principal: Principal
    session: McpSessionInfo
    uri: str
    meta: dict[str, Any] | None
    request_id: JsonRpcId
    cancelled: asyncio.Event


@dataclass(slots=True)
class PromptGet:
    """One ``prompts/get``: the prompt's name as listed, and its arguments (strings, ``{}`` when none)."""

    principal: Principal
    session: McpSessionInfo
    name: str
    arguments: dict[str, str]
    meta: dict[str, Any] | None
    request_id: JsonRpcId
    cancelled: asyncio.Event


class McpAuthError(Exception):
    """Authentication failed: the layer answers ``status`` (401 by default) with
    ``WWW-Authenticate: Bearer resource_metadata="…"`` (plus ``error="invalid_token"`` when a token was
    presented but refused) and a JSON-RPC error body carrying Tether's ``code``.

    ``code`` is one of Tether's stable error codes (``token_missing``, ``token_expired``, ...);
    ``token_presented`` says whether the request carried a token at all (RFC 6750 §3.1: no error
    attribute in the challenge when it did not)."""

    def __init__(self, code: str, message: str, *, status: int = 401, token_presented: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.token_presented = token_presented


class UnknownTool(Exception):
    """``call_tool`` was asked for a tool name the caller has no such tool for (JSON-RPC -32602)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class UnknownResource(Exception):
    """``read_resource`` was asked for a URI the caller may not read (not granted, or not one the backend
    serves): JSON-RPC -32602 "Resource not found" (the SDKs' code; 2025's -32002 is retired), exactly as for
    a resource that does not exist, so that grants cannot be probed."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.uri = uri


class UnknownPrompt(Exception):
    """``get_prompt`` was asked for a prompt name the caller has no such prompt for (JSON-RPC -32602)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class McpRefused(Exception):
    """A ``resources/read`` or ``prompts/get`` refused or failed after it was found (a rate limit, a field
    rule, the upstream's error): their results have no ``isError``, so the refusal is a JSON-RPC error
    (``rpc_code``) whose ``data`` carries Tether's error body (``code``, ``message``, ``status``,
    ``request_id``, ``details``)."""

    def __init__(self, rpc_code: int, message: str, data: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        self.message = message
        self.data = dict(data)


class ToolBackend(Protocol):
    """What the core provides to the MCP front door. Every method is called on the event loop."""

    async def authenticate(self, request: web.BaseRequest) -> Principal:
        """Verify the request's credentials (the same bearer JWT check as the REST door), on every
        request — sessions are never authentication. Raise :class:`McpAuthError` to refuse."""
        ...

    def tools_for(self, principal: Principal) -> Sequence[Tool]:
        """The caller's whole tool list, in a stable order (pagination slices it). Called for
        ``tools/list`` only; should be cheap (built once per rules version and grant set)."""
        ...

    def tools_version(self, principal: Principal) -> object:
        """Any value that changes whenever ``tools_for(principal)`` would change (rules reload, promotion,
        quarantine). Compared with ``!=``; read on every ``tools/list`` and periodically for sessions
        with an open GET stream, so it must be cheap. The layer sends ``notifications/tools/list_changed``
        when it differs from what the session last listed."""
        ...

    async def call_tool(self, call: ToolCall) -> CallToolResult:
        """Run one tool call through the policy pipeline and say what happened. Refusals and upstream
        errors are results with ``is_error=True``; raise :class:`UnknownTool` for a name the caller has
        no tool for. Any other exception becomes JSON-RPC -32603 (logged; nothing is retried)."""
        ...

    def resource_metadata(self, resource: str) -> Mapping[str, Any]:
        """The RFC 9728 protected-resource metadata for the MCP endpoint whose URL is ``resource``:
        at least ``authorization_servers`` (the configured token issuer). The layer sets ``resource``
        itself and adds ``bearer_methods_supported: ["header"]`` unless given."""
        ...

    def record(self, event: Mapping[str, Any]) -> str | None:
        """Journal a protocol-level event without waiting (a refused request, a session opened, closed,
        expired or evicted) and return the request id used for it, which the layer echoes in its answer.
        ``event["event"]`` names it (``mcp_refused``, ``mcp_session_opened``, ``mcp_session_closed``);
        the other keys are plain JSON values (see docs/mcp.md)."""
        ...


class ResourceBackend(Protocol):
    """Optional: a backend with these methods gets ``resources/list``, ``resources/templates/list`` and
    ``resources/read`` served, and ``resources: {listChanged: true}`` declared."""

    def resources_for(self, principal: Principal) -> Sequence[Resource]:
        """The concrete resources the caller may read, in a stable order (pagination slices it)."""
        ...

    def resource_templates_for(self, principal: Principal) -> Sequence[ResourceTemplate]:
        """The resource templates the caller may read through, in a stable order."""
        ...

    def resources_version(self, principal: Principal) -> object:
        """Changes whenever either list would (``notifications/resources/list_changed``). Cheap."""
        ...

    async def read_resource(self, read: ResourceRead) -> ReadResourceResult:
        """Read through the policy pipeline. Raise :class:`UnknownResource` for a URI the caller may not
        read, :class:`McpRefused` for a refusal or failure; anything else is -32603."""
        ...


class PromptBackend(Protocol):
    """Optional: a backend with these methods gets ``prompts/list`` and ``prompts/get`` served, and
    ``prompts: {listChanged: true}`` declared."""

    def prompts_for(self, principal: Principal) -> Sequence[Prompt]:
        ...

    def prompts_version(self, principal: Principal) -> object:
        ...

    async def get_prompt(self, get: PromptGet) -> GetPromptResult:
        """Raise :class:`UnknownPrompt` for a name the caller has no prompt for, :class:`McpRefused` for a
        refusal or failure."""
        ...
