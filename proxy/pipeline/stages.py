"""The pipeline's shared stages, in order: every front door's operations pass them. Each is a small function
``(runtime, exchange)`` with one job. A door's own intake stages come first (the REST door's in
:mod:`proxy.doors.rest.intake`, the MCP door's in :mod:`proxy.doors.mcp.tools`): they build the exchange —
identity, intent, capability, parameters, body — from what the door received.

=====================  ======================================================================
stage                  job
=====================  ======================================================================
check_grant            is every operation's capability granted to this agent?
require_intent         writes must declare their business intent
check_transaction      a write naming a transaction joins it (it must be this agent's, open)
validate_body          field rules, constraints, JSON Schema           (proxy.policy.validation)
rate_limit             token buckets per agent, grant and upstream     (proxy.safety.ratelimit)
decide_mode            live / dry-run / canary / quarantine            (proxy.safety.governance)
journal_intent         commit the intent record durably — before anything leaves
check_relative_caps    read the pre-image, check caps relative to it (max_increase_pct)
capture_dry_run        dry-run writes: store the request, answer synthetically (proxy.safety.review)
upstream_quota         the upstream's shared quota at its reserve or "wait": 429 (proxy.safety.quota)
stamp_provenance       agent, person, intent, event id into the written record (proxy.policy.provenance)
prepare_compensation   inside a transaction: pre-image and undo plan (proxy.safety.transactions)
forward                credentials, provenance, to the upstream and the answer back through the door
                       (a tool of an MCP upstream: called over MCP instead, proxy.pipeline.tool_call)
=====================  ======================================================================
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import TYPE_CHECKING, Any, NoReturn

import orjson
from multidict import CIMultiDict

from adapters.base import Operation

from .. import headers as H
from ..core.exchange import Exchange
from ..core.records import request_record
from ..core.upstream_calls import read_pre_image
from ..errors import TetherError
from ..journal.writer import JournalUnavailable
from ..normalise import ambiguous, decode_segments, unsafe_char
from ..policy.bodies import OVERRIDE_FIELDS, media_type, smuggled_field
from ..policy.identity import require_verified_user_message
from ..policy.provenance import provenance_values, stamped_body
from ..policy.validation import validator_for
from ..safety.quota import check_upstream_quota
from ..safety.ratelimit import rate_limit
from ..safety.review import capture_dry_run
from ..safety.transactions import prepare_compensation
from .tool_call import call_tool
from ..transport.forward import (
    SMALL_BODY,
    WHOLE_BODY_LIMIT,
    AnswerPrefix,
    Timer,
    as_tether_error,
    build_target,
    json_prefix_fields,
    read_whole,
    redact_bytes,
    redact_headers,
    response_headers,
    send,
)
from ..transport.upstream_http import UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from ..core.runtime import Runtime

log = logging.getLogger("tether.stages")

MAX_INTENT = 1000  # characters


def admit_intent(value: str, where: str) -> str | None:
    """An agent's declared intent as Tether keeps it (stripped; None when empty), or 400 when it is too
    long or holds characters that could forge or hide what an operator reads (control, line-separator,
    bidi). ``where`` names it for the agent: ``X-Tether-Intent``, or a tool's ``intent`` argument."""
    value = value.strip()
    if len(value) > MAX_INTENT:
        raise TetherError("bad_request", f"{where} is longer than {MAX_INTENT} characters")
    bad = unsafe_char(value)
    if bad is not None:
        raise TetherError("bad_request", f"{where} holds {bad}: control, line-separator and bidi "
                                         "characters are refused in text an operator reads")
    return value or None


def refuse_smuggled(ex: Exchange, names: Any, json: bool = False) -> None:
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
        ex.upstream.adapter.check_request_headers(op, ex.headers)  # type: ignore[union-attr]
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
    """Commit the intent record. A write waits for it before anything leaves. A read (unless its
    capability says ``journal: before_forward``) is forwarded while the record commits, and its answer —
    or any answer — is released only once the record is durable (:func:`intent_durable`): no data reaches
    an agent before the record of its access is on disk, and the fsync overlaps the upstream's latency."""
    if (not ex.is_write and ex.mode == "live" and ex.capability is not None
            and ex.capability.config.journal == "while_forwarding"):
        try:
            ex.extra["intent_commit"] = gw.journal.enqueue(request_record(ex))
        except JournalUnavailable:
            ex.decision = "refused"
            raise TetherError("journal_unavailable") from None
        return
    await _journal_intent_now(gw, ex)


