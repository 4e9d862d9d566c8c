"""Requests Tether itself sends to an upstream: pre-image reads, undo steps, approved replays.

They take the same road as an agent's request — the upstream's base URL plus a validated path, its
injected credentials, provenance headers naming the agent (and the reviewer, for a replay), the shared
forwarding client — and they are read whole (they are small and their content matters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from multidict import CIMultiDict

from adapters.base import Operation, PlannedRequest

from .. import headers as H
from ..errors import TetherError
from ..normalise import decode_segments, split_target
from ..policy.bodies import encode_body
from ..transport.forward import (
    WHOLE_BODY_LIMIT,
    build_target,
    json_prefix_fields,
    read_prefix,
    read_whole,
    redact_bytes,
    send,
)

if TYPE_CHECKING:
    from .exchange import Exchange
    from .rules import UpstreamRuntime
    from .runtime import Runtime


async def call_upstream(
    gw: "Runtime",
    up: "UpstreamRuntime",
    req: PlannedRequest,
    *,
    agent: str,
    on_behalf_of: str | None = None,
    intent: str | None = None,
    request_id: str | None = None,
    authz_event: str | None = None,
    reviewer: str | None = None,
    extra_headers: dict[str, str] | None = None,
    prefix_ok: bool = False,
) -> tuple[int, dict[str, str], bytes, Any]:
    """Send a planned request; returns (status, headers, raw body, parsed JSON or None).

    Raises TetherError (upstream_unavailable / upstream_timeout) when the upstream cannot answer.
    ``prefix_ok`` (a replayed write, whose status is what counts): an answer past WHOLE_BODY_LIMIT is
    not an error — its first bytes are returned, parsed as far as they go (the top-level fields of a JSON
    object). Pre-image reads never set it: a record read in part must not be restored."""
    # The planned path is validated exactly like an agent's (it may embed ids from a response); a '?' in
    # it would cut the path short (an id "7?x" must never become DELETE .../7), so it is refused too.
    path, stray_query = split_target(req.path, 1 << 16)
    if stray_query or "?" in req.path:
        raise TetherError("ambiguous_request", "a planned request's path holds a '?'; refused")
    decode_segments(path)
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Accept"] = "application/json"
    headers[H.ACCEPT_IDENTITY[0]] = H.ACCEPT_IDENTITY[1]
    body = encode_body(req.body, req.content_type)
    if body is not None and req.content_type:
        headers["Content-Type"] = req.content_type
    strip = up.strip_headers
    for k, v in (req.headers or {}).items():
        if k.lower() not in strip:  # a captured request's headers pass the same filter as a forwarded one's
            headers[k] = v
    for k, v in (extra_headers or {}).items():
        headers[k] = v
    if up.provenance_headers:
        headers[H.AGENT] = agent
        if on_behalf_of:
            headers[H.ON_BEHALF_OF] = on_behalf_of
        if intent:
            headers[H.INTENT] = intent
        if authz_event:
            headers[H.AUTHZ_EVENT] = authz_event
        if request_id:
            headers[H.REQUEST_ID] = request_id
        if reviewer:
            headers["X-Tether-Reviewer"] = reviewer
    await up.apply_credentials(headers)
    resp = await send(gw.origin(up), req.method, build_target(path, req.query), headers, body, up.timeouts)
    gw.quota.observe(up, resp.status, resp.raw_headers)  # replays and undo steps spend the quota too
    whole = True
    if prefix_ok and (resp.content_length is None or resp.content_length > WHOLE_BODY_LIMIT):
        data, whole = await read_prefix(resp, WHOLE_BODY_LIMIT, up.timeouts)
    else:
        try:
            data = await read_whole(resp, WHOLE_BODY_LIMIT, up.timeouts)
        finally:
            resp.release()
    rheaders = {str(k): v for k, v in resp.headers.items()}
    needles = up.reflection_needles()
    if needles:
        # a reflected credential never reaches a review item, a compensation step or the journal
        data, _ = redact_bytes(data, needles)
        for k, v in rheaders.items():
            for n in needles.text:
                if n in v:
                    rheaders[k] = v = v.replace(n, "*" * len(n))
    if not whole:
        return resp.status, rheaders, data, json_prefix_fields(data)
    parsed: Any = None
    if data:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
    return resp.status, rheaders, data, parsed


async def read_pre_image(gw: "Runtime", ex: "Exchange", op: Operation) -> Any:
    """The record as it is now (for relative caps and undo plans); read once per operation."""
    cache = ex.extra.setdefault("pre_images", {})
    key = op.index if op.index is not None else -1
    if key in cache:
        return cache[key]
    up = ex.upstream
    assert up is not None and ex.identity is not None
    plan = up.adapter.pre_image_request(op)
    if plan is None:
        cache[key] = None
        return None
    status, _, _, parsed = await call_upstream(gw, up, plan, agent=ex.identity.agent,
                                               on_behalf_of=ex.identity.on_behalf_of, intent=ex.intent,
                                               request_id=ex.request_id)
    if not up.adapter.pre_image_ok(plan, status, parsed):
        raise TetherError("upstream_unavailable",
                          f"reading the current record ({plan.method} {plan.path}) answered {status}; "
                          "Tether cannot check or undo this write without it")
    cache[key] = parsed
    return parsed
