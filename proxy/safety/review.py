"""The Dry-Run Rule: capture writes into a review queue, answer synthetically, approve-and-replay or reject.

A write whose grant is not promoted to live passes every check a live one would (identity, grant,
validation, rate limit, journal) and is then *captured*: the full request (secrets removed), identity,
intent, capability and a digest of it all are stored durably, and the agent gets a realistic synthetic
response from the upstream's adapter with ``X-Tether-Dry-Run: <item id>``.

Review states::

    pending ──approve──▶ approved ──replay──▶ replayed | replay_failed
       │ └──reject──▶ rejected
       └──ttl──▶ expired

Every transition is a compare-and-set in the store, so an item is decided exactly once even when two
reviewers (or two replicas) click at the same moment; the loser gets 409 ``already_decided``. Approval
is bound to the captured call (its digest is re-checked) and to the rules in force: if the rules
changed since capture, the call must still match a capability granted to the agent and still pass
validation. A replay goes to the upstream with the upstream's credentials and provenance naming both
the agent and the reviewer, and is journaled (intent before forwarding, outcome after) like any call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from adapters.base import NotCompensable, Operation, PlannedRequest, SyntheticResponse

from .. import headers as H
from ..chain import lenient
from ..core.exchange import Exchange, new_request_id
from ..core.upstream_calls import call_upstream
from ..errors import TetherError
from ..journal.writer import JournalUnavailable, base_record
from ..policy.bodies import parse_body
from ..policy.identity import Identity
from ..policy.validation import validator_for
from ..store.rows import Unstorable, prepare_review

if TYPE_CHECKING:
    from ..core.runtime import Runtime

from .captured import request_body
from .replay_records import finish_replay, journal_replay_intent, replay_intent
from .tool_review import is_tool_item, plan_replay_undo, recheck_tool, replay_tool

log = logging.getLogger("tether.review")

# Never stored with a captured request (credentials, hop-by-hop, Tether's own).
_NOT_CAPTURED = H.STRIPPED_REQUEST | H.HOP_BY_HOP | {"content-type"}


def new_item_id() -> str:
    """Unique without a syscall per capture: the per-process random prefix and counter of request ids."""
    return "dr_" + new_request_id()


def captured_request(ex: Exchange) -> dict[str, Any]:
    """The request as it would be sent, minus anything secret."""
    up = ex.upstream
    assert up is not None
    if up.is_mcp:
        return captured_tool_request(ex)
    drop = _NOT_CAPTURED | up.credential_headers
    headers = [[k, v] for k, v in ex.headers.items()
               if k.lower() not in drop and not H.is_tether_header(k)]
    body = ex.body or b""
    req: dict[str, Any] = {
        "method": ex.method,
        "wire_method": ex.extra.get("wire_method", ex.method),
        "path": ex.raw_path,
        "query": ex.query,
        "headers": headers,
        "content_type": ex.headers.get("Content-Type"),
        "body_bytes": len(body),
    }
    req.update(stored_body(body))
    return req


def captured_tool_request(ex: Exchange) -> dict[str, Any]:
    """A captured call of an MCP upstream's tool (``kind: tool``, see :mod:`.tool_review`): the tool, and
    its arguments as the body — exactly what it would have been called with. ``method``/``path``
    (``tools/call`` and the tool) let every view of an item read it as it reads a REST one."""
    cap = ex.capability
    assert cap is not None
    body = ex.body or b"{}"
    req: dict[str, Any] = {"kind": "tool", "tool": cap.target, "method": "tools/call", "wire_method": "tools/call",
                           "path": cap.target, "query": "", "headers": [], "content_type": "application/json",
                           "body_bytes": len(body)}
    req.update(stored_body(body))
    return req


def stored_body(body: bytes) -> dict[str, str]:
    """The body, kept once: as text when it is UTF-8 that JSON holds compactly, else as base64 (so a body
    of control characters, each six bytes escaped, cannot make its item six times its size). The parsed
    form is derived when an item is read (:func:`body_json`), never stored beside it."""
    if not body:
        return {"body_text": ""}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and len(orjson.dumps(text)) <= len(body) * 4 // 3 + 8:
        return {"body_text": text}
    return {"body_b64": base64.b64encode(body).decode()}


def body_json(req: dict[str, Any]) -> Any:
    """The captured body parsed (JSON only; None for anything else): for views, never stored."""
    if "body_json" in req:  # items captured before bodies were stored once
        return req["body_json"]
    from ..policy.bodies import is_json_type, media_type

    text = req.get("body_text")
    if not text or not (is_json_type(media_type(req.get("content_type"))) or text.lstrip()[:1] in ("{", "[")):
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def digest_of(item: dict[str, Any]) -> str:
    """sha256 over everything that defines the captured call (what an approval is bound to)."""
    req = item["request"]
    doc = {
        "upstream": item["upstream"], "agent": item["agent"], "on_behalf_of": item.get("on_behalf_of"),
        "intent": item.get("intent"), "capabilities": item.get("capabilities"),
        "method": req["method"], "wire_method": req.get("wire_method"), "path": req["path"], "query": req["query"],
        "headers": req["headers"], "content_type": req.get("content_type"),
        "body_sha256": hashlib.sha256(request_body(req)).hexdigest(),
    }
    if req.get("kind") == "tool":  # a tool call (REST items' digests are unchanged)
        doc["kind"], doc["tool"] = "tool", req.get("tool")
    try:
        data = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a header JSON cannot hold: the item will be refused (prepare_review says which)
        data = orjson.dumps(lenient(doc)[0], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


def _principals(*names: str | None) -> set[str]:
    """Every spelling of the identities that must not meet: case-folded, with and without a ``kind:``
    prefix."""
    out: set[str] = set()
    for n in names:
        if not n:
            continue
        n = n.strip().casefold()
        out.add(n)
        if ":" in n:
            out.add(n.split(":", 1)[1])
    out.discard("")
    return out


def synthetic_for(ex: Exchange, item_id: str) -> SyntheticResponse:
    up = ex.upstream
    assert up is not None
    if up.is_mcp:  # a tool call: no synthetic result (the agent is told it is pending review)
        return SyntheticResponse(202, None)
    if ex.composite:
        return up.adapter.synthetic_composite(ex.extra["composite_outer"], ex.operations, item_id)
    return up.adapter.synthetic_response(ex.operations[0], item_id)


def prepare_capture(gw: "Runtime", ex: Exchange) -> dict[str, Any]:
    """Build the review item of a dry-run write (before its intent record: both go in one commit)."""
    ident = ex.identity
    up = ex.upstream
    assert ident is not None and up is not None
    item_id = new_item_id()
    ex.review_item_id = item_id
    synthetic = synthetic_for(ex, item_id)
    now = time.time()
    item: dict[str, Any] = {
        "id": item_id,
        "state": "pending",
        "created_at": now,
        "updated_at": now,
        "expires_at": now + gw.server_cfg.review.ttl,
        "agent": ident.agent,
        "on_behalf_of": ident.on_behalf_of,
        "on_behalf_of_proof": ident.on_behalf_of_proof,
        "intent": ex.intent,
        "capability": ex.capability.name if ex.capability is not None else "composite",
        "capabilities": [op.capability.name for op in ex.operations],
        "upstream": up.name,
        "request_id": ex.request_id,
        "tx": ex.transaction_id,
        "trace_id": ex.extra.get("trace_id"),
        "rules_version": ex.registry.version,
        "request": captured_request(ex),
        "synthetic": stored_synthetic(synthetic),
        "canary": ex.extra.get("canary"),
        "quarantined": ex.quarantined,
    }
    item["digest"] = digest_of(item)
    try:  # the headline lists show (stored in the item's summary; completed when a reviewer opens it)
        from .headline import headline_for

        item["headline"] = headline_for(gw, item)
    except Exception:  # noqa: BLE001 - a headline never fails a capture; views compute a plain one
        log.debug("no headline for %s", item_id, exc_info=True)
    ex.extra["capture"] = (item, synthetic)
    return item


_SYNTHETIC_KEPT = 16 * 1024  # bytes of a synthetic answer kept with its item (it may echo the body)


def stored_synthetic(synthetic: SyntheticResponse) -> dict[str, Any]:
    body = synthetic.body if not isinstance(synthetic.body, bytes) else None
    out: dict[str, Any] = {"status": synthetic.status, "headers": synthetic.headers, "body": body}
    if body is not None:
        try:
            size = len(orjson.dumps(body))
        except TypeError:
            size = _SYNTHETIC_KEPT + 1
        if size > _SYNTHETIC_KEPT:
            out["body"] = None
            out["body_omitted"] = f"{size} bytes (an adapter's echo of the request body; not kept twice)"
    return out


async def journal_capture(gw: "Runtime", ex: Exchange, record: dict[str, Any] | None = None) -> None:
    """The ``journal_intent`` stage of a dry-run write: its review item and intent record in one commit.
    With ``record`` (a write whose relative caps had to be checked after its intent record), the item is
    committed with that record instead, and the intent record's sequence number stays the request's.

    Before anything is built, the agent's share of the queue is checked: at most
    ``server.review.max_pending_per_agent`` items and ``max_pending_bytes_per_agent`` stored bytes may be
    pending per agent (429 ``review_queue_full`` beyond), counting this process's captures still on their
    way to the store, so a burst cannot slip past. The item is serialised strictly before it joins the
    journal's batch: a value JSON cannot hold exactly fails this request (400 ``unrepresentable_value``,
    the field named), never the batch it would have shared with other agents' records."""
    from ..core.records import request_record

    ident = ex.identity
    assert ident is not None
    svc: ReviewService = gw.review
    agent = ident.agent
    size = len(ex.body or b"")
    if not await svc.admit(agent, size):
        ex.decision = "denied"
        raise svc.full_error(agent)
    stored = 0
    try:
        item = prepare_capture(gw, ex)
        if record is not None:
            record["review_item"] = item["id"]
        try:
            row = prepare_review(item)
        except Unstorable as exc:
            ex.review_item_id = None
            ex.decision = "denied"
            field = _friendly_field(item, exc.field)
            raise TetherError("unrepresentable_value", f"{field} {exc.why}; it cannot be kept for review exactly "
                                                       "as sent, so nothing was captured",
                              details={"field": field}) from None
        rec = request_record(ex) if record is None else record
        try:
            seq = await gw.journal.write(rec, ("review_insert", row))
        except JournalUnavailable:
            ex.decision = "refused"
            raise TetherError("journal_unavailable") from None
        stored = row.size
    finally:
        svc.settle(agent, size, stored)
    if record is None:
        ex.intent_seq = seq
        ex.authz_event = str(seq)


