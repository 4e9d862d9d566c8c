"""The execution step for a tool of an MCP upstream: what ``forward`` does when the exchange's upstream
is of ``kind: mcp`` (one attribute check on the REST path; everything before it — grant, intent, rate
limits, mode, the intent record, dry-run capture, quota, compensation — is the same shared stages).

The tool is called with exactly the arguments the stages checked (Tether's own ``intent`` and
``transaction`` taken out), in Tether's session with the server, under Tether's JSON-RPC id:

* the agent's progress reaches it as the call goes (``notifications/progress``), its cancellation
  reaches the server (``notifications/cancelled``), a server that is slow or gone is a tool error after
  ``timeouts.call`` — never a hang;
* a request the server sends back during the call (sampling, elicitation, roots) is refused and
  journaled with the agent's identity (nothing is relayed to the agent);
* the result is relayed as the tool result; the journal keeps its digest, size and ``isError`` only;
* a client error becomes a tool error with its code, and ``applied`` (False: it never reached the
  server; None: nobody can tell) — for the journal and the transaction's steps to settle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.tool_calls import result_digest, result_doc, tether_error
from ..errors import TetherError
from ..journal.writer import base_record
from ..mcp_upstream import McpUpstreamError, ServerRequest, ServerRequestRefused
from ..transport.forward import Timer

if TYPE_CHECKING:
    from ..core.exchange import Exchange
    from ..core.runtime import Runtime


def _server_requests(gw: "Runtime", ex: "Exchange") -> Any:
    """The handler of requests the server sends during this call: refused, journaled with who called."""
    ident = ex.identity
    assert ident is not None and ex.capability is not None

    async def handler(req: ServerRequest) -> Any:
        gw.journal.submit(base_record(
            "mcp", request_id=ex.request_id, agent=ident.agent, on_behalf_of=ident.on_behalf_of,
            capability=ex.capability.name if ex.capability is not None else None, upstream=req.upstream,
            decision="refused", reason="server_request_not_relayed", event="mcp_upstream_server_request",
            method=req.method, tool=req.tool, channel=ex.channel))
        raise ServerRequestRefused(f"refused by Tether: {req.method} is not relayed to the agent")

    return handler


async def call_tool(gw: "Runtime", ex: "Exchange") -> None:
    """Call the exchange's tool on its MCP upstream and hand the result to the door (see the module doc)."""
    up: Any = ex.upstream
    cap = ex.capability
    assert up is not None and cap is not None
    op = ex.operations[0]
    call = ex.extra.get("tool_call")  # the agent's ToolCall (progress, cancellation), when it came by MCP
    steps = ex.extra.get("tx_steps")
    try:
        await up.current()  # listed in the session the call will use (a restarted server is checked again)
        up.pinned(cap.target)
    except TetherError:
        if steps:
            await gw.transactions.after_forward(ex, status=None, headers={}, body=None, failed=True, applied=False)
        raise
    timer = Timer()
    ex.forwarded = True
    try:
        result = await up.call(cap.target, op.body or {}, progress=getattr(call, "progress", None),
                               cancelled=getattr(call, "cancelled", None), on_server_request=_server_requests(gw, ex))
    except McpUpstreamError as err:
        ex.upstream_latency_ms = timer.ms()
        if err.applied is False:
            ex.forwarded = False
        if ex.is_write:
            ex.extra.setdefault("outcome", {})["applied"] = err.applied
        if steps:
            await gw.transactions.after_forward(ex, status=None, headers={}, body=None, failed=True,
                                                applied=err.applied)
        raise tether_error(err) from None
    ex.upstream_latency_ms = timer.ms()
    doc = result_doc(result)
    digest, size = result_digest(doc)
    failed = bool(result.is_error)
    outcome = ex.extra.setdefault("outcome", {})
    outcome.update(result_sha256=digest, result_bytes=size, tool_error=failed)
    if failed:
        outcome["upstream_failure"] = True
    ex.status = 200
    if steps:
        await gw.transactions.after_forward(ex, status=200, headers={}, body=doc, failed=failed, applied=not failed)
    mcp_cfg = gw.server_cfg.mcp
    limit = mcp_cfg.max_result_bytes if mcp_cfg is not None else None
    if limit is not None and size > limit:
        if ex.is_write and not failed:
            outcome["applied"] = True
            raise TetherError("upstream_applied_response_lost",
                              f"tool {cap.target} ran, but its result is {size} bytes, over server.mcp.max_result_bytes "
                              f"({limit}); do not call it again", details={"applied": True})
        raise TetherError("upstream_response_too_large",
                          f"tool {cap.target}'s result is {size} bytes, over server.mcp.max_result_bytes ({limit})")
    ex.door.answer(ex, 200, None, {}, None, upstream=result)


__all__ = ["call_tool"]
