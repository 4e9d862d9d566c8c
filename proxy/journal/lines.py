"""Journal records as one human line each (``tether journal tail``, ``tether demo``).

``#42 | 2026-11-25T10:00:00.123456Z | agent=renewal-bot | on_behalf_of=ae:jane@acme.example |
intent="renew Acme Corp" | capability=opportunity.update | action=PATCH /opportunities/42 | decision=live``

Fields are separated by `` | ``. Every value is made inert (:mod:`proxy.inert`) and a value that holds
the separator or a quote is quoted, so an agent's intent such as ``x | decision=live`` stays one field
(``intent="x | decision=live"``) and cannot forge another. Records that are not a request or its outcome
name their event: ``event=system:started``, ``event=review:approved``, ``event=tx:rolled_back``.
"""

from __future__ import annotations

from typing import Any

from ..inert import SEPARATOR, field_value

_AFTER_ACTION = (("decision", "decision"), ("reason", "reason"), ("status", "status"), ("error", "error"),
                 ("latency_ms", "latency_ms"), ("tx", "tx"), ("reviewer", "reviewer"), ("review_item", "item"),
                 ("request_id", "request_id"))
# fields of system / governance / alert records worth a glance (the JSON form has everything)
_EVENT_EXTRAS = (("alert", "alert"), ("file", "file"), ("source", "source"), ("rules_version", "rules_version"),
                 ("from", "from"), ("to", "to"), ("instance", "instance"))


def event_name(rec: dict[str, Any]) -> str | None:
    """``system:started``, ``review:approved``, ``tx:rolled_back``; None for requests and outcomes."""
    kind = rec.get("kind")
    if kind in ("request", "outcome"):
        return None
    name = rec.get("event") or rec.get("decision")
    return f"{kind}:{name}" if name else str(kind)


def human_line(seq: int, rec: dict[str, Any]) -> str:
    parts = [f"#{seq}", field_value(rec.get("ts", ""))]
    ev = event_name(rec)
    if ev is not None:
        parts.append(f"event={field_value(ev)}")
    if rec.get("agent") is not None or rec.get("on_behalf_of") is not None or ev is None:
        parts.append(f"agent={field_value(rec.get('agent') or '-')}")
        parts.append(f"on_behalf_of={field_value(rec.get('on_behalf_of') or '-')}")
    if rec.get("intent") is not None:
        parts.append(f"intent={field_value(rec['intent'], always_quote=True)}")
    if rec.get("capability"):
        parts.append(f"capability={field_value(rec['capability'])}")
    if rec.get("method"):
        parts.append(f"action={field_value(str(rec['method']) + ' ' + str(rec.get('path') or ''))}")
    for field, label in _AFTER_ACTION:
        value = rec.get(field)
        if value in (None, ""):
            continue
        if field == "decision" and ev is not None and ev.endswith(":" + str(value)):
            continue  # already said by event=
        parts.append(f"{label}={field_value(value)}")
    if ev is not None:
        for field, label in _EVENT_EXTRAS:
            if rec.get(field) not in (None, ""):
                parts.append(f"{label}={field_value(rec[field])}")
    return SEPARATOR.join(parts)
