"""The pipeline's stages, in order. Each is a small function ``(gateway, exchange)`` with one job.

=====================  ======================================================================
stage                  job
=====================  ======================================================================
parse_request          one canonical method/path; refuse ambiguous targets, overrides, aliases
authenticate           verify the agent JWT; two-dimensional identity; intent, transaction, trace
match_route            upstream + method + path -> capability (default deny)
read_body              bounded read of the request body; sha256 digest
parse_body             JSON/form parsed strictly (duplicates, depth, lying content types)
unpack_composite       composite/batch requests -> sub-operations, each matched
check_grant            is every operation's capability granted to this agent?
require_intent         writes must declare X-Tether-Intent
validate_body          field rules, constraints, JSON Schema           (proxy.validation)
rate_limit             token buckets per agent, grant and upstream     (proxy.ratelimit)
decide_mode            live / dry-run / canary / quarantine
journal_intent         commit the intent record durably — before anything leaves
capture_dry_run        dry-run writes: store the request, answer synthetically (proxy.dryrun)
upstream_quota         the upstream's shared quota at its reserve or "wait": 429 (proxy.quota)
prepare_compensation   inside a transaction: pre-image and undo plan (proxy.transactions)
forward                credentials, provenance, stream to the upstream and back
=====================  ======================================================================
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from adapters.base import Operation

from . import headers as H
from .bodies import media_type, parse_body
from .config import HTTP_METHODS
from .errors import TetherError
from .exchange import Exchange
from .forward import SMALL_BODY, WHOLE_BODY_LIMIT, Timer, build_target, read_whole, relay, response_headers, send
from .journal import JournalUnavailable
from .normalise import ambiguous, decode_segments, parse_query, split_target
from .pipeline import request_record
from .upstream_calls import call_upstream
from .validation import validator_for

if TYPE_CHECKING:
    from .gateway import Gateway

_MAX_INTENT = 1000
_GENERIC_OVERRIDE_PARAMS = ("_method", "_httpmethod", "x-http-method-override")
# Headers whose *aliases* (same name with '_' or '.') a lenient upstream might read as the real thing.
_PROTECTED = frozenset(H.STRIPPED_REQUEST | H.HOP_BY_HOP | {"content-type", "content-encoding"})


# --------------------------------------------------------------------------- parse_request


def parse_request(gw: "Gateway", ex: Exchange) -> None:
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


def authenticate(gw: "Gateway", ex: Exchange) -> None:
    hdrs = ex.request.headers
    auth = hdrs.getall("Authorization", ())
    if len(auth) > 1:
        raise ambiguous("more than one Authorization header")
    ident = gw.state.verifier.authenticate(auth[0] if auth else None)
    ex.identity = ident
    if ident.agent not in ex.registry.rules.agents:
        raise TetherError("agent_unknown", f"agent {ident.agent!r} is not declared in the rules")
    intent = hdrs.getall(H.INTENT, ())
    if len(intent) > 1:
        raise ambiguous("more than one X-Tether-Intent header")
    if intent:
        value = intent[0].strip()
        if len(value) > _MAX_INTENT:
            raise TetherError("bad_request", f"X-Tether-Intent is longer than {_MAX_INTENT} characters")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise TetherError("bad_request", "X-Tether-Intent holds control characters")
        ex.intent = value or None
    tx = hdrs.get(H.TRANSACTION)
    if tx is not None:
        ex.transaction_id = tx.strip() or None
    tp = hdrs.get("traceparent")
    if tp is not None:
        ex.traceparent = tp


# --------------------------------------------------------------------------- match_route


def match_route(gw: "Gateway", ex: Exchange) -> None:
    up = ex.upstream
    if up is None:
        first = ex.segments[0] if ex.segments else ""
        raise TetherError("route_not_registered",
                          f"no upstream is reachable at /{first} on this listener (default deny)")
    adapter = up.adapter
    method = ex.method
    if ex.query:
        pairs = parse_query(ex.query)
        for name in up.credential_params:
            if any(k.lower() == name for k, _ in pairs):
                raise TetherError("credential_in_request",
                                  f"query parameter {name!r} carries a credential; Tether injects the upstream's own")
        override = adapter.method_override(method, pairs)
        if override is not None:
            if override not in HTTP_METHODS:
                raise TetherError("method_not_allowed", f"override to {override!r} refused")
            ex.extra["wire_method"] = method
            ex.method = method = override
        elif any(k.lower() in _GENERIC_OVERRIDE_PARAMS for k, _ in pairs):
            raise ambiguous("a method-override query parameter was sent to an upstream that does not define one")
    op = Operation(method=method, path=ex.raw_path, query=ex.query, segments=ex.segments,
                   content_type=ex.request.headers.get("Content-Type"))
    ex.operations = [op]
    if adapter.is_composite(op):
        ex.composite = True
        return
    found = ex.registry.match(up.name, method, ex.segments, ex.query)
    if found is None:
        raise TetherError("route_not_registered",
                          f"{method} {ex.raw_path} is not a registered capability of upstream {up.name!r}")
    op.capability, op.params = found
    ex.capability, ex.params = found


# --------------------------------------------------------------------------- body


async def read_body(gw: "Gateway", ex: Exchange) -> None:
    req = ex.request
    if not req.body_exists:
        return
    cap = ex.capability
    if cap is not None and cap.config.stream_request:
        return
    limit = gw.limits.max_body_bytes
    if cap is not None and cap.config.body is not None and cap.config.body.max_bytes is not None:
        limit = min(limit, cap.config.body.max_bytes)
    cl = req.content_length
    if cl is not None and cl > limit:
        raise TetherError("body_too_large", f"the body is {cl} bytes; this capability accepts at most {limit}")
    content = req.content
    if content.is_eof():
        # the whole body came with the head (most API calls): no waiting, so no timer to arm
        body = content.read_nowait(-1)
        if len(body) > limit:
            raise TetherError("body_too_large", f"the body exceeds {limit} bytes")
    else:
        body = await _read_body_slowly(gw, content, limit)
    ex.body = body
    ex.body_digest = hashlib.sha256(body).hexdigest() if body else None
    for op in ex.operations:
        op.raw_body = body


async def _read_body_slowly(gw: "Gateway", content: Any, limit: int) -> bytes:
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


def parse_body_stage(gw: "Gateway", ex: Exchange) -> None:
    body = ex.body
    if not body:
        return
    hdrs = ex.request.headers
    needs = ex.composite or ex.is_write or (ex.capability is not None and ex.capability.config.body is not None)
    if not needs:
        return
    enc = hdrs.get("Content-Encoding", "identity").strip().lower()
    if enc not in ("", "identity"):
        raise TetherError("bad_request", f"Content-Encoding {enc!r}: a body Tether must inspect cannot be compressed")
    kind, value = parse_body(body, hdrs.get("Content-Type"), gw.limits.max_json_depth)
    ex.extra["body_kind"] = kind
    for op in ex.operations:
        op.body = value


def unpack_composite(gw: "Gateway", ex: Exchange) -> None:
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


# --------------------------------------------------------------------------- grants & intent


def check_grant(gw: "Gateway", ex: Exchange) -> None:
    assert ex.identity is not None
    agent = ex.identity.agent
    registry = ex.registry
    for op in ex.operations:
        grant = registry.grant(agent, op.capability.name)
        if grant is None:
            where = f"sub-request {op.index}: " if ex.composite else ""
            raise TetherError("capability_not_granted",
                              f"{where}capability {op.capability.name!r} is not granted to agent {agent!r}"
                              + ("; the whole composite request is refused" if ex.composite else ""))
        if ex.grant is None:
            ex.grant = grant
        ex.upstream.adapter.check_request_headers(op, ex.request.headers)  # type: ignore[union-attr]
    ex.extra["grants"] = [registry.grant(agent, op.capability.name) for op in ex.operations]


async def check_transaction(gw: "Gateway", ex: Exchange) -> None:
    """A write naming a transaction joins it (opened on first use); it must be this agent's and open."""
    if ex.transaction_id is not None and ex.is_write:
        await gw.transactions.for_write(ex)


