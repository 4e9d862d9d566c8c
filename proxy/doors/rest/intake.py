"""The REST front door's intake: an agent's HTTP request, pointed at Tether by its SDK, becomes an operation.

=====================  ======================================================================
stage                  job
=====================  ======================================================================
parse_request          one canonical method/path; refuse ambiguous targets, overrides, aliases
authenticate           verify the agent JWT; two-dimensional identity; intent, transaction, trace
match_route            upstream + method + path -> capability (default deny)
read_body              bounded read of the request body; sha256 digest (100 Continue when asked)
parse_body             JSON/form parsed strictly (duplicates, depth, lying content types)
unpack_composite       composite/batch requests -> sub-operations, each matched
=====================  ======================================================================

The shared stages follow (:mod:`proxy.pipeline.stages`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from adapters import vendor_headers
from adapters.base import Operation

from ... import headers as H
from ...config import HTTP_METHODS
from ...core.exchange import Exchange
from ...errors import TetherError
from ...normalise import (
    ambiguous,
    canonical_path,
    decode_segments,
    parse_query,
    policy_params,
    redact_query,
    split_target,
)
from ...pipeline.stages import (
    admit_intent,
    check_grant,
    refuse_smuggled,
    require_intent,
)
from ...policy.bodies import (
    OVERRIDE_FIELDS,
    media_type,
    multipart_names,
    parse_body,
)
from ...policy.identity import USER_TOKEN
from ...safety.ratelimit import demands_for
from .protocol import awaits_continue, send_continue

if TYPE_CHECKING:
    from ...core.runtime import Runtime

log = logging.getLogger("tether.rest")

# Headers whose *aliases* (same name with '_' or '.') a lenient upstream might read as the real thing.
_PROTECTED = frozenset(H.STRIPPED_REQUEST | H.HOP_BY_HOP | {"content-type", "content-encoding"} | vendor_headers())


# --------------------------------------------------------------------------- parse_request


def parse_request(gw: "Runtime", ex: Exchange) -> None:
    req = ex.request
    method = req.method
    if method not in HTTP_METHODS:
        raise TetherError("method_not_allowed", f"method {method} is not accepted by Tether")
    limits = gw.limits
    path, query = split_target(req.raw_path, limits.max_url_length)
    segments = decode_segments(path)
    hdrs = req.headers
    if len(hdrs) > limits.max_headers:
        raise TetherError("headers_too_large", f"more than {limits.max_headers} request headers")
    for name in hdrs:
        lname = name.lower()
        if lname in H.METHOD_OVERRIDE_HEADERS:
            raise ambiguous(f"method override header {name} refused: send the real method")
        if ("_" in name or "." in name):
            canon = H.canonical_name(name)
            if canon != lname and (canon.startswith("x-tether-") or canon in _PROTECTED
                                   or canon in ex.listener.credential_aliases):
                raise ambiguous(f"header {name!r} is an alias of {canon!r}; refused")
    conn_tokens = H.connection_tokens(hdrs) if "Connection" in hdrs else ()
    for tok in conn_tokens:
        if tok.startswith("x-tether-") or tok in ("authorization", "cookie", "host", "content-length",
                                                   "content-type") or tok in ex.listener.credential_aliases:
            raise ambiguous(f"the Connection header names {tok!r}, which Tether relies on")
    host = hdrs.get("Host", "")
    if not ex.listener.host_allowed(host):
        raise ambiguous(f"Host {host!r} does not belong to this listener")
    if "Content-Length" in hdrs and "Transfer-Encoding" in hdrs:  # llhttp refuses this already
        raise ambiguous("both Content-Length and Transfer-Encoding")
    ex.query = query
    listener_up = ex.listener.upstream
    if listener_up is not None:
        ex.upstream = listener_up
        ex.raw_path = path
        ex.segments = segments
    else:
        # path-prefix routing on the main listener: /<upstream>/<path as the upstream sees it>
        ups = gw.state.upstreams
        if segments and segments[0] in ups and path.startswith("/" + segments[0]):
            ex.upstream = ups[segments[0]]
            rest = path[len(segments[0]) + 1:]
            ex.raw_path = rest or "/"
            ex.segments = segments[1:]
        else:
            ex.upstream = None
            ex.raw_path = path
            ex.segments = segments


# --------------------------------------------------------------------------- authenticate


async def authenticate(gw: "Runtime", ex: Exchange) -> None:
    hdrs = ex.request.headers
    auth = hdrs.getall("Authorization", ())
    if len(auth) > 1:
        raise ambiguous("more than one Authorization header")
    # the agent's token, and the person's own (X-Tether-User-Token) when sent: proxy.policy.identity
    ident = await gw.state.verifier.identify(auth[0] if auth else None, hdrs.getall(USER_TOKEN, ()))
    ex.identity = ident
    if ident.agent not in ex.registry.rules.agents:
        raise TetherError("agent_unknown", f"agent {ident.agent!r} is not declared in the rules")
    intent = hdrs.getall(H.INTENT, ())
    if len(intent) > 1:
        raise ambiguous("more than one X-Tether-Intent header")
    if intent:
        ex.intent = admit_intent(intent[0], "X-Tether-Intent")
    tx = hdrs.get(H.TRANSACTION)
    if tx is not None:
        ex.transaction_id = tx.strip() or None
    tp = hdrs.get("traceparent")
    if tp is not None:
        ex.traceparent = tp


# --------------------------------------------------------------------------- match_route


def match_route(gw: "Runtime", ex: Exchange) -> None:
    up = ex.upstream
    if up is None:
        first = ex.segments[0] if ex.segments else ""
        raise TetherError("route_not_registered",
                          f"no upstream is reachable at /{first} on this listener (default deny)")
    adapter = up.adapter
    method = ex.method
    if ex.query:
        query = ex.query
        pairs = parse_query(query)
        # read as the most generous server would: ';' separates parameters too
        policy = policy_params(query) if ";" in query else pairs
        creds = up.credential_params
        if creds:
            for k, _ in policy:
                if k.lower() in creds:
                    ex.query = redact_query(query, creds)  # the journal keeps the name, never the value
                    raise TetherError("credential_in_request",
                                      f"query parameter {k!r} carries a credential; Tether injects the upstream's own")
        override = adapter.method_override(method, pairs)
        if policy is not pairs and sum(k.lower() in OVERRIDE_FIELDS for k, _ in policy) != \
                sum(k.lower() in OVERRIDE_FIELDS for k, _ in pairs):
            raise ambiguous("a method-override parameter hides behind a ';' in the query")
        if override is not None:
            if override not in HTTP_METHODS:
                raise TetherError("method_not_allowed", f"override to {override!r} refused")
            ex.extra["wire_method"] = method
            ex.method = method = override
        elif any(k.lower() in OVERRIDE_FIELDS for k, _ in pairs):
            raise ambiguous("a method-override query parameter was sent to an upstream that does not define one")
    op = Operation(method=method, path=ex.raw_path, query=ex.query, segments=ex.segments,
                   content_type=ex.request.headers.get("Content-Type"))
    ex.operations = [op]
    if adapter.is_composite(op):
        ex.composite = True
        ex.raw_path = op.path = canonical_path(ex.raw_path, ex.segments, False)
        return
    found = ex.registry.match(up.name, method, ex.segments, ex.query)
    if found is None:
        raise TetherError("route_not_registered",
                          f"{method} {ex.raw_path} is not a registered capability of upstream {up.name!r}")
    op.capability, op.params = found
    ex.capability, ex.params = found
    # forward the path that was matched: one escaping, and a trailing '/' only where the template has one
    template = found[0].template
    ex.raw_path = op.path = canonical_path(ex.raw_path, ex.segments, len(template) > 1 and template[-1] == "/")


# --------------------------------------------------------------------------- body


async def read_body(gw: "Runtime", ex: Exchange) -> None:
    req = ex.request
    if not req.body_exists:
        return
    cap = ex.capability
    limit = gw.limits.max_body_bytes
    if cap is not None and cap.config.body is not None and cap.config.body.max_bytes is not None:
        limit = min(limit, cap.config.body.max_bytes)
    cl = req.content_length
    if cl is not None and cl > limit:
        raise TetherError("body_too_large", f"the body is {cl} bytes; this capability accepts at most {limit}")
    if cap is not None and cap.config.stream_request:
        ex.body_stream = RestBodyStream(req)  # forwarded as it arrives, counted and hashed on the way
        return
    content = req.content
    if content.is_eof():
        # the whole body came with the head (most API calls): no waiting, so no timer to arm
        body = content.read_nowait(-1)
        if len(body) > limit:
            raise TetherError("body_too_large", f"the body exceeds {limit} bytes")
    else:
        if awaits_continue(req):
            await _before_continue(gw, ex)
        body = await _read_body_slowly(gw, content, limit)
    ex.body = body
    ex.body_digest = hashlib.sha256(body).hexdigest() if body else None
    for op in ex.operations:
        op.raw_body = body


class RestBodyStream:
    """A ``stream_request`` body the REST door has not read: the forward stage asks for the agent's body
    (``100 Continue`` when it waits for one) only once every check has passed, and streams it upstream."""

    __slots__ = ("request", "length")

    def __init__(self, request: Any) -> None:
        self.request = request
        self.length: int | None = request.content_length  # passed on as is: object stores refuse chunked

    @property
    def content(self) -> Any:
        return self.request.content

    async def begin(self) -> None:
        await send_continue(self.request)


async def _before_continue(gw: "Runtime", ex: Exchange) -> None:
    """The agent waits for ``100 Continue`` before sending its body (``Expect: 100-continue``). First the
    checks that do not need the body — the grant, the intent a write must declare, the rate limits (only
    looked at here; their tokens are taken by the rate_limit stage, as for any request) — so that a
    refusal comes instead of the 100 and the body is never sent. A composite request's sub-operations are
    in its body: those are checked after it arrives."""
    if not ex.composite:
        check_grant(gw, ex)
        require_intent(gw, ex)
        gw.rate_limiter.peek(demands_for(ex))
    await send_continue(ex.request)


async def _read_body_slowly(gw: "Runtime", content: Any, limit: int) -> bytes:
    """A body still arriving: read it under the client timeout, refusing it past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(gw.limits.client_timeout):
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise TetherError("body_too_large", f"the body exceeds {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise TetherError("client_timeout", f"the request body did not arrive within "
                                            f"{gw.limits.client_timeout:g}s") from None
    return b"".join(chunks)


