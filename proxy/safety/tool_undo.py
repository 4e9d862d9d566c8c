"""Compensation for tools of MCP upstreams: the transaction steps of tool calls, planned, armed and undone.

A write tool's capability may say how to undo a call of it (docs/mcp-upstreams.md)::

    undo: {tool: delete_customer, arguments: {id: "{result.structuredContent.id}"}}
    pre_image: {tool: get_customer, arguments: {id: "{arguments.id}"}}
    undo: {tool: update_customer, arguments: {id: "{arguments.id}", email: "{pre_image.structuredContent.email}"}}

Inside a transaction a live tool call becomes a step exactly as a REST write does
(:mod:`proxy.safety.transactions`): **planned** and committed before the call goes — the pre-image read
first (a pinned tool call; a failed read refuses the write: nothing could undo it), the undo's arguments
filled in as far as they are known — then **armed** with the call's result (``{result…}`` values, checked
to be ids, and the arguments validated against the undo tool's pinned ``inputSchema``). A write tool with
no ``undo``, or whose undo cannot be planned, is refused live inside a transaction
(``non_compensable_in_transaction``) unless its capability says ``allow_live_without_compensation``.

Rollback (newest first, crash recovery by the sweep, retries, ``needs_attention``) is the transaction
manager's; :func:`compensate_tool_step` undoes one step: when the capability reads a pre-image, the record
is read again first with that same tool, and a step whose fields no longer hold what the agent wrote is
flagged ``conflict`` for a human instead of being overwritten; one still holding its pre-image after a
crash between plan and outcome is ``not_applied``. The undo is a pinned tool call in Tether's session; a
result with ``isError`` is a failed attempt.

The step's plan is stored in the shape REST steps have (``kind``, ``request`` — ``tools/call`` of the undo
tool with its arguments, which views show — ``pre_image``, ``expect``, ``note``) plus ``tool``: what
Tether needs to finish it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapters.base import NotCompensable

from ..config import TEMPLATE_PLACEHOLDER_RE
from ..core.tool_calls import call_pinned, result_doc
from ..errors import TetherError
from ..mcp_upstream import TemplateError, check_arguments, resolve_arguments

if TYPE_CHECKING:
    from ..core.exchange import Exchange
    from ..core.mcp_upstreams import McpUpstreamRuntime


@dataclass
class ToolUndoPlan:
    """How to undo one tool call (see the module doc)."""

    tool: str  # the undo tool
    template: dict[str, Any]  # its arguments as the rules write them
    arguments: dict[str, Any]  # the call's arguments
    pre_image: Any = None  # the pre-image call's result (JSON), when the capability reads one
    check: dict[str, Any] | None = None  # {tool, arguments}: the pre-image read, repeated before undoing
    expect: dict[str, Any] | None = None  # what the call wrote: its arguments that the pre-image record has
    resolved: dict[str, Any] | None = None  # the undo's arguments once known (planned, or armed)
    note: str = ""
    kind = "tool"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tool",
                "request": {"method": "tools/call", "path": self.tool, "query": "", "content_type": "application/json",
                            "headers": {}, "body": self.resolved if self.resolved is not None else self.template},
                "pre_image": self.pre_image, "expect": self.expect, "note": self.note,
                "tool": {"undo": self.tool, "template": self.template, "arguments": self.arguments,
                         "check": self.check, "resolved": self.resolved is not None}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToolUndoPlan":
        t = d.get("tool") or {}
        req = d.get("request") or {}
        return cls(tool=t["undo"], template=t.get("template") or {}, arguments=t.get("arguments") or {},
                   pre_image=d.get("pre_image"), check=t.get("check"), expect=d.get("expect"),
                   resolved=req.get("body") if t.get("resolved") else None, note=d.get("note", ""))


def is_tool_plan(plan: Any) -> bool:
    return isinstance(plan, dict) and plan.get("kind") == "tool" and "tool" in plan


def _structured(doc: Any) -> dict[str, Any]:
    sc = doc.get("structuredContent") if isinstance(doc, dict) else None
    return sc if isinstance(sc, dict) else {}


def _needs_result(template: Any) -> bool:
    if isinstance(template, dict):
        return any(_needs_result(v) for v in template.values())
    if isinstance(template, list):
        return any(_needs_result(v) for v in template)
    return isinstance(template, str) and any(m.group(1) == "result" for m in TEMPLATE_PLACEHOLDER_RE.finditer(template))


def _undo_schema(up: "McpUpstreamRuntime", tool: str) -> Any:
    listed = up.usable(tool)
    if listed is None:
        raise NotCompensable(f"the undo tool {tool!r} is not callable now (not listed, or its definition changed "
                             "since it was pinned)")
    return listed.input_schema


async def plan_tool_undo(up: "McpUpstreamRuntime", cap: Any, arguments: dict[str, Any]) -> tuple[ToolUndoPlan | None, str | None]:
    """The undo plan of a call of ``cap`` with ``arguments`` — or (None, why) when it has none. Reads
    the pre-image (a TetherError refuses the write: it could not be undone without it)."""
    cfg = cap.config
    if cfg.undo is None:
        return None, f"tool {cap.target} has no undo in the rules"
    try:
        _undo_schema(up, cfg.undo.tool)
        pre = check = expect = None
        if cfg.pre_image is not None:
            pargs = resolve_arguments(cfg.pre_image.arguments, arguments=arguments)
            res = await call_pinned(up, cfg.pre_image.tool, pargs)
            if res.is_error:
                raise TetherError("upstream_unavailable",
                                  f"reading the pre-image ({cfg.pre_image.tool}) answered an error; Tether cannot "
                                  "undo this write without it")
            pre = result_doc(res)
            check = {"tool": cfg.pre_image.tool, "arguments": pargs}
            record = _structured(pre)
            expect = {k: v for k, v in arguments.items() if k in record} or None
        plan = ToolUndoPlan(tool=cfg.undo.tool, template=dict(cfg.undo.arguments), arguments=dict(arguments),
                            pre_image=pre, check=check, expect=expect, note=f"undo with tool {cfg.undo.tool}")
        if not _needs_result(plan.template):  # known before the call: a crash in between can still be undone
            plan.resolved = resolve_arguments(plan.template, arguments=arguments, pre_image=pre)
            check_arguments(plan.resolved, _undo_schema(up, plan.tool))
        return plan, None
    except (TemplateError, NotCompensable) as exc:
        return None, f"the undo of tool {cap.target} cannot be planned: {exc}"


def arm_tool_undo(up: "McpUpstreamRuntime", plan: ToolUndoPlan, result: Any) -> ToolUndoPlan:
    """Fill the undo's arguments with what the call's result revealed (``result``: its JSON). Raises
    NotCompensable (the step is left ``unknown`` for a human)."""
    try:
        plan.resolved = resolve_arguments(plan.template, arguments=plan.arguments, result=result,
                                          pre_image=plan.pre_image)
        check_arguments(plan.resolved, _undo_schema(up, plan.tool))
    except TemplateError as exc:
        raise NotCompensable(f"the undo's arguments cannot be filled in from the result: {exc}") from None
    return plan


async def plan_steps(tm: Any, ex: "Exchange") -> list[tuple[Any, ToolUndoPlan | None, str | None]]:
    """(operation, plan, reason) for a tool call inside a transaction (the REST adapter's part of
    ``TransactionManager.prepare``)."""
    up: Any = ex.upstream
    out = []
    for op in ex.operations:
        if op.capability.is_write:
            plan, reason = await plan_tool_undo(up, op.capability, op.body or {})
            out.append((op, plan, reason))
    return out


async def _verdict(up: "McpUpstreamRuntime", step: dict[str, Any], plan: ToolUndoPlan) -> str:
    """Read the record again with the pre-image tool: 'ok' | 'conflict' | 'not_applied'."""
    if plan.check is None:
        return "ok"
    res = await call_pinned(up, plan.check["tool"], plan.check["arguments"])
    if res.is_error:
        return "conflict"  # gone or unreadable: a person decides, Tether does not recreate blindly
    if not plan.expect:
        return "ok"
    now = _structured(result_doc(res))
    before = _structured(plan.pre_image)
    holds = all(now.get(k) == v for k, v in plan.expect.items())
    if step["state"] == "planned" and not holds and all(now.get(k) == before.get(k) for k in plan.expect):
        return "not_applied"  # a crash between plan and outcome: the write never landed
    return "ok" if holds else "conflict"


async def compensate_tool_step(tm: Any, tx: dict[str, Any], step: dict[str, Any],
                               force: bool = False) -> str:
    """Undo one tool step (conflict check, retries); returns the step's final state, as
    ``TransactionManager._compensate`` does for REST steps."""
    gw = tm.gw
    store = gw.store
    plan = ToolUndoPlan.from_dict(step["plan"])
    cap = gw.state.registry.capabilities.get(step.get("capability", ""))
    up = gw.state.mcp_upstreams.get(cap.upstream) if cap is not None else None
    if up is None:
        await store.step_update(step["id"], {"state": "failed", "last_error": "the MCP upstream or the capability is "
                                                                              "no longer configured"})
        return "failed"
    if plan.resolved is None:
        await store.step_update(step["id"], {"state": "unknown",
                                             "last_error": "the undo needs the call's result, which was never learned"})
        return "unknown (the call's result was never learned)"
    attempts = int(step.get("attempts") or 0)
    backoff = float(tm.cfg.retry_backoff)
    last_error = None
    for attempt in range(tm.cfg.retry_attempts):
        attempts += 1
        transient = False
        try:
            if not force:
                verdict = await _verdict(up, step, plan)
                if verdict == "not_applied":
                    await store.step_update(step["id"], {"state": "not_applied", "attempts": attempts})
                    return "compensated"
                if verdict == "conflict":
                    await store.step_update(step["id"], {"state": "conflict", "attempts": attempts,
                                                         "last_error": "the record changed after the agent's write"})
                    await tm._journal(tx, "step_conflict", step=step["id"])  # noqa: SLF001
                    return "conflict"
            res = await call_pinned(up, plan.tool, plan.resolved)
            if not res.is_error:
                await store.step_update(step["id"], {"state": "compensated", "attempts": attempts})
                await tm._journal(tx, "step_compensated", step=step["id"], capability=step.get("capability"),  # noqa: SLF001
                                  tool=plan.tool)
                return "compensated"
            text = " ".join(getattr(c, "text", "") for c in res.content)[:200]
            last_error = f"the undo tool {plan.tool} answered an error: {text}"
        except TetherError as err:
            last_error = f"{err.code}: {err.message}"
            transient = err.code in ("upstream_unavailable", "upstream_timeout")
        await store.step_update(step["id"], {"attempts": attempts, "last_error": last_error, "transient": transient})
        await tm._journal(tx, "step_retry", step=step["id"], attempt=attempts, error=last_error)  # noqa: SLF001
        if attempt + 1 < tm.cfg.retry_attempts:
            await asyncio.sleep(backoff * (2 ** attempt))
            await store.try_lease(f"tx-rollback:{tx['id']}", gw.instance_id, tm.cfg.rollback_lease)
    await store.step_update(step["id"], {"state": "failed", "attempts": attempts, "last_error": last_error})
    await tm._journal(tx, "step_failed", step=step["id"], error=last_error)  # noqa: SLF001
    return "failed"


__all__ = ["ToolUndoPlan", "arm_tool_undo", "compensate_tool_step", "is_tool_plan", "plan_steps", "plan_tool_undo"]
