"""The MCP door's backend: the capability registry served as tools, every call through the one pipeline.

:class:`PipelineBackend` implements the protocol layer's :class:`~.backend.ToolBackend` with Tether's own
decisions:

* **who** — the agent's bearer JWT, verified by the same verifier as the REST door (``X-Tether-User-Token``
  too), on every HTTP request; the MCP session is bound to the agent *and* the person it acts for;
* **which tools** — one per capability granted to the calling agent, nothing else (:class:`ToolCatalog`):
  a name derived from the capability id, its title and description from the rules plus what its mode
  means, an input schema built from the path parameters (with their patterns), a ``query`` object for
  reads, the ``body`` (from ``json_schema`` or the field rules) and, for writes, a required ``intent``;
  annotations say what the capability is (``readOnlyHint``, ``destructiveHint``, ``idempotentHint``).
  The list changes when the rules, a promotion or a quarantine do (``tools_version``);
* **what a call does** — the exchange is built by this door's intake stages (:data:`MCP_INTAKE`:
  ``resolve_tool``, ``bind_arguments``), then the *same* shared stages as the REST door run: grant,
  validation, rate limits, mode, the intent record durable before anything leaves, dry-run capture,
  quota, provenance, compensation, forwarding through the upstream's adapter. A rule, promotion,
  quarantine or rate limit therefore holds identically on both doors;
* **the answer** — :class:`McpDoor` keeps the upstream's answer (bounded) and :func:`render` makes it a
  tool result: the JSON as ``structuredContent`` plus a text rendering; a dry-run capture says what was
  captured, the review item and that nothing was applied yet; a refusal is ``isError: true`` with
  Tether's error code (the model can read it and correct itself).

Built-in tools let an agent use transactions and follow its review items from MCP
(``tether_transaction_begin/commit/rollback/status``, ``tether_review_status``); a write may also name
its transaction with the ``transaction`` argument or ``_meta["tether/transaction"]``.

MCP upstreams' resources and prompts an agent is granted are served beside its tools (:mod:`.reads`): the
backend is also a ``ResourceBackend`` and a ``PromptBackend``, and relays the servers' log messages about
a call (``relays_logs``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote, urlencode

import orjson
from aiohttp import web
from mcp_types import (
    CallToolResult,
    GetPromptResult,
    Prompt,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    TextContent,
    Tool,
    ToolAnnotations,
)
from multidict import CIMultiDict

from adapters.base import FORM_CT, Operation

from ...core.exchange import Exchange
from ...errors import AuthError, TetherError
from ...journal.writer import base_record
from ...normalise import ambiguous, canonical_path, decode_segments
from ...pipeline.stages import admit_intent, refuse_smuggled
from ...policy.bodies import OVERRIDE_FIELDS, encode_form, media_type, parse_body
from ...policy.identity import USER_TOKEN, Identity
from .backend import (
    REFUSED,
    McpAuthError,
    McpRefused,
    PromptGet,
    ResourceRead,
    ToolCall,
    UnknownPrompt,
    UnknownResource,
    UnknownTool,
)
from .reads import (
    PromptCatalog,
    ResourceCatalog,
    bind_prompt_arguments,
    fetch_grants,
    json_arguments_body,
    resolve_fetch,
)
from .results import error_result, error_result_from

if TYPE_CHECKING:
    from ...core.runtime import Runtime
    from ...pipeline.runner import Pipeline
    from ...policy.registry import Capability, Grant

log = logging.getLogger("tether.mcp")

MAX_TEXT = 64 * 1024  # characters of a result's text rendering (the structured content is whole)
MAX_RECORDED_URI = 2200  # characters of a resource URI or prompt name the journal keeps (longer ones match nothing)
_NAME_OK = re.compile(r"[A-Za-z0-9_-]")
_TOOL_NAME_MAX = 64  # the strictest client limit in use (OpenAI's function names); MCP allows 128
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

MODE_WORDS = {
    "live": "",
    "dry_run": "Dry-run: a call is captured for a human to review before it takes effect; nothing is applied "
               "until it is approved.",
    "canary": "Canary: some calls take effect at once, the rest are captured for a human to review.",
}
QUARANTINE_WORDS = ("This agent is quarantined: its writes are held for review (or refused) until a person "
                    "releases it.")


class AgentPrincipal:
    """The caller of one MCP request: the verified identity. Sessions are bound to the agent and the person
    it acts for together (a session opened for Jane is not Bob's, even with the same agent)."""

    __slots__ = ("identity", "key")

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.key = identity.agent + "|" + (identity.on_behalf_of or "")


# --------------------------------------------------------------------------- the tool catalogue


def tool_names(capabilities: list[str], bare: dict[str, str] | None = None) -> dict[str, str]:
    """capability id -> tool name: ``[A-Za-z0-9_-]``, at most 64 characters (every client accepts it), and
    one-to-one — a name that two ids would share, or one cut short, gets a suffix from the id's hash.
    ``bare`` names the capabilities whose tool keeps an MCP upstream's own name (``tool_names: bare``)
    instead of one derived from the capability id; the same rule then applies to it."""
    def plain(cap: str) -> str:
        src = bare.get(cap, cap) if bare else cap
        return "".join(c if _NAME_OK.fullmatch(c) else "_" for c in src)

    out: dict[str, str] = {}
    taken: dict[str, int] = {}
    for cap in capabilities:
        taken[plain(cap)] = taken.get(plain(cap), 0) + 1
    for cap in capabilities:
        name = plain(cap)
        if taken[name] > 1 or len(name) > _TOOL_NAME_MAX or name.startswith("tether_"):
            h = hashlib.sha256(cap.encode()).hexdigest()[:8]
            name = name[: _TOOL_NAME_MAX - 9] + "_" + h
        out[cap] = name
    return out


def _constraint_schema(c: Any) -> dict[str, Any]:
    s: dict[str, Any] = {}
    if c.type is not None:
        s["type"] = c.type
    if c.enum is not None:
        s["enum"] = list(c.enum)
    if c.min is not None:
        s["minimum"] = c.min
    if c.max is not None:
        s["maximum"] = c.max
    if c.min_length is not None:
        s["minLength"] = c.min_length
    if c.max_length is not None:
        s["maxLength"] = c.max_length
    if c.pattern is not None:
        s["pattern"] = c.pattern
    return s


def body_schema(cap: "Capability") -> dict[str, Any]:
    """The ``body`` argument's JSON Schema: the capability's ``json_schema`` when it has one, else what its
    field rules say (allowed fields as properties, required ones, constraints on top-level fields). The
    rules themselves are checked by the pipeline either way; the schema tells the model what will pass."""
    rules = cap.config.body
    if rules is None:
        return {"type": "object", "description": "the request body (a JSON object)"}
    if rules.json_schema is not None:
        return dict(rules.json_schema)
    props: dict[str, Any] = {}
    for f in rules.allow_fields or []:
        if "." not in f and "*" not in f:
            props[f] = {}
    for f, c in rules.constraints.items():
        if "." not in f:
            props[f] = {**props.get(f, {}), **_constraint_schema(c)}
    s: dict[str, Any] = {"type": "object"}
    if props:
        s["properties"] = props
    req = [f for f in rules.require_fields if "." not in f]
    if req:
        s["required"] = req
    if rules.allow_fields is not None and all("." not in f and "*" not in f for f in rules.allow_fields):
        s["additionalProperties"] = False
    return s


def input_schema(cap: "Capability") -> dict[str, Any]:
    """A tool's input schema (JSON Schema 2020-12): path parameters (with their patterns), ``query`` for
    reads, ``body`` for writes that take one, ``intent`` (required for writes), ``transaction``."""
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, pattern in zip(cap.param_names, cap.param_patterns):
        p: dict[str, Any] = {"type": "string", "minLength": 1, "description": f"path parameter {{{name}}}"}
        if pattern is not None:
            p["pattern"] = "^(?:" + pattern.pattern + ")$"
        props[name] = p
        required.append(name)
    if not cap.is_write or cap.method not in BODY_METHODS:
        props["query"] = {"type": "object", "description": "query parameters, sent as given",
                          "additionalProperties": {"type": ["string", "number", "boolean", "array"]}}
    if cap.method in BODY_METHODS:
        props["body"] = body_schema(cap)
    if cap.is_write:
        props["intent"] = {"type": "string", "minLength": 1, "maxLength": 1000,
                           "description": "why: the business intent of this call, in a sentence (journaled, shown "
                                          "to the people who review and audit it)"}
        required.append("intent")
        props["transaction"] = {"type": "string", "description": "a transaction id (tether_transaction_begin) "
                                                                 "this write joins, so it can be rolled back"}
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


BUILTIN_TOOLS: dict[str, dict[str, Any]] = {
    "tether_transaction_begin": {
        "description": "Open a transaction: writes that name it (argument 'transaction') are undone newest "
                       "first if it is rolled back, or if one of them fails.",
        "properties": {"name": {"type": "string", "maxLength": 200, "description": "what the workflow is"},
                       "deadline": {"type": "string", "description": "rolled back unless committed within, e.g. 15m"}},
        "required": []},
    "tether_transaction_commit": {
        "description": "Commit a transaction: its writes stay.",
        "properties": {"transaction": {"type": "string"}}, "required": ["transaction"]},
    "tether_transaction_rollback": {
        "description": "Roll a transaction back: its writes are undone, newest first.",
        "properties": {"transaction": {"type": "string"}}, "required": ["transaction"]},
    "tether_transaction_status": {
        "description": "A transaction's state and its steps (what was written and how each would be undone).",
        "properties": {"transaction": {"type": "string"}}, "required": ["transaction"]},
    "tether_review_status": {
        "description": "What became of a call captured for review: pending, approved and replayed (with the "
                       "upstream's answer), rejected (with the reason) or expired.",
        "properties": {"item": {"type": "string", "description": "the review item id a captured call returned"}},
        "required": ["item"]},
}


def tool_grants(grants: list["Grant"]) -> list["Grant"]:
    """The grants served as tools: REST capabilities and MCP upstreams' tools (an MCP upstream's resources
    and prompts are served as resources and prompts, :mod:`.reads`)."""
    return [g for g in grants if g.capability.kind in ("rest", "tool")]


def names_of(state: Any, grants: list["Grant"]) -> dict[str, str]:
    """capability id -> tool name for these grants (see :func:`tool_names`)."""
    mcp = state.mcp_upstreams
    bare = {g.capability.name: g.capability.target for g in grants if g.capability.kind == "tool"
            and g.capability.upstream in mcp and mcp[g.capability.upstream].cfg.tool_names == "bare"}
    return tool_names([g.capability.name for g in grants], bare or None)


def tether_arg_names(schema: Any) -> tuple[str, str]:
    """The names of Tether's own ``intent`` and ``transaction`` arguments for a tool whose input schema is
    ``schema``: those, unless the tool has arguments of that name (then ``tether_intent``, ...)."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    props = props if isinstance(props, dict) else {}
    out = []
    for base in ("intent", "transaction"):
        name = base
        while name in props:
            name = "tether_" + name
        out.append(name)
    return out[0], out[1]


INTENT_ARG = {"type": "string", "minLength": 1, "maxLength": 1000,
              "description": "why: the business intent of this call, in a sentence (journaled, shown to the people "
                             "who review and audit it)"}
TRANSACTION_ARG = {"type": "string", "description": "a transaction id (tether_transaction_begin) this write joins, "
                                                    "so it can be rolled back"}


def upstream_tool_schema(cap: "Capability", listed: Tool) -> dict[str, Any]:
    """An MCP upstream tool's input schema as an agent sees it: the pinned ``inputSchema`` plus, for a
    write, Tether's required ``intent`` and optional ``transaction`` (renamed if the tool has its own)."""
    schema = copy.deepcopy(listed.input_schema) if isinstance(listed.input_schema, dict) else {}
    schema.setdefault("type", "object")
    if not cap.is_write:
        return schema
    ik, tk = tether_arg_names(schema)
    props = dict(schema.get("properties") or {})
    props[ik] = dict(INTENT_ARG)
    props[tk] = dict(TRANSACTION_ARG)
    schema["properties"] = props
    schema["required"] = [*(r for r in schema.get("required") or [] if r != ik), ik]
    return schema


class ToolCatalog:
    """One agent's tools under one rules version and one set of modes (built on demand, cached)."""

    def __init__(self, rt: "Runtime", agent: str, names: dict[str, str]) -> None:
        state = rt.state
        gov = rt.governance
        quarantined = agent in gov.quarantined
        grants: list[Grant] = tool_grants(state.registry.agent_grants.get(agent, []))
        self.by_name: dict[str, Capability] = {}
        tools: list[Tool] = []
        any_write = False
        for g in grants:
            cap = g.capability
            name = names[cap.name]
            mode = gov.grant_mode(g) if cap.is_write else "live"
            if cap.kind == "tool":
                up = state.mcp_upstreams.get(cap.upstream)
                listed = up.usable(cap.target) if up is not None else None
                if listed is None:  # changed, missing, or not listed (yet): hidden
                    continue
                tools.append(self._upstream_tool(cap, name, mode, quarantined, listed))
            else:
                tools.append(self._tool(cap, name, mode, quarantined))
            self.by_name[name] = cap
            any_write = any_write or cap.is_write
        if any_write:
            for name, spec in BUILTIN_TOOLS.items():
                tools.append(Tool(name=name, title=name.replace("_", " "), description=spec["description"],
                                  input_schema={"type": "object", "properties": spec["properties"],
                                                "required": spec["required"], "additionalProperties": False},
                                  annotations=ToolAnnotations(read_only_hint=name.endswith("status"),
                                                              destructive_hint=name.endswith("rollback"),
                                                              open_world_hint=False)))
        self.tools = tools

    @staticmethod
    def _tool(cap: "Capability", name: str, mode: str, quarantined: bool) -> Tool:
        cfg = cap.config
        parts = [cfg.description.strip()] if cfg.description.strip() else []
        parts.append(f"{cap.method} {cap.template} on {cap.upstream} ({cap.operation}).")
        if cap.is_write:
            if MODE_WORDS.get(mode):
                parts.append(MODE_WORDS[mode])
            if quarantined:
                parts.append(QUARANTINE_WORDS)
            parts.append("Say why in 'intent'.")
        title = (getattr(cfg, "title", "") or "").strip() or cap.name
        return Tool(name=name, title=title, description=" ".join(parts), input_schema=input_schema(cap),
                    annotations=ToolAnnotations(
                        title=title, read_only_hint=not cap.is_write,
                        destructive_hint=cap.operation == "delete" if cap.is_write else None,
                        idempotent_hint=cap.method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS"),
                        open_world_hint=True))

    @staticmethod
    def _upstream_tool(cap: "Capability", name: str, mode: str, quarantined: bool, listed: Tool) -> Tool:
        """An MCP upstream's tool as this agent sees it: the pinned definition (description, input and
        output schema), Tether's arguments for a write, what the mode means — and hints from the
        capability's ``effect``, never from the server's annotations."""
        parts = [listed.description.strip()] if (listed.description or "").strip() else []
        parts.append(f"Tool {cap.target} of MCP server {cap.upstream}.")
        if cap.is_write:
            if MODE_WORDS.get(mode):
                parts.append(MODE_WORDS[mode])
            if quarantined:
                parts.append(QUARANTINE_WORDS)
            parts.append(f"Say why in '{tether_arg_names(listed.input_schema)[0]}'.")
        title = (listed.title or "").strip() or cap.name
        # a write may be answered "captured for review" instead of its output: no outputSchema to hold it to
        return Tool(name=name, title=title, description=" ".join(parts),
                    input_schema=upstream_tool_schema(cap, listed),
                    output_schema=None if cap.is_write else listed.output_schema,
                    annotations=ToolAnnotations(title=title, read_only_hint=not cap.is_write,
                                                destructive_hint=True if cap.is_write else None,
                                                idempotent_hint=not cap.is_write, open_world_hint=True))


# --------------------------------------------------------------------------- the door


class McpAnswer:
    """An answer the pipeline gave through the MCP door (kept whole, bounded); ``result``: an MCP
    upstream's tool result (or resource, or prompt), relayed as it is."""

    __slots__ = ("status", "headers", "body", "truncated", "result")

    def __init__(self, status: int, headers: Any, body: bytes | None, truncated: bool = False,
                 result: CallToolResult | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.truncated = truncated
        self.result: Any = result


class McpDoor:
    """How the MCP door answers: it keeps the answer (at most ``max_bytes`` of a body) for :func:`render`."""

    channel = "mcp"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def refuse(self, ex: Exchange, err: TetherError) -> None:
        ex.response = err

    def answer(self, ex: Exchange, status: int, reason: str | None, headers: Any, body: bytes | None, *,
               upstream: Any = None) -> None:
        ex.response = McpAnswer(status, headers, body, result=upstream if isinstance(
            upstream, (CallToolResult, ReadResourceResult, GetPromptResult)) else None)

    async def relay(self, ex: Exchange, resp: Any, headers: Any, limit: int | None, needles: Any = None,
                    found: list[bool] | None = None, tap: Any = None) -> tuple[int, str | None]:
        from ...transport.forward import redacted_chunks
        from ...transport.upstream_http import UpstreamError

        cap = self.max_bytes if limit is None else min(limit, self.max_bytes)
        parts: list[bytes] = []
        size = 0
        error: str | None = None
        source = resp.chunks() if not needles else redacted_chunks(resp.chunks(), needles, found or [False])
        try:
            async for chunk in source:
                if tap is not None:
                    tap(chunk)
                size += len(chunk)
                if size > cap:
                    error = "upstream_response_too_large"
                    break
                parts.append(chunk)
        except UpstreamError as exc:
            error = "upstream_timeout" if exc.kind == "read_timeout" else "upstream_unavailable"
        finally:
            resp.release() if error is None else resp.close()
        ex.response = McpAnswer(resp.status, headers, b"".join(parts), truncated=error is not None)
        return size, error


# --------------------------------------------------------------------------- intake stages


def resolve_tool(rt: "Runtime", ex: Exchange) -> None:
    """The tool a ``tools/call`` names -> its capability and upstream (default deny: a name the caller
    has no tool for is refused, journaled, and answered as the protocol's unknown-tool error)."""
    if "mcp_fetch" in ex.extra:  # a resources/read or prompts/get (.reads)
        resolve_fetch(rt, ex)
        return
    call: ToolCall = ex.extra["tool_call"]
    backend: PipelineBackend = ex.extra["mcp_backend"]
    cap = backend.names_for(ex.identity.agent).get(call.name)  # type: ignore[union-attr]
    if cap is None:
        raise TetherError("capability_not_granted", f"agent {ex.identity.agent!r} has no tool {call.name!r}")  # type: ignore[union-attr]
    if cap.kind == "tool":  # an MCP upstream's tool: callable only while its listed definition has its pin
        mcp_up = ex.state.mcp_upstreams[cap.upstream]
        ex.upstream = mcp_up
        ex.capability = cap
        ex.method = cap.method
        ex.raw_path = cap.target
        mcp_up.pinned(cap.target)  # tool_definition_changed (409) / upstream_unavailable: refused, journaled
        return
    up = rt.state.upstreams[cap.upstream]
    ex.upstream = up
    ex.capability = cap
    ex.method = cap.method


def bind_arguments(rt: "Runtime", ex: Exchange) -> None:
    """A tool's arguments -> the request the REST door would have received for it: the path built from
    the template (each parameter one segment, checked against its pattern), the query, the body encoded
    the way the upstream takes it and parsed back exactly as the REST door parses it, the intent and the
    transaction. The path is then matched like any other (it must reach this very capability)."""
    if "mcp_fetch" in ex.extra:
        bind_prompt_arguments(rt, ex)
        return
    call: ToolCall = ex.extra["tool_call"]
    cap = ex.capability
    up = ex.upstream
    assert cap is not None and up is not None
    if cap.kind == "tool":
        bind_tool_arguments(rt, ex)
        return
    args = call.arguments or {}
    plan = _path_plan(ex.registry, cap)
    if not plan.known.issuperset(args):
        extra = sorted(set(args) - plan.known)
        raise TetherError("bad_request", f"unknown argument(s) {', '.join(map(repr, extra))} for tool {call.name!r}")
    _intent_and_transaction(ex, call, args.get("intent"), args.get("transaction"), "intent")
    # the path: one segment per parameter, as the REST door would have decoded it
    segs: list[str] = []
    for literal, name, pattern in plan.segments:
        if name is None:
            segs.append(literal)
            continue
        value = args.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TetherError("bad_request", f"path parameter {name!r} is required (a string)")
        value = str(value)
        if value in ("", ".", "..") or "/" in value or "\\" in value:
            raise ambiguous(f"path parameter {name!r} must be one plain path segment")
        if pattern is not None and not pattern.fullmatch(value):
            raise TetherError("bad_request", f"path parameter {name!r} must match {pattern.pattern!r}")
        segs.append(quote(value, safe=""))
    raw = "/" + "/".join(segs) + plan.trailing
    query = ""
    q = args.get("query")
    if q is not None:
        if not isinstance(q, dict):
            raise TetherError("bad_request", "the query argument is an object of parameters")
        pairs: list[tuple[str, str]] = []
        for k, v in q.items():
            for item in (v if isinstance(v, list) else [v]):
                if isinstance(item, (dict, list)) or item is None:
                    raise TetherError("bad_request", f"query parameter {k!r}: a string, number or boolean")
                pairs.append((str(k), ("true" if item else "false") if isinstance(item, bool) else str(item)))
        creds = up.credential_params
        for k, _ in pairs:
            if k.lower() in OVERRIDE_FIELDS:
                raise ambiguous(f"query parameter {k!r} is a method override: call the tool that does it")
            if creds and k.lower() in creds:
                raise TetherError("credential_in_request",
                                  f"query parameter {k!r} carries a credential; Tether injects the upstream's own")
        query = urlencode(pairs, quote_via=quote)
    segments = decode_segments(raw)
    found = ex.registry.match(up.name, cap.method, segments, query)
    if found is None or found[0].name != cap.name:
        raise TetherError("route_not_registered",
                          f"these arguments make {cap.method} {raw}, which is not tool {call.name!r}'s capability")
    ex.capability, ex.params = found
    ex.raw_path = canonical_path(raw, segments, cap.template.endswith("/") and len(cap.template) > 1)
    ex.segments = segments
    ex.query = query
    headers: CIMultiDict[str] = CIMultiDict(Accept="application/json")
    op = Operation(method=cap.method, path=ex.raw_path, query=query, segments=segments, capability=found[0],
                   params=found[1])
    body = args.get("body")
    if body is not None:
        if cap.method not in BODY_METHODS:
            raise TetherError("bad_request", f"tool {call.name!r} ({cap.method}) takes no body")
        if not isinstance(body, dict):
            raise TetherError("bad_request", "the body argument is a JSON object")
        ctype = up.adapter.request_content_type
        raw_body = encode_form(body).encode("ascii") if media_type(ctype) == FORM_CT else orjson.dumps(body)
        if len(raw_body) > rt.limits.max_body_bytes:
            raise TetherError("body_too_large", f"the body exceeds {rt.limits.max_body_bytes} bytes")
        kind, value = parse_body(raw_body, ctype, rt.limits.max_json_depth)  # as the REST door reads it
        if isinstance(value, dict):
            refuse_smuggled(ex, value, json=kind == "json")
        headers["Content-Type"] = ctype
        ex.body = raw_body
        ex.body_digest = hashlib.sha256(raw_body).hexdigest()
        ex.extra["body_kind"] = kind
        op.body, op.raw_body, op.content_type = value, raw_body, ctype
    elif cap.method in BODY_METHODS and cap.is_write:
        ex.body = b""
    ex.headers = headers
    ex.operations = [op]


class _PathPlan:
    """A registry tool's path template, taken apart once per rules version (not per call): its segments
    as (literal, None, None) or ("", parameter, pattern), the trailing slash, the arguments it knows."""

    __slots__ = ("segments", "trailing", "known")

    def __init__(self, cap: Any) -> None:
        segs: list[tuple[str, str | None, Any]] = []
        for seg in cap.template.strip("/").split("/") if cap.template != "/" else []:
            if seg.startswith("{") and seg.endswith("}"):
                name = seg[1:-1]
                segs.append(("", name, cap.param_patterns[cap.param_names.index(name)]))
            else:
                segs.append((seg, None, None))
        self.segments = tuple(segs)
        self.trailing = "/" if cap.template.endswith("/") and len(cap.template) > 1 else ""
        self.known = frozenset(cap.param_names) | {"query", "body", "intent", "transaction"}


def _path_plan(registry: Any, cap: Any) -> _PathPlan:
    plans = registry.tool_plans
    plan = plans.get(cap.name)
    if plan is None:
        plan = plans[cap.name] = _PathPlan(cap)
    return plan


def _intent_and_transaction(ex: Exchange, call: ToolCall, intent: Any, tx: Any, where: str) -> None:
    """Tether's own arguments of a call: the intent (admitted like the REST header), the transaction
    (the argument, else ``_meta["tether/transaction"]``; null counts as not given) and the trace context."""
    if intent is not None:
        if not isinstance(intent, str):
            raise TetherError("bad_request", f"the {where} argument is a string")
        ex.intent = admit_intent(intent, f"the {where} argument")
    meta = call.meta or {}
    tx = meta.get("tether/transaction") if tx is None else tx
    if tx is not None:
        if not isinstance(tx, str):
            raise TetherError("bad_request", "the transaction argument is a string")
        ex.transaction_id = tx.strip() or None
    tp = meta.get("traceparent")
    if isinstance(tp, str):
        ex.traceparent = tp


def bind_tool_arguments(rt: "Runtime", ex: Exchange) -> None:
    """An MCP upstream tool's arguments -> the operation: Tether's own arguments (``intent``,
    ``transaction``, under the names :func:`tether_arg_names` gives) taken out, the rest is the body the
    capability's field rules, ``json_schema`` and ``audit_fields`` apply to — and exactly what the tool
    is called with (its digest is journaled)."""
    call: ToolCall = ex.extra["tool_call"]
    cap = ex.capability
    up = ex.upstream
    assert cap is not None and up is not None
    listed = up.pinned(cap.target)  # type: ignore[union-attr]
    args = dict(call.arguments or {})
    ik, tk = tether_arg_names(listed.input_schema)
    _intent_and_transaction(ex, call, args.pop(ik, None), args.pop(tk, None), ik)
    raw_body = json_arguments_body(rt, ex, args)
    ex.headers = CIMultiDict()
    ex.operations = [Operation(method=cap.method, path=cap.target, body=args, raw_body=raw_body,
                               content_type="application/json", capability=cap)]


MCP_INTAKE: list[tuple[str, Any]] = [
    ("resolve_tool", resolve_tool),
    ("bind_arguments", bind_arguments),
]


# --------------------------------------------------------------------------- results


def _decode(body: bytes | None, headers: Any) -> Any:
    if not body:
        return None
    ctype = headers.get("Content-Type") if headers is not None else None
    mt = media_type(ctype)
    if mt and "json" not in mt:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _text(value: Any, body: bytes | None) -> str:
    if value is not None:
        text = orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()
    else:
        text = (body or b"").decode("utf-8", "replace")
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n… (cut; the whole answer is in structuredContent)"


def render(ex: Exchange) -> CallToolResult:
    """The pipeline's outcome as a tool result (see the module doc)."""
    meta = {"tether/request_id": ex.request_id}
    if ex.error is not None:
        err = ex.error
        details = dict(err.details or {})
        outcome = ex.extra.get("outcome") or {}
        if outcome.get("applied"):
            details.setdefault("applied", True)
        if outcome.get("upstream_status") is not None:
            details.setdefault("upstream_status", outcome["upstream_status"])
        res = error_result(err.code, err.message, status=err.status, details=details or None,
                           request_id=ex.request_id)
        res.meta = meta
        return res
    ans = ex.response
    if not isinstance(ans, McpAnswer):  # nothing answered: a stage ended the request without a word
        res = error_result("internal_error", "the call ended without an answer", status=500, request_id=ex.request_id)
        res.meta = meta
        return res
    if ex.mode == "dry_run" and ex.review_item_id and ex.capability is not None and ex.capability.kind == "tool":
        doc = {"dry_run": True, "applied": False, "review_item": ex.review_item_id,
               "message": f"Captured for review: tool {ex.capability.target} was not called yet. A person approves "
                          "it (then Tether calls it exactly as captured) or rejects it; tether_review_status tells "
                          "which, and what the tool answered."}
        meta["tether/review_item"] = ex.review_item_id
        return CallToolResult(content=[TextContent(text=doc["message"] + f"\nReview item: {ex.review_item_id}")],
                              structured_content=doc, meta=meta)
    if ans.result is not None:  # an MCP upstream's tool result, relayed (Tether's _meta added)
        res = ans.result
        theirs = {k: v for k, v in (res.meta or {}).items() if not k.startswith("tether/")}
        return res.model_copy(update={"meta": {**theirs, **meta}})
    value = _decode(ans.body, ans.headers)
    if ex.mode == "dry_run" and ex.review_item_id:
        doc = {"dry_run": True, "applied": False, "review_item": ex.review_item_id,
               "message": "Captured for review: nothing was applied yet. A person approves it (then it is sent "
                          "as captured) or rejects it; tether_review_status tells which.",
               "synthetic": value}
        meta["tether/review_item"] = ex.review_item_id
        return CallToolResult(content=[TextContent(text=doc["message"] + f"\nReview item: {ex.review_item_id}\n"
                                                   + "What the upstream would answer (synthetic):\n"
                                                   + _text(value, ans.body))],
                              structured_content=doc, meta=meta)
    meta["tether/status"] = ans.status
    structured = value if isinstance(value, dict) else {"result": value} if value is not None else None
    if ans.status >= 400:
        text = f"The upstream answered {ans.status}:\n" + _text(value, ans.body)
        doc = {"status": ans.status, "body": value if value is not None else (ans.body or b"").decode("utf-8", "replace")}
        return CallToolResult(content=[TextContent(text=text)], structured_content={"upstream_error": doc},
                              is_error=True, meta=meta)
    return CallToolResult(content=[TextContent(text=_text(value, ans.body) or f"({ans.status}, no content)")],
                          structured_content=structured, meta=meta)


# --------------------------------------------------------------------------- the backend


class PipelineBackend:
    """The :class:`~.backend.ToolBackend` over Tether's pipeline (see the module doc); also the
    resource and prompt backend, and it relays the servers' log messages about a call."""

    relays_logs = True

    def __init__(self, rt: "Runtime", pipeline: "Pipeline", max_result_bytes: int) -> None:
        self.rt = rt
        self.pipeline = pipeline
        self.door = McpDoor(max_result_bytes)
        self._names: dict[tuple[str, str], dict[str, Capability]] = {}  # (rules version, agent) -> tools
        self._catalogs: dict[tuple[str, object], ToolCatalog] = {}
        # (rules version, agent) -> granted resource templates by upstream / prompts by name
        self._resource_grants: dict[tuple[str, str], dict[str, list[Capability]]] = {}
        self._prompt_names: dict[tuple[str, str], dict[str, Capability]] = {}
        self._read_catalogs: dict[tuple[str, str, object], Any] = {}

    # -- who ----------------------------------------------------------------------------------

    async def authenticate(self, request: web.BaseRequest) -> AgentPrincipal:
        hdrs = request.headers
        auth = hdrs.getall("Authorization", ())
        try:
            if len(auth) > 1:
                raise TetherError("ambiguous_request", "more than one Authorization header")
            ident = await self.rt.state.verifier.identify(auth[0] if auth else None, hdrs.getall(USER_TOKEN, ()))
        except AuthError as err:
            raise McpAuthError(err.code, err.message, status=err.status, token_presented=bool(auth)) from None
        except TetherError as err:
            raise McpAuthError(err.code, err.message, status=err.status if err.status in (401, 403) else 401,
                               token_presented=bool(auth)) from None
        if ident.agent not in self.rt.state.rules.agents:
            raise McpAuthError("agent_unknown", f"agent {ident.agent!r} is not declared in the rules", status=403)
        return AgentPrincipal(ident)

    # -- which tools ----------------------------------------------------------------------------

    def names_for(self, agent: str) -> dict[str, "Capability"]:
        """tool name -> capability for the agent's grants under the rules in force."""
        state = self.rt.state
        key = (state.registry.version, agent)
        found = self._names.get(key)
        if found is None:
            grants = tool_grants(state.registry.agent_grants.get(agent, []))
            names = names_of(state, grants)
            found = {names[g.capability.name]: g.capability for g in grants}
            if len(self._names) > 4096:
                self._names.clear()
            self._names[key] = found
        return found

    def tools_version(self, principal: AgentPrincipal) -> object:
        agent = principal.identity.agent
        gov = self.rt.governance
        modes = tuple(sorted((c, m) for (a, c), m in gov.promoted.items() if a == agent))
        state = self.rt.state
        return (state.registry.version, agent in gov.quarantined, modes, state.mcp_version())

    def tools_for(self, principal: AgentPrincipal) -> list[Tool]:
        agent = principal.identity.agent
        key = (agent, self.tools_version(principal))
        cat = self._catalogs.get(key)
        if cat is None:
            state = self.rt.state
            cat = ToolCatalog(self.rt, agent, names_of(state, tool_grants(state.registry.agent_grants.get(agent, []))))
            if len(self._catalogs) > 4096:
                self._catalogs.clear()
            self._catalogs[key] = cat
        return cat.tools

    # -- which resources and prompts -------------------------------------------------------------

    def resource_grants_for(self, agent: str) -> dict[str, list["Capability"]]:
        """upstream -> the agent's granted resource capabilities there, in grant order (what a read may reach)."""
        reg = self.rt.state.registry
        key = (reg.version, agent)
        found = self._resource_grants.get(key)
        if found is None:
            found = {}
            for g in fetch_grants(reg.agent_grants.get(agent, []), "resource"):
                found.setdefault(g.capability.upstream, []).append(g.capability)
            if len(self._resource_grants) > 4096:
                self._resource_grants.clear()
            self._resource_grants[key] = found
        return found

    def prompt_names_for(self, agent: str) -> dict[str, "Capability"]:
        """prompt name -> capability for the agent's granted prompts (named as tools are, :func:`tool_names`)."""
        state = self.rt.state
        key = (state.registry.version, agent)
        found = self._prompt_names.get(key)
        if found is None:
            grants = fetch_grants(state.registry.agent_grants.get(agent, []), "prompt")
            names = self._prompt_name_map(grants)
            found = {names[g.capability.name]: g.capability for g in grants}
            if len(self._prompt_names) > 4096:
                self._prompt_names.clear()
            self._prompt_names[key] = found
        return found

    def _prompt_name_map(self, grants: list["Grant"]) -> dict[str, str]:
        mcp = self.rt.state.mcp_upstreams
        bare = {g.capability.name: g.capability.target for g in grants
                if g.capability.upstream in mcp and mcp[g.capability.upstream].cfg.tool_names == "bare"}
        return tool_names([g.capability.name for g in grants], bare or None)

    def resources_version(self, principal: AgentPrincipal) -> object:
        state = self.rt.state
        return state.registry.version, state.mcp_resources_version()

    def prompts_version(self, principal: AgentPrincipal) -> object:
        state = self.rt.state
        return state.registry.version, state.mcp_prompts_version()

    def _read_catalog(self, kind: str, principal: AgentPrincipal) -> Any:
        agent = principal.identity.agent
        version = self.resources_version(principal) if kind == "resources" else self.prompts_version(principal)
        key = (kind, agent, version)
        cat = self._read_catalogs.get(key)
        if cat is None:
            state = self.rt.state
            grants = state.registry.agent_grants.get(agent, [])
            cat = ResourceCatalog(state, grants) if kind == "resources" else PromptCatalog(
                state, grants, self._prompt_name_map(fetch_grants(grants, "prompt")))
            if len(self._read_catalogs) > 4096:
                self._read_catalogs.clear()
            self._read_catalogs[key] = cat
        return cat

    def resources_for(self, principal: AgentPrincipal) -> list[Resource]:
        return self._read_catalog("resources", principal).resources  # type: ignore[no-any-return]

    def resource_templates_for(self, principal: AgentPrincipal) -> list[ResourceTemplate]:
        return self._read_catalog("resources", principal).templates  # type: ignore[no-any-return]

    def prompts_for(self, principal: AgentPrincipal) -> list[Prompt]:
        return self._read_catalog("prompts", principal).prompts  # type: ignore[no-any-return]

    def resource_metadata(self, resource: str) -> dict[str, Any]:
        ident = self.rt.state.rules.identity
        servers = [i.issuer for i in getattr(ident, "issuers", None) or [] if getattr(i, "issuer", None)]
        if not servers and ident.issuer:
            servers = [ident.issuer]
        return {"authorization_servers": servers, "resource_name": "Tether"}

    # -- calls ----------------------------------------------------------------------------------

    def _exchange(self, principal: AgentPrincipal, session: Any, request_id: Any, **what: Any) -> Exchange:
        state = self.rt.state
        ex = Exchange(self.door, state.registry, None, "POST", "", CIMultiDict())
        ex.state = state
        ex.identity = principal.identity
        ex.mcp = {**what, "jsonrpc_id": request_id, "session": session.id, "client": session.client_name,
                  "client_version": session.client_version, "protocol": session.protocol_version}
        ex.extra["mcp_backend"] = self
        return ex

    async def call_tool(self, call: ToolCall) -> CallToolResult:
        principal: AgentPrincipal = call.principal  # type: ignore[assignment]
        if call.name in BUILTIN_TOOLS:
            return await self._builtin(call, principal.identity)
        ex = self._exchange(principal, call.session, call.request_id, tool=call.name)
        ex.method, ex.raw_path = "tools/call", call.name[:MAX_RECORDED_URI]  # what a refusal before binding records
        ex.extra["tool_call"] = call
        await self.pipeline.run(ex)
        if ex.reason == "capability_not_granted" and ex.capability is None:
            raise UnknownTool(call.name)  # journaled as a denial; answered as the protocol's error
        return render(ex)

    async def read_resource(self, read: ResourceRead) -> ReadResourceResult:
        """``resources/read`` through the pipeline (see :mod:`.reads`)."""
        uri = read.uri[:MAX_RECORDED_URI]  # what the records keep of a URI too long to match anything
        ex = self._exchange(read.principal, read.session, read.request_id, resource=uri)  # type: ignore[arg-type]
        ex.method, ex.raw_path = "resources/read", uri
        ex.extra["mcp_fetch"] = read
        await self.pipeline.run(ex)
        if ex.reason == "capability_not_granted" and ex.capability is None:
            raise UnknownResource(read.uri)  # journaled as a denial; answered as a resource that does not exist
        return self._fetched(ex, ReadResourceResult)  # type: ignore[no-any-return]

    async def get_prompt(self, get: PromptGet) -> GetPromptResult:
        """``prompts/get`` through the pipeline (see :mod:`.reads`)."""
        name = get.name[:MAX_RECORDED_URI]
        ex = self._exchange(get.principal, get.session, get.request_id, prompt=name)  # type: ignore[arg-type]
        ex.method, ex.raw_path = "prompts/get", name
        ex.extra["mcp_fetch"] = get
        await self.pipeline.run(ex)
        if ex.reason == "capability_not_granted" and ex.capability is None:
            raise UnknownPrompt(get.name)
        return self._fetched(ex, GetPromptResult)  # type: ignore[no-any-return]

    @staticmethod
    def _fetched(ex: Exchange, expected: type) -> Any:
        """The upstream's result with Tether's ``_meta``, or the refusal as a JSON-RPC error (McpRefused):
        -32602 when the request is at fault (its arguments), the server's own code for its JSON-RPC error
        when that is -32602 or -32603, else REFUSED; ``data`` is the REST door's error body."""
        err = ex.error
        ans = ex.response
        if err is None and not (isinstance(ans, McpAnswer) and isinstance(ans.result, expected)):
            err = TetherError("internal_error", "the request ended without an answer")
        if err is not None:
            details = dict(err.details or {})
            data: dict[str, Any] = {"code": err.code, "message": err.message, "status": err.status,
                                    "request_id": ex.request_id}
            if details:
                data["details"] = details
            rpc = REFUSED
            if err.status in (400, 413, 422):
                rpc = -32602
            elif err.code == "upstream_rpc_error" and details.get("rpc_code") in (-32602, -32603):
                rpc = details["rpc_code"]
            raise McpRefused(rpc, f"Refused by Tether ({err.code}): {err.message}", data)
        assert isinstance(ans, McpAnswer)
        theirs = {k: v for k, v in (ans.result.meta or {}).items() if not k.startswith("tether/")}
        return ans.result.model_copy(update={"meta": {**theirs, "tether/request_id": ex.request_id}})

    async def _builtin(self, call: ToolCall, ident: Identity) -> CallToolResult:
        """Transactions and review status, as the REST door's /_tether/ endpoints offer them."""
        rid = self.rt_request_id()
        args = call.arguments or {}
        try:
            tm = self.rt.transactions
            if call.name == "tether_transaction_begin":
                from ...config import parse_duration
                from ...safety.transactions import tx_name

                deadline = None
                if args.get("deadline") is not None:
                    try:
                        deadline = parse_duration(args["deadline"])
                    except (TypeError, ValueError) as exc:
                        raise TetherError("bad_request", f"deadline: {exc}") from None
                doc = await tm.open(ident, name=tx_name(args.get("name")), deadline=deadline)
            elif call.name == "tether_review_status":
                item = await self.rt.review.get(str(args.get("item", "")))
                if item.get("agent") != ident.agent:
                    raise TetherError("not_found", f"no review item {args.get('item')!r}")
                doc = {k: item.get(k) for k in ("id", "state", "capability", "intent", "created_at", "updated_at",
                                                "expires_at")}
                decision = item.get("decision") or {}
                doc["decision"] = {k: decision.get(k) for k in ("action", "by", "at", "reason", "edited")} or None
                replay = item.get("replay") or {}
                if replay:
                    doc["replay"] = {k: replay.get(k) for k in ("status", "error", "message", "body", "at")}
            else:
                tx_id = args.get("transaction")
                if not isinstance(tx_id, str) or not tx_id:
                    raise TetherError("bad_request", "the transaction argument is the transaction's id")
                if call.name == "tether_transaction_commit":
                    doc = await tm.commit(tx_id, ident)
                elif call.name == "tether_transaction_rollback":
                    await tm.owned(tx_id, ident)
                    doc = await tm.rollback(tx_id, reason="requested by the agent (MCP)", by=ident.agent)
                else:
                    await tm.owned(tx_id, ident)
                    doc = await tm.describe(tx_id)
        except TetherError as err:
            return error_result_from(err, rid)
        return CallToolResult(content=[TextContent(text=_text(doc, None))], structured_content=doc,
                              meta={"tether/request_id": rid})

    def rt_request_id(self) -> str:
        from ...core.exchange import new_request_id

        return new_request_id()

    # -- protocol events --------------------------------------------------------------------------

    def record(self, event: dict[str, Any]) -> str | None:
        """Journal a protocol-level event (a refused request, a session opened or closed)."""
        from ...core.exchange import new_request_id

        rid = new_request_id()
        name = str(event.get("event") or "mcp")
        principal = event.get("principal")
        agent = principal.partition("|")[0] if isinstance(principal, str) else None
        fields = {k: v for k, v in event.items() if k not in ("event", "principal")}
        rec = base_record("mcp", request_id=rid, agent=agent, decision="denied" if name == "mcp_refused" else None,
                          reason=fields.pop("reason", None), event=name, channel="mcp") | fields
        self.rt.journal.submit(rec)
        return rid


def tool_changes_hook(endpoint: Any) -> Callable[[], None]:
    """What the gateway calls when the tool lists may have changed (reload, promotion, quarantine)."""
    def changed() -> None:
        try:
            endpoint.tools_changed()
        except Exception:  # noqa: BLE001 - the sessions notice on their next poll
            log.exception("could not announce a tool list change")
    return changed


__all__ = ["AgentPrincipal", "BUILTIN_TOOLS", "MCP_INTAKE", "McpDoor", "PipelineBackend", "ToolCatalog",
           "bind_arguments", "input_schema", "render", "resolve_tool", "tool_names"]

