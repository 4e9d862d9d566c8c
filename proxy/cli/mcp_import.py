"""Capabilities from an MCP server's tools: ``tether rules import-mcp``; pins: ``tether rules pin``.

One capability per tool the server lists (``tools/list``, all pages), named ``<upstream>.<tool>``, with:

* **effect** — guessed, and never from the annotations alone (a server's annotations are hints the
  spec says not to trust): ``read`` only when the tool says ``readOnlyHint: true`` *and* its name starts
  with a read verb (get, list, search, read, fetch, ...) and holds no write verb; anything else is a
  ``write`` — reviewed in dry-run until promoted, so a wrong guess costs a review, not a change.
  Annotations are not consulted at run time at all: the capability's ``effect`` is what counts.
* **needs_review** — every imported capability says why a person must look at it (the guess and what
  it rests on); ``tether rules check`` warns and the catalogue lists it as "needs wrapping" until the key
  is deleted.
* **pin** — the tool's definition digest (:func:`proxy.mcp_upstream.pins.definition_digest`); the
  definition itself is kept in the import state file beside the output
  (``<output>.import-state.json``), so ``tether rules pin --accept`` can show what changed.
* **body** — the tool's ``inputSchema`` as ``json_schema``, and its top-level properties as
  ``allow_fields`` when the schema lists them and does not allow others (``--allow-fields`` as for
  OpenAPI: auto, closed, off).
* **description** — the tool's first line, clipped.

Re-running into an existing file merges like the OpenAPI importer (:func:`proxy.openapi.merge_values`):
keys a person changed stay, untouched keys follow the server, new tools are appended, tools that
vanished are reported, capabilities or grants deleted by hand are not brought back. One exception on
purpose: a **pin is never changed by a re-import** — a tool whose definition changed is reported and
keeps its old pin (so it stays refused) until ``tether rules pin --accept TOOL`` (or
``--accept-changes``) records the new one after a person has read the diff.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp_types import Tool

from ..mcp_upstream.pins import definition_digest, tool_definition
from .openapi import _MISSING, merge_values

READ_VERBS = frozenset({"get", "list", "search", "read", "fetch", "find", "query", "describe", "count", "show",
                        "view", "lookup", "retrieve", "check", "preview", "estimate", "explain", "summarize",
                        "browse", "inspect", "status", "download", "export"})
WRITE_VERBS = frozenset({"create", "add", "insert", "new", "update", "set", "put", "patch", "edit", "modify",
                         "change", "delete", "remove", "destroy", "drop", "archive", "cancel", "refund", "send",
                         "post", "publish", "submit", "charge", "pay", "transfer", "move", "rename", "merge",
                         "upsert", "write", "upload", "import", "trigger", "run", "execute", "exec", "start",
                         "stop", "enable", "disable", "toggle", "assign", "invite", "approve", "reject", "close",
                         "open", "reset", "revoke", "grant", "purge", "void", "capture", "book", "schedule",
                         "invoke", "call", "apply", "commit", "push", "deploy", "restore", "sync", "clear"})
# "export"/"download" read the system but move data out: they are reads of the record system, and a
# write verb anywhere in the name still makes the tool a write ("export_and_delete").


@dataclass
class McpImportOptions:
    upstream: str
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    name_prefix: str | None = None  # default "<upstream>."
    allow_fields: str = "auto"  # auto | closed | off
    accept_changes: bool = False

    @property
    def prefix(self) -> str:
        return f"{self.upstream}." if self.name_prefix is None else self.name_prefix


def matches_name(patterns: list[str], *subjects: str) -> bool:
    """Does a glob (or ``re:REGEX``) match the tool's name or the capability's name?"""
    import fnmatch

    for pat in patterns:
        if pat.startswith("re:"):
            rx = re.compile(pat[3:])
            if any(rx.search(s) for s in subjects):
                return True
        elif any(fnmatch.fnmatchcase(s, pat) for s in subjects):
            return True
    return False


def name_tokens(name: str) -> list[str]:
    """``createCustomer``, ``create_customer``, ``create-customer`` -> ['create', 'customer']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [t.lower() for t in re.split(r"[^A-Za-z0-9]+", spaced) if t]


