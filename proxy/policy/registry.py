"""The capability registry, compiled: precompiled route matching and grant lookup.

A rules file is compiled once (at startup and on hot reload) into a :class:`Registry`: one segment trie
per upstream and method, whose leaves hold the capabilities registered for that template. Matching a
request walks the trie once — O(path depth), independent of how many capabilities exist — preferring
literal segments over parameters and backtracking when a parameter's pattern does not fully match.
Parameter patterns are compiled here, never per request, and always applied with ``fullmatch``.

Grants are compiled into a dict keyed by (agent, capability) holding the effective mode, so the
"is this granted and how" question is one dict lookup.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from ..config import CapabilityConfig, GrantConfig, Mode, RulesFile

if TYPE_CHECKING:
    from adapters.base import Adapter


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    upstream: str
    method: str
    template: str
    effect: str  # "read" | "write"
    operation: str  # read/create/update/delete/upsert/action
    param_names: tuple[str, ...]
    param_patterns: tuple[re.Pattern[str] | None, ...]
    config: CapabilityConfig  # or McpCapabilityConfig (kind tool / resource / prompt)
    kind: str = "rest"  # rest, or on an MCP upstream: tool / resource / prompt
    target: str = ""  # MCP: the tool name, resource URI template or prompt name (the upstream's own words)

    @property
    def is_write(self) -> bool:
        return self.effect == "write"


@dataclass(frozen=True, slots=True)
class Grant:
    agent: str
    capability: Capability
    mode: Mode  # effective: reads are always "live"; unset writes are "dry_run"
    declared_mode: Mode | None
    config: GrantConfig


@dataclass(slots=True)
class _Node:
    literals: dict[str, "_Node"] = field(default_factory=dict)
    param: "_Node | None" = None
    # method -> capabilities ending here (several when parameter patterns disambiguate)
    endpoints: dict[str, list[Capability]] = field(default_factory=dict)


class Router:
    """Segment trie for one upstream. ``case_insensitive`` folds literal segments (Salesforce object
    names are case-insensitive, so a grant or a deny must hold for every spelling)."""

    __slots__ = ("_root", "case_insensitive", "_default_param")

    def __init__(self, case_insensitive: bool = False, default_param: str | None = None) -> None:
        self._root = _Node()
        self.case_insensitive = case_insensitive
        self._default_param = re.compile(default_param) if default_param else None

    def add(self, cap: Capability, segments: tuple[str, ...] | None = None) -> None:
        node = self._root
        for seg in (segments if segments is not None else _template_segments(cap.template)):
            if seg.startswith("{"):
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                key = seg.lower() if self.case_insensitive else seg
                node = node.literals.setdefault(key, _Node())
        node.endpoints.setdefault(cap.method, []).append(cap)

    def match(self, method: str, segments: tuple[str, ...]) -> tuple[Capability, dict[str, str]] | None:
        fold = self.case_insensitive
        keys = tuple(s.lower() for s in segments) if fold else segments
        return self._walk(self._root, method, segments, keys, 0, [])

    def _walk(self, node: _Node, method: str, segs: tuple[str, ...], keys: tuple[str, ...], i: int,
              values: list[str]) -> tuple[Capability, dict[str, str]] | None:
        if i == len(segs):
            for cap in node.endpoints.get(method, ()):
                params = self._bind(cap, values)
                if params is not None:
                    return cap, params
            return None
        child = node.literals.get(keys[i])
        if child is not None:
            found = self._walk(child, method, segs, keys, i + 1, values)
            if found is not None:
                return found
        if node.param is not None:
            values.append(segs[i])
            found = self._walk(node.param, method, segs, keys, i + 1, values)
            values.pop()
            return found
        return None

    def _bind(self, cap: Capability, values: list[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for name, pattern, value in zip(cap.param_names, cap.param_patterns, values):
            pat = pattern or self._default_param
            if pat is not None and pat.fullmatch(value) is None:
                return None
            params[name] = value
        return params

    def methods_for(self, segments: tuple[str, ...]) -> set[str]:
        """Which methods are registered for this path (for a helpful denial message)."""
        out: set[str] = set()
        keys = tuple(s.lower() for s in segments) if self.case_insensitive else segments

        def walk(node: _Node, i: int) -> None:
            if i == len(keys):
                out.update(node.endpoints)
                return
            child = node.literals.get(keys[i])
            if child is not None:
                walk(child, i + 1)
            if node.param is not None:
                walk(node.param, i + 1)

        walk(self._root, 0)
        return out


def _template_segments(template: str) -> list[str]:
    t = template.strip("/")
    return t.split("/") if t else []


_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# what an MCP capability's operation is called in records (its "method"; its "path" is the tool name)
_MCP_METHODS = {"tool": "tools/call", "resource": "resources/read", "prompt": "prompts/get"}


class Registry:
    """Everything compiled from one rules file; immutable and shared by all requests using it."""

    def __init__(self, rules: RulesFile, adapters: dict[str, "Adapter"]) -> None:
        self.rules = rules
        self.version = hashlib.sha256(orjson.dumps(rules.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        self.adapters = adapters
        self.validators: dict[str, Any] = {}  # capability -> BodyValidator (compiled at build time)
        # (agent, capability, upstream) -> the rate-limit buckets a one-operation request draws on
        # (proxy.safety.ratelimit.demands_for fills it on first use)
        self.demand_cache: dict[tuple[str, str, str], list[Any]] = {}
        # capability -> its path template taken apart, for the MCP door (proxy.doors.mcp.tools)
        self.tool_plans: dict[str, Any] = {}
        self.capabilities: dict[str, Capability] = {}
        self.routers: dict[str, Router] = {}  # REST upstreams only: MCP capabilities are found by name
        for up_name in rules.rest_upstreams:
            ad = adapters[up_name]
            self.routers[up_name] = Router(ad.case_insensitive_paths, ad.default_param_pattern)
        mcp_caps = rules.mcp_capabilities
        for name, cc in rules.capabilities.items():
            mc = mcp_caps.get(name)
            if mc is not None:
                self.capabilities[name] = Capability(
                    name=name, upstream=mc.upstream, method=_MCP_METHODS[mc.kind], template=mc.target,
                    effect=mc.resolved_effect, operation="action" if mc.resolved_effect == "write" else "read",
                    param_names=(), param_patterns=(), config=mc, kind=mc.kind, target=mc.target)  # type: ignore[arg-type]
                continue
            ad = adapters[cc.upstream]
            names = tuple(_PARAM_RE.findall(cc.path))
            patterns = tuple(
                re.compile(cc.params[n]) if n in cc.params else ad.param_pattern(n) for n in names
            )
            cap = Capability(
                name=name,
                upstream=cc.upstream,
                method=cc.method,
                template=cc.path,
                effect=cc.resolved_effect,
                operation=cc.operation or ad.infer_operation(cc.method, cc.path, cc.resolved_effect),
                param_names=names,
                param_patterns=patterns,
                config=cc,
            )
            self.capabilities[name] = cap
            self.routers[cc.upstream].add(cap, ad.canonical_segments(tuple(_template_segments(cc.path)), None))
        self.grants: dict[tuple[str, str], Grant] = {}
        self.agent_grants: dict[str, list[Grant]] = {}
        for agent, ac in rules.agents.items():
            lst: list[Grant] = []
            for g in ac.grants:
                cap = self.capabilities[g.capability]
                grant = Grant(agent=agent, capability=cap, mode=effective_mode(cap, g.mode), declared_mode=g.mode,
                              config=g)
                self.grants[(agent, cap.name)] = grant
                lst.append(grant)
            self.agent_grants[agent] = lst

    def match(self, upstream: str, method: str, segments: tuple[str, ...],
              query: str | None = "") -> tuple[Capability, dict[str, str]] | None:
        """Match as the upstream reads the path: its adapter canonicalises the segments first."""
        return self.routers[upstream].match(method, self.adapters[upstream].canonical_segments(segments, query))

    def grant(self, agent: str, capability: str) -> Grant | None:
        return self.grants.get((agent, capability))


def effective_mode(cap: Capability, declared: Mode | None) -> Mode:
    """Reads always go live; a write whose mode is not set is dry-run, never live by default."""
    if cap.effect == "read":
        return "live"
    return declared or "dry_run"


def template_to_regex(template: str) -> str:
    """A readable regex for a template (used in docs/linters, not for matching)."""
    return "^" + _PARAM_RE.sub(r"(?P<\1>[^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}")) + "$"


def describe(cap: Capability) -> dict[str, Any]:
    return {"name": cap.name, "upstream": cap.upstream, "method": cap.method, "path": cap.template,
            "effect": cap.effect, "operation": cap.operation}