def require_intent(gw: "Gateway", ex: Exchange) -> None:
    if ex.intent is None and ex.is_write:
        raise TetherError("intent_required", "writes must declare their business intent in X-Tether-Intent")


# --------------------------------------------------------------------------- validation


async def validate_body(gw: "Gateway", ex: Exchange) -> None:
    """Each operation's body against its capability's rules (proxy.validation)."""
    for op in ex.operations:
        v = validator_for(ex.registry, op.capability)
        if v is None:
            continue
        if op.index is not None:
            kind = "json" if op.body is not None else "empty"
        else:
            kind = ex.extra.get("body_kind") or ("empty" if not ex.body else "other")
        pre_image = None
        if v.needs_pre_image_for(op.body):
            pre_image = await read_pre_image(gw, ex, op)
        v.validate(kind, op.body, pre_image)


async def read_pre_image(gw: "Gateway", ex: Exchange, op: Operation) -> Any:
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


# --------------------------------------------------------------------------- mode


async def decide_mode(gw: "Gateway", ex: Exchange) -> None:
    """live or dry_run, from the grants, stored promotions, canary and quarantine (proxy.governance)."""
    ex.mode = await gw.governance.decide(ex)
    ex.decision = ex.mode


# --------------------------------------------------------------------------- journal


async def journal_intent(gw: "Gateway", ex: Exchange) -> None:
    side = None
    if ex.mode == "dry_run":
        from .review import prepare_capture

        side = ("review_insert", prepare_capture(gw, ex))  # the item is committed with its intent record
    rec = request_record(ex)
    try:
        seq = await gw.journal.write(rec, side)
    except JournalUnavailable:
        ex.decision = "refused"
        raise TetherError("journal_unavailable") from None
    ex.intent_seq = seq
    ex.authz_event = str(seq)


# --------------------------------------------------------------------------- forward


