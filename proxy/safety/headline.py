"""One plain-language line per review item, for the people who decide it.

    renewal-bot, for jane@acme.example (AE), wants to change Opportunity 'Acme renewal 2027':
    stage negotiation → proposal — because: renew Acme Corp

The adapter names the action and the record (:meth:`adapters.base.Adapter.describe`, from the record as
Tether read it and the captured body; the generic adapter from the capability's ``display`` config);
this module adds who, the fields that change (from → to when the current record is known) and why.
The same headline is shown by ``tether review list/show``, the console, alerts and the Slack message.

:func:`headline_for` needs no I/O: it is computed on the fly for any item (the body alone names what it
can); the review notifier (:mod:`proxy.doors.admin.review_notify`) reads the current record once per new item and
stores the complete headline on the item (``item["headline"]``), which then wins.

The text is data, not markup: every view makes it inert (:mod:`proxy.inert`) as it shows it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from adapters.base import Adapter, Description, Operation, humanise

if TYPE_CHECKING:
    from ..core.runtime import Runtime

MAX_FIELDS = 3
MAX_VALUE = 60
_ROLE = re.compile(r"([A-Za-z][A-Za-z0-9_-]{0,15}):(.+)")


def person(subject: str | None) -> str | None:
    """``ae:jane@acme.example`` -> ``jane@acme.example (AE)``; other subjects as they are."""
    if not subject:
        return None
    m = _ROLE.fullmatch(subject)
    if m and "/" not in m.group(1):
        return f"{m.group(2)} ({m.group(1).upper()})"
    return subject


def show_value(v: Any) -> str:
    if v is None:
        return "(empty)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        text = v if v.strip() else repr(v)
    else:
        import orjson

        text = orjson.dumps(v).decode()
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _flatten(body: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(body, dict):
        for k, v in body.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(_flatten(v, key + "."))
            else:
                out[key] = v
    return out


def _lookup(record: Any, path: str) -> tuple[bool, Any]:
    node = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


REDACTED = "[redacted]"


def changes(adapter: Adapter, op: Operation, record: Any) -> list[dict[str, Any]]:
    """The fields the operation writes: ``{field, label, from, to, known}`` (``known``: the current value
    was read); unchanged fields are left out when the current record is known. A capability's
    ``sensitive_fields`` are shown as ``[redacted]``: headlines travel to Slack and to alert webhooks."""
    from ..policy.validation import _path_matches

    sensitive = list(getattr(getattr(op.capability, "config", None), "sensitive_fields", None) or [])
    out = []
    for path, value in _flatten(op.body).items():
        found, now = _lookup(record, path) if isinstance(record, dict) else (False, None)
        if found and now == value:
            continue
        hidden = any(_path_matches(path, rule) for rule in sensitive)
        out.append({"field": path, "label": adapter.field_label(path),
                    "from": (REDACTED if hidden else now) if found else None,
                    "to": REDACTED if hidden else value, "known": found})
    return out


def _record_words(d: Description) -> str:
    if d.name:
        return f"{d.kind} '{d.name}'" if not d.name.startswith("#") else f"{d.kind} {d.name}"
    if d.record_id:
        return f"{d.kind} {d.record_id}"
    return d.kind if d.action in ("create", "create or change") else f"a {d.kind}" if d.kind[:1].islower() else d.kind


def _fields_words(op_kind: str, fields: list[dict[str, Any]], name: str | None = None) -> str:
    if op_kind == "create" and name:
        fields = [f for f in fields if str(f["to"]) != name]  # already said: create contact 'Bo'
    if not fields:
        return ""
    shown = []
    for f in fields[:MAX_FIELDS]:
        if op_kind in ("create",) or (not f["known"] and op_kind not in ("update", "upsert")):
            shown.append(f"{f['label']} {show_value(f['to'])}")
        elif f["known"]:
            shown.append(f"{f['label']} {show_value(f['from'])} → {show_value(f['to'])}")
        else:
            shown.append(f"{f['label']} → {show_value(f['to'])}")
    more = len(fields) - MAX_FIELDS
    return ", ".join(shown) + (f" and {more} more field{'s' if more > 1 else ''}" if more > 0 else "")


def compose(agent: str, on_behalf_of: str | None, intent: str | None, parts: list[tuple[Description, str, list]],
            upstream: str) -> str:
    who = agent + (f", for {person(on_behalf_of)}," if on_behalf_of and on_behalf_of != agent else "")
    if len(parts) == 1:
        d, op_kind, fields = parts[0]
        what = f"{d.action} {_record_words(d)}"
        detail = _fields_words(op_kind, fields, d.name)
        if detail:
            what += (" with " if op_kind == "create" else ": ") + detail
    else:
        listed = "; ".join(f"{d.action} {_record_words(d)}" for d, _, _ in parts[:MAX_FIELDS])
        more = len(parts) - MAX_FIELDS
        what = f"make {len(parts)} changes in {upstream}: {listed}" + (f"; and {more} more" if more > 0 else "")
    text = f"{who} wants to {what}"
    if intent:
        text += f" — because: {intent}"
    return text


def operations_of(gw: "Runtime", item: dict[str, Any]) -> tuple[Adapter, list[Operation]] | None:
    """The captured call as matched operations under the rules in force (None: it no longer matches)."""
    from ..normalise import decode_segments
    from ..policy.bodies import parse_body
    from .captured import request_body

    up = gw.state.upstreams.get(item.get("upstream", ""))
    req = item.get("request") or {}
    if up is None or not req:
        return None
    registry = gw.state.registry
    body = req.get("body_json")
    raw = request_body(req) if ("body_text" in req or "body_b64" in req) else b""
    if body is None and raw:
        try:
            _, body = parse_body(raw, req.get("content_type"), gw.limits.max_json_depth)
        except Exception:  # noqa: BLE001 - a headline never fails an item; it names less
            body = None
    segments = decode_segments(req["path"])
    op = Operation(method=req["method"], path=req["path"], query=req.get("query") or "", segments=segments,
                   body=body, content_type=req.get("content_type"), raw_body=raw)
    try:
        ops = (up.adapter.unpack(op) or []) if up.adapter.is_composite(op) else [op]
    except Exception:  # noqa: BLE001
        ops = [op]
    out = []
    for o in ops:
        found = registry.match(up.name, o.method, o.segments, o.query)
        if found is None:
            continue
        o.capability, o.params = found
        out.append(o)
    return (up.adapter, out) if out else None


def _not_sensitive(d: Description, op: Operation, record: Any) -> Description:
    """A record named by a sensitive field's value (an e-mail marked sensitive) is named by its id instead."""
    from ..policy.validation import _path_matches

    rules = list(getattr(getattr(op.capability, "config", None), "sensitive_fields", None) or [])
    if not d.name or not rules:
        return d
    for src in (op.body, record):
        for path, value in _flatten(src).items():
            if any(_path_matches(path, r) for r in rules) and isinstance(value, (str, int, float)) \
                    and str(value).strip() and str(value).strip() in d.name:
                return Description(d.action, d.kind, None, d.record_id)
    return d


