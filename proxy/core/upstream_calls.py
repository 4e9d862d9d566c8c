"""Requests Tether itself sends to an upstream: pre-image reads, undo steps, approved replays.

They take the same road as an agent's request — the upstream's base URL plus a validated path, its
injected credentials, provenance headers naming the agent (and the reviewer, for a replay), the shared
forwarding client — and they are read whole (they are small and their content matters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import orjson
from multidict import CIMultiDict

from adapters.base import FORM_CT, PlannedRequest

from .. import headers as H
from ..errors import TetherError
from ..normalise import decode_segments, split_target
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
    from .runtime import Runtime
    from .rules import UpstreamRuntime


def encode_body(body: Any, content_type: str | None) -> bytes | None:
    """Serialise a planned body the way its content type says (JSON, or a nested form)."""
    if body is None:
        return None
    if isinstance(body, bytes):
        return body
    if content_type and content_type.split(";")[0].strip().lower() == FORM_CT:
        return encode_form(body).encode("ascii")
    return orjson.dumps(body)


def encode_form(value: Any, prefix: str = "") -> str:
    """Nested dicts/lists -> ``a[b][0]=v`` form encoding (Stripe's)."""
    pairs: list[tuple[str, str]] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            if not v and key:
                pairs.append((key, ""))
            for k, x in v.items():
                walk(x, f"{key}[{k}]" if key else str(k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{key}[{i}]")
        elif v is None:
            pairs.append((key, ""))
        elif isinstance(v, bool):
            pairs.append((key, "true" if v else "false"))
        else:
            pairs.append((key, str(v)))

    walk(value, prefix)
    return urlencode(pairs)


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
