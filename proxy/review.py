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
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from adapters.base import Operation, PlannedRequest, SyntheticResponse

from . import headers as H
from .bodies import parse_body
from .errors import TetherError
from .exchange import Exchange, new_request_id
from .identity import Identity
from .journal import JournalUnavailable, base_record
from .upstream_calls import call_upstream
from .validation import validator_for

if TYPE_CHECKING:
    from .gateway import Gateway

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
    drop = _NOT_CAPTURED | up.credential_headers
    headers = [[k, v] for k, v in ex.request.headers.items()
               if k.lower() not in drop and not H.is_tether_header(k)]
    body = ex.body or b""
    req: dict[str, Any] = {
        "method": ex.method,
        "wire_method": ex.extra.get("wire_method", ex.method),
        "path": ex.raw_path,
        "query": ex.query,
        "headers": headers,
        "content_type": ex.request.headers.get("Content-Type"),
    }
    try:
        req["body_text"] = body.decode("utf-8")
    except UnicodeDecodeError:
        req["body_b64"] = base64.b64encode(body).decode()
    if ex.operations and ex.operations[0].body is not None:
        req["body_json"] = ex.operations[0].body if not ex.composite else None
    return req


def request_body(req: dict[str, Any]) -> bytes:
    if "body_b64" in req:
        return base64.b64decode(req["body_b64"])
    return (req.get("body_text") or "").encode("utf-8")


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
    return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()


def synthetic_for(ex: Exchange, item_id: str) -> SyntheticResponse:
    up = ex.upstream
    assert up is not None
    if ex.composite:
        return up.adapter.synthetic_composite(ex.extra["composite_outer"], ex.operations, item_id)
    return up.adapter.synthetic_response(ex.operations[0], item_id)


def prepare_capture(gw: "Gateway", ex: Exchange) -> dict[str, Any]:
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
        "intent": ex.intent,
        "capability": ex.capability.name if ex.capability is not None else "composite",
        "capabilities": [op.capability.name for op in ex.operations],
        "upstream": up.name,
        "request_id": ex.request_id,
        "tx": ex.transaction_id,
        "trace_id": ex.extra.get("trace_id"),
        "rules_version": ex.registry.version,
        "request": captured_request(ex),
        "synthetic": {"status": synthetic.status, "headers": synthetic.headers,
                      "body": synthetic.body if not isinstance(synthetic.body, bytes) else None},
        "canary": ex.extra.get("canary"),
        "quarantined": ex.quarantined,
    }
    item["digest"] = digest_of(item)
    ex.extra["capture"] = (item, synthetic)
    return item


async def capture_dry_run(gw: "Gateway", ex: Exchange) -> None:
    """Pipeline stage: answer a dry-run write synthetically. Its review item was committed together with
    its intent record (journal_intent); nothing is forwarded."""
    if ex.mode != "dry_run":
        return
    item, synthetic = ex.extra["capture"]
    headers = {H.DRY_RUN: item["id"], H.REQUEST_ID: ex.request_id, **synthetic.headers}
    if ex.quarantined:
        headers[H.QUARANTINED] = "true"
    resp = web.Response(status=synthetic.status, body=synthetic.body_bytes() if synthetic.status != 204 else None,
                        headers=headers, content_type=synthetic.content_type if synthetic.status != 204 else None)
    ex.status = synthetic.status
    ex.response = resp
    gw.governance.on_captured(ex)