def guess_effect(tool: Tool) -> tuple[str, str]:
    """(effect, what the guess rests on)."""
    tokens = name_tokens(tool.name)
    ann = tool.annotations
    ro = ann.read_only_hint if ann is not None else None
    writes = [t for t in tokens if t in WRITE_VERBS]
    if writes:
        return "write", f"the name {tool.name!r} holds a write verb ({writes[0]!r})"
    if ro is True and tokens and tokens[0] in READ_VERBS:
        return "read", f"readOnlyHint: true and the name {tool.name!r} starts with {tokens[0]!r}"
    if ro is True:
        return "write", (f"readOnlyHint: true, but the name {tool.name!r} does not start with a read verb: taken as "
                         "a write until a person says otherwise")
    if tokens and tokens[0] in READ_VERBS:
        return "write", (f"the name {tool.name!r} looks like a read, but the server does not say readOnlyHint: true: "
                         "taken as a write until a person says otherwise")
    return "write", f"nothing shows that {tool.name!r} only reads"


def _description(tool: Tool) -> str:
    text = " ".join((tool.description or tool.title or "").split())
    return text if len(text) <= 160 else text[:157].rstrip() + "..."


def body_rules(schema: dict[str, Any] | None, mode: str) -> dict[str, Any] | None:
    """``json_schema`` (the tool's inputSchema) and, by ``mode``, ``allow_fields`` from its properties."""
    if not isinstance(schema, dict) or not schema:
        return None
    body: dict[str, Any] = {}
    props = schema.get("properties")
    ap = schema.get("additionalProperties")
    if isinstance(props, dict) and mode != "off":
        closed = ap is False
        if closed or (mode == "auto" and ap is None and not schema.get("patternProperties")):
            body["allow_fields"] = list(props)
    body["json_schema"] = copy.deepcopy(schema)
    return body


def build_capability(tool: Tool, opts: McpImportOptions) -> dict[str, Any]:
    effect, why = guess_effect(tool)
    cap: dict[str, Any] = {"upstream": opts.upstream, "tool": tool.name, "effect": effect}
    desc = _description(tool)
    if desc:
        cap["description"] = desc
    cap["pin"] = definition_digest(tool)
    cap["needs_review"] = f"effect {effect} guessed: {why}"
    body = body_rules(tool.input_schema, opts.allow_fields)
    if body:
        cap["body"] = body
    return cap


@dataclass
class McpImported:
    capabilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    tool_of: dict[str, str] = field(default_factory=dict)  # capability -> tool
    definitions: dict[str, dict[str, Any]] = field(default_factory=dict)  # tool -> {pin, definition}
    filtered_out: set[str] = field(default_factory=set)
    duplicates: list[str] = field(default_factory=list)
    listed: int = 0


def import_tools(tools: list[Tool], opts: McpImportOptions, names_by_tool: dict[str, str] | None = None,
                 taken: set[str] | None = None) -> McpImported:
    """Capabilities for the listed tools that pass the filters. A name the server lists twice is
    skipped (which of the two would a call reach?) and reported."""
    res = McpImported(listed=len(tools))
    names_by_tool = names_by_tool or {}
    taken = set(taken or ())
    counts: dict[str, int] = {}
    for t in tools:
        counts[t.name] = counts.get(t.name, 0) + 1
    for t in tools:
        if counts[t.name] > 1:
            if t.name not in res.duplicates:
                res.duplicates.append(t.name)
            continue
        name = names_by_tool.get(t.name) or _unique(opts.prefix + t.name, taken)
        if (opts.include and not matches_name(opts.include, t.name, name)) or (
                opts.exclude and matches_name(opts.exclude, t.name, name)):
            res.filtered_out.add(t.name)
            continue
        taken.add(name)
        res.capabilities[name] = build_capability(t, opts)
        res.tool_of[name] = t.name
        res.definitions[t.name] = {"pin": definition_digest(t), "definition": tool_definition(t)}
    return res


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


@dataclass
class McpMergeReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept_edits: list[str] = field(default_factory=list)
    pin_changed: list[tuple[str, str]] = field(default_factory=list)  # (capability, tool): kept the old pin
    pin_accepted: list[tuple[str, str]] = field(default_factory=list)  # with --accept-changes
    vanished: list[tuple[str, str]] = field(default_factory=list)  # (capability, tool)
    removed_by_hand: list[tuple[str, str]] = field(default_factory=list)
    grants_added: list[str] = field(default_factory=list)
    grants_not_restored: list[str] = field(default_factory=list)