def parse_body_stage(gw: "Runtime", ex: Exchange) -> None:
    body = ex.body
    if not body:
        return
    hdrs = ex.request.headers
    ctype = hdrs.get("Content-Type")
    needs = ex.composite or ex.is_write or (ex.capability is not None and ex.capability.config.body is not None)
    if not needs:
        _refuse_smuggled_in_unparsed(gw, ex, body, ctype)
        return
    enc = hdrs.get("Content-Encoding", "identity").strip().lower()
    if enc not in ("", "identity"):
        raise TetherError("bad_request", f"Content-Encoding {enc!r}: a body Tether must inspect cannot be compressed")
    kind, value = parse_body(body, ctype, gw.limits.max_json_depth)
    ex.extra["body_kind"] = kind
    for op in ex.operations:
        op.body = value
    if kind == "other" and media_type(ctype).startswith("multipart/"):
        refuse_smuggled(ex, multipart_names(body))
    elif kind == "form" and b";" in body:
        refuse_smuggled(ex, _form_names(body))  # as a server splitting on ';' too reads it
    elif isinstance(value, dict):
        refuse_smuggled(ex, value, json=kind == "json")


def _form_names(body: bytes) -> list[str]:
    """A form body's field names, split on '&' and ';' (for checks only; the body is forwarded as sent)."""
    from urllib.parse import parse_qsl

    return [k for k, _ in parse_qsl(body.decode("latin-1").replace(";", "&"), keep_blank_values=True,
                                    errors="replace")]


