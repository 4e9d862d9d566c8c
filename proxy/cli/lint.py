"""``tether rules check``: every problem of a rules file at once, and the rules file's JSON Schema.

The linter reads the raw YAML first, so one bad key does not hide the rest: schema errors come from
:func:`proxy.config.parse_rules` (a :class:`ConfigError` lists them all), then each upstream, agent and
capability that validates on its own is linted, and the config's own cross-reference checks run on
those parts. Findings (``LEVEL file: key.path: message [code]``):

=========================  =======  ==========================================================================
code                       level    what
=========================  =======  ==========================================================================
``yaml``                   ERROR    the file is not YAML (or repeats a key)
``schema``                 ERROR    a value the schema refuses
``unknown-key``            ERROR    a key the schema does not know (a typo is never ignored)
``unknown-capability``     ERROR    a grant names a capability that does not exist
``unknown-upstream``       ERROR    a capability names an upstream that does not exist
``duplicate-grant``        ERROR    an agent is granted the same capability twice
``unknown-adapter``        ERROR    an upstream names an adapter that does not exist, or bad adapter options
``streamed-body``          ERROR    a ``stream_request`` capability that also declares body rules, audit
                                    fields or a promotion gate, or is granted in dry_run/canary (a body
                                    Tether never reads can be neither checked nor captured for review)
``shadowed-route``         ERROR    a capability can never match: an earlier one with the same method and
                                    route shape takes every request it would (declaration order decides)
``overlapping-routes``     WARNING  two capabilities match some of the same requests; the one that wins is
                                    named (a literal segment beats a parameter, then declaration order —
                                    the rule of :mod:`proxy.policy.registry`)
``live-non-compensable``   ERROR    a write granted ``live`` or ``canary`` that cannot be undone
                                    (``compensation: non_compensable`` / ``none``); INFO when the capability
                                    says ``allow_live_without_compensation: true``
``write-without-fields``   WARNING  a write (other than DELETE) with neither ``allow_fields`` nor ``json_schema``
``unheld-capability``      WARNING  no agent holds the capability
``unused-capability``      WARNING  held, but no request record for it in the whole journal (with a store)
``needs-review``           WARNING  an MCP capability written by ``tether rules import-mcp`` whose guessed effect a
                                    person has not confirmed yet (its ``needs_review`` key is still there)
``journal-unavailable``    WARNING  a store was to be read and could not be
=========================  =======  ==========================================================================

Exit status (``cmd_check``): 1 with an ERROR, or a WARNING under ``--strict``; else 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import TypeAdapter, ValidationError

from ..config import (
    HTTP_METHODS,
    AgentConfig,
    AnyCapabilityConfig,
    AnyUpstreamConfig,
    CapabilityConfig,
    ConfigError,
    GovernanceConfig,
    GrantConfig,
    McpCapabilityConfig,
    McpUpstreamConfig,
    RulesFile,
    ServerConfig,
    UpstreamConfig,
    _grant_from_short,
    _yaml_loader,
    parse_duration,
    parse_rules,
    parse_size,
    stream_request_errors,
)

LEVELS = ("ERROR", "WARNING", "INFO")


@dataclass(frozen=True)
class Finding:
    level: str
    file: str
    path: str
    message: str
    code: str

    def line(self) -> str:
        return f"{self.level} {self.file}: {self.path or '<root>'}: {self.message} [{self.code}]"

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "file": self.file, "path": self.path, "message": self.message, "code": self.code}


# --------------------------------------------------------------------------- entry points


def lint_file(path: str | Path, *, store: str | None = None, use_default_store: bool = True,
              traffic: Any = None) -> list[Finding]:
    """Lint one rules file. The journal is read from ``store`` (or, with ``use_default_store``, from the
    file's ``server.store`` when it exists) to find capabilities with no traffic."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [Finding("ERROR", file, "", f"cannot read: {exc}", "yaml")]
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return [Finding("ERROR", file, where, f"YAML error: {getattr(exc, 'problem', None) or exc}", "yaml")]
    problems: list[Finding] = []
    if traffic is None and (store or use_default_store):
        try:
            traffic = _traffic_for(data, store)
        except Exception as exc:  # StoreUnavailable, a PostgreSQL server that is down...
            problems.append(Finding("WARNING", file, "server.store", f"cannot read the journal, so unused "
                                    f"capabilities are not reported: {exc}", "journal-unavailable"))
    return lint_data(data, file, traffic=traffic) + problems


def _traffic_for(data: Any, store: str | None) -> Any:
    from .catalogue import default_store, read_traffic_sync

    server = data.get("server") if isinstance(data, dict) else None
    rules_store = server.get("store") if isinstance(server, dict) else None
    default = ServerConfig().store  # what the gateway would use when the file names none
    url = default_store(rules_store if isinstance(rules_store, str) else default, store)
    if url is None:
        return None
    return read_traffic_sync(url)


_CODE_BY_REASON = (("unknown capability", "unknown-capability"), ("unknown upstream", "unknown-upstream"),
                   ("granted twice", "duplicate-grant"), ("unknown key", "unknown-key"),
                   ("streams its request body", "streamed-body"))


def _code(reason: str) -> str:
    for needle, code in _CODE_BY_REASON:
        if needle in reason:
            return code
    return "schema"


def lint_data(data: Any, file: str = "<rules>", traffic: Any = None) -> list[Finding]:
    """Lint an already-loaded rules document."""
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()

    def add(level: str, path: str, message: str, code: str) -> None:
        if (path, message) in seen:
            return
        seen.add((path, message))
        findings.append(Finding(level, file, path, message, code))

    try:
        rules = parse_rules(data, file)
    except ConfigError as exc:
        for path, reason in exc.problems:
            add("ERROR", path, reason, _code(reason))
        if not isinstance(data, dict):
            return findings
        bare, agents = _partial(data)
        for path, reason in bare.cross_reference_errors():
            add("ERROR", path, reason, _code(reason))
        for path, reason in _grant_errors(data):
            add("ERROR", path, reason, _code(reason))
        rules = RulesFile.model_construct(server=bare.server, governance=bare.governance, upstreams=bare.upstreams,
                                          capabilities=bare.capabilities, agents=agents)
    held = _held_raw(data) if isinstance(data, dict) else None
    for lvl, path, msg, code in _lints(rules, traffic, held):
        add(lvl, path, msg, code)
    return sorted(findings, key=lambda f: LEVELS.index(f.level))


def _held_raw(data: dict[str, Any]) -> set[str]:
    """Capability names any agent's grants mention, valid grant or not."""
    out: set[str] = set()
    agents = data.get("agents") if isinstance(data.get("agents"), dict) else {}
    for raw in agents.values():
        grants = raw.get("grants") if isinstance(raw, dict) else None
        for g in grants if isinstance(grants, list) else []:
            name = g if isinstance(g, str) else g.get("capability") if isinstance(g, dict) else None
            if isinstance(name, str):
                out.add(name)
    return out


def _grant_errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Grants naming unknown capabilities, or one twice, straight from the raw document (the config's
    own check runs only once the whole file validates)."""
    caps = data.get("capabilities") if isinstance(data.get("capabilities"), dict) else {}
    agents = data.get("agents") if isinstance(data.get("agents"), dict) else {}
    ups = data.get("upstreams") if isinstance(data.get("upstreams"), dict) else {}
    errs = []
    for name, raw in caps.items():
        up = raw.get("upstream") if isinstance(raw, dict) else None
        if isinstance(up, str) and up not in ups:
            errs.append((f"capabilities.{name}.upstream", f"unknown upstream {up!r}"))
    for agent, raw in agents.items():
        grants = raw.get("grants") if isinstance(raw, dict) else None
        seen: set[str] = set()
        for i, g in enumerate(grants if isinstance(grants, list) else []):
            name = g if isinstance(g, str) else g.get("capability") if isinstance(g, dict) else None
            if not isinstance(name, str):
                continue
            if name not in caps:
                errs.append((f"agents.{agent}.grants[{i}]", f"unknown capability {name!r}"))
            elif name in seen:
                errs.append((f"agents.{agent}.grants[{i}]", f"capability {name!r} granted twice"))
            seen.add(name)
    return errs


def _partial(data: dict[str, Any]) -> tuple[RulesFile, dict[str, AgentConfig]]:
    """A RulesFile built from the parts that validate on their own (the others were reported): its
    ``cross_reference_errors`` still finds unknown upstreams and clashing listeners, and the lints run
    on it. Grants that do not validate are left out (their agents' grants are checked raw)."""

    def ok(model: Any, value: Any) -> Any:
        try:
            if isinstance(model, TypeAdapter):
                return model.validate_python(value)
            return model.model_validate(value)
        except (ValidationError, ValueError, TypeError):
            return None

    any_upstream: TypeAdapter[Any] = TypeAdapter(AnyUpstreamConfig)
    any_capability: TypeAdapter[Any] = TypeAdapter(AnyCapabilityConfig)

    def section(key: str) -> dict[str, Any]:
        v = data.get(key)
        return v if isinstance(v, dict) else {}

    server = ok(ServerConfig, data.get("server") or {}) or ServerConfig()
    governance = ok(GovernanceConfig, data.get("governance") or {}) or GovernanceConfig()
    upstreams: dict[str, Any] = {}
    for name, raw in section("upstreams").items():
        up = ok(any_upstream, raw)
        if up is None and isinstance(raw, dict) and raw.get("kind") == "mcp":
            up = McpUpstreamConfig.model_construct(kind="mcp", url=None, command=None)
        elif up is None:  # reported already; keep the name so capabilities naming it are not "unknown"
            up = UpstreamConfig.model_construct(url="", adapter="generic", adapter_options={}, listen=None)
        upstreams[str(name)] = up
    caps: dict[str, Any] = {}
    for name, raw in section("capabilities").items():
        cap = ok(any_capability, raw)
        if cap is not None:
            caps[str(name)] = cap
    agents: dict[str, AgentConfig] = {}
    for name, raw in section("agents").items():
        ag = ok(AgentConfig, raw)
        if ag is None:
            raw_grants = raw.get("grants") if isinstance(raw, dict) else None
            grants = [gc for gc in (ok(GrantConfig, _grant_from_short(g))
                                    for g in (raw_grants if isinstance(raw_grants, list) else [])) if gc is not None]
            ag = AgentConfig.model_construct(grants=grants)
        agents[str(name)] = ag
    # without agents: they are checked raw (_grant_errors), as the partial's grant indexes may differ
    bare = RulesFile.model_construct(server=server, governance=governance, upstreams=upstreams, agents={},
                                     capabilities=caps)
    return bare, agents


# --------------------------------------------------------------------------- the lints


def _lints(rules: RulesFile, traffic: Any, held_raw: set[str] | None = None) -> Iterable[tuple[str, str, str, str]]:
    caps = rules.capabilities
    adapters = yield from _adapter_lints(rules)
    yield from _route_lints({n: c for n, c in caps.items() if not isinstance(c, McpCapabilityConfig)}, adapters)
    held: set[str] = set(held_raw or ())
    # an MCP tool Tether calls itself (an undo, a pre-image read) is declared to be pinned, not to be held
    called_by_tether = {(c.upstream, t.tool) for c in caps.values() if isinstance(c, McpCapabilityConfig)
                        for t in (c.undo, c.pre_image) if t is not None}
    for agent, ac in rules.agents.items():
        for i, g in enumerate(ac.grants):
            held.add(g.capability)
            cap = caps.get(g.capability)
            if cap is None or cap.resolved_effect != "write":
                continue
            if g.mode in ("live", "canary") and cap.compensation in ("non_compensable", "none"):
                why = (f"{g.capability!r} is granted {g.mode} but cannot be undone (compensation: "
                       f"{cap.compensation})")
                if cap.allow_live_without_compensation:
                    yield ("INFO", f"agents.{agent}.grants[{i}]", why + "; accepted by allow_live_without_compensation",
                           "live-non-compensable")
                else:
                    yield ("ERROR", f"agents.{agent}.grants[{i}]",
                           why + ": grant it dry_run, give it a compensation, or set "
                                 "allow_live_without_compensation: true on the capability", "live-non-compensable")
    for path, reason in stream_request_errors(caps, rules.agents):
        yield ("ERROR", path, reason, "streamed-body")
    for name, cap in caps.items():
        if cap.stream_request and cap.resolved_effect == "write" and cap.compensation == "auto":
            yield ("WARNING", f"capabilities.{name}.compensation",
                   f"capability {name!r} streams its request body, so Tether cannot plan its undo from it: inside "
                   "a transaction it is refused live (say compensation: none to make that explicit)", "streamed-body")
        if isinstance(cap, McpCapabilityConfig):
            if cap.needs_review:
                yield ("WARNING", f"capabilities.{name}.needs_review", f"not confirmed yet: {cap.needs_review} "
                       "(delete needs_review once a person has checked it)", "needs-review")
            b = cap.body
            if cap.resolved_effect == "write" and (b is None or (b.allow_fields is None and b.json_schema is None)):
                yield ("WARNING", f"capabilities.{name}", f"write tool {cap.tool} has no field rules on its "
                       "arguments: add body.allow_fields or body.json_schema", "write-without-fields")
            continue
        if cap.resolved_effect == "write" and cap.method != "DELETE" and not cap.stream_request:
            b = cap.body
            if b is None or (b.allow_fields is None and b.json_schema is None):
                extra = " (only forbid_fields: a denylist)" if b is not None and b.forbid_fields else ""
                yield ("WARNING", f"capabilities.{name}", f"write {cap.method} {cap.path} has no field rules{extra}: "
                       "add body.allow_fields or body.json_schema", "write-without-fields")
    for name, cap in caps.items():
        if isinstance(cap, McpCapabilityConfig) and (cap.upstream, cap.tool) in called_by_tether:
            continue
        if name not in held:
            yield ("WARNING", f"capabilities.{name}", "no agent holds this capability", "unheld-capability")
    if traffic is not None:
        span = (f"{traffic.records} journal record(s) from {traffic.first_ts} to {traffic.last_ts}"
                if traffic.records else "the journal is empty")
        for name in caps:
            if name in held and not traffic.requests.get(name):
                yield ("WARNING", f"capabilities.{name}", f"no request used this capability ({span})",
                       "unused-capability")


def _adapter_lints(rules: RulesFile) -> Any:
    """Yield adapter findings; return {upstream: adapter or None}."""
    from adapters import AdapterOptionsError, get_adapter

    out: dict[str, Any] = {}
    for name, up in rules.upstreams.items():
        if isinstance(up, McpUpstreamConfig):
            continue
        if not up.url:
            out[name] = None  # invalid upstream (already reported)
            continue
        try:
            out[name] = get_adapter(up.adapter, up.adapter_options)
        except AdapterOptionsError as exc:
            out[name] = None
            yield ("ERROR", f"upstreams.{name}.adapter", str(exc), "unknown-adapter")
        except Exception as exc:  # an adapter whose constructor refuses its options in another way
            out[name] = None
            yield ("ERROR", f"upstreams.{name}.adapter_options", f"{type(exc).__name__}: {exc}", "unknown-adapter")
    return out


# --------------------------------------------------------------------------- routes


_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass
class _Route:
    name: str
    order: int
    method: str
    template: str
    segs: tuple[str, ...]
    keys: tuple[str | None, ...]  # literal key (folded when the adapter folds), None for a parameter
    patterns: tuple[re.Pattern[str] | None, ...]  # effective parameter patterns (None: any value)
    sources: tuple[str | None, ...]  # pattern text, to compare two parameters' patterns


def _routes(caps: dict[str, CapabilityConfig], adapters: dict[str, Any]) -> dict[tuple[str, str, int], list[_Route]]:
    groups: dict[tuple[str, str, int], list[_Route]] = {}
    for order, (name, cap) in enumerate(caps.items()):
        ad = adapters.get(cap.upstream)
        fold = bool(getattr(ad, "case_insensitive_paths", False))
        segs = tuple(s for s in cap.path.strip("/").split("/") if s)
        if ad is not None and hasattr(ad, "canonical_segments"):
            segs = tuple(ad.canonical_segments(segs, None))
        keys: list[str | None] = []
        pats: list[re.Pattern[str] | None] = []
        srcs: list[str | None] = []
        for s in segs:
            m = _PARAM.match(s)
            if m is None:
                keys.append(s.lower() if fold else s)
                pats.append(None)
                srcs.append(None)
                continue
            pname = m.group(1)
            pat: re.Pattern[str] | None = None
            if pname in cap.params:
                pat = re.compile(cap.params[pname])
            elif ad is not None:
                pat = ad.param_pattern(pname) or (re.compile(ad.default_param_pattern)
                                                  if ad.default_param_pattern else None)
            keys.append(None)
            pats.append(pat)
            srcs.append(pat.pattern if pat is not None else None)
        r = _Route(name, order, cap.method, cap.path, segs, tuple(keys), tuple(pats), tuple(srcs))
        groups.setdefault((cap.upstream, cap.method, len(segs)), []).append(r)
    return groups


def overlapping_pairs(routes: list[_Route]) -> set[tuple[int, int]]:
    """Index pairs (i < j) of routes of one (upstream, method, length) that some path matches both.

    Partitions by segment: routes with the same literal go together, joined by the parameter routes
    whose pattern accepts that literal; parameter routes also go on together. Two parameters with
    different explicit patterns are taken as disjoint (the author separated them on purpose)."""
    n = len(routes[0].segs) if routes else 0
    pairs: set[tuple[int, int]] = set()

    def rec(group: list[int], i: int) -> None:
        if len(group) < 2:
            return
        if i == n:
            for a in range(len(group)):
                for b in range(a + 1, len(group)):
                    x, y = sorted((group[a], group[b]))
                    if _params_compatible(routes[x], routes[y]):
                        pairs.add((x, y))
            return
        lits: dict[str, list[int]] = {}
        params: list[int] = []
        for idx in group:
            k = routes[idx].keys[i]
            if k is None:
                params.append(idx)
            else:
                lits.setdefault(k, []).append(idx)
        for key, members in lits.items():
            literal = routes[members[0]].segs[i]
            joined = members + [p for p in params
                                if routes[p].patterns[i] is None or routes[p].patterns[i].fullmatch(literal)]
            rec(joined, i + 1)
        rec(params, i + 1)

    rec(list(range(len(routes))), 0)
    return pairs


def _params_compatible(a: _Route, b: _Route) -> bool:
    for ka, kb, sa, sb in zip(a.keys, b.keys, a.sources, b.sources):
        if ka is None and kb is None and sa is not None and sb is not None and sa != sb:
            return False
    return True


def _example(a: _Route, b: _Route) -> str:
    segs = []
    for sa, ka, sb, kb in zip(a.segs, a.keys, b.segs, b.keys):
        segs.append(sa if ka is not None else sb if kb is not None else sa)
    return "/" + "/".join(segs)


def route_findings(a: _Route, b: _Route) -> tuple[str, str, str, str]:
    """(level, key path, message, code) for two overlapping routes, a declared before b."""
    for ka, kb in zip(a.keys, b.keys):
        if (ka is None) != (kb is None):
            winner, loser = (a, b) if ka is not None else (b, a)
            return ("WARNING", f"capabilities.{loser.name}.path",
                    f"{loser.method} {loser.template} also matches requests of {winner.name!r} "
                    f"({winner.method} {winner.template}), e.g. {_example(a, b)}: {winner.name!r} wins (a literal "
                    f"segment beats a parameter); a pattern in params on a parameter would keep them apart",
                    "overlapping-routes")
    covered = all(sa is None or sa == sb for sa, sb, ka in zip(a.sources, b.sources, a.keys) if ka is None)
    if a.template == b.template and covered:
        return ("ERROR", f"capabilities.{b.name}.path",
                f"{b.method} {b.template} is also declared by {a.name!r}, which comes first and takes every request: "
                f"{b.name!r} can never match", "shadowed-route")
    if covered:
        return ("ERROR", f"capabilities.{b.name}.path",
                f"{b.method} {b.template} is shadowed by {a.name!r} ({a.method} {a.template}), declared earlier with "
                f"the same route shape and no narrower parameter pattern: {b.name!r} can never match",
                "shadowed-route")
    return ("WARNING", f"capabilities.{b.name}.path",
            f"{b.method} {b.template} overlaps {a.name!r} ({a.method} {a.template}), declared earlier: {a.name!r} "
            f"wins whenever its parameter patterns match", "overlapping-routes")


def _route_lints(caps: dict[str, CapabilityConfig], adapters: dict[str, Any]) -> Iterable[tuple[str, str, str, str]]:
    """One finding per shadowed capability; overlaps grouped per capability that loses them, so a
    parameter route overlapping a thousand literal ones is one line, not a thousand."""
    for (_up, _method, _n), routes in _routes(caps, adapters).items():
        if len(routes) < 2:
            continue
        losing: dict[str, list[tuple[str, str, str, str]]] = {}
        for i, j in sorted(overlapping_pairs(routes), key=lambda p: (routes[p[1]].order, routes[p[0]].order)):
            f = route_findings(routes[i], routes[j])
            if f[3] == "overlapping-routes":
                losing.setdefault(f[1], []).append(f)
            else:
                yield f
        for path, fs in losing.items():
            if len(fs) <= 3:
                yield from fs
                continue
            first = fs[0]
            more = f"; and {len(fs) - 1} more like it; a pattern in params"
            yield (first[0], path, first[2].replace("; a pattern in params", more), first[3])


# --------------------------------------------------------------------------- JSON Schema


DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d|w)?\s*$"
SIZE_PATTERN = r"^\s*\d+\s*([bB]|[kK][bB]?|[kK][iI][bB]|[mM][bB]?|[mM][iI][bB]|[gG][bB]?|[gG][iI][bB])?\s*$"
_SECRET_SHORTHANDS = {"BearerCredentials": ("token",), "BasicCredentials": ("password",),
                      "ApiKeyCredentials": ("value",), "OAuth2ClientCredentials": ("client_secret",),
                      "IdentityConfig": ("hs_secret",)}
_DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("RulesFile", "upstreams"): "The systems of record agents reach through Tether, by name (the path prefix "
                                "/<name>/ on the main listener).",
    ("RulesFile", "agents"): "Agents by name (the JWT's act.sub, or sub when it acts for itself) and their grants.",
    ("RulesFile", "capabilities"): "The registry: every operation an agent may perform (default deny), by name.",
    ("CapabilityConfig", "upstream"): "The upstream this operation goes to.",
    ("CapabilityConfig", "method"): "HTTP method, upper case.",
    ("CapabilityConfig", "path"): "Path template on the upstream; each {param} is a whole segment.",
    ("CapabilityConfig", "effect"): "read or write (default: from the method; GET/HEAD/OPTIONS read). Writes are "
                                    "dry-run unless granted live.",
    ("CapabilityConfig", "compensation"): "How a live write is undone: auto (the adapter plans it), "
                                          "non_compensable or none (cannot run live inside a transaction).",
    ("CapabilityConfig", "body"): "Field rules and JSON Schema the request body must satisfy (422 otherwise).",
    ("BodyRules", "allow_fields"): "The only fields the body may carry (dotted paths; an entry covers its subtree).",
    ("BodyRules", "forbid_fields"): "Fields the body may never carry.",
    ("BodyRules", "require_fields"): "Fields the body must carry.",
    ("BodyRules", "json_schema"): "A JSON Schema (draft 2020-12) the body must satisfy.",
    ("GrantConfig", "capability"): "The capability granted.",
    ("GrantConfig", "mode"): "dry_run (captured for review), canary (a share goes live) or live. A write granted "
                             "without a mode is dry-run.",
    ("AgentConfig", "grants"): "Capabilities this agent holds: a name, or {capability, mode, rate_limit}.",
    ("UpstreamConfig", "url"): "Base URL of the upstream (http:// or https://, no query).",
    ("UpstreamConfig", "adapter"): "Adapter that knows this upstream (generic, or a SaaS adapter).",
    ("UpstreamConfig", "credentials"): "How Tether authenticates to the upstream; agents never hold these.",
}