def _friendly_field(item: dict[str, Any], path: str) -> str:
    """``request.headers[2][1]`` -> ``header 'X-Note'``; other paths as they are."""
    import re

    m = re.fullmatch(r"request\.headers\[(\d+)\](?:\[\d+\])?", path)
    if m:
        try:
            name = item["request"]["headers"][int(m.group(1))][0]
            return f"header {name.encode('utf-8', 'backslashreplace').decode()!r}"
        except (IndexError, KeyError, TypeError):
            pass
    return f"field {path!r}"


async def capture_dry_run(gw: "Runtime", ex: Exchange) -> None:
    """Pipeline stage: answer a dry-run write synthetically. Its review item was committed together with
    its intent record (journal_intent); nothing is forwarded."""
    if ex.mode != "dry_run":
        return
    item, synthetic = ex.extra["capture"]
    headers = {H.DRY_RUN: item["id"], H.REQUEST_ID: ex.request_id, **synthetic.headers}
    if ex.quarantined:
        headers[H.QUARANTINED] = "true"
    body = None
    if synthetic.status != 204:
        body = synthetic.body_bytes()
        headers["Content-Type"] = synthetic.content_type
    ex.status = synthetic.status
    ex.door.answer(ex, synthetic.status, None, headers, body)
    gw.governance.on_captured(ex)