def headline_for(gw: "Runtime", item: dict[str, Any], record: Any = None, *, read: bool = False) -> dict[str, Any]:
    """The headline of a review item: ``{text, action, object, name, fields, complete}``.

    ``record``: the record as it is now (read by the caller), for a single operation; ``read`` says the
    caller tried to read it (so ``complete`` is true even when there was nothing to read)."""
    agent = item.get("agent") or "an agent"
    if (item.get("request") or {}).get("kind") == "tool":
        return tool_headline(gw, item)
    found = operations_of(gw, item)
    if found is None:
        req = item.get("request") or {}
        text = compose(agent, item.get("on_behalf_of"), item.get("intent"),
                       [(Description("call", f"{req.get('method', '')} {req.get('path', '')}".strip()), "action", [])],
                       item.get("upstream", ""))
        return {"text": text, "action": "call", "object": None, "name": None, "fields": [], "complete": False}
    adapter, ops = found
    parts = []
    for o in ops:
        rec = record if len(ops) == 1 else None
        d = _clipped(_not_sensitive(adapter.describe(o, rec), o, rec))
        op_kind = getattr(o.capability, "operation", "action")
        parts.append((d, op_kind, changes(adapter, o, rec) if op_kind != "delete" else []))
    text = compose(agent, item.get("on_behalf_of"), item.get("intent"), parts, item.get("upstream", ""))
    d0, _, fields0 = parts[0]
    return {"text": text, "action": d0.action, "object": d0.kind, "name": d0.name, "record_id": d0.record_id,
            "fields": [_bounded(f) for f in fields0[:MAX_LISTED]] if len(parts) == 1 else [],
            "operations": len(parts), "complete": bool(read and len(parts) == 1)}


