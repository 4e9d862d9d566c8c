"""Transactional Safety Nets: transactions, pre-images, a compensation journal, reverse-order rollback.

An agent ties writes into one workflow with ``X-Tether-Transaction: <id>`` (opened implicitly on first
use, or explicitly with ``POST /_tether/transactions``). For every *live* write inside it:

1. before forwarding, the adapter plans the undo — create → delete the created record, update →
   restore the changed fields from a pre-image read first, delete → re-create from the pre-image — and
   the plan is committed to the store (a write that cannot be undone is refused live inside a
   transaction unless its capability says ``allow_live_without_compensation``);
2. after the upstream answers, the plan is *armed* with what the response revealed (the created id),
   or marked ``not_applied`` when the write failed.

Rollback runs armed steps newest first. Before each undo it re-reads the record: if someone changed it
after the agent's write, the step is flagged ``conflict`` for a human instead of overwriting; where the
upstream gives a version (ETag) the undo carries ``If-Match``. Undo requests carry an idempotency key
where the upstream supports one, are retried with exponential backoff, and a step that still fails stops
the rollback with the transaction ``needs_attention`` (exact remaining steps kept, an alert sent) —
``tether tx retry ID`` resumes it. Rollback happens on request, when a write inside the transaction
fails (``on_failure: rollback``), when the deadline passes, and after a crash (the deadline sweep runs
at startup).

Step states (an ``unknown`` step does not stop the older steps being undone; a failed or conflicting one does):
``planned`` (committed, not yet known to be applied), ``armed``, ``not_applied``,
``non_compensable`` (allowed, nothing to undo), ``compensated``, ``failed``, ``conflict``, ``skipped``,
``unknown`` (applied or not cannot be told; needs a human).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from adapters.base import NotCompensable, Operation, UndoPlan

from ..core.exchange import Exchange
from ..core.upstream_calls import call_upstream
from ..errors import TetherError
from ..journal.writer import base_record
from ..normalise import decode_segments, split_target, unsafe_char
from ..policy.identity import Identity
from .tool_undo import arm_tool_undo, compensate_tool_step, is_tool_plan, plan_steps

if TYPE_CHECKING:
    from ..core.runtime import Runtime

log = logging.getLogger("tether.transactions")

TX_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
OPEN_STATES = ("open",)
ROLLBACK_FROM = ("open", "needs_attention", "rolling_back")
DONE_STEP_STATES = frozenset({"compensated", "not_applied", "non_compensable", "skipped"})


def new_tx_id() -> str:
    import secrets

    return "tx_" + secrets.token_hex(10)


class TransactionManager:
    def __init__(self, gw: "Runtime") -> None:
        self.gw = gw
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def cfg(self) -> Any:
        return self.gw.server_cfg.transactions

    def _lock(self, tx_id: str) -> asyncio.Lock:
        lock = self._locks.get(tx_id)
        if lock is None:
            if len(self._locks) > 10000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[tx_id] = asyncio.Lock()
        return lock

    # -- opening and finding ----------------------------------------------------------------------

    async def open(self, ident: Identity, *, tx_id: str | None = None, name: str | None = None,
                   deadline: float | None = None, implicit: bool = False) -> dict[str, Any]:
        now = time.time()
        tx = {
            "id": tx_id or new_tx_id(),
            "state": "open",
            "agent": ident.agent,
            "on_behalf_of": ident.on_behalf_of,
            "name": name,
            "created_at": now,
            "updated_at": now,
            "deadline": now + (deadline if deadline is not None else self.cfg.default_deadline),
            "opened": "implicit" if implicit else "explicit",
        }
        try:
            await self.gw.store.tx_insert(tx)
        except Exception as exc:  # a concurrent open of the same id (unique key)
            existing = await self.gw.store.tx_get(tx["id"])
            if existing is None:
                raise TetherError("journal_unavailable", f"could not record the transaction: {exc}") from None
            return existing
        await self._journal(tx, "opened", name=name, deadline=tx["deadline"], opened=tx["opened"])
        return tx

    async def owned(self, tx_id: str, ident: Identity) -> dict[str, Any]:
        tx = await self.gw.store.tx_get(tx_id)
        if tx is None:
            raise TetherError("not_found", f"no transaction {tx_id!r}")
        if tx["agent"] != ident.agent:
            raise TetherError("transaction_not_owned", f"transaction {tx_id} belongs to another agent")
        return tx

    async def for_write(self, ex: Exchange) -> dict[str, Any]:
        """The open transaction a write joins (opened implicitly when new)."""
        tx_id = ex.transaction_id
        assert tx_id is not None and ex.identity is not None
        if not TX_ID_RE.fullmatch(tx_id):
            raise TetherError("bad_request", "X-Tether-Transaction must be 1-128 characters of A-Z a-z 0-9 _ . : -")
        tx = await self.gw.store.tx_get(tx_id)
        if tx is None:
            tx = await self.open(ex.identity, tx_id=tx_id, implicit=True)
        if tx["agent"] != ex.identity.agent:
            raise TetherError("transaction_not_owned", f"transaction {tx_id} belongs to another agent")
        if tx["state"] != "open":
            raise TetherError("transaction_closed", f"transaction {tx_id} is {tx['state']}")
        if tx.get("deadline") and tx["deadline"] <= time.time():
            raise TetherError("transaction_expired", f"transaction {tx_id} passed its deadline and is being rolled back")
        return tx

    # -- pipeline stage ---------------------------------------------------------------------------

    async def prepare(self, ex: Exchange) -> None:
        """Stage ``prepare_compensation``: plan and commit the undo of each live write in a transaction."""
        if ex.transaction_id is None or not ex.is_write:
            return
        if ex.mode != "live":
            # dry-run writes join nothing upstream; the review item records the transaction id
            return
        # A write and a rollback of the same transaction never interleave in this process: the lock is
        # held from planning until the write's outcome is recorded (released in after_forward, or by
        # the pipeline's cleanup if the request ends earlier).
        lock = self._lock(ex.transaction_id)  # type: ignore[arg-type]
        await lock.acquire()
        ex.extra.setdefault("cleanup", []).append(lambda: lock.release() if lock.locked() else None)
        ex.extra["tx_lock"] = lock
        tx = await self.for_write(ex)
        up = ex.upstream
        assert up is not None
        from ..core.upstream_calls import read_pre_image

        steps = []
        existing = len(await self.gw.store.steps_for(tx["id"]))
        tool_plans = {id(op): (p, r) for op, p, r in await plan_steps(self, ex)} if up.is_mcp else None
        for n, op in enumerate(ex.operations):
            cap = op.capability
            if not cap.is_write:
                continue
            plan: Any = None
            reason = None
            if tool_plans is not None:  # a tool of an MCP upstream: its undo template (proxy.safety.tool_undo)
                plan, reason = tool_plans[id(op)]
            elif cap.config.compensation == "auto" and cap.config.stream_request:
                reason = f"capability {cap.name} streams its request body, so Tether cannot plan its undo from it"
            elif cap.config.compensation == "auto":
                try:
                    pre = await read_pre_image(self.gw, ex, op) if up.adapter.pre_image_request(op) else None
                    plan = up.adapter.plan_undo(op, pre)
                except NotCompensable as exc:
                    reason = str(exc)
            else:
                reason = f"capability {cap.name} is marked compensation: {cap.config.compensation}"
            if plan is None and not cap.config.allow_live_without_compensation:
                raise TetherError("non_compensable_in_transaction",
                                  f"{cap.name}: {reason}; it may not run live inside a transaction "
                                  "(it can still run as dry-run)")
            now = time.time()
            step = {
                "tx_id": tx["id"],
                "state": "planned" if plan is not None else "non_compensable",
                "created_at": now,
                "updated_at": now,
                "order": existing + n + 1,
                "request_id": ex.request_id,
                "intent_seq": ex.intent_seq,
                "capability": cap.name,
                "method": op.method,
                "path": op.path,
                "op_index": op.index,
                "plan": plan.to_dict() if plan is not None else None,
                "reason": reason,
                "attempts": 0,
                "intent": ex.intent,
            }
            step["id"] = await self.gw.store.step_insert(step)
            steps.append((op, step, plan))
        # another replica may have started rolling the transaction back meanwhile: then this write must
        # not go out (its steps would never be undone)
        now_tx = await self.gw.store.tx_get(tx["id"])
        if now_tx is None or now_tx["state"] != "open":
            for _, step, _ in steps:
                await self.gw.store.step_update(step["id"], {"state": "not_applied",
                                                             "reason": "the transaction closed before forwarding"})
            raise TetherError("transaction_closed", f"transaction {tx['id']} is {now_tx['state'] if now_tx else 'gone'}")
        ex.extra["tx_steps"] = steps

    async def after_forward(self, ex: Exchange, *, status: int | None, headers: dict[str, str], body: Any,
                            failed: bool, applied: bool | None) -> None:
        """Arm the planned steps with the response, or mark them not applied; maybe roll back."""
        steps = ex.extra.get("tx_steps") or []
        up = ex.upstream
        assert up is not None
        store = self.gw.store
        for op, step, plan in steps:
            if plan is None:
                continue
            if failed:
                state = "not_applied" if applied is False or (status is not None and status >= 400) else "unknown"
                await store.step_update(step["id"], {"state": state, "response_status": status})
                continue
            try:
                if up.is_mcp:  # a tool call: the undo's arguments filled in from its result
                    armed = arm_tool_undo(up, plan, body)  # type: ignore[arg-type]
                    created: list[str] = []
                else:
                    armed = up.adapter.arm_undo(plan, op, status or 0, headers, body)
                    check_undo_target(armed)
                    created = up.adapter.created_ids(op, status or 0, headers, body)
                await store.step_update(step["id"], {"state": "armed", "plan": armed.to_dict(),
                                                     "response_status": status, "created_ids": created})
            except NotCompensable as exc:
                await store.step_update(step["id"], {"state": "unknown", "reason": str(exc), "response_status": status})
                await self._flag(ex.transaction_id, f"step {step['id']} could not be armed: {exc}")
        await self._journal({"id": ex.transaction_id, "agent": ex.agent}, "steps_recorded",
                            request_id=ex.request_id, steps=[s["id"] for _, s, _ in steps], failed=failed)
        lock = ex.extra.pop("tx_lock", None)
        if lock is not None and lock.locked():
            lock.release()
        if failed and any(op.capability.config.on_failure == "rollback" for op, _, _ in steps):
            result = await self.rollback(ex.transaction_id, reason=f"write {ex.request_id} failed")
            ex.extra.setdefault("outcome", {})["tx_state"] = result["state"]
            ex.extra["tx_state"] = result["state"]

    # -- commit / rollback ------------------------------------------------------------------------

    async def commit(self, tx_id: str, ident: Identity) -> dict[str, Any]:
        tx = await self.owned(tx_id, ident)
        if not await self.gw.store.tx_transition(tx_id, OPEN_STATES, "committed"):
            raise TetherError("transaction_closed", f"transaction {tx_id} is {tx['state']}")
        await self._journal(tx, "committed")
        return await self.describe(tx_id)

    async def rollback(self, tx_id: str, *, reason: str, by: str | None = None,
                       resolve_conflicts: str | None = None, only_if: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Run the undo steps newest first. Returns the transaction as described after the attempt."""
        store = self.gw.store
        lease = f"tx-rollback:{tx_id}"
        holder = self.gw.instance_id
        async with self._lock(tx_id):
            tx = await store.tx_get(tx_id)
            if tx is None:
                raise TetherError("not_found", f"no transaction {tx_id!r}")
            if tx["state"] not in ROLLBACK_FROM:
                raise TetherError("transaction_closed", f"transaction {tx_id} is {tx['state']}")
            if only_if is not None and tx["state"] not in only_if:
                return await self.describe(tx_id)  # someone else settled it while we waited
            # one rollback at a time across replicas; a crashed one's lease runs out and it is resumed
            if not await store.try_lease(lease, holder, self.cfg.rollback_lease):
                raise TetherError("conflict", f"transaction {tx_id} is being rolled back elsewhere")
            try:
                return await self._rollback_locked(tx, reason=reason, by=by, resolve_conflicts=resolve_conflicts,
                                                   lease=lease)
            finally:
                await store.lease_release(lease, holder)

    async def _rollback_locked(self, tx: dict[str, Any], *, reason: str, by: str | None,
                               resolve_conflicts: str | None, lease: str) -> dict[str, Any]:
        store = self.gw.store
        tx_id = tx["id"]
        if not await store.tx_transition(tx_id, ROLLBACK_FROM, "rolling_back", {"rollback_reason": reason}):
            raise TetherError("transaction_closed", f"transaction {tx_id} changed state")
        await self._journal(tx, "rollback_started", reason=reason, by=by)
        steps = sorted(await store.steps_for(tx_id), key=lambda s: s["id"], reverse=True)
        final = "rolled_back"
        problem = None
        unknown: list[str] = []
        for step in steps:
            await store.try_lease(lease, self.gw.instance_id, self.cfg.rollback_lease)
            if step["state"] in DONE_STEP_STATES:
                continue
            if step["state"] == "conflict" and resolve_conflicts == "skip":
                await store.step_update(step["id"], {"state": "skipped", "skipped_by": by})
                await self._journal(tx, "step_skipped", step=step["id"], by=by)
                continue
            if step["state"] == "conflict" and resolve_conflicts != "overwrite":
                final, problem = "needs_attention", f"step {step['id']} is in conflict"
                break
            if step["state"] == "unknown":
                # nothing Tether can undo (e.g. a create whose id was never learned): a human must look,
                # but the older steps are still undone
                unknown.append(f"step {step['id']}: cannot tell whether the write applied")
                continue
            outcome = await self._compensate(tx, step, force=resolve_conflicts == "overwrite")
            if outcome.startswith("unknown"):
                unknown.append(f"step {step['id']} {outcome}")
                continue
            if outcome != "compensated":
                final, problem = "needs_attention", f"step {step['id']} {outcome}"
                break
        if unknown and final == "rolled_back":
            final, problem = "needs_attention", "; ".join(unknown)
        await store.tx_transition(tx_id, ("rolling_back",), final, {"problem": problem})
        await self._journal(tx, final, reason=reason, problem=problem)
        if final == "needs_attention":
            await self.gw.governance.alert("needs_attention", {
                "transaction": tx_id, "agent": tx["agent"], "problem": problem,
                "remaining_steps": [s["id"] for s in await store.steps_for(tx_id)
                                    if s["state"] not in DONE_STEP_STATES]})
        else:
            self.gw.governance.on_rollback(tx)
        return await self.describe(tx_id)

    async def _compensate(self, tx: dict[str, Any], step: dict[str, Any], force: bool = False) -> str:
        """Run one undo step with conflict check and retries. Returns the step's final state."""
        gw = self.gw
        store = gw.store
        if is_tool_plan(step.get("plan")):  # a tool call's step (proxy.safety.tool_undo)
            return await compensate_tool_step(self, tx, step, force)
        up = gw.state.upstreams.get(self._upstream_of(step))
        if up is None:
            await store.step_update(step["id"], {"state": "failed", "last_error": "upstream no longer configured"})
            return "failed"
        plan = UndoPlan.from_dict(step["plan"])
        adapter = up.adapter
        if plan.request is None:
            await store.step_update(step["id"], {"state": "compensated", "note": "nothing to undo"})
            return "compensated"
        if "{created_id}" in plan.request.path:
            await store.step_update(step["id"], {"state": "unknown", "last_error": "the created id was never learned"})
            return "unknown (the created id was never learned)"
        extra_headers: dict[str, str] = {}
        if adapter.idempotency_header:
            extra_headers[adapter.idempotency_header] = f"tether-undo-{tx['id']}-{step['id']}"
        attempts = int(step.get("attempts") or 0)
        backoff = float(self.cfg.retry_backoff)
        last_error = None
        for attempt in range(self.cfg.retry_attempts):
            attempts += 1
            try:
                if not force:
                    verdict = await self._check(up, tx, step, plan)
                    if verdict == "gone":
                        await store.step_update(step["id"], {"state": "compensated", "attempts": attempts,
                                                             "note": "already undone (the record is gone)"})
                        await self._journal(tx, "step_compensated", step=step["id"], note="already gone")
                        return "compensated"
                    if verdict == "not_applied":
                        await store.step_update(step["id"], {"state": "not_applied", "attempts": attempts})
                        return "compensated"
                    if verdict == "conflict":
                        await store.step_update(step["id"], {"state": "conflict", "attempts": attempts,
                                                             "last_error": "the record changed after the agent's write"})
                        await self._journal(tx, "step_conflict", step=step["id"])
                        return "conflict"
                    if isinstance(verdict, dict):
                        extra_headers.update(verdict)
                status, _, raw, parsed = await call_upstream(
                    gw, up, plan.request, agent=tx["agent"], on_behalf_of=tx.get("on_behalf_of"),
                    intent=f"rollback of transaction {tx['id']}: {step.get('intent') or ''}".strip(),
                    request_id=step.get("request_id"), extra_headers=extra_headers)
                if status == 412:
                    await store.step_update(step["id"], {"state": "conflict", "attempts": attempts,
                                                         "last_error": "precondition failed (record changed)"})
                    await self._journal(tx, "step_conflict", step=step["id"], status=status)
                    return "conflict"
                ok = status < 300 and not adapter.is_failure(status, parsed)
                if not ok and adapter.undo_already_done(plan, status, parsed):
                    ok = True
                if ok:
                    await store.step_update(step["id"], {"state": "compensated", "attempts": attempts,
                                                         "undo_status": status})
                    await self._journal(tx, "step_compensated", step=step["id"], status=status,
                                        capability=step.get("capability"))
                    return "compensated"
                last_error = f"undo answered {status}: {raw[:200].decode('utf-8', 'replace')}"
                transient = status >= 500 or status == 429
            except TetherError as err:
                last_error = f"{err.code}: {err.message}"
                transient = err.code in ("upstream_unavailable", "upstream_timeout")
            await store.step_update(step["id"], {"attempts": attempts, "last_error": last_error,
                                                 "transient": transient})
            await self._journal(tx, "step_retry", step=step["id"], attempt=attempts, error=last_error)
            if attempt + 1 < self.cfg.retry_attempts:
                await asyncio.sleep(backoff * (2 ** attempt))
                await store.try_lease(f"tx-rollback:{tx['id']}", gw.instance_id, self.cfg.rollback_lease)
        await store.step_update(step["id"], {"state": "failed", "attempts": attempts, "last_error": last_error})
        await self._journal(tx, "step_failed", step=step["id"], error=last_error)
        return "failed"

    async def _check(self, up: Any, tx: dict[str, Any], step: dict[str, Any], plan: UndoPlan) -> Any:
        """Compare the record now with what the agent wrote: 'ok' | 'gone' | 'conflict' | 'not_applied'
        | {If-Match header}."""
        check = up.adapter.check_request(plan)
        if check is None:
            return "ok"
        status, headers, _, current = await call_upstream(self.gw, up, check, agent=tx["agent"],
                                                          on_behalf_of=tx.get("on_behalf_of"),
                                                          request_id=step.get("request_id"))
        if up.adapter.undo_already_done(plan, status, current):
            return "gone"
        if status in (404, 410):
            return "conflict"
        if status >= 400:
            raise TetherError("upstream_unavailable", f"reading the record before undo answered {status}")
        if step["state"] == "planned" and up.adapter.looks_unapplied(plan, current):
            return "not_applied"  # crash between plan and outcome: the write never landed
        if not up.adapter.current_matches(plan, current):
            return "conflict"
        return up.adapter.precondition_headers(plan, headers, current) or "ok"

    def _upstream_of(self, step: dict[str, Any]) -> str:
        cap = self.gw.state.registry.capabilities.get(step.get("capability", ""))
        return cap.upstream if cap is not None else step.get("upstream", "")

    async def _flag(self, tx_id: str | None, problem: str) -> None:
        if tx_id is None:
            return
        await self.gw.governance.alert("needs_attention", {"transaction": tx_id, "problem": problem})

    # -- reading --------------------------------------------------------------------------------

    async def describe(self, tx_id: str) -> dict[str, Any]:
        tx = await self.gw.store.tx_get(tx_id)
        if tx is None:
            raise TetherError("not_found", f"no transaction {tx_id!r}")
        tx["steps"] = await self.gw.store.steps_for(tx_id)
        tx["remaining_steps"] = [s["id"] for s in tx["steps"] if s["state"] not in DONE_STEP_STATES]
        return tx

    async def sweep(self) -> int:
        """Roll back open transactions past their deadline (also right after a restart), and retry
        rollbacks that an upstream outage stopped (every step left failed only for transient reasons)."""
        n = 0
        now = time.time()
        for tx in await self.gw.store.tx_due(now):
            try:
                await self.rollback(tx["id"], reason="deadline passed", only_if=("open",))
                n += 1
            except TetherError as err:
                if err.code != "transaction_closed":
                    log.error("deadline rollback of %s failed: %s", tx["id"], err)
        for tx in await self.gw.store.tx_list(state="rolling_back", limit=100):
            try:  # a rollback interrupted by a crash: resumed once its lease has run out
                await self.rollback(tx["id"], reason="resuming an interrupted rollback", only_if=("rolling_back",))
                n += 1
            except TetherError:
                pass
        for tx in await self.gw.store.tx_list(state="needs_attention", limit=100):
            if now - tx.get("updated_at", now) < self.cfg.retry_interval:
                continue
            steps = await self.gw.store.steps_for(tx["id"])
            stuck = [s for s in steps if s["state"] not in DONE_STEP_STATES and s["state"] != "armed"]
            if stuck and all(s["state"] == "failed" and s.get("transient") for s in stuck):
                try:
                    await self.rollback(tx["id"], reason="automatic retry after an upstream outage",
                                        only_if=("needs_attention",))
                    n += 1
                except TetherError as err:
                    log.error("retry of %s failed: %s", tx["id"], err)
        return n

    async def sweep_loop(self) -> None:
        while True:
            try:
                if await self.gw.store.try_lease("tx-sweep", self.gw.instance_id, self.cfg.sweep_interval * 3):
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("transaction sweep failed: %s", exc)
            await asyncio.sleep(self.cfg.sweep_interval)

    async def _journal(self, tx: dict[str, Any], event: str, **fields: Any) -> None:
        rec = base_record("tx", agent=tx.get("agent"), on_behalf_of=tx.get("on_behalf_of"), decision=event)
        rec.update({"tx": tx["id"], "event": event, **{k: v for k, v in fields.items() if v is not None}})
        try:
            await self.gw.journal.write(rec)
        except Exception as exc:  # noqa: BLE001 - the state is in the store; the journal is best effort here
            log.error("could not journal %s of %s: %s", event, tx["id"], exc)