def _refuse_smuggled_in_unparsed(gw: "Runtime", ex: Exchange, body: bytes, ctype: str | None) -> None:
    """A body Tether does not otherwise parse (a read's): form and multipart field names are read all
    the same; a JSON body only when it could spell an override name (``method`` or a ``\\u`` escape)."""
    mt = media_type(ctype)
    try:
        if mt.startswith("multipart/"):
            refuse_smuggled(ex, multipart_names(body))
        elif mt == "application/x-www-form-urlencoded":
            refuse_smuggled(ex, _form_names(body))
        elif (b"method" in body.lower() or b"\\u" in body) and (mt == "" or "json" in mt):
            _, value = parse_body(body, "application/json", gw.limits.max_json_depth)
            if isinstance(value, dict):
                refuse_smuggled(ex, value, json=True)
    except TetherError as err:
        if err.code in ("ambiguous_request", "credential_in_request"):
            raise
        # a body that does not parse is not read by the upstream as these fields either


def unpack_composite(gw: "Runtime", ex: Exchange) -> None:
    if not ex.composite:
        return
    up = ex.upstream
    assert up is not None
    outer = ex.operations[0]
    ex.extra["composite_outer"] = outer
    subs = up.adapter.unpack(outer)
    if not subs:
        raise TetherError("unsupported_composite", "the composite request holds no sub-request")
    for op in subs:
        found = ex.registry.match(up.name, op.method, op.segments, op.query)
        if found is None:
            raise TetherError("route_not_registered",
                              f"sub-request {op.index} ({op.method} {op.path}) is not a registered capability; "
                              "the whole composite request is refused")
        op.capability, op.params = found
    ex.operations = subs
    ex.capability = subs[0].capability if len({op.capability.name for op in subs}) == 1 else None


REST_INTAKE: list[tuple[str, Any]] = [
    ("parse_request", parse_request),
    ("authenticate", authenticate),
    ("match_route", match_route),
    ("read_body", read_body),
    ("parse_body", parse_body_stage),
    ("unpack_composite", unpack_composite),
]
