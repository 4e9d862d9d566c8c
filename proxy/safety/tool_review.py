"""Dry-run for tools of MCP upstreams: the captured call, its approval re-checked, its exact replay.

A dry-run call of a write tool is captured like a REST write (:mod:`proxy.safety.review`): the item's
``request`` is a **tool request** — ``kind: tool``, the ``tool`` and its ``upstream``, and the arguments
as the body (``body_text``, the exact JSON the tool would have been called with), besides ``method:
tools/call`` and ``path: <tool>`` so that every view of a review item reads it — plus the agent, the
person it acts for and the intent. Its digest covers all of it.

On approval the call is checked again *as the rules stand now* (the capability still names this tool of
this upstream and is granted to the agent, the arguments — or the reviewer's edit, a JSON object — pass
its field rules, and the tool is callable: listed with its pin), then **replayed exactly**: the tool is
called with those arguments, once, in Tether's session with the server. The result is stored with the
item (``replay``: ``is_error``, the result's digest and, up to 64 KiB, the result itself) for
``tether_review_status``, the console and ``tether review show``; the journal has the replay's intent
and outcome records (the result's digest only). An item captured inside a transaction replays as a
step of it, its undo planned from the tool's ``undo`` template (:mod:`.tool_undo`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from adapters.base import NotCompensable, Operation

from ..core.tool_calls import call_pinned, result_digest, result_doc
from ..errors import TetherError
from ..policy.identity import Identity
from ..policy.validation import validator_for
from .captured import request_body
from .replay_records import finish_replay, journal_replay_intent, replay_intent
from .tool_undo import arm_tool_undo, plan_tool_undo

KEPT_RESULT = 64 * 1024  # bytes of a replay's result kept with its item (its digest is kept either way)


def is_tool_item(item: dict[str, Any]) -> bool:
    return (item.get("request") or {}).get("kind") == "tool"


async def recheck_tool(svc: Any, item: dict[str, Any], edit: Any) -> tuple[Operation, list[Operation], str, bytes | None, dict[int, Any]]:
    """The approval's check of a tool item (see the module doc): the operation to replay, in the shape
    ``ReviewService._recheck`` returns."""
    gw = svc.gw
    state = gw.state
    req = item["request"]
    up = state.mcp_upstreams.get(item["upstream"])
    cap = state.registry.capabilities.get(item["capability"])
    if up is None or cap is None or cap.kind != "tool" or cap.upstream != item["upstream"] or cap.target != req["tool"]:
        raise TetherError("conflict", f"tool {req.get('tool')!r} of {item['upstream']!r} no longer matches capability "
                                      f"{item['capability']!r} (rules changed)")
    if state.registry.grant(item["agent"], cap.name) is None:
        raise TetherError("conflict", f"capability {cap.name!r} is no longer granted to {item['agent']!r} (rules changed)")
    edited: bytes | None = None
    body = request_body(req)
    if edit is not None:
        if not isinstance(edit, dict):
            raise TetherError("bad_request", "an edit of a tool call is its new arguments: a JSON object")
        edited = body = orjson.dumps(edit)
    limit = gw.limits.max_body_bytes
    rules = cap.config.body
    if rules is not None and rules.max_bytes is not None:
        limit = min(limit, rules.max_bytes)
    if len(body) > limit:
        raise TetherError("body_too_large", f"the arguments are {len(body)} bytes; capability {cap.name!r} accepts "
                                            f"at most {limit}")
    try:
        args = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise TetherError("conflict", "the captured arguments are not JSON") from None
    if not isinstance(args, dict):
        raise TetherError("bad_request", "a tool's arguments are a JSON object")
    v = validator_for(state.registry, cap)
    if v is not None:
        v.validate("json", args, None)
    await up.current()
    up.pinned(cap.target)  # tool_definition_changed: a tool that changed since capture is not called
    op = Operation(method="tools/call", path=cap.target, body=args, raw_body=body, content_type="application/json",
                   capability=cap)
    return op, [op], "json", edited, {}


async def plan_replay_undo(svc: Any, item: dict[str, Any], ops: list[Operation]) -> list[tuple[Operation, Any, str | None]]:
    """The undo of a tool item captured inside a transaction, planned now (as a live call's would be)."""
    up = svc.gw.state.mcp_upstreams[item["upstream"]]
    out: list[tuple[Operation, Any, str | None]] = []
    for op in ops:
        cap = op.capability
        plan, reason = await plan_tool_undo(up, cap, op.body or {})
        if plan is None and not cap.config.allow_live_without_compensation:
            raise TetherError("non_compensable_in_transaction",
                              f"{cap.name}: {reason}; item {item['id']} belongs to transaction {item['tx']}, and its "
                              "replay could not be undone with it")
        out.append((op, plan, reason))
    return out


async def replay_tool(svc: Any, item: dict[str, Any], reviewer: Identity, edited_body: bytes | None,
                      undo: list[tuple[Operation, Any, str | None]] | None) -> None:
    """Call the approved tool exactly as captured (or as edited), once; store and journal what it answered
    (see the module doc). Mirrors ``ReviewService.replay`` for REST items."""
    gw = svc.gw
    up = gw.state.mcp_upstreams.get(item["upstream"])
    req = item["request"]
    tool = req["tool"]
    body = edited_body if edited_body is not None else request_body(req)
    args = orjson.loads(body) if body else {}
    try:
        await svc._transaction_open(item)  # noqa: SLF001
        if up is None:
            raise TetherError("conflict", f"MCP upstream {item['upstream']!r} no longer exists in the rules")
    except TetherError as err:
        await gw.store.review_transition(item["id"], ("approved",), "replay_failed", {"replay": {
            "status": None, "error": err.code, "message": err.message, "at": time.time(), "by": reviewer.agent}})
        raise
    rid, intent_rec = replay_intent(gw, item, reviewer, body, edited=edited_body is not None,
                                    method="tools/call", path=tool)
    t0 = time.perf_counter()
    seq = await journal_replay_intent(gw, item, intent_rec)
    replay: dict[str, Any] = {"request_id": rid, "intent_seq": seq, "at": time.time(), "by": reviewer.agent,
                              "tool": tool}
    lock = gw.transactions._lock(item["tx"]) if undo else None  # noqa: SLF001
    steps: list[tuple[Operation, dict[str, Any], Any]] = []
    forwarded = False
    failed = True
    doc: Any = None
    if lock is not None:
        await lock.acquire()
    try:
        try:
            if undo:
                steps = await svc._record_steps(item, undo, rid, seq)  # noqa: SLF001
            forwarded = True
            try:
                result = await call_pinned(up, tool, args)
            except TetherError as err:
                if (err.details or {}).get("applied", False) is False:
                    forwarded = False  # refused before it left, or provably never reached the server
                raise
            doc = result_doc(result)
            failed = bool(result.is_error)
            digest, size = result_digest(doc)
            replay.update({"status": 200, "is_error": failed, "result_sha256": digest, "result_bytes": size,
                           "body": doc if size <= KEPT_RESULT else None})
        except TetherError as err:
            failed = True
            replay.update({"status": None, "error": err.code, "message": err.message})
            if not forwarded:
                replay["forwarded"] = False
        for op, step, plan in steps:
            if plan is None:
                continue
            if failed:
                await gw.store.step_update(step["id"], {"state": "not_applied" if not forwarded or doc is not None
                                                        else "unknown"})
                continue
            try:
                armed = arm_tool_undo(up, plan, doc)  # type: ignore[arg-type]
                await gw.store.step_update(step["id"], {"state": "armed", "plan": armed.to_dict(), "response_status": 200})
            except NotCompensable as exc:
                await gw.store.step_update(step["id"], {"state": "unknown", "reason": str(exc)})
        if steps:
            await gw.transactions._journal(  # noqa: SLF001
                {"id": item["tx"], "agent": item["agent"], "on_behalf_of": item.get("on_behalf_of")}, "steps_recorded",
                request_id=rid, steps=[s["id"] for _, s, _ in steps], failed=failed, review_item=item["id"])
    finally:
        if lock is not None and lock.locked():
            lock.release()
    await finish_replay(gw, item, reviewer, rid=rid, seq=seq, method="tools/call", path=tool, replay=replay,
                        forwarded=forwarded, failed=failed, t0=t0, result_sha256=replay.get("result_sha256"),
                        result_bytes=replay.get("result_bytes"), tool_error=replay.get("is_error"))


__all__ = ["is_tool_item", "plan_replay_undo", "recheck_tool", "replay_tool"]