def check_undo_target(plan: UndoPlan) -> None:
    """An armed undo step's path (which may embed an id from the upstream's answer) must be a path
    Tether would forward for an agent — no '?', '#', encoded '/', dot segment — or the step is not
    armed (NotCompensable: it is left ``unknown`` for a human, never sent somewhere else)."""
    req = plan.request
    if req is None or "{created_id}" in req.path:
        return
    try:
        path, query = split_target(req.path, 1 << 16)
        decode_segments(path)
    except TetherError as err:
        raise NotCompensable(f"the undo step's target {req.path[:120]!r} is not a path Tether forwards: "
                             f"{err.message}") from None
    if query or "?" in req.path:
        raise NotCompensable(f"the undo step's target {req.path[:120]!r} holds a '?'")


# --------------------------------------------------------------------------- agent endpoints

MAX_TX_NAME = 200


def tx_name(value: Any) -> str | None:
    """A transaction's name as the agent gave it: a string of at most MAX_TX_NAME characters, none of
    them control, line-separator or bidi characters (operators read it in ``tx list`` and the console);
    anything else is 400."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TetherError("bad_request", "name must be a string")
    if len(value) > MAX_TX_NAME:
        raise TetherError("bad_request", f"name is longer than {MAX_TX_NAME} characters")
    bad = unsafe_char(value)
    if bad is not None:
        raise TetherError("bad_request", f"name holds {bad}: control, line-separator and bidi characters are "
                                         "refused in text an operator reads")
    return value



async def prepare_compensation(gw: "Runtime", ex: Exchange) -> None:
    """Pipeline stage (see TransactionManager.prepare)."""
    if ex.transaction_id is not None:
        await gw.transactions.prepare(ex)


__all__ = ["Operation", "TransactionManager", "prepare_compensation"]
