"""Identity as Context in the record itself: stamping provenance fields into the written body.

Where the rules ask for it (``upstreams.<name>.provenance.record_fields``, e.g. Salesforce custom fields
``Agent_Id__c``, HubSpot properties, Stripe ``metadata[...]``), the adapter places the agent, the
on-behalf-of user, the intent and the authorisation event id into the body of creates and updates,
so the system of record itself says who did what, for whom and why. The body is re-encoded in its own
content type; the journal keeps the digest of the body the agent sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from .bodies import media_type

if TYPE_CHECKING:
    from .exchange import Exchange
    from .gateway import UpstreamRuntime


def provenance_values(ex: "Exchange") -> dict[str, str]:
    ident = ex.identity
    assert ident is not None
    return {
        "agent": ident.agent,
        "on_behalf_of": ident.on_behalf_of or ident.agent,
        "intent": (ex.intent or "")[:255],
        "authz_event": ex.authz_event or "",
    }


def stamp(up: "UpstreamRuntime", ex: "Exchange") -> tuple[bytes, str] | None:
    """(new body, content type) with provenance fields added, or None to send the body unchanged."""
    op = ex.operations[0]
    if op.capability is None or op.capability.operation not in ("create", "update", "upsert"):
        return None
    kind = ex.extra.get("body_kind")
    if kind not in ("json", "form") or not isinstance(op.body, dict):
        return None
    values = provenance_values(ex)
    fields = {field: values[key] for key, field in up.record_fields.items()}
    new_body = up.adapter.stamp_provenance(op, fields)
    if new_body is None:
        return None
    ctype = ex.request.headers.get("Content-Type") or "application/json"
    if kind == "form" or media_type(ctype) == "application/x-www-form-urlencoded":
        from .upstream_calls import encode_form

        return encode_form(new_body).encode("ascii"), ctype
    return orjson.dumps(new_body), ctype
