"""Resources and prompts of MCP upstreams, served to the agents granted them: catalogues and intake.

An agent is granted a resource by a URI template (``{upstream: crm, resource: "crm://customers/{id}"}``) and
a prompt by its name (``{upstream: crm, prompt: follow_up}``). Through the MCP door it sees:

* **resources** (``resources/list``) — the concrete resources its upstreams list whose URI one of its granted
  templates matches (:func:`proxy.mcp_upstream.match_resource`: strict, nothing decoded);
* **resource templates** (``resources/templates/list``) — the upstream templates that are a granted template
  (the same literal text and the same number of ``{…}`` expressions, whatever their names);
* **prompts** (``prompts/list``) — its granted prompts the upstream lists, under a name made as a tool's is
  (from the capability id: ``crm.follow_up`` → ``crm_follow_up``; the server's own with ``tool_names: bare``),
  with the server's title, description and arguments.

URIs are namespaced by the upstream, so two servers' resources never collide: an agent sees and reads
``tether://<upstream>/<the server's URI>`` (``tether://crm/crm://customers/cus_1``), and Tether sends the
server the part after the upstream's name, exactly as written. A URI no granted template of that upstream
matches is answered as a resource that does not exist, without reaching the server.

Every ``resources/read`` and ``prompts/get`` is an exchange through the same pipeline as a tool call: this
module's intake (:func:`resolve_fetch`, :func:`bind_prompt_arguments`, run by the door's ``resolve_tool``
and ``bind_arguments`` stages) names the capability, the upstream and what is sent; then grant, field
rules (a prompt's ``body`` rules apply to its arguments), rate limits, the intent record (durable before
anything leaves), the call (:func:`proxy.pipeline.tool_call.fetch`), and the outcome record with the
result's digest and size — never the result.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

import orjson
from mcp_types import Prompt, Resource, ResourceTemplate
from multidict import CIMultiDict

from adapters.base import Operation

from ...core.exchange import Exchange
from ...errors import TetherError
from ...mcp_upstream import match_resource
from .backend import PromptGet, ResourceRead

if TYPE_CHECKING:
    from ...core.runtime import Runtime
    from ...policy.registry import Capability, Grant

SCHEME = "tether://"
MAX_PROMPT_ARGUMENT = 64 * 1024  # characters of one prompt argument
_EXPR = re.compile(r"\{[A-Za-z0-9_]+\}")


def agent_uri(upstream: str, uri: str) -> str:
    """The URI an agent sees for ``uri`` of ``upstream`` (see the module doc)."""
    return f"{SCHEME}{upstream}/{uri}"


def split_uri(uri: str) -> tuple[str, str] | None:
    """(upstream, the server's URI) of an agent's URI, or None when it is not one of Tether's."""
    if not uri.startswith(SCHEME):
        return None
    upstream, sep, inner = uri[len(SCHEME):].partition("/")
    if not sep or not upstream or not inner:
        return None
    return upstream, inner


def skeleton(template: str) -> str | None:
    """A level-1 URI template with its expressions' names left out (``crm://c/{id}`` → ``crm://c/{}``), so
    that two templates granting the same URIs compare equal; None for anything beyond level 1."""
    rest = _EXPR.sub("{}", template)
    return rest if "{" not in rest.replace("{}", "") and "}" not in rest.replace("{}", "") else None


def fetch_grants(grants: list["Grant"], kind: str) -> list["Grant"]:
    return [g for g in grants if g.capability.kind == kind]


class ResourceCatalog:
    """One agent's resources and templates, from its grants and the upstreams' last listings."""

    def __init__(self, state: Any, grants: list["Grant"]) -> None:
        by_upstream: dict[str, list["Capability"]] = {}
        for g in fetch_grants(grants, "resource"):
            by_upstream.setdefault(g.capability.upstream, []).append(g.capability)
        self.resources: list[Resource] = []
        self.templates: list[ResourceTemplate] = []
        for name, caps in by_upstream.items():
            rt = state.mcp_upstreams.get(name)
            if rt is None:
                continue
            for r in rt.resources or ():
                if any(match_resource(c.target, r.uri) is not None for c in caps):
                    self.resources.append(r.model_copy(update={"uri": agent_uri(name, r.uri)}))
            granted = {skeleton(c.target) for c in caps}
            for t in rt.templates or ():
                sk = skeleton(t.uri_template)
                if sk is not None and sk in granted:
                    self.templates.append(t.model_copy(update={"uri_template": agent_uri(name, t.uri_template)}))


class PromptCatalog:
    """One agent's prompts: its granted prompts the upstreams list, under the names ``names`` gives."""

    def __init__(self, state: Any, grants: list["Grant"], names: dict[str, str]) -> None:
        self.prompts: list[Prompt] = []
        for g in fetch_grants(grants, "prompt"):
            cap = g.capability
            rt = state.mcp_upstreams.get(cap.upstream)
            found = [p for p in (rt.prompts or ()) if p.name == cap.target] if rt is not None else []
            if len(found) != 1:  # not listed (or listed twice: which one would a get reach?): hidden
                continue
            p = found[0]
            parts = [p.description.strip()] if (p.description or "").strip() else []
            parts.append(f"Prompt {cap.target} of MCP server {cap.upstream}.")
            self.prompts.append(p.model_copy(update={"name": names[cap.name], "description": " ".join(parts),
                                                     "title": p.title or None}))


# --------------------------------------------------------------------------- intake


def resolve_fetch(rt: "Runtime", ex: Exchange) -> None:
    """The resource a ``resources/read`` names (the first of the agent's granted templates of that upstream
    that matches it) or the prompt a ``prompts/get`` names -> capability, upstream, what is sent. Nothing
    granted: refused (``capability_not_granted``), journaled, answered as an unknown resource or prompt."""
    req = ex.extra["mcp_fetch"]
    backend = ex.extra["mcp_backend"]
    agent = ex.identity.agent  # type: ignore[union-attr]
    if isinstance(req, ResourceRead):
        parts = split_uri(req.uri)
        cap = None
        if parts is not None:
            for c in backend.resource_grants_for(agent).get(parts[0], ()):
                if match_resource(c.target, parts[1]) is not None:
                    cap = c
                    break
        if cap is None or parts is None:
            raise TetherError("capability_not_granted", f"agent {agent!r} may read no resource {req.uri[:300]!r}")
        path, body = parts[1], None
    else:
        assert isinstance(req, PromptGet)
        cap = backend.prompt_names_for(agent).get(req.name)
        if cap is None:
            raise TetherError("capability_not_granted", f"agent {agent!r} has no prompt {req.name[:200]!r}")
        path, body = cap.target, None
    up = ex.state.mcp_upstreams.get(cap.upstream)
    if up is None:
        raise TetherError("upstream_unavailable", f"MCP upstream {cap.upstream!r} is not running")
    ex.upstream = up
    ex.capability = cap
    ex.method = cap.method
    ex.raw_path = path
    ex.headers = CIMultiDict()
    ex.operations = [Operation(method=cap.method, path=path, body=body, capability=cap)]
    tp = (req.meta or {}).get("traceparent")
    if isinstance(tp, str):
        ex.traceparent = tp


def json_arguments_body(rt: "Runtime", ex: Exchange, args: dict[str, Any]) -> bytes:
    """A call's arguments as the JSON body the pipeline checks and journals (size-capped like any body,
    digested): for a prompt's arguments and for an MCP upstream tool's."""
    raw = orjson.dumps(args)
    if len(raw) > rt.limits.max_body_bytes:
        raise TetherError("body_too_large", f"the arguments exceed {rt.limits.max_body_bytes} bytes")
    ex.body = raw
    ex.body_digest = hashlib.sha256(raw).hexdigest()
    ex.extra["body_kind"] = "json"
    return raw


def bind_prompt_arguments(rt: "Runtime", ex: Exchange) -> None:
    """A prompt's arguments (strings) -> the operation's body: what its ``body`` rules, ``json_schema`` and
    ``audit_fields`` apply to, what is journaled as a digest, and exactly what the server is sent."""
    req = ex.extra["mcp_fetch"]
    if not isinstance(req, PromptGet):
        return
    args = dict(req.arguments or {})
    for k, v in args.items():
        if not isinstance(v, str):
            raise TetherError("bad_request", f"prompt argument {k!r} is a string")
        if len(v) > MAX_PROMPT_ARGUMENT:
            raise TetherError("body_too_large", f"prompt argument {k!r} exceeds {MAX_PROMPT_ARGUMENT} characters")
    raw = json_arguments_body(rt, ex, args)
    op = ex.operations[0]
    op.body, op.raw_body, op.content_type = args, raw, "application/json"


__all__ = ["PromptCatalog", "ResourceCatalog", "SCHEME", "agent_uri", "bind_prompt_arguments", "fetch_grants",
           "resolve_fetch", "skeleton", "split_uri"]
