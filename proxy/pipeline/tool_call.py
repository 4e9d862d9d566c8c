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
  server; None: nobody can tell) — for the journal and the transaction's steps to settle;
* the server's log messages about the call (``notifications/message`` on the call's stream) reach the
  agent's log sink when it has one (the door filters them by the level the agent asked for and caps them);
  the outcome record counts them (``log_messages``), nothing of what they say.

A ``resources/read`` or ``prompts/get`` of a granted resource or prompt (:func:`fetch`) is the same step
for the other two things a server offers: the URI or prompt name and arguments the stages checked, the
result relayed, its digest and size journaled, never its content.
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


def _log_relay(ex: "Exchange", sink: Any) -> Any:
    """The call's ``on_log``: each of the server's log messages to the agent's sink, counted."""
    outcome = ex.extra.setdefault("outcome", {})

    async def on_log(params: dict[str, Any]) -> None:
        outcome["log_messages"] = outcome.get("log_messages", 0) + 1
        await sink(str(params.get("level")), params.get("data"), params.get("logger"))

    return on_log


def _result_limit(gw: "Runtime") -> int | None:
    mcp_cfg = gw.server_cfg.mcp
    return mcp_cfg.max_result_bytes if mcp_cfg is not None else None


async def call_tool(gw: "Runtime", ex: "Exchange") -> None:
    """Call the exchange's tool on its MCP upstream and hand the result to the door (see the module doc)."""
    up: Any = ex.upstream
    cap = ex.capability
    assert up is not None and cap is not None
    if cap.kind != "tool":
        await fetch(gw, ex)
        return
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
        sink = getattr(call, "log", None)
        result = await up.call(cap.target, op.body or {}, progress=getattr(call, "progress", None),
                               on_log=_log_relay(ex, sink) if sink is not None else None,
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
    limit = _result_limit(gw)
    if limit is not None and size > limit:
        if ex.is_write and not failed:
            outcome["applied"] = True
            raise TetherError("upstream_applied_response_lost",
                              f"tool {cap.target} ran, but its result is {size} bytes, over server.mcp.max_result_bytes "
                              f"({limit}); do not call it again", details={"applied": True})
        raise TetherError("upstream_response_too_large",
                          f"tool {cap.target}'s result is {size} bytes, over server.mcp.max_result_bytes ({limit})")
    ex.door.answer(ex, 200, None, {}, None, upstream=result)


async def fetch(gw: "Runtime", ex: "Exchange") -> None:
    """``resources/read`` of the exchange's URI, or ``prompts/get`` of its prompt with the checked arguments,
    on its MCP upstream; the result to the door (a read: nothing to undo, nothing to capture)."""
    up: Any = ex.upstream
    cap = ex.capability
    assert up is not None and cap is not None
    op = ex.operations[0]
    req = ex.extra.get("mcp_fetch")
    cancelled = getattr(req, "cancelled", None)
    timer = Timer()
    ex.forwarded = True
    try:
        if cap.kind == "resource":
            result: Any = await up.read(op.path, cancelled=cancelled)
        else:
            result = await up.prompt(cap.target, op.body or {}, cancelled=cancelled)
    except McpUpstreamError as err:
        ex.upstream_latency_ms = timer.ms()
        if err.applied is False:
            ex.forwarded = False
        raise tether_error(err) from None
    ex.upstream_latency_ms = timer.ms()
    digest, size = result_digest(result.model_dump(by_alias=True, mode="json", exclude_none=True))
    ex.extra.setdefault("outcome", {}).update(result_sha256=digest, result_bytes=size)
    ex.status = 200
    limit = _result_limit(gw)
    if limit is not None and size > limit:
        what = f"resource {op.path}" if cap.kind == "resource" else f"prompt {cap.target}"
        raise TetherError("upstream_response_too_large",
                          f"{what} is {size} bytes, over server.mcp.max_result_bytes ({limit})")
    ex.door.answer(ex, 200, None, {}, None, upstream=result)


__all__ = ["call_tool", "fetch"]
