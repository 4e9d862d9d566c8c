"""Pinned tool definitions: what a granted tool means cannot change after it was granted.

A vendor's MCP server decides what its tools are called, what their descriptions tell the model and
what arguments they take — and can change any of it at any time ("rug pull"), or ship a description
that instructs the model ("tool poisoning"). Tether pins each tool a capability names: the
**definition digest** is sha256 over the canonical JSON of what the model and Tether read about a tool
— ``name``, ``title``, ``description``, ``inputSchema``, ``outputSchema``, ``annotations`` (``title`` is
included although the issue's list omits it: a client may show it to the model as the tool's name) —
and the capability carries it (``pin: sha256:…``), written by ``tether rules import-mcp`` and updated only
by a person with ``tether rules pin --accept TOOL``.

Canonical JSON: keys sorted, no insignificant whitespace, UTF-8, absent and null members left out
(so a server that starts sending ``"description": null`` has not changed anything a model reads), the
definition as the SDK's ``Tool`` model reads it (what Tether would show an agent). Any other change —
a character of the description, a schema keyword, an annotation — changes the digest.

:func:`check_pins` is the run-time check: a tool whose listed definition does not have its pin is
``changed``, one the server no longer lists (or lists twice) is ``missing``/``changed``; the core hides
and refuses such tools (``tool_definition_changed``), journals and alerts. Tools the server lists that
no capability names are simply not Tether's business: they are never shown or callable.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from mcp_types import Tool

DIGEST_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
PinState = Literal["ok", "changed", "missing"]


def tool_definition(tool: Tool | Mapping[str, Any]) -> dict[str, Any]:
    """The pinned part of a tool's definition, as plain JSON values (absent and null members dropped)."""
    raw = tool.model_dump(by_alias=True, mode="json", exclude_none=True) if isinstance(tool, Tool) else dict(tool)
    out: dict[str, Any] = {}
    for k in DIGEST_FIELDS:
        v = raw.get(k)
        if v is None:
            continue
        out[k] = _drop_nulls(v) if k == "annotations" else v
    return out


def _drop_nulls(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    return v


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (non-ASCII kept as is)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def definition_digest(tool: Tool | Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the tool's canonical definition."""
    return "sha256:" + hashlib.sha256(canonical_json(tool_definition(tool))).hexdigest()


@dataclass(frozen=True, slots=True)
class PinStatus:
    """One pinned tool's state: ``ok`` (listed once, digest equals the pin), ``changed`` (listed with
    another digest, or more than once), ``missing`` (not listed). ``actual`` is the listed digest (None
    when missing or ambiguous); ``tool`` the listed definition when there is exactly one."""

    tool_name: str
    state: PinState
    expected: str | None
    actual: str | None
    capabilities: tuple[str, ...]
    reason: str
    tool: Tool | None = None

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check_pins(capabilities: Mapping[str, Any], listed_tools: Iterable[Tool], *,
               upstream: str | None = None) -> dict[str, PinStatus]:
    """``{tool name: PinStatus}`` for every tool capability (of ``upstream``, when given) in
    ``capabilities`` (name -> McpCapabilityConfig; others are ignored) against what the server listed.
    Fail closed: a tool listed twice is ``changed`` (which definition would a call reach?)."""
    by_name: dict[str, list[Tool]] = {}
    for t in listed_tools:
        by_name.setdefault(t.name, []).append(t)
    wanted: dict[str, list[tuple[str, str | None]]] = {}
    for cname, cap in capabilities.items():
        if getattr(cap, "tool", None) is None or (upstream is not None and cap.upstream != upstream):
            continue
        wanted.setdefault(cap.tool, []).append((cname, cap.pin))
    out: dict[str, PinStatus] = {}
    for tname, caps in wanted.items():
        names = tuple(c for c, _ in caps)
        pins = {p for _, p in caps}
        expected = next(iter(pins)) if len(pins) == 1 else None
        found = by_name.get(tname, [])
        if not found:
            out[tname] = PinStatus(tname, "missing", expected, None, names, "the server does not list this tool")
            continue
        if len(found) > 1:
            out[tname] = PinStatus(tname, "changed", expected, None, names,
                                   f"the server lists {len(found)} tools with this name")
            continue
        actual = definition_digest(found[0])
        if expected is None or actual != expected:
            why = "its capabilities disagree on the pin" if expected is None and len(pins) > 1 else (
                "no pin recorded" if expected is None else "the definition differs from its pin")
            out[tname] = PinStatus(tname, "changed", expected, actual, names, why, found[0])
        else:
            out[tname] = PinStatus(tname, "ok", expected, actual, names, "as pinned", found[0])
    return out


def definition_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any], *, name: str = "tool") -> str:
    """A unified diff of two definitions as indented, key-sorted JSON (what ``pin --accept`` shows)."""
    def lines(d: Mapping[str, Any] | None) -> list[str]:
        if d is None:
            return []
        return json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False).splitlines(keepends=True)

    a, b = lines(old), lines(new)
    return "".join(difflib.unified_diff(a, b, f"{name} (pinned)" if old is not None else f"{name} (no pinned copy)",
                                        f"{name} (listed now)"))


__all__ = ["DIGEST_FIELDS", "PinStatus", "PinState", "canonical_json", "check_pins", "definition_diff",
           "definition_digest", "tool_definition"]
