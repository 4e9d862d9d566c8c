"""What every replay of an approved review item journals and stores, REST or MCP tool alike.

A replay is a new request on the agent's behalf, made by a reviewer: its intent record must be durable
before anything is sent (else the item stays ``approved`` and can be replayed again), and its end moves the
item to ``replayed`` / ``replay_failed`` and journals the outcome. :mod:`.review` (REST items) and
:mod:`.tool_review` (tool items) differ only in how the call is made, so both build their records here —
one place decides what an auditor sees of a replay.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ..core.exchange import new_request_id
from ..errors import TetherError
from ..journal.writer import JournalUnavailable, base_record
from ..policy.identity import Identity


def replay_intent(gw: Any, item: dict[str, Any], reviewer: Identity, body: bytes | None, *, edited: bool,
                  method: str, path: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    """A fresh request id and the replay's intent record (the body as a digest, never in full)."""
    rid = new_request_id()
    rec = base_record(
        "request", request_id=rid, agent=item["agent"], on_behalf_of=item.get("on_behalf_of"),
        intent=item.get("intent"), capability=item["capability"], upstream=item["upstream"],
        method=method, path=path, decision="replay", reason="approved")
    rec.update({"reviewer": reviewer.agent, "review_item": item["id"], **extra,
                "body_sha256": hashlib.sha256(body).hexdigest() if body else None,
                "edited": edited, "rules_version": gw.state.registry.version, "tx": item.get("tx"),
                "on_behalf_of_proof": item.get("on_behalf_of_proof")})  # as captured: verified / asserted
    return rid, rec


async def journal_replay_intent(gw: Any, item: dict[str, Any], rec: dict[str, Any]) -> int:
    """Make the intent durable; when it cannot be, nothing is sent and the item stays approved."""
    try:
        return await gw.journal.write(rec)
    except JournalUnavailable:
        await gw.store.review_transition(item["id"], ("approved",), "approved",
                                         {"replay": {"error": "journal_unavailable", "at": time.time()}})
        raise TetherError("journal_unavailable", "the replay was not sent: the journal is unavailable; the item "
                                                 "stays approved and can be replayed again") from None


async def finish_replay(gw: Any, item: dict[str, Any], reviewer: Identity, *, rid: str, seq: int, method: str,
                        path: str, replay: dict[str, Any], forwarded: bool, failed: bool, t0: float,
                        **outcome_extra: Any) -> None:
    """Store the replay on the item, journal its outcome, tell governance of a failure, and raise the
    replay's error when nothing was sent (the reviewer must hear that the approval did nothing)."""
    replay["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    new_state = "replay_failed" if failed else "replayed"
    await gw.store.review_transition(item["id"], ("approved",), new_state, {"replay": replay})
    out = base_record("outcome", request_id=rid, agent=item["agent"], on_behalf_of=item.get("on_behalf_of"),
                      capability=item["capability"], upstream=item["upstream"], method=method, path=path,
                      decision="replay", reason=new_state)
    out.update({"status": replay.get("status"), "intent_seq": seq, "review_item": item["id"], "forwarded": forwarded,
                "reviewer": reviewer.agent, "latency_ms": replay["latency_ms"], "error": replay.get("error"),
                **outcome_extra})
    gw.journal.submit(out)
    if failed:
        gw.governance.on_review_decided(item, "replay_failed")
    if not forwarded:
        raise TetherError(replay["error"], replay["message"])
