"""The journal records of a request: the intent (or denial) record and the outcome record, fixed schema.

Built from the :class:`~proxy.core.exchange.Exchange` by the pipeline runner and by the services that
journal on a request's behalf (a dry-run capture commits its review item with the request's record).
Audit fields are copied from the body as capabilities mark them (``audit_fields``), sensitive ones
replaced by a marker and listed in ``redacted`` — the body itself is kept only as a digest.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ..journal.writer import REDACTED, now_iso
from ..policy.validation import _lookup, _path_matches
from .exchange import Exchange


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
    if ex.mcp is not None:  # the door it came by, when not REST: channel, tool, JSON-RPC id, session, client
        rec["channel"] = ex.channel
        rec["mcp"] = ex.mcp
    # the outcome is stored referring to this record (proxy.compact): it must not change once written
    ex.intent_record = rec
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
    """The outcome record, whole (fixed schema): the journal stores it without what it shares with the
    intent record ``ex.intent_record`` (see ``JournalWriter.submit``), and readers get it back whole."""
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
    if ex.mcp is not None:
        rec["channel"] = ex.channel
        rec["mcp"] = ex.mcp
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