async def intent_durable(ex: Exchange) -> None:
    """Wait until a read's intent record is durable (see :func:`journal_intent`): before any of its answer
    is released. A commit that failed withholds the answer: 503 ``journal_unavailable``."""
    fut = ex.extra.pop("intent_commit", None)
    if fut is None:
        return
    try:
        seq = await fut
    except JournalUnavailable:
        ex.decision = "refused"
        raise TetherError("journal_unavailable", "the record of this read could not be made durable, so its "
                                                 "answer is withheld") from None
    ex.intent_seq = seq
    ex.authz_event = str(seq)


async def _journal_intent_now(gw: "Runtime", ex: Exchange) -> None:
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
    src = ex.headers
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
        v = ex.http_version
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
    if up.is_mcp:  # a tool of an MCP upstream: called over MCP, not sent over HTTP
        await call_tool(gw, ex)
        return
    body: Any = ex.body
    length: int | None = None
    stamped = ex.extra.get("forward_body")  # set by the stamp_provenance stage
    if stamped is not None:
        body, content_type = stamped
        hdrs = await upstream_headers(gw, ex, body_override=True)
        hdrs.append(("Content-Type", content_type))
    else:
        hdrs = await upstream_headers(gw, ex)
        if body is None and ex.body_stream is not None:  # stream_request capabilities (REST door)
            src = ex.body_stream
            length = src.length  # passed on as is: object stores answer 411 to chunked
            await src.begin()  # every check passed: an agent waiting on Expect may send its body now
            body = StreamedBody(gw, ex, src.content)
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
    if "intent_commit" in ex.extra:
        try:
            await intent_durable(ex)  # the read went out while its record committed: nothing before it is durable
        except TetherError:
            resp.close()
            raise
    if wire_method == "HEAD":  # no body; the answer keeps its Content-Length
        resp.release()
        ex.door.answer(ex, resp.status, resp.reason, out_headers, None, upstream=resp)
        return
    if cl is not None and cl <= SMALL_BODY and (limit is None or cl <= limit):
        # small answers (most API reads): one read, one write, instead of a streamed prepare/write/eof
        data = await read_whole(resp, SMALL_BODY, up.timeouts)
        resp.release()
        if needles:
            data, hit = redact_bytes(data, needles)
            if hit:
                _reflected(ex)
        ex.door.answer(ex, resp.status, resp.reason, out_headers, data, upstream=resp)
        return
    found = [False]
    sent, err = await ex.door.relay(ex, resp, out_headers, limit, needles, found)
    if found[0]:
        _reflected(ex)
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
        ex.door.answer(ex, resp.status, resp.reason, out_headers, data, upstream=resp)
        return
    prefix = AnswerPrefix(WHOLE_BODY_LIMIT)
    found = [False]
    sent, err = await ex.door.relay(ex, resp, out_headers, limit, up.reflection_needles(), found, tap=prefix)
    if found[0]:
        _reflected(ex)
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

    def __init__(self, gw: "Runtime", ex: Exchange, content: Any) -> None:
        self.content = content  # a reader with readany() (aiohttp's StreamReader)
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


def stamp_provenance(gw: "Runtime", ex: Exchange) -> None:
    """Pipeline stage: stamp live writes (dry-run writes are stamped when their approval replays them)."""
    up = ex.upstream
    if up is None or not up.record_fields or not ex.is_write or ex.mode != "live":
        return
    ident = ex.identity
    assert ident is not None
    outer = ex.extra.get("composite_outer") or ex.operations[0]
    res = stamped_body(up, outer, ex.operations, composite=ex.composite, kind=ex.extra.get("body_kind"),
                       content_type=ex.headers.get("Content-Type"),
                       values=provenance_values(ident.agent, ident.on_behalf_of, ex.intent, ex.authz_event))
    if res is None:
        return
    body, ctype, new = res
    ex.extra["forward_body"] = (body, ctype)
    if not ex.composite:
        ex.operations[0].body = new  # the undo plan then restores the provenance fields too


# The shared stages, in order (see the module doc); a door's intake stages come first.
SHARED_STAGES: list[tuple[str, Any]] = [
    ("check_grant", check_grant),
    ("require_intent", require_intent),
    ("check_transaction", check_transaction),
    ("validate_body", validate_body),
    ("rate_limit", rate_limit),
    ("decide_mode", decide_mode),
    ("journal_intent", journal_intent),
    ("check_relative_caps", check_relative_caps),
    ("capture_dry_run", capture_dry_run),
    ("upstream_quota", check_upstream_quota),
    ("stamp_provenance", stamp_provenance),
    ("prepare_compensation", prepare_compensation),
    ("forward", forward),
]
