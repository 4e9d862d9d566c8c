"""Identity as Context in the record itself: stamping provenance fields into the written body.

Where the rules ask for it (``upstreams.<name>.provenance.record_fields``, e.g. Salesforce custom fields
``Agent_Id__c``, HubSpot properties, Stripe ``metadata[...]``), the adapter places the agent, the
on-behalf-of user, the intent and the authorisation event id into the body of creates and updates —
into every record of a composite/batch request too — so the system of record itself says who did what,
for whom and why. Approved dry-run replays are stamped the same way (with the replay's own event id).

Stamping happens in the ``stamp_provenance`` stage, after the intent is journaled (its sequence number
is the authorisation event id) and *before* the undo plan is made, so that a rollback restores the
provenance fields too. The body is re-encoded in its own content type; the journal keeps the digest of
the body the agent sent.
"""

from __future__ import annotations

from typing import Any

import orjson

from adapters.base import Operation

from .bodies import encode_form, media_type


def provenance_values(agent: str, on_behalf_of: str | None, intent: str | None, authz_event: str | None) -> dict[str, str]:
    return {
        "agent": agent,
        "on_behalf_of": on_behalf_of or agent,
        "intent": (intent or "")[:255],
        "authz_event": authz_event or "",
    }


def stamped_body(up: Any, outer: Operation, ops: list[Operation], *, composite: bool, kind: str | None,
                 content_type: str | None, values: dict[str, str]) -> tuple[bytes, str, Any] | None:
    """(new body bytes, content type, new parsed body), or None to send the body unchanged. ``up`` is the
    upstream's runtime (:class:`proxy.core.rules.UpstreamRuntime`: its adapter and ``record_fields``)."""
    if not up.record_fields:
        return None
    fields = {field: values[key] for key, field in up.record_fields.items()}
    ctype = content_type or "application/json"
    if composite:
        if kind != "json":
            return None
        new = up.adapter.stamp_composite(outer, ops, fields)
    else:
        op = ops[0]
        if op.capability is None or op.capability.operation not in ("create", "update", "upsert"):
            return None
        if kind not in ("json", "form") or not isinstance(op.body, dict):
            return None
        new = up.adapter.stamp_provenance(op, fields)
    if new is None:
        return None
    if kind == "form" or media_type(ctype) == "application/x-www-form-urlencoded":
        return encode_form(new).encode("ascii"), ctype, new
    return orjson.dumps(new), ctype, new