async def upstream_headers(gw: "Gateway", ex: Exchange, body_override: bool = False) -> list[tuple[str, str]]:
    """The agent's headers minus everything that must not cross, plus provenance and credentials.

    A plain list of pairs: the upstream client writes them out as they are (what must not cross is
    already gone; the client refuses CR/LF/NUL in any of them)."""
    up = ex.upstream
    assert up is not None
    src = ex.request.headers
    drop = up.strip_headers
    if "Connection" in src:
        drop = drop | frozenset(H.connection_tokens(src))
    if body_override:
        drop = drop | _BODY_HEADERS
    out = [(k, v) for k, v in src.items() if (lk := k.lower()) not in drop and not lk.startswith("x-tether-")]
    if up.provenance_headers:
        ident = ex.identity
        assert ident is not None
        out.append((H.AGENT, ident.agent))
        if ident.on_behalf_of:
            out.append((H.ON_BEHALF_OF, ident.on_behalf_of))
        if ex.intent:
            out.append((H.INTENT, ex.intent))
        if ex.authz_event:
            out.append((H.AUTHZ_EVENT, ex.authz_event))
        out.append((H.REQUEST_ID, ex.request_id))
    cred = up.credential_now()
    if cred is not None:
        out.extend(cred)
    else:
        extra: dict[str, str] = {}
        await up.apply_credentials(extra)
        out.extend(extra.items())
    return out


_BODY_HEADERS = frozenset({"content-type", "content-encoding"})


async def forward(gw: "Gateway", ex: Exchange) -> None:
    up = ex.upstream
    assert up is not None
    body: Any = ex.body
    stamped = ex.extra.get("forward_body")  # set by the stamp_provenance stage
    if stamped is not None:
        body, content_type = stamped
        hdrs = await upstream_headers(gw, ex, body_override=True)
        hdrs.append(("Content-Type", content_type))
    else:
        hdrs = await upstream_headers(gw, ex)
        if body is None and ex.request.body_exists:
            body = ex.request.content  # streamed request body (stream_request capabilities)
    target = build_target(ex.raw_path, ex.query)
    wire_method = ex.extra.get("wire_method", ex.method)
    steps = ex.extra.get("tx_steps")
    timer = Timer()
    ex.forwarded = True
    try:
        resp = await send(gw.origin(up), wire_method, target, hdrs, body, up.timeouts)
    except TetherError as err:
        if steps:
            await gw.transactions.after_forward(ex, status=None, headers={}, body=None, failed=True,
                                                applied=(err.details or {}).get("applied"))
        raise
    ex.upstream_latency_ms = timer.ms()
    ex.status = resp.status
    gw.quota.observe(up, resp.status, resp.raw_headers)  # the upstream's quota signals (proxy.quota)
    out_headers = response_headers(resp.raw_headers)
    out_headers[H.REQUEST_ID] = ex.request_id
    limit = up.max_response_bytes or gw.limits.max_response_bytes
    if ex.is_write or ex.transaction_id is not None:
        try:
            data = await read_whole(resp, min(limit or WHOLE_BODY_LIMIT, WHOLE_BODY_LIMIT), up.timeouts)
        except TetherError:
            if steps:
                await gw.transactions.after_forward(ex, status=resp.status, headers={}, body=None, failed=True,
                                                    applied=None)
            raise
        finally:
            resp.release()
        parsed = decode_json_body(data, resp.headers.get("Content-Type"))
        ex.response_body = parsed
        rheaders = {str(k): v for k, v in resp.headers.items()}
        failed = up.adapter.is_failure(resp.status, parsed)
        if failed:
            ex.extra.setdefault("outcome", {})["upstream_failure"] = True
        else:
            for o in ex.operations:
                for rid in up.adapter.created_ids(o, resp.status, rheaders, parsed):
                    if rid not in ex.upstream_ids:
                        ex.upstream_ids.append(rid)
        if steps:
            await gw.transactions.after_forward(ex, status=resp.status, headers=rheaders, body=parsed,
                                                failed=failed, applied=not failed)
            if ex.extra.get("tx_state"):
                out_headers["X-Tether-Transaction-State"] = ex.extra["tx_state"]
        ex.response = web.Response(body=data, status=resp.status, reason=resp.reason or None, headers=out_headers)
        return
    cl = resp.content_length
    if cl is not None and cl <= SMALL_BODY and (limit is None or cl <= limit):
        # small answers (most API reads): one read, one write, instead of a streamed prepare/write/eof
        data = await read_whole(resp, SMALL_BODY, up.timeouts)
        resp.release()
        ex.response = web.Response(body=data, status=resp.status, reason=resp.reason or None, headers=out_headers)
        return
    streamed, sent, err = await relay(ex.request, resp, out_headers, limit)
    ex.response = streamed
    if err is not None:
        ex.error = TetherError(err)
        ex.reason = err
        ex.extra.setdefault("outcome", {})["bytes_sent"] = sent


def decode_json_body(data: bytes, content_type: str | None) -> Any:
    """Parse a response body as JSON when it says it is (or looks like) JSON; else None."""
    if not data:
        return None
    mt = media_type(content_type)
    if mt and "json" not in mt and mt != "*/*":
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