def merge(existing: dict[str, Any] | None, state: dict[str, Any] | None, imported: McpImported,
          opts: McpImportOptions, *, upstream: dict[str, Any], agent: str | None) -> tuple[dict[str, Any], dict[str, Any],
                                                                                          McpMergeReport]:
    """The new rules document and import state (see the module docstring)."""
    report = McpMergeReport()
    doc: dict[str, Any] = copy.deepcopy(existing) if existing else {
        "version": 1, "identity": {"hs_secret": {"env": "TETHER_DEV_JWT_SECRET"}}}
    doc.setdefault("version", 1)
    ups = doc.get("upstreams") or {}
    doc["upstreams"] = ups
    if opts.upstream not in ups:
        ups[opts.upstream] = upstream
    caps: dict[str, Any] = doc.get("capabilities") or {}
    up_state = ((state or {}).get("upstreams") or {}).get(opts.upstream) or {}
    generated_before: dict[str, Any] = up_state.get("capabilities") or {}
    tools_before: dict[str, str] = up_state.get("tools") or {}  # tool -> capability
    defs: dict[str, Any] = dict(up_state.get("definitions") or {})
    by_tool = {c.get("tool"): n for n, c in caps.items()
               if isinstance(c, dict) and c.get("upstream") == opts.upstream and isinstance(c.get("tool"), str)}

    new_caps = dict(caps)
    new_state_caps: dict[str, Any] = {}
    new_tools: dict[str, str] = {}
    for name, gen in imported.capabilities.items():
        tool = imported.tool_of[name]
        target = tools_before.get(tool)
        if target is not None and target not in caps and existing is not None and by_tool.get(tool) is None:
            report.removed_by_hand.append((target, tool))  # imported before, deleted by a person
            new_state_caps[target] = gen
            new_tools[tool] = target
            continue
        if target not in caps:
            target = by_tool.get(tool)
        if target is None or target not in caps:
            new_caps[name] = gen
            report.added.append(name)
            new_state_caps[name] = gen
            new_tools[tool] = name
            defs[tool] = imported.definitions[tool]
            continue
        mine = caps[target]
        merged = merge_values(generated_before.get(target, _MISSING), mine, gen)
        if merged is _MISSING:
            merged = mine
        old_pin = mine.get("pin") if isinstance(mine, dict) else None
        if isinstance(merged, dict) and old_pin and old_pin != gen["pin"]:
            if opts.accept_changes:
                merged["pin"] = gen["pin"]
                report.pin_accepted.append((target, tool))
                defs[tool] = imported.definitions[tool]
            else:
                merged["pin"] = old_pin  # never moved by a re-import: tether rules pin --accept
                report.pin_changed.append((target, tool))
        elif isinstance(merged, dict) and merged.get("pin") == gen["pin"]:
            defs[tool] = imported.definitions[tool]
        new_caps[target] = merged
        new_state_caps[target] = gen if not (isinstance(merged, dict) and merged.get("pin") != gen["pin"]) else {
            **gen, "pin": merged.get("pin")}
        new_tools[tool] = target
        if merged == mine:
            report.unchanged.append(target)
        else:
            report.updated.append(target)
        if merged != gen:
            report.kept_edits.append(target)
    doc["capabilities"] = new_caps

    seen = {v for v in new_tools.values() if v in new_caps}
    for tool, cname in tools_before.items():
        if tool not in new_tools and tool not in imported.filtered_out and cname in new_caps and cname not in seen:
            report.vanished.append((cname, tool))
    if not tools_before and existing:
        for tool, cname in by_tool.items():
            if cname not in seen and tool not in imported.filtered_out:
                report.vanished.append((cname, str(tool)))

    grants_state: dict[str, list[str]] = dict(up_state.get("grants") or {})
    if agent:
        granted_before = set(grants_state.get(agent, []))
        agents = doc.get("agents") or {}
        doc["agents"] = agents
        a = agents.get(agent) or {}
        agents[agent] = a
        grants = a.get("grants") or []
        a["grants"] = grants
        held = {g if isinstance(g, str) else g.get("capability") for g in grants if isinstance(g, (str, dict))}
        for name in sorted(seen, key=list(new_caps).index):
            if name in held:
                continue
            if name in granted_before:
                report.grants_not_restored.append(name)
                continue
            c = new_caps[name]
            effect = c.get("effect") if isinstance(c, dict) else "write"
            grants.append(name if effect == "read" else {"capability": name, "mode": "dry_run"})
            report.grants_added.append(name)
        grants_state[agent] = sorted(granted_before | set(report.grants_added) | (held & seen))

    order = ["version", "server", "identity", "governance", "upstreams", "agents", "capabilities"]
    doc = {k: doc[k] for k in order if k in doc} | {k: v for k, v in doc.items() if k not in order}
    new_state = copy.deepcopy(state) if state else {}
    new_state.setdefault("upstreams", {})
    keep_tools = {k: v for k, v in tools_before.items() if k in imported.filtered_out and v in new_caps}
    keep_caps = {v: generated_before[v] for v in keep_tools.values() if v in generated_before}
    new_state["upstreams"][opts.upstream] = {
        "kind": "mcp",
        "tools": {**keep_tools, **new_tools},
        "capabilities": {**keep_caps, **new_state_caps},
        "definitions": defs,
        **({"grants": grants_state} if grants_state else {}),
    }
    return doc, new_state, report