_USAGE_TTL = 5.0  # seconds a per-agent figure read from the store is trusted (other replicas move it)


@dataclass(slots=True)
class _Usage:
    count: int = 0
    bytes: int = 0
    fetched: float = -1e9
    inflight_n: int = 0
    inflight_b: int = 0
    settled_n: int = 0  # captures this process committed, ever (to tell which a store read may have missed)
    settled_b: int = 0

    def over(self, cfg: Any, size: int) -> bool:
        return (self.count + self.inflight_n >= cfg.max_pending_per_agent
                or self.bytes + self.inflight_b + size > cfg.max_pending_bytes_per_agent)


class ReviewService:
    """Deciding review items (admin API and CLI both come here)."""

    def __init__(self, gw: "Runtime") -> None:
        self.gw = gw
        # per agent: pending items and bytes as last read from the store, plus this process's captures
        # committed since, and those still on their way (see admit)
        self._usage: dict[str, _Usage] = {}

    async def admit(self, agent: str, size: int) -> bool:
        """Reserve a place in the agent's share of the queue for a capture of ``size`` body bytes; False
        when it is full (nothing reserved). O(1) in the common case: the store is asked again only when the figures are
        older than ``_USAGE_TTL`` (other replicas capture and decide too) or this capture would reach a
        limit (so a refusal is always decided on fresh figures). Check and reservation happen with no
        await between them, and a read that raced a commit of this process counts it, so concurrent
        captures in this process cannot overshoot."""
        cfg = self.gw.server_cfg.review
        u = self._usage.get(agent)
        if u is None:
            u = self._usage[agent] = _Usage()
        if time.monotonic() - u.fetched > _USAGE_TTL or u.over(cfg, size):
            for _ in range(3):
                n0, b0 = u.settled_n, u.settled_b
                count, used = await self.gw.store.review_usage(agent)
                # a capture committed here while the store was being read may be missing from the read (and
                # is no longer in flight): count it, so the figures never fall short; read again to be exact
                u.count, u.bytes = count + u.settled_n - n0, used + u.settled_b - b0
                if u.settled_n == n0:
                    break
            u.fetched = time.monotonic()
        if u.over(cfg, size):
            return False
        u.inflight_n += 1
        u.inflight_b += size
        return True

    def full_error(self, agent: str) -> TetherError:
        cfg = self.gw.server_cfg.review
        u = self._usage[agent]
        n, b = u.count + u.inflight_n, u.bytes + u.inflight_b
        return TetherError("review_queue_full",
                           f"agent {agent!r} has {n} item(s) ({b} bytes) pending review, at its limit "
                           f"({cfg.max_pending_per_agent} items, {cfg.max_pending_bytes_per_agent} bytes); nothing "
                           "is captured until a reviewer decides some", details={"pending": n, "pending_bytes": b})

    def settle(self, agent: str, size: int, stored: int) -> None:
        """A reserved capture is over: committed (``stored`` bytes now in the store) or not (0)."""
        u = self._usage.get(agent)
        if u is None:
            return
        u.inflight_n -= 1
        u.inflight_b -= size
        if stored:
            u.count += 1
            u.bytes += stored
            u.settled_n += 1
            u.settled_b += stored

    def decided(self, agent: str) -> None:
        """An item left ``pending``: read the agent's figures afresh on its next capture."""
        u = self._usage.get(agent)
        if u is not None:
            u.fetched = -1e9

    async def get(self, item_id: str) -> dict[str, Any]:
        """The whole item; ``request.body_json`` is the stored body parsed (derived, not stored)."""
        item = await self.gw.store.review_get(item_id)
        if item is None:
            raise TetherError("not_found", f"no review item {item_id!r}")
        req = item.get("request")
        if isinstance(req, dict) and "body_json" not in req:
            req["body_json"] = body_json(req)
        return item

    def _not_self(self, item: dict[str, Any], reviewer: Identity) -> None:
        """Separation of duties: neither the agent nor the person it acted for decides the item, nor does
        any identity the rules declare as an agent (an agent's issuer may let it put a reviewer role in
        its own token). Names are compared case-insensitively, and with any ``kind:`` prefix removed
        (``ae:jane@acme.example`` is ``jane@acme.example``): refusing one reviewer too many is safe,
        letting the requester approve is not."""
        mine = _principals(reviewer.agent, reviewer.on_behalf_of)
        if mine & _principals(item["agent"], item.get("on_behalf_of")):
            raise TetherError("self_approval", "a reviewer may not decide items made by their own identity or "
                                               "on their behalf")
        agents = self.gw.state.rules.agents
        if any(name in agents for name in (reviewer.agent, reviewer.on_behalf_of) if name):
            raise TetherError("self_approval", "an identity declared as an agent may not decide review items")

    async def _refuse_if_expired(self, item: dict[str, Any], now: float | None = None) -> None:
        """An item past its TTL is expired now, whether or not the sweep has run yet."""
        now = time.time() if now is None else now
        exp = item.get("expires_at")
        if item["state"] == "expired":
            raise TetherError("review_expired", f"review item {item['id']} expired; it can no longer be decided")
        if item["state"] == "pending" and exp is not None and exp <= now:
            if await self.gw.store.review_transition(item["id"], ("pending",), "expired",
                                                     {"decision": {"action": "expire", "at": now}}):
                self.decided(item["agent"])
                await self._journal(item, "expired")
            raise TetherError("review_expired", f"review item {item['id']} expired at "
                                                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(exp))} "
                                                "(server.review.ttl); it can no longer be decided")

    async def _lost_race(self, item: dict[str, Any]) -> TetherError:
        """Why a compare-and-set from pending failed: decided by someone else, or expired meanwhile."""
        now_item = await self.gw.store.review_get(item["id"])
        if now_item is not None and now_item["state"] == "pending":
            await self._refuse_if_expired(now_item)
        state = now_item["state"] if now_item is not None else "gone"
        if state == "expired":
            return TetherError("review_expired", f"review item {item['id']} expired; it can no longer be decided")
        return TetherError("already_decided", f"review item {item['id']} is no longer pending ({state})")

    async def _transaction_open(self, item: dict[str, Any]) -> None:
        """An item captured inside a transaction is approved only while that transaction is open: once it is
        committed, rolled back or past its deadline, its replay would be a write outside any undo plan."""
        tx_id = item.get("tx")
        if not tx_id:
            return
        tx = await self.gw.store.tx_get(tx_id)
        state = "gone" if tx is None else tx["state"]
        if tx is not None and state == "open" and tx.get("deadline") and tx["deadline"] <= time.time():
            state = "past its deadline"
        if state != "open":
            raise TetherError("transaction_closed",
                              f"review item {item['id']} was captured in transaction {tx_id}, which is {state}: "
                              "its replay could not be undone with the transaction, so it cannot be approved "
                              "(reject it, and let the agent redo the write)")

    async def diff(self, item: dict[str, Any]) -> dict[str, Any]:
        """Field-by-field: the record as it is now (read through the gateway) and what the item would write."""
        gw = self.gw
        up = gw.state.upstreams.get(item["upstream"])
        req = item["request"]
        proposed = body_json(req)
        out: dict[str, Any] = {"item": item["id"], "operation": None, "current": None, "fields": [], "error": None}
        if is_tool_item(item):  # a tool call: its arguments (Tether has no generic read of what a tool changes)
            out["operation"] = "call"
            out["fields"] = [{"field": k, "current": None, "proposed": v, "changed": True}
                             for k, v in (proposed.items() if isinstance(proposed, dict) else ())]
            return out
        if up is None:
            return out
        if not isinstance(proposed, dict):
            proposed = {}  # a delete (no body): the diff shows the record that would go
        from ..normalise import decode_segments

        segments = decode_segments(req["path"])
        found = gw.state.registry.match(up.name, req["method"], segments, req["query"])
        if found is None:
            out["error"] = "the captured call no longer matches a capability"
            return out
        op = Operation(method=req["method"], path=req["path"], query=req["query"], segments=segments, body=proposed,
                       capability=found[0], params=found[1])
        out["operation"] = found[0].operation
        plan = up.adapter.pre_image_request(op)
        if plan is None:
            out["fields"] = [{"field": k, "current": None, "proposed": v, "changed": True} for k, v in proposed.items()]
            return out
        if found[0].operation == "delete":
            out["deletes"] = True
        try:
            status, _, _, current = await call_upstream(gw, up, plan, agent=item["agent"],
                                                        on_behalf_of=item.get("on_behalf_of"),
                                                        intent=f"review of {item['id']}")
        except TetherError as err:
            out["error"] = f"{err.code}: {err.message}"
            return out
        if status >= 400 or not isinstance(current, dict):
            out["error"] = f"reading the current record answered {status}"
            return out
        out["current"] = current
        from ..policy.bodies import flatten
        from ..policy.validation import _lookup

        for path, value in flatten(proposed).items():
            found_now, now_value = _lookup(current, path)
            out["fields"].append({"field": path, "current": now_value if found_now else None, "proposed": value,
                                  "changed": not found_now or now_value != value})
        return out

    async def reject(self, item_id: str, reviewer: Identity, reason: str) -> dict[str, Any]:
        if not reason or not reason.strip():
            raise TetherError("bad_request", "a rejection needs a reason")
        item = await self.get(item_id)
        self._not_self(item, reviewer)
        await self._refuse_if_expired(item)
        decision = {"by": reviewer.agent, "at": time.time(), "reason": reason.strip(), "action": "reject"}
        if not await self.gw.store.review_transition(item_id, ("pending",), "rejected", {"decision": decision},
                                                     unexpired_at=time.time()):
            raise await self._lost_race(item)
        self.decided(item["agent"])
        await self._journal(item, "rejected", reviewer=reviewer.agent, reason=reason.strip())
        self.gw.governance.on_review_decided(item, "rejected")
        return await self.get(item_id)

    async def approve(self, item_id: str, reviewer: Identity, *, edit: Any = None, note: str | None = None) -> dict[str, Any]:
        """Approve and replay. Refused (nothing sent) when: the reviewer is the agent, the person it acted
        for or any declared agent (403 ``self_approval``); the item is not pending (409
        ``already_decided``) or past its TTL (410 ``review_expired``, even before the sweep); its
        transaction is no longer open (409 ``transaction_closed``); or the call — edited or not — fails
        any rule of its capability as the rules stand now, pre-image caps read now (see _recheck)."""
        gw = self.gw
        item = await self.get(item_id)
        self._not_self(item, reviewer)
        await self._refuse_if_expired(item)
        if item["state"] != "pending":
            raise TetherError("already_decided", f"review item {item_id} is {item['state']}")
        if digest_of(item) != item["digest"]:
            raise TetherError("conflict", "the captured request no longer matches its digest; refusing to replay it")
        await self._transaction_open(item)
        outer, ops, kind, edited_body, pre_images = await self._recheck(item, edit)
        undo = await self._plan_undo(item, ops, pre_images) if item.get("tx") else None
        decision: dict[str, Any] = {"by": reviewer.agent, "at": time.time(), "action": "approve",
                                    "edited": edit is not None, "note": note}
        if edit is not None:
            decision["edit_body"] = edit
        if not await gw.store.review_transition(item_id, ("pending",), "approved", {"decision": decision},
                                                unexpired_at=time.time()):
            raise await self._lost_race(item)
        self.decided(item["agent"])
        await self._journal(item, "approved", reviewer=reviewer.agent, edited=edit is not None)
        self.gw.governance.on_review_decided(item, "approved", edited=edit is not None)
        await self.replay(item, reviewer, edited_body, stamp=(outer, ops, kind), undo=undo)
        return await self.get(item_id)

    async def _recheck(self, item: dict[str, Any],
                       edit: Any) -> tuple[Operation, list[Operation], str, bytes | None, dict[int, Any]]:
        """What is replayed is what was checked: the call (the edited body, or the captured one) must pass
        every rule of its capability *as the rules stand now* — it still matches and is granted, its
        headers and query carry no credential, its size is within the limits, and its body passes
        ``allow_fields``, ``forbid_fields``, ``require_fields``, ``constraints`` and the JSON Schema,
        with caps relative to the record (``max_increase_pct``, ...) compared with the record as it is
        *now*, read through the gateway. A failure refuses the approval with the rule's own error."""
        if is_tool_item(item):
            return await recheck_tool(self, item, edit)
        gw = self.gw
        state = gw.state
        registry = state.registry
        req = item["request"]
        up = state.upstreams.get(item["upstream"])
        if up is None:
            raise TetherError("conflict", f"upstream {item['upstream']!r} no longer exists in the rules")
        from ..normalise import decode_segments, parse_query

        segments = decode_segments(req["path"])
        edited_body: bytes | None = None
        body = request_body(req)
        if edit is not None:
            if isinstance(edit, (dict, list)):
                from ..policy.bodies import encode_body

                edited_body = encode_body(edit, req.get("content_type"))
            elif isinstance(edit, str):
                edited_body = edit.encode("utf-8")
            else:
                raise TetherError("bad_request", "an edit is the new body: a JSON object/array or a string")
            body = edited_body or b""
        if req.get("query"):
            names = {k.lower() for k, _ in parse_query(req["query"])}
            for name in up.credential_params:
                if name in names:
                    raise TetherError("conflict", f"query parameter {name!r} is now a credential parameter "
                                                  "(rules changed)")
        kind, parsed = parse_body(body, req.get("content_type"), gw.limits.max_json_depth)
        op = Operation(method=req["method"], path=req["path"], query=req["query"], segments=segments,
                       body=parsed, content_type=req.get("content_type"), raw_body=body)
        if up.adapter.is_composite(op):
            ops = up.adapter.unpack(op) or []
        else:
            ops = [op]
        headers = CIMultiDict((k, v) for k, v in req["headers"])
        pre_images: dict[int, Any] = {}  # id(op) -> the record read for a relative cap (reused for the undo)
        for o in ops:
            found = registry.match(up.name, o.method, o.segments, o.query)
            if found is None:
                raise TetherError("conflict", f"{o.method} {o.path} no longer matches a capability (rules changed)")
            o.capability, o.params = found
            if registry.grant(item["agent"], o.capability.name) is None:
                raise TetherError("conflict", f"capability {o.capability.name!r} is no longer granted to "
                                              f"{item['agent']!r} (rules changed)")
            limit = gw.limits.max_body_bytes
            rules = o.capability.config.body
            if rules is not None and rules.max_bytes is not None:
                limit = min(limit, rules.max_bytes)
            if len(body) > limit:
                raise TetherError("body_too_large", f"the body is {len(body)} bytes; capability "
                                                    f"{o.capability.name!r} accepts at most {limit}")
            try:
                up.adapter.check_request_headers(o, headers)
            except TetherError as err:
                raise TetherError("conflict", f"{err.message} (rules changed)") from None
            v = validator_for(registry, o.capability)
            if v is None:
                continue
            pre_image = None
            if v.needs_pre_image_for(o.body):
                pre_image = pre_images[id(o)] = await self._pre_image(item, up, o)
            v.validate("json" if o.index is not None else kind, o.body, pre_image)
        return op, ops, kind, edited_body, pre_images

    async def _plan_undo(self, item: dict[str, Any], ops: list[Operation],
                         pre_images: dict[int, Any]) -> list[tuple[Operation, Any, str | None]]:
        """An item captured in a transaction replays as a step of it: each write's undo is planned now (from
        the record as it is now), exactly as a live write's would be; a write that cannot be undone is
        refused unless its capability allows it live without compensation (403
        ``non_compensable_in_transaction``)."""
        if is_tool_item(item):
            return await plan_replay_undo(self, item, ops)
        up = self.gw.state.upstreams[item["upstream"]]
        out: list[tuple[Operation, Any, str | None]] = []
        for op in ops:
            cap = op.capability
            if not cap.is_write:
                continue
            plan, reason = None, None
            if cap.config.compensation == "auto":
                try:
                    pre = None
                    if up.adapter.pre_image_request(op) is not None:
                        pre = pre_images[id(op)] if id(op) in pre_images else await self._pre_image(item, up, op)
                    plan = up.adapter.plan_undo(op, pre)
                except NotCompensable as exc:
                    reason = str(exc)
            else:
                reason = f"capability {cap.name} is marked compensation: {cap.config.compensation}"
            if plan is None and not cap.config.allow_live_without_compensation:
                raise TetherError("non_compensable_in_transaction",
                                  f"{cap.name}: {reason}; item {item['id']} belongs to transaction {item['tx']}, "
                                  "and its replay could not be undone with it")
            out.append((op, plan, reason))
        return out

    async def _pre_image(self, item: dict[str, Any], up: Any, op: Operation) -> Any:
        """The record as it is now, for caps relative to it (fail closed: no record, no approval)."""
        plan = up.adapter.pre_image_request(op)
        if plan is None:
            return None  # the cap then refuses: nothing to compare with
        status, _, _, parsed = await call_upstream(self.gw, up, plan, agent=item["agent"],
                                                   on_behalf_of=item.get("on_behalf_of"),
                                                   intent=f"review of {item['id']}")
        if not up.adapter.pre_image_ok(plan, status, parsed):
            raise TetherError("upstream_unavailable",
                              f"reading the current record ({plan.method} {plan.path}) answered {status}; "
                              "the approval's relative caps cannot be checked without it")
        return parsed

    async def replay(self, item: dict[str, Any], reviewer: Identity, edited_body: bytes | None,
                     stamp: tuple[Operation, list[Operation], str] | None = None,
                     undo: list[tuple[Operation, Any, str | None]] | None = None) -> None:
        """Send the approved call upstream, journaled like any forwarded call, with provenance stamped into
        the record as a live write would have it (the replay's own intent record is its event id).

        ``undo``: the item belongs to a transaction: its planned undo steps are committed before the call
        leaves (under the transaction's lock, which a rollback also takes), the transaction is checked
        to be still open, and the steps are armed with the answer — the replay is then a step of the
        transaction like any live write of the agent's, undone by its rollback."""
        if is_tool_item(item):
            await replay_tool(self, item, reviewer, edited_body, undo)
            return
        gw = self.gw
        up = gw.state.upstreams[item["upstream"]]
        req = item["request"]
        body = edited_body if edited_body is not None else request_body(req)
        try:  # the transaction may have closed while the approval was being checked
            await self._transaction_open(item)
        except TetherError as err:
            await gw.store.review_transition(item["id"], ("approved",), "replay_failed", {"replay": {
                "status": None, "error": err.code, "message": err.message, "at": time.time(), "by": reviewer.agent}})
            raise
        rid, intent_rec = replay_intent(gw, item, reviewer, body, edited=edited_body is not None,
                                        method=req["method"], path=req["path"], query=req["query"] or None)
        t0 = time.perf_counter()
        seq = await journal_replay_intent(gw, item, intent_rec)
        headers = {k: v for k, v in req["headers"]}
        content_type = req.get("content_type")
        if stamp is not None and up.record_fields:
            from ..policy.provenance import provenance_values, stamped_body

            outer, ops, kind = stamp
            res = stamped_body(up, outer, ops, composite=up.adapter.is_composite(outer), kind=kind,
                               content_type=content_type,
                               values=provenance_values(item["agent"], item.get("on_behalf_of"), item.get("intent"),
                                                        str(seq)))
            if res is not None:
                body, content_type, _ = res
        planned = PlannedRequest(req.get("wire_method") or req["method"], req["path"], req["query"], body,
                                 content_type, headers)
        replay: dict[str, Any] = {"request_id": rid, "intent_seq": seq, "at": time.time(), "by": reviewer.agent}
        lock = gw.transactions._lock(item["tx"]) if undo else None  # noqa: SLF001 - one lock per transaction
        steps: list[tuple[Operation, dict[str, Any], Any]] = []
        forwarded = False
        status: int | None = None
        rheaders: dict[str, str] = {}
        parsed: Any = None
        if lock is not None:
            await lock.acquire()
        try:
            try:
                if undo:
                    steps = await self._record_steps(item, undo, rid, seq)
                forwarded = True
                status, rheaders, raw, parsed = await call_upstream(
                    gw, up, planned, agent=item["agent"], on_behalf_of=item.get("on_behalf_of"),
                    intent=item.get("intent"), request_id=rid, authz_event=str(seq), reviewer=reviewer.agent, prefix_ok=True)
                failed = up.adapter.is_failure(status, parsed)
                replay.update({"status": status, "headers": rheaders,
                               "body": parsed if parsed is not None else raw[:65536].decode("utf-8", "replace")})
            except TetherError as err:
                failed = True
                replay.update({"status": None, "error": err.code, "message": err.message})
                if not forwarded:
                    replay["forwarded"] = False
            if steps:
                await self._arm_steps(item, up, steps, status, rheaders, parsed, failed, rid)
        finally:
            if lock is not None and lock.locked():
                lock.release()
        await finish_replay(gw, item, reviewer, rid=rid, seq=seq, method=req["method"], path=req["path"],
                            replay=replay, forwarded=forwarded, failed=failed, t0=t0)

    async def _record_steps(self, item: dict[str, Any], undo: list[tuple[Operation, Any, str | None]], rid: str,
                            seq: int) -> list[tuple[Operation, dict[str, Any], Any]]:
        """Commit the replay's undo steps to its transaction (before anything leaves), then make sure the
        transaction did not close meanwhile (else the steps are marked not applied and nothing is sent)."""
        store = self.gw.store
        tx_id = item["tx"]
        existing = len(await store.steps_for(tx_id))
        steps = []
        for n, (op, plan, reason) in enumerate(undo):
            now = time.time()
            step = {"tx_id": tx_id, "state": "planned" if plan is not None else "non_compensable",
                    "created_at": now, "updated_at": now, "order": existing + n + 1, "request_id": rid,
                    "intent_seq": seq, "capability": op.capability.name, "method": op.method, "path": op.path,
                    "op_index": op.index, "plan": plan.to_dict() if plan is not None else None, "reason": reason,
                    "attempts": 0, "intent": item.get("intent"), "review_item": item["id"]}
            step["id"] = await store.step_insert(step)
            steps.append((op, step, plan))
        tx = await store.tx_get(tx_id)
        if tx is None or tx["state"] != "open":
            for _, step, _ in steps:
                await store.step_update(step["id"], {"state": "not_applied",
                                                     "reason": "the transaction closed before the replay was sent"})
            raise TetherError("transaction_closed", f"transaction {tx_id} is {tx['state'] if tx else 'gone'}; "
                                                    "the replay was not sent")
        return steps

    async def _arm_steps(self, item: dict[str, Any], up: Any, steps: list[tuple[Operation, dict[str, Any], Any]],
                         status: int | None, headers: dict[str, str], body: Any, failed: bool, rid: str) -> None:
        """Arm the replay's undo steps with what the upstream answered (as after a live write)."""
        store = self.gw.store
        for op, step, plan in steps:
            if plan is None:
                continue
            if failed:
                state = "not_applied" if status is not None and status >= 400 else "unknown"
                await store.step_update(step["id"], {"state": state, "response_status": status})
                continue
            try:
                armed = up.adapter.arm_undo(plan, op, status or 0, headers, body)
                await store.step_update(step["id"], {"state": "armed", "plan": armed.to_dict(),
                                                     "response_status": status,
                                                     "created_ids": up.adapter.created_ids(op, status or 0, headers,
                                                                                           body)})
            except NotCompensable as exc:
                await store.step_update(step["id"], {"state": "unknown", "reason": str(exc), "response_status": status})
        await self.gw.transactions._journal(  # noqa: SLF001 - the transaction's own record of its steps
            {"id": item["tx"], "agent": item["agent"], "on_behalf_of": item.get("on_behalf_of")}, "steps_recorded",
            request_id=rid, steps=[s["id"] for _, s, _ in steps], failed=failed, review_item=item["id"])

    async def expire_due(self) -> int:
        """Mark pending items past their TTL as expired; returns how many."""
        gw = self.gw
        n = 0
        now = time.time()
        # oldest expiry first: review_list (newest first, limit 1000) never reached the oldest items of a
        # queue longer than 1000
        for item in await gw.store.review_due(now, limit=1000):
            if await gw.store.review_transition(item["id"], ("pending",), "expired",
                                                {"decision": {"action": "expire", "at": now}}):
                self.decided(item["agent"])
                await self._journal(item, "expired")
                n += 1
        return n

    async def _journal(self, item: dict[str, Any], event: str, **fields: Any) -> None:
        rec = base_record("review", request_id=item.get("request_id"), agent=item["agent"],
                          on_behalf_of=item.get("on_behalf_of"), intent=item.get("intent"),
                          capability=item["capability"], upstream=item["upstream"],
                          method=item["request"]["method"], path=item["request"]["path"], decision=event)
        rec.update({"review_item": item["id"], "event": event, **fields})
        await self.gw.journal.write(rec)

    async def sweep_loop(self, interval: float = 30.0) -> None:
        while True:
            try:
                if await self.gw.store.try_lease("review-expiry", self.gw.instance_id, interval * 2):
                    await self.expire_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.error("review expiry sweep failed: %s", exc)
            await asyncio.sleep(interval)