def tool_headline(gw: "Runtime", item: dict[str, Any]) -> dict[str, Any]:
    """A captured call of an MCP upstream's tool: "bot, for Jane, wants to call tool create_customer on
    upstream crm: name Ada, email … — because: …" (sensitive arguments redacted)."""
    from ..policy.validation import _path_matches
    from .captured import request_body

    req = item.get("request") or {}
    try:
        args = orjson.loads(request_body(req) or b"{}")
    except (orjson.JSONDecodeError, ValueError):
        args = None
    cap = gw.state.registry.capabilities.get(item.get("capability") or "")
    sensitive = list(getattr(getattr(cap, "config", None), "sensitive_fields", None) or [])
    fields = []
    for path, value in _flatten(args if isinstance(args, dict) else {}).items():
        hidden = any(_path_matches(path, rule) for rule in sensitive)
        fields.append({"field": path, "label": humanise(path), "from": None, "to": REDACTED if hidden else value,
                       "known": False})
    tool, upstream = str(req.get("tool") or ""), str(item.get("upstream") or "")
    who = (item.get("agent") or "an agent") + (f", for {person(item['on_behalf_of'])},"
                                               if item.get("on_behalf_of") and item["on_behalf_of"] != item.get("agent")
                                               else "")
    text = f"{who} wants to call tool {tool} on upstream {upstream}"
    detail = _fields_words("action", fields)
    if detail:
        text += ": " + detail
    if item.get("intent"):
        text += f" — because: {item['intent']}"
    return {"text": text, "action": "call", "object": "tool", "name": tool, "record_id": None,
            "fields": [_bounded(f) for f in fields[:MAX_LISTED]], "operations": 1, "complete": True}


MAX_LISTED = 50  # fields a headline lists (it is stored with the item's summary: bounded whatever the body)


def _clipped(d: Description) -> Description:
    """A record's name and id as a headline says them: at most MAX_NAME characters each."""
    name, rid = d.name, d.record_id
    if (name is None or len(name) <= MAX_NAME) and (rid is None or len(rid) <= MAX_NAME):
        return d
    clip = lambda v: v if v is None or len(v) <= MAX_NAME else v[: MAX_NAME - 1] + "…"  # noqa: E731
    return Description(d.action, d.kind, clip(name), clip(rid))


MAX_NAME = 120


def _bounded(f: dict[str, Any]) -> dict[str, Any]:
    """A changed field as a headline keeps it: long values clipped (the item keeps the whole body)."""
    out = {k: f[k] for k in ("field", "label", "known")}
    for k in ("from", "to"):
        v = f[k]
        out[k] = v if v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_VALUE) \
            else show_value(v)
    return out


def headline_of(gw: "Runtime", item: dict[str, Any]) -> dict[str, Any]:
    """The stored headline when the notifier made one (it read the record), else one computed now."""
    stored = item.get("headline")
    if isinstance(stored, dict) and isinstance(stored.get("text"), str):
        return stored
    try:
        return headline_for(gw, item)
    except Exception:  # noqa: BLE001 - never let a headline fail a listing
        return {"text": f"{item.get('agent')} wants to call {item.get('capability')}", "complete": False}
