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
validate_body          field rules, constraints, JSON Schema           (proxy.policy.validation)
rate_limit             token buckets per agent, grant and upstream     (proxy.safety.ratelimit)
decide_mode            live / dry-run / canary / quarantine
journal_intent         commit the intent record durably — before anything leaves
check_relative_caps    read the pre-image, check caps relative to it (max_increase_pct)
capture_dry_run        dry-run writes: store the request, answer synthetically (proxy.dryrun)
upstream_quota         the upstream's shared quota at its reserve or "wait": 429 (proxy.safety.quota)
prepare_compensation   inside a transaction: pre-image and undo plan (proxy.safety.transactions)
forward                credentials, provenance, stream to the upstream and back
=====================  ======================================================================
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
from multidict import CIMultiDict

from adapters import vendor_headers
from adapters.base import Operation

from .. import headers as H
from ..config import HTTP_METHODS
from ..core.exchange import Exchange
from ..core.upstream_calls import call_upstream
from ..doors.rest.protocol import awaits_continue, send_continue
from ..errors import TetherError
from ..journal.writer import JournalUnavailable
from ..normalise import (
    ambiguous,
    canonical_path,
    decode_segments,
    parse_query,
    policy_params,
    redact_query,
    split_target,
    unsafe_char,
)
from ..policy.bodies import OVERRIDE_FIELDS, media_type, multipart_names, parse_body, smuggled_field
from ..policy.identity import USER_TOKEN, require_verified_user_message
from ..policy.validation import validator_for
from ..safety.ratelimit import demands_for
from ..transport.forward import (
    SMALL_BODY,
    WHOLE_BODY_LIMIT,
    AnswerPrefix,
    Timer,
    answer,
    as_tether_error,
    build_target,
    json_prefix_fields,
    read_whole,
    redact_bytes,
    redact_headers,
    relay,
    response_headers,
    send,
)
from ..transport.upstream_http import UpstreamError, UpstreamResponse
from .runner import request_record

if TYPE_CHECKING:
    from ..core.runtime import Runtime

log = logging.getLogger("tether.stages")

_MAX_INTENT = 1000
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
        value = intent[0].strip()
        if len(value) > _MAX_INTENT:
            raise TetherError("bad_request", f"X-Tether-Intent is longer than {_MAX_INTENT} characters")
        bad = unsafe_char(value)
        if bad is not None:
            raise TetherError("bad_request", f"X-Tether-Intent holds {bad}: control, line-separator and bidi "
                                             "characters are refused in text an operator reads")
        ex.intent = value or None
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
        return  # forwarded as it arrives, counted and hashed on the way (StreamedBody)
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
        _refuse_smuggled(ex, multipart_names(body))
    elif kind == "form" and b";" in body:
        _refuse_smuggled(ex, _form_names(body))  # as a server splitting on ';' too reads it
    elif isinstance(value, dict):
        _refuse_smuggled(ex, value, json=kind == "json")


def _refuse_smuggled(ex: Exchange, names: Any, json: bool = False) -> None:
    """A body field a server would read as the request's method (``_method``: Rails, Laravel) or as a
    credential (``credential_params``, read from forms by servers that merge parameters) is refused as it
    is in the query. JSON bodies are checked for overrides only (servers take credentials from forms)."""
    found = smuggled_field(names, OVERRIDE_FIELDS)
    if found is not None:
        raise ambiguous(f"the body field {found!r} is a method override: send the real method")
    if not json:
        creds = ex.upstream.credential_params  # type: ignore[union-attr]
        found = smuggled_field(names, frozenset(creds)) if creds else None
        if found is not None:
            raise TetherError("credential_in_request",
                              f"the body field {found!r} carries a credential; Tether injects the upstream's own")


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
            _refuse_smuggled(ex, multipart_names(body))
        elif mt == "application/x-www-form-urlencoded":
            _refuse_smuggled(ex, _form_names(body))
        elif (b"method" in body.lower() or b"\\u" in body) and (mt == "" or "json" in mt):
            _, value = parse_body(body, "application/json", gw.limits.max_json_depth)
            if isinstance(value, dict):
                _refuse_smuggled(ex, value, json=True)
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