def rules_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a rules file, from the pydantic models, made usable by
    editors: durations and sizes accept their string forms, grants their short form, secrets their
    ``*_env`` / ``*_file`` / inline shorthands, methods are enumerated and key fields described."""
    from pydantic.json_schema import GenerateJsonSchema

    class Gen(GenerateJsonSchema):
        def function_before_schema(self, schema: Any) -> Any:
            fn = (schema.get("function") or {}).get("function")
            if fn is parse_duration:
                return {"anyOf": [{"type": "number", "minimum": 0},
                                  {"type": "string", "pattern": DURATION_PATTERN}],
                        "description": "seconds, or a duration such as '90s', '5m', '1h', '30d'"}
            if fn is parse_size:
                return {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
                        "description": "bytes, or a size such as '512k', '10MB'"}
            inner = super().function_before_schema(schema)
            if fn is _grant_from_short:
                return {"anyOf": [{"type": "string", "description": "a capability name (default mode)"}, inner]}
            return inner

    schema = RulesFile.model_json_schema(schema_generator=Gen)
    defs = schema.setdefault("$defs", {})
    for def_name, names in _SECRET_SHORTHANDS.items():
        d = defs.get(def_name)
        if d is None:
            continue
        props = d.setdefault("properties", {})
        required = d.get("required", [])
        alternatives = []
        for n in names:
            ref = {"$ref": "#/$defs/SecretRef"}
            optional = n not in required
            props[n] = {"anyOf": [ref, {"type": "string", "description": "inline value (development only)"}]
                        + ([{"type": "null"}] if optional else [])}
            props[f"{n}_env"] = {"type": "string", "description": f"shorthand for {n}: {{env: NAME}}"}
            props[f"{n}_file"] = {"type": "string", "description": f"shorthand for {n}: {{file: /path}}"}
            if not optional:
                required.remove(n)
                alternatives.append({"anyOf": [{"required": [n]}, {"required": [f"{n}_env"]},
                                               {"required": [f"{n}_file"]}]})
        if alternatives:
            d["allOf"] = d.get("allOf", []) + alternatives
        if not required:
            d.pop("required", None)
    cap = defs.get("CapabilityConfig", {}).get("properties", {})
    if "method" in cap:
        cap["method"]["enum"] = list(HTTP_METHODS)
    if "path" in cap:
        cap["path"]["pattern"] = r"^/([^/{}%]+|\{[A-Za-z_][A-Za-z0-9_]*\})?(/([^/{}%]+|\{[A-Za-z_][A-Za-z0-9_]*\}))*/?$"
    for (model, prop), text in _DESCRIPTIONS.items():
        target = schema if model == "RulesFile" else defs.get(model)
        if target is not None and prop in target.get("properties", {}):
            target["properties"][prop].setdefault("description", text)
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Tether rules file",
           "description": "Upstreams, agents with their grants, and the capability registry Tether enforces "
                          "(default deny). Generated by `tether rules schema` from proxy/config.py."}
    out.update({k: v for k, v in schema.items() if k not in ("title", "description")})
    return out