class ReviewService:
    """Deciding review items (admin API and CLI both come here)."""

    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw

    async def get(self, item_id: str) -> dict[str, Any]:
        item = await self.gw.store.review_get(item_id)
        if item is None:
            raise TetherError("not_found", f"no review item {item_id!r}")
        return item

    def _not_self(self, item: dict[str, Any], reviewer: Identity) -> None:
        if reviewer.agent == item["agent"] or (reviewer.on_behalf_of is not None and reviewer.on_behalf_of == item["agent"]):
            raise TetherError("self_approval", "a reviewer may not decide items made by their own identity")

    async def diff(self, item: dict[str, Any]) -> dict[str, Any]:
        """Field-by-field: the record as it is now (read through the gateway) and what the item would write."""
        gw = self.gw
        up = gw.state.upstreams.get(item["upstream"])
        req = item["request"]
        proposed = req.get("body_json")
        out: dict[str, Any] = {"item": item["id"], "operation": None, "current": None, "fields": [], "error": None}
        if up is None:
            return out
        if not isinstance(proposed, dict):
            proposed = {}  # a delete (no body): the diff shows the record that would go
        from .normalise import decode_segments

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
        from .bodies import flatten
        from .validation import _lookup

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
        decision = {"by": reviewer.agent, "at": time.time(), "reason": reason.strip(), "action": "reject"}
        if not await self.gw.store.review_transition(item_id, ("pending",), "rejected", {"decision": decision}):
            raise TetherError("already_decided", f"review item {item_id} is no longer pending")
        await self._journal(item, "rejected", reviewer=reviewer.agent, reason=reason.strip())
        self.gw.governance.on_review_decided(item, "rejected")
        return await self.get(item_id)

    async def approve(self, item_id: str, reviewer: Identity, *, edit: Any = None, note: str | None = None) -> dict[str, Any]:
        gw = self.gw
        item = await self.get(item_id)
        self._not_self(item, reviewer)
        if item["state"] != "pending":
            raise TetherError("already_decided", f"review item {item_id} is {item['state']}")
        if digest_of(item) != item["digest"]:
            raise TetherError("conflict", "the captured request no longer matches its digest; refusing to replay it")
        outer, ops, kind, edited_body = self._recheck(item, edit)
        decision: dict[str, Any] = {"by": reviewer.agent, "at": time.time(), "action": "approve",
                                    "edited": edit is not None, "note": note}
        if edit is not None:
            decision["edit_body"] = edit
        if not await gw.store.review_transition(item_id, ("pending",), "approved", {"decision": decision}):
            raise TetherError("already_decided", f"review item {item_id} is no longer pending")
        await self._journal(item, "approved", reviewer=reviewer.agent, edited=edit is not None)
        self.gw.governance.on_review_decided(item, "approved", edited=edit is not None)
        await self.replay(item, reviewer, edited_body, stamp=(outer, ops, kind))
        return await self.get(item_id)

    def _recheck(self, item: dict[str, Any], edit: Any) -> tuple[Operation, list[Operation], str, bytes | None]:
        """Against the rules in force now: the call must still match, be granted and validate."""
        gw = self.gw
        state = gw.state
        registry = state.registry
        req = item["request"]
        up = state.upstreams.get(item["upstream"])
        if up is None:
            raise TetherError("conflict", f"upstream {item['upstream']!r} no longer exists in the rules")
        from .normalise import decode_segments

        segments = decode_segments(req["path"])
        edited_body: bytes | None = None
        body = request_body(req)
        if edit is not None:
            if isinstance(edit, (dict, list)):
                from .upstream_calls import encode_body

                edited_body = encode_body(edit, req.get("content_type"))
            elif isinstance(edit, str):
                edited_body = edit.encode("utf-8")
            else:
                raise TetherError("bad_request", "an edit is the new body: a JSON object/array or a string")
            body = edited_body or b""
        kind, parsed = parse_body(body, req.get("content_type"), gw.limits.max_json_depth)
        op = Operation(method=req["method"], path=req["path"], query=req["query"], segments=segments,
                       body=parsed, content_type=req.get("content_type"), raw_body=body)
        if up.adapter.is_composite(op):
            ops = up.adapter.unpack(op) or []
        else:
            ops = [op]
        for o in ops:
            found = registry.match(up.name, o.method, o.segments, o.query)
            if found is None:
                raise TetherError("conflict", f"{o.method} {o.path} no longer matches a capability (rules changed)")
            o.capability, o.params = found
            if registry.grant(item["agent"], o.capability.name) is None:
                raise TetherError("conflict", f"capability {o.capability.name!r} is no longer granted to "
                                              f"{item['agent']!r} (rules changed)")
            try:
                up.adapter.check_request_headers(o, CIMultiDict((k, v) for k, v in req["headers"]))
            except TetherError as err:
                raise TetherError("conflict", f"{err.message} (rules changed)") from None
            v = validator_for(registry, o.capability)
            if v is not None and not v.needs_pre_image_for(o.body):
                v.validate("json" if o.index is not None else kind, o.body)
        return op, ops, kind, edited_body

    async def replay(self, item: dict[str, Any], reviewer: Identity, edited_body: bytes | None,
                     stamp: tuple[Operation, list[Operation], str] | None = None) -> None:
        """Send the approved call upstream, journaled like any forwarded call, with provenance stamped into
        the record as a live write would have it (the replay's own intent record is its event id)."""
        gw = self.gw
        up = gw.state.upstreams[item["upstream"]]
        req = item["request"]
        body = edited_body if edited_body is not None else request_body(req)
        rid = new_request_id()
        intent_rec = base_record(
            "request", request_id=rid, agent=item["agent"], on_behalf_of=item.get("on_behalf_of"),
            intent=item.get("intent"), capability=item["capability"], upstream=item["upstream"],
            method=req["method"], path=req["path"], decision="replay", reason="approved")
        intent_rec.update({"reviewer": reviewer.agent, "review_item": item["id"], "query": req["query"] or None,
                           "body_sha256": hashlib.sha256(body).hexdigest() if body else None,
                           "edited": edited_body is not None, "rules_version": gw.state.registry.version,
                           "tx": item.get("tx")})
        t0 = time.perf_counter()
        try:
            seq = await gw.journal.write(intent_rec)
        except JournalUnavailable:
            await gw.store.review_transition(item["id"], ("approved",), "approved",
                                             {"replay": {"error": "journal_unavailable", "at": time.time()}})
            raise TetherError("journal_unavailable", "the replay was not sent: the journal is unavailable; "
                                                    "the item stays approved and can be replayed again") from None
        headers = {k: v for k, v in req["headers"]}
        content_type = req.get("content_type")
        if stamp is not None and up.record_fields:
            from .provenance import provenance_values, stamped_body

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
        try:
            status, rheaders, raw, parsed = await call_upstream(
                gw, up, planned, agent=item["agent"], on_behalf_of=item.get("on_behalf_of"), intent=item.get("intent"),
                request_id=rid, authz_event=str(seq), reviewer=reviewer.agent, prefix_ok=True)
            failed = up.adapter.is_failure(status, parsed)
            replay.update({"status": status, "headers": rheaders,
                           "body": parsed if parsed is not None else raw[:65536].decode("utf-8", "replace")})
        except TetherError as err:
            failed = True
            status = err.status
            replay.update({"status": None, "error": err.code, "message": err.message})
        replay["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        new_state = "replay_failed" if failed else "replayed"
        await gw.store.review_transition(item["id"], ("approved",), new_state, {"replay": replay})
        out = base_record("outcome", request_id=rid, agent=item["agent"], on_behalf_of=item.get("on_behalf_of"),
                          capability=item["capability"], upstream=item["upstream"], method=req["method"],
                          path=req["path"], decision="replay", reason=new_state)
        out.update({"status": replay.get("status"), "intent_seq": seq, "review_item": item["id"], "forwarded": True,
                    "reviewer": reviewer.agent, "latency_ms": replay["latency_ms"], "error": replay.get("error")})
        gw.journal.submit(out)
        if failed:
            gw.governance.on_review_decided(item, "replay_failed")

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