# --------------------------------------------------------------------------- grants & intent


def check_grant(gw: "Runtime", ex: Exchange) -> None:
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
        if grant.config.require_verified_user and not ex.identity.user_verified:
            raise TetherError("verified_user_required", require_verified_user_message(ex.identity, op.capability.name))
        if ex.grant is None:
            ex.grant = grant
        ex.upstream.adapter.check_request_headers(op, ex.request.headers)  # type: ignore[union-attr]
    ex.extra["grants"] = [registry.grant(agent, op.capability.name) for op in ex.operations]


async def check_transaction(gw: "Runtime", ex: Exchange) -> None:
    """A write naming a transaction joins it (opened on first use); it must be this agent's and open."""
    if ex.transaction_id is not None and ex.is_write:
        await gw.transactions.for_write(ex)


def require_intent(gw: "Runtime", ex: Exchange) -> None:
    if ex.intent is None and ex.is_write:
        raise TetherError("intent_required", "writes must declare their business intent in X-Tether-Intent")


# --------------------------------------------------------------------------- validation


def validate_body(gw: "Runtime", ex: Exchange) -> None:
    """Each operation's body against its capability's rules (proxy.policy.validation) — all but the caps
    relative to the record as it is now: those need a read upstream, which waits until the request is
    rate-counted and its intent record is durable (check_relative_caps)."""
    pending = None
    for op in ex.operations:
        v = validator_for(ex.registry, op.capability)
        if v is None:
            continue
        if op.index is not None:
            kind = "json" if op.body is not None else "empty"
        else:
            kind = ex.extra.get("body_kind") or ("empty" if not ex.body else "other")
        v.validate(kind, op.body, relative=False)
        if v.needs_pre_image_for(op.body):
            if pending is None:
                pending = ex.extra["relative_caps"] = []
            pending.append((op, v, kind))


async def check_relative_caps(gw: "Runtime", ex: Exchange) -> None:
    """Caps relative to the pre-image (``max_increase``, ``max_increase_pct``): read the record — after
    the rate limit and after the intent record is committed, so no read leaves for a request that is
    rate-limited or unjournaled — and check. A violation names the record's current value only to an
    agent that holds a read grant on that record. A dry-run write's review item is committed here, once
    the write passed (not with its intent record, which had to come first)."""
    pending = ex.extra.get("relative_caps")
    if not pending:
        return
    for op, v, kind in pending:
        pre_image = await read_pre_image(gw, ex, op)
        v.validate_relative(kind, op.body, pre_image, reveal=_may_read_pre_image(ex, op))
    if ex.mode == "dry_run":
        from ..journal.writer import base_record
        from ..safety.review import journal_capture

        ident = ex.identity
        assert ident is not None
        rec = base_record("review", request_id=ex.request_id, agent=ident.agent, on_behalf_of=ident.on_behalf_of,
                          intent=ex.intent, capability=ex.capability.name if ex.capability is not None else "composite",
                          upstream=ex.upstream.name if ex.upstream is not None else None,
                          method=ex.method, path=ex.raw_path, decision="captured")
        rec.update({"event": "captured", "intent_seq": ex.intent_seq})
        await journal_capture(gw, ex, rec)


def _may_read_pre_image(ex: Exchange, op: Operation) -> bool:
    """Does the agent hold a grant for the read Tether made of this record (so that a refusal may tell it
    what the record holds)?"""
    up = ex.upstream
    assert up is not None and ex.identity is not None
    plan = up.adapter.pre_image_request(op)
    if plan is None:
        return False
    try:
        segments = decode_segments(plan.path)
    except TetherError:
        return False
    found = ex.registry.match(up.name, plan.method, segments, plan.query)
    return found is not None and found[0].effect == "read" and \
        ex.registry.grant(ex.identity.agent, found[0].name) is not None


