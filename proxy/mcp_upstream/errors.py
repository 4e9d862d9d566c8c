"""What the MCP upstream client raises, in one hierarchy.

Every failure of a request to an MCP server is a :class:`McpUpstreamError` with a stable ``code`` (one of
:data:`proxy.errors.ERROR_CODES`, so the core can turn it into a refusal the agent reads) and
``applied``: False when the request provably never reached the server (connection refused, process not
running, credential unavailable), None when nobody can tell (the connection broke, the server exited,
the call timed out or was cancelled after it was sent) — never True: a call that was applied answers.
A write whose ``applied`` is None is for the journal and transactions to settle, not to resend.

::

    McpUpstreamError                 code, message, upstream, applied
    ├── UpstreamUnavailable          upstream_unavailable   not reachable, process down, broke mid-answer
    ├── UpstreamTimeout              upstream_timeout       no answer in time (cancelled upstream)
    ├── CallCancelled                call_cancelled         the caller cancelled (cancelled upstream)
    ├── ResultTooLarge               upstream_response_too_large   an answer over max_result_bytes
    ├── UpstreamAuthFailed           upstream_auth_failed   the server refused Tether's credential (401/403)
    ├── UpstreamProtocolError        upstream_protocol_error   not MCP: bad JSON, bad shapes, bad version
    └── UpstreamRpcError             upstream_rpc_error     the server answered a JSON-RPC error
"""

from __future__ import annotations

from typing import Any


class McpUpstreamError(Exception):
    code = "upstream_unavailable"

    def __init__(self, message: str, *, upstream: str | None = None, applied: bool | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream
        self.applied = applied
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class UpstreamUnavailable(McpUpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(McpUpstreamError):
    code = "upstream_timeout"


class CallCancelled(McpUpstreamError):
    code = "call_cancelled"


class ResultTooLarge(McpUpstreamError):
    code = "upstream_response_too_large"


class UpstreamAuthFailed(McpUpstreamError):
    code = "upstream_auth_failed"


class UpstreamProtocolError(McpUpstreamError):
    code = "upstream_protocol_error"


class UpstreamRpcError(McpUpstreamError):
    """The server answered with a JSON-RPC error (``rpc_code``, ``rpc_message``, ``rpc_data``): an unknown
    tool (-32602), a method it lacks (-32601), its own failure (-32603)."""

    code = "upstream_rpc_error"

    def __init__(self, rpc_code: int, rpc_message: str, rpc_data: Any = None, *, upstream: str | None = None,
                 applied: bool | None = None) -> None:
        super().__init__(f"the MCP server answered error {rpc_code}: {rpc_message[:500]}", upstream=upstream,
                         applied=applied, details={"rpc_code": rpc_code, "rpc_message": rpc_message[:500]})
        self.rpc_code = rpc_code
        self.rpc_message = rpc_message
        self.rpc_data = rpc_data


class SessionExpired(Exception):
    """Internal: the server does not know the session the request named (HTTP 404); the request was not
    processed, so the client initializes a new session and sends it once more."""


class ServerRequestRefused(Exception):
    """Raised by an ``on_server_request`` handler to refuse a server→client request: the server gets a
    JSON-RPC error with ``code`` (default -1, the spec's "user rejected" example) and ``message``."""

    def __init__(self, message: str = "refused by Tether", code: int = -1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
