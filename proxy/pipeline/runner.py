"""The request pipeline: a fixed sequence of small named stages.

Each stage has one job, reads what earlier stages put on the :class:`~proxy.core.exchange.Exchange`, and
either passes, answers (sets ``ex.response``: a dry-run capture, for instance) or raises a
:class:`~proxy.errors.TetherError`, which the runner turns into a JSON error. The runner also makes sure
that *every* request that reached the pipeline leaves a journal record — a denial as one record, a
request that passed the intent stage as an intent record (durable before forwarding) plus an outcome.

The stage list is built once at startup; :data:`STAGE_NAMES` documents the order.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from ..core.exchange import Exchange
from ..doors.responses import error_response
from ..errors import TetherError
from ..journal.writer import REDACTED, JournalUnavailable, now_iso
from ..policy.validation import _lookup, _path_matches

if TYPE_CHECKING:
    from ..core.runtime import Runtime

log = logging.getLogger("tether.pipeline")

Stage = Callable[["Runtime", Exchange], "Awaitable[None] | None"]


class Pipeline:
    def __init__(self, gw: "Runtime", stages: list[tuple[str, Stage]]) -> None:
        self.gw = gw
        self.stages = [(name, fn, inspect.iscoroutinefunction(fn)) for name, fn in stages]
        self.names = [name for name, _ in stages]

    async def run(self, ex: Exchange) -> web.StreamResponse:
        gw = self.gw
        stage_name = "?"
        try:
            for stage_name, fn, is_async in self.stages:
                if is_async:
                    await fn(gw, ex)
                else:
                    fn(gw, ex)
                if ex.response is not None:
                    break
        except TetherError as err:
            ex.error = err
            if ex.decision is None:
                ex.decision = "denied"
            ex.reason = err.code
            ex.response = error_response(err, ex.request_id)
        except asyncio.CancelledError:
            # the client went away; still account for the request
            ex.error = TetherError("client_closed")
            ex.decision = ex.decision or "error"
            ex.reason = "client_closed"
            await self._finish(ex, stage_name)
            raise
        except Exception:  # noqa: BLE001 - never leak a traceback to the agent
            log.exception("unexpected error in stage %s (request %s)", stage_name, ex.request_id)
            err = TetherError("internal_error")
            ex.error = err
            ex.decision = ex.decision or "error"
            ex.reason = f"internal_error:{stage_name}"
            ex.response = error_response(err, ex.request_id)
        resp = await self._finish(ex, stage_name)
        return resp

    async def _finish(self, ex: Exchange, stage_name: str) -> web.StreamResponse:
        """Journal what happened and count it. A request refused before the intent stage leaves one
        record (awaited: a denial is evidence too); one that passed it leaves an outcome record."""
        gw = self.gw
        for cleanup in ex.extra.pop("cleanup", ()):
            cleanup()
        resp = ex.response
        if ex.status is None and resp is not None:
            ex.status = resp.status
        try:
            if ex.intent_seq is None:
                rec = request_record(ex)
                rec["stage"] = stage_name
                try:
                    await gw.journal.write(rec)
                except JournalUnavailable:
                    log.error("could not journal the denial of request %s", ex.request_id)
            else:
                gw.journal.submit(outcome_record(ex))
        finally:
            gw.observe(ex)
        assert resp is not None
        return resp


def body_digest(body: bytes | None) -> str | None:
    return hashlib.sha256(body).hexdigest() if body else None


def request_record(ex: Exchange) -> dict[str, Any]:
    """The intent (or denial) record of a request, fixed schema."""
    ident = ex.identity
    ops = ex.operations
    body = ex.body
    # one literal (the fixed schema of base_record, plus the request's own fields): built per request
    rec: dict[str, Any] = {
        "ts": now_iso(), "kind": "request", "request_id": ex.request_id,
        "agent": ident.agent if ident else None,
        "on_behalf_of": ident.on_behalf_of if ident else None,
        "on_behalf_of_proof": ident.on_behalf_of_proof if ident else None,  # verified / asserted
        "intent": ex.intent,
        "capability": ex.capability.name if ex.capability is not None else None,
        "upstream": ex.upstream.name if ex.upstream is not None else None,
        "method": ex.method, "path": ex.raw_path, "decision": ex.decision, "reason": ex.reason,
        "query": ex.query or None, "body_sha256": ex.body_digest,
        "body_bytes": len(body) if body is not None else None,
        "tx": ex.transaction_id, "trace_id": trace_id(ex.traceparent), "rules_version": ex.registry.version,
    }
    if ex.audit is None:
        collect_audit(ex)
    if ex.audit:
        rec["audit"] = ex.audit
    if ex.redacted:
        rec["redacted"] = ex.redacted
    if ex.composite:
        rec["operations"] = [
            {"index": op.index, "method": op.method, "path": op.path,
             "capability": op.capability.name if op.capability is not None else None}
            for op in ops
        ]
    if ex.error is not None:
        rec["error"] = ex.error.code
        rec["status"] = ex.error.status
        rec["message"] = ex.error.message
    if ex.review_item_id:
        rec["review_item"] = ex.review_item_id
    if ex.quarantined:
        rec["quarantined"] = True
    return rec


def collect_audit(ex: Exchange) -> None:
    """Copy the fields capabilities mark ``audit_fields`` into the record; ``sensitive_fields`` are
    replaced by a marker and listed in ``redacted`` (the body itself is kept only as a digest)."""
    if not any(op.capability is not None and op.capability.config.audit_fields for op in ex.operations):
        ex.audit = {}
        return
    audit: dict[str, Any] = {}
    redacted: list[str] = []
    for op in ex.operations:
        cap = op.capability
        if cap is None or op.body is None:
            continue
        cfg = cap.config
        prefix = f"[{op.index}]." if op.index is not None else ""
        for field in cfg.audit_fields:
            found, value = _lookup(op.body, field)
            if not found:
                continue
            if any(_path_matches(field, s) for s in cfg.sensitive_fields):
                audit[prefix + field] = REDACTED
                redacted.append(prefix + field)
            else:
                audit[prefix + field] = value
    ex.audit = audit
    if redacted:
        ex.redacted = redacted


def outcome_record(ex: Exchange) -> dict[str, Any]:
    ident = ex.identity
    rec: dict[str, Any] = {
        "ts": now_iso(), "kind": "outcome", "request_id": ex.request_id,
        "agent": ident.agent if ident else None,
        "on_behalf_of": ident.on_behalf_of if ident else None,
        "on_behalf_of_proof": ident.on_behalf_of_proof if ident else None,  # verified / asserted
        "intent": None,
        "capability": ex.capability.name if ex.capability is not None else None,
        "upstream": ex.upstream.name if ex.upstream is not None else None,
        "method": ex.method, "path": ex.raw_path, "decision": ex.decision, "reason": ex.reason,
        "intent_seq": ex.intent_seq, "status": ex.status, "latency_ms": round(ex.elapsed_ms(), 3),
        "upstream_latency_ms": ex.upstream_latency_ms, "forwarded": ex.forwarded, "tx": ex.transaction_id,
    }
    if ex.upstream_ids:
        rec["upstream_ids"] = ex.upstream_ids
    if ex.review_item_id:
        rec["review_item"] = ex.review_item_id
    if ex.error is not None:
        rec["error"] = ex.error.code
        rec["message"] = ex.error.message
    if ex.extra.get("outcome"):
        rec.update(ex.extra["outcome"])
    return rec


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (``00-<trace>-<span>-<flags>``), if well formed."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) >= 4 and len(parts[1]) == 32:
        return parts[1]
    return None


def elapsed_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)