async def read_pre_image(gw: "Runtime", ex: Exchange, op: Operation) -> Any:
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


async def decide_mode(gw: "Runtime", ex: Exchange) -> None:
    """live or dry_run, from the grants, stored promotions, canary and quarantine (proxy.safety.governance)."""
    ex.mode = await gw.governance.decide(ex)
    ex.decision = ex.mode
    if ex.mode == "dry_run" and any(op.capability.config.stream_request for op in ex.operations):
        # a streamed body is never read, so it cannot be captured for review (the rules check refuses such
        # grants; this catches a quarantine, a canary draw or a demotion at run time): refused, not forwarded
        ex.decision = "denied"
        raise TetherError("agent_quarantined" if ex.quarantined else "forbidden",
                          "this write streams its body, which cannot be captured for review, and it may not run "
                          "live now" + (" (the agent is quarantined)" if ex.quarantined else ""))


# --------------------------------------------------------------------------- journal


async def journal_intent(gw: "Runtime", ex: Exchange) -> None:
    if ex.mode == "dry_run" and "relative_caps" not in ex.extra:
        from ..safety.review import journal_capture

        # the review item is committed with its intent record (with relative caps still to check, by
        # check_relative_caps once they passed)
        await journal_capture(gw, ex)
        return
    rec = request_record(ex)
    try:
        seq = await gw.journal.write(rec)
    except JournalUnavailable:
        ex.decision = "refused"
        raise TetherError("journal_unavailable") from None
    ex.intent_seq = seq
    ex.authz_event = str(seq)


# --------------------------------------------------------------------------- forward


async def upstream_headers(gw: "Runtime", ex: Exchange, body_override: bool = False) -> list[tuple[str, str]]:
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
    out.append(H.ACCEPT_IDENTITY)  # answers Tether can scan for a reflected credential
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
    if up.via:  # RFC 9110 §7.6.3: a proxy says so, with the protocol version it received
        v = ex.request.version
        out.append(("Via", "1.1 tether" if v == (1, 1) else f"{v[0]}.{v[1]} tether"))
    cred = up.credential_now()
    if cred is not None:
        out.extend(cred)
    else:
        extra: dict[str, str] = {}
        await up.apply_credentials(extra)
        out.extend(extra.items())
    return out


_BODY_HEADERS = frozenset({"content-type", "content-encoding"})


async def forward(gw: "Runtime", ex: Exchange) -> None:
    up = ex.upstream
    assert up is not None
    body: Any = ex.body
    length: int | None = None
    stamped = ex.extra.get("forward_body")  # set by the stamp_provenance stage
    if stamped is not None:
        body, content_type = stamped
        hdrs = await upstream_headers(gw, ex, body_override=True)
        hdrs.append(("Content-Type", content_type))
    else:
        hdrs = await upstream_headers(gw, ex)
        if body is None and ex.request.body_exists:
            body = StreamedBody(gw, ex)  # stream_request capabilities
            length = ex.request.content_length  # passed on as is: object stores answer 411 to chunked
            await send_continue(ex.request)  # every check passed: an agent waiting on Expect may send it now
    target = build_target(ex.raw_path, ex.query)
    wire_method = ex.extra.get("wire_method", ex.method)
    steps = ex.extra.get("tx_steps")
    timer = Timer()
    ex.forwarded = True
    try:
        resp = await send(gw.origin(up), wire_method, target, hdrs, body, up.timeouts, length)
    except TetherError as err:
        if steps:
            await gw.transactions.after_forward(ex, status=None, headers={}, body=None, failed=True,
                                                applied=(err.details or {}).get("applied"))
        raise
    ex.upstream_latency_ms = timer.ms()
    ex.status = resp.status
    gw.quota.observe(up, resp.status, resp.raw_headers)  # the upstream's quota signals (proxy.safety.quota)
    out_headers = response_headers(resp.raw_headers)
    needles = up.reflection_needles()
    if needles and redact_headers(out_headers, needles):
        _reflected(ex)
    out_headers[H.REQUEST_ID] = ex.request_id
    limit = up.max_response_bytes or gw.limits.max_response_bytes
    if resp.transfer_coding is not None:
        resp.close()
        await _answer_lost(gw, ex, resp, f"it is framed with the transfer coding {resp.transfer_coding!r}, which "
                                         "Tether does not decode", code="upstream_unavailable")
    if ex.is_write:
        await _forward_write(gw, ex, resp, out_headers, limit)
        return
    cl = resp.content_length
    if wire_method == "HEAD":  # no body; the answer keeps its Content-Length
        resp.release()
        ex.response = answer(resp, out_headers, None)
        return
    if cl is not None and cl <= SMALL_BODY and (limit is None or cl <= limit):
        # small answers (most API reads): one read, one write, instead of a streamed prepare/write/eof
        data = await read_whole(resp, SMALL_BODY, up.timeouts)
        resp.release()
        if needles:
            data, hit = redact_bytes(data, needles)
            if hit:
                _reflected(ex)
        ex.response = answer(resp, out_headers, data)
        return
    found = [False]
    streamed, sent, err = await relay(ex.request, resp, out_headers, limit, needles, found)
    if found[0]:
        _reflected(ex)
    ex.response = streamed
    if err is not None:
        _relay_failed(ex, err, sent)


