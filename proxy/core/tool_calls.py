"""Tool calls on MCP upstreams: what a result is to the journal, and the calls Tether makes itself.

The counterpart of :mod:`proxy.core.upstream_calls` for upstreams of ``kind: mcp``. Tether calls a tool
itself to read a pre-image before a write, to undo a write on rollback and to replay an approved call;
like an agent's call, each goes only to a tool whose listed definition carries its pin
(:meth:`~proxy.core.mcp_upstreams.McpUpstreamRuntime.pinned`), in Tether's own session with the server.

A tool's result may hold anything — a customer's data, or text written to steer a model ("ignore previous
instructions…"). Tether does not pretend to detect that; it relays a result to the agent that asked,
keeps it out of the journal except as a digest and size (:func:`result_digest`), and never reads a
result to decide what anyone is granted. The one place Tether reads a value out of a result is an undo
template (``{result.structuredContent.id}``), where :mod:`proxy.mcp_upstream.templates` checks it is an id.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from ..errors import TetherError
from ..mcp_upstream import McpUpstreamError

if TYPE_CHECKING:
    from mcp_types import CallToolResult

    from .mcp_upstreams import McpUpstreamRuntime


def result_doc(result: "CallToolResult") -> dict[str, Any]:
    """A tool result as JSON (camelCase, nulls left out): what templates read and digests cover."""
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def result_digest(doc: Mapping[str, Any]) -> tuple[str, int]:
    """(sha256 hex, size) of a result's canonical JSON (sorted keys): what the journal keeps of it."""
    data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest(), len(data)


def tether_error(err: McpUpstreamError) -> TetherError:
    """An MCP client error as the refusal an agent reads: its code, the upstream, and ``applied`` (False:
    never reached the server; None: nobody can tell — do not send it again blindly)."""
    details: dict[str, Any] = {"upstream": err.upstream, "applied": err.applied}
    details.update(err.details or {})
    return TetherError(err.code, f"MCP upstream {err.upstream!r}: {err.message}", details=details)


async def call_pinned(up: "McpUpstreamRuntime", tool: str, arguments: Mapping[str, Any], *,
                      timeout: float | None = None) -> "CallToolResult":
    """Call ``tool`` for Tether itself (a pre-image read, an undo, a replay): only while its listed
    definition carries its pin. Raises TetherError (the refusal, or the client's error as
    :func:`tether_error` words it)."""
    await up.current()
    up.pinned(tool)
    try:
        return await up.call(tool, arguments, timeout=timeout)
    except McpUpstreamError as err:
        raise tether_error(err) from None


__all__ = ["call_pinned", "result_digest", "result_doc", "tether_error"]