HEADER = """\
# Generated by `tether rules import-mcp` and meant to be edited: re-running the import merges, keeping what
# you changed (see proxy/cli/mcp_import.py). Each tool's effect is a guess (needs_review says from what): confirm
# it and delete needs_review. Writes are dry-run until promoted. `pin` is the tool's definition digest: a
# server that changes the tool gets it refused until `tether rules pin --accept TOOL`.
"""


def upstream_entry(url: str | None, command: list[str] | None, env: dict[str, str], cwd: str | None,
                   token_env: str | None) -> dict[str, Any]:
    """The upstream block written for a new upstream."""
    up: dict[str, Any] = {"kind": "mcp"}
    if url:
        up["url"] = url
        if token_env:
            up["credentials"] = {"type": "bearer", "token_env": token_env}
    else:
        up["command"] = list(command or [])
        if env:
            up["env"] = dict(env)
        if cwd:
            up["cwd"] = cwd
    return up


def find_pin_node(text: str, capability: str) -> tuple[int, int] | None:
    """(start, end) character offsets of ``capabilities.<capability>.pin``'s value in a YAML text, so it can
    be replaced without rewriting (and losing the comments of) the rest of the file."""
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return None

    def child(node: Any, key: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == key:
                    return v
        return None

    caps = child(root, "capabilities")
    cap = child(caps, capability)
    pin = child(cap, "pin")
    if isinstance(pin, yaml.ScalarNode):
        return pin.start_mark.index, pin.end_mark.index
    if isinstance(cap, yaml.MappingNode):
        return None
    return None


def set_pin(text: str, capability: str, pin: str) -> str:
    """The rules text with ``capabilities.<capability>.pin`` set to ``pin``: the value replaced in place, or
    (no pin yet, a block mapping) a ``pin:`` line added after the capability's ``tool:`` line."""
    span = find_pin_node(text, capability)
    if span is not None:
        start, end = span
        return text[:start] + pin + text[end:]
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for k, v in root.value:
        if k.value == "capabilities":
            for ck, cv in v.value:
                if ck.value == capability and isinstance(cv, yaml.MappingNode) and not cv.flow_style:
                    for kk, vv in cv.value:
                        if kk.value == "tool":
                            line_end = text.index("\n", vv.end_mark.index) if "\n" in text[vv.end_mark.index:] \
                                else len(text)
                            indent = " " * kk.start_mark.column
                            return text[:line_end] + f"\n{indent}pin: {pin}" + text[line_end:]
    raise ValueError(f"capability {capability!r} has no pin to replace and no block 'tool:' line to add one after; "
                     "add `pin:` by hand")


def state_for_rules(path: Path) -> Path:
    from .openapi import state_path

    return state_path(path)


__all__ = ["McpImportOptions", "McpImported", "McpMergeReport", "guess_effect", "build_capability", "import_tools",
           "merge", "HEADER", "upstream_entry", "set_pin", "find_pin_node", "name_tokens", "body_rules"]