async def _forward_write(gw: "Runtime", ex: Exchange, resp: UpstreamResponse, out_headers: CIMultiDict[str],
                         limit: int | None) -> None:
    """Relay a write's answer — never refused for its size. A small one of known length is read whole
    (the transaction state can then ride on it as a header); any other (a 100 MB export, an event
    stream) streams through while its first WHOLE_BODY_LIMIT bytes are kept for what Tether needs."""
    up = ex.upstream
    assert up is not None
    size = resp.content_length if resp.content_length is not None else (resp.buffered if resp.complete else None)
    if limit is not None and size is not None and size > limit:
        resp.close()
        await _answer_lost(gw, ex, resp, f"its answer is {size} bytes, over the response limit of {limit}")
    if size is not None and size <= WHOLE_BODY_LIMIT and (resp.complete or not _is_event_stream(resp)):
        try:
            data = await resp.read(WHOLE_BODY_LIMIT)
        except UpstreamError as exc:
            resp.close()
            await _answer_lost(gw, ex, resp, as_tether_error(exc, up.timeouts, mid_response=True).message)
        resp.release()
        needles = up.reflection_needles()
        if needles:
            data, hit = redact_bytes(data, needles)
            if hit:
                _reflected(ex)
        await _write_outcome(gw, ex, resp, decode_json_body(data, resp.headers.get("Content-Type")))
        if ex.extra.get("tx_state"):
            out_headers["X-Tether-Transaction-State"] = ex.extra["tx_state"]
        ex.response = answer(resp, out_headers, data)
        return
    prefix = AnswerPrefix(WHOLE_BODY_LIMIT)
    found = [False]
    streamed, sent, err = await relay(ex.request, resp, out_headers, limit, up.reflection_needles(), found, tap=prefix)
    if found[0]:
        _reflected(ex)
    ex.response = streamed
    if err is not None:
        _relay_failed(ex, err, sent)
        ex.extra["outcome"].update(applied=not up.adapter.is_failure(resp.status, None), upstream_status=resp.status)
    ctype = resp.headers.get("Content-Type")
    data = prefix.data()
    parsed = decode_json_body(data, ctype) if prefix.whole else _json_prefix(data, ctype)
    await _write_outcome(gw, ex, resp, parsed)


async def _write_outcome(gw: "Runtime", ex: Exchange, resp: UpstreamResponse, parsed: Any) -> None:
    """What a write's answer tells: failure or created ids (journaled with the outcome); inside a
    transaction, the undo steps armed from it."""
    up = ex.upstream
    assert up is not None
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
    if ex.extra.get("tx_steps"):
        await gw.transactions.after_forward(ex, status=resp.status, headers=rheaders, body=parsed,
                                            failed=failed, applied=not failed)


