"""Tool results the model can read: Tether's errors as ``CallToolResult(isError=True)``.

The MCP spec separates *protocol errors* (JSON-RPC errors: unknown tool, malformed request) from
*tool execution errors* (a result with ``isError: true``), and asks servers to report what a model could
correct — a refused field, a missing intent, a rate limit — as the latter (SEP-1303). Tether's refusals
are therefore tool results carrying the same stable code, message, status and request id as the REST
door's JSON error, twice over: as text for the model, and as ``structuredContent`` for programs.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson
from mcp_types import CallToolResult, TextContent


def error_result(code: str, message: str, *, status: int | None = None, details: Mapping[str, Any] | None = None,
                 request_id: str | None = None) -> CallToolResult:
    """A refusal as a tool result: ``isError: true``, a one-paragraph text, and
    ``structuredContent = {"error": {code, message, status, request_id, details}}`` — the REST door's
    error body, so one parser serves both doors."""
    err: dict[str, Any] = {"code": code, "message": message}
    if status is not None:
        err["status"] = status
    if request_id is not None:
        err["request_id"] = request_id
    if details:
        err["details"] = dict(details)
    text = f"Refused by Tether ({code}): {message}"
    if details:
        text += f"\nDetails: {orjson.dumps(dict(details), default=str).decode()}"
    if request_id is not None:
        text += f"\nRequest id: {request_id}"
    return CallToolResult(content=[TextContent(text=text)], structured_content={"error": err}, is_error=True)


def error_result_from(err: Any, request_id: str | None = None) -> CallToolResult:
    """:func:`error_result` for anything shaped like ``proxy.errors.TetherError`` (``code``, ``message``,
    ``status``, ``details``), read by attribute so this module does not depend on the core."""
    return error_result(str(err.code), str(err.message), status=getattr(err, "status", None),
                        details=getattr(err, "details", None), request_id=request_id)


def json_result(value: Any, *, text: str | None = None) -> CallToolResult:
    """A successful result for a JSON value: ``structuredContent`` when it is an object (the spec
    requires an object there), and always a text rendering (the spec asks servers that return
    structured content to serialise it into a text block too, for clients that only show text)."""
    rendered = text if text is not None else orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()
    return CallToolResult(content=[TextContent(text=rendered)],
                          structured_content=value if isinstance(value, dict) else None)