async def _answer_lost(gw: "Runtime", ex: Exchange, resp: UpstreamResponse, why: str,
                       code: str = "upstream_response_too_large") -> NoReturn:
    """The upstream answered but its answer cannot reach the agent. For a write the upstream applied
    (its status is no failure), a distinct error saying so — the agent must not retry it — and the
    journal says so too; otherwise ``code``. Inside a transaction the steps are settled either way."""
    up = ex.upstream
    assert up is not None
    status = resp.status
    applied = ex.is_write and not up.adapter.is_failure(status, None)
    outcome = ex.extra.setdefault("outcome", {})
    outcome["upstream_status"] = status
    if ex.is_write:
        outcome["applied"] = applied
    if ex.extra.get("tx_steps"):
        rheaders = {str(k): v for k, v in resp.headers.items()}
        await gw.transactions.after_forward(ex, status=status, headers=rheaders, body=None, failed=not applied,
                                            applied=True if applied else None)
    if applied:
        raise TetherError("upstream_applied_response_lost",
                          f"the upstream applied this write (status {status}) but {why}; do not send it again",
                          headers={H.UPSTREAM_STATUS: str(status)},
                          details={"applied": True, "upstream_status": status})
    raise TetherError(code, f"the upstream answered {status} but {why}", headers={H.UPSTREAM_STATUS: str(status)},
                      details={"upstream_status": status})


def _relay_failed(ex: Exchange, err: str, sent: int) -> None:
    """A streamed answer broke off after its head went out: the agent's connection was aborted; the
    journal records why and how many bytes got through."""
    ex.error = TetherError(err)
    ex.reason = err
    ex.extra.setdefault("outcome", {})["bytes_sent"] = sent


def _is_event_stream(resp: UpstreamResponse) -> bool:
    return media_type(resp.headers.get("Content-Type")) == "text/event-stream"


def _json_prefix(data: bytes, content_type: str | None) -> Any:
    """The top-level scalar fields of a JSON answer too large to keep whole (where APIs put ``id``)."""
    mt = media_type(content_type)
    if mt and "json" not in mt:
        return None
    return json_prefix_fields(data)


class StreamedBody:
    """A ``stream_request`` body on its way upstream: bounded by ``max_body_bytes`` *while* it streams
    (past it the upstream connection is dropped before the body's end, so the upstream never gets a
    complete request, and the agent gets 413), each chunk awaited under the client timeout, and hashed,
    so the outcome record carries its sha256 and size (the intent record cannot: it is written first)."""

    def __init__(self, gw: "Runtime", ex: Exchange) -> None:
        self.content = ex.request.content
        self.limit = gw.limits.max_body_bytes
        self.timeout = gw.limits.client_timeout
        self.ex = ex
        self.hash = hashlib.sha256()
        self.size = 0

    async def __aiter__(self) -> Any:
        outcome = self.ex.extra.setdefault("outcome", {})
        outcome["body_streamed"] = True
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    chunk = await self.content.readany()
            except TimeoutError:
                raise TetherError("client_timeout", f"the streamed request body stalled for more than "
                                                    f"{self.timeout:g}s") from None
            if not chunk:
                break
            self.size += len(chunk)
            if self.size > self.limit:
                outcome["body_bytes"] = self.size
                raise TetherError("body_too_large", f"the streamed body exceeds {self.limit} bytes; the upstream "
                                                    "connection was dropped before the body's end")
            self.hash.update(chunk)
            outcome["body_bytes"] = self.size
            yield chunk
        outcome["body_sha256"] = self.hash.hexdigest() if self.size else None
        outcome["body_bytes"] = self.size


def _reflected(ex: Exchange) -> None:
    """The upstream echoed Tether's credential; it was masked. The outcome record says so."""
    ex.extra.setdefault("outcome", {})["credential_reflected"] = True
    log.warning("upstream %s reflected the injected credential (request %s); masked",
                ex.upstream.name if ex.upstream else "?", ex.request_id)


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
