"""Test ToolBackends for the MCP front door's protocol layer (no pipeline: that is the core's part).

* :class:`JwtBackend` verifies the agent's bearer JWT with the gateway's own ``TokenVerifier`` (the REST
  door's check) and serves two agents different tools: ``bot`` gets a structured read, a refusal, a slow
  tool that streams progress and honours cancellation, an echo and one that crashes; ``other-bot`` gets
  the read only. Tests can change an agent's tools (``set_tools``) and the version moves with them.
* :class:`ReadsBackend` is a ``JwtBackend`` that also serves resources, templates and prompts and relays
  log messages (the protocol layer's optional parts), with a tool that logs at every level.
* :class:`ConformanceBackend` serves the tools the official conformance suite's server scenarios call,
  to an anonymous principal (the suite sends no token).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from aiohttp import web
from mcp_types import (
    AudioContent,
    CallToolResult,
    EmbeddedResource,
    GetPromptResult,
    ImageContent,
    Prompt,
    PromptArgument,
    PromptMessage,
    ReadResourceResult,
    Resource,
    ResourceTemplate,
    TextContent,
    TextResourceContents,
    Tool,
    ToolAnnotations,
)

from proxy.doors.mcp import (
    REFUSED,
    McpAuthError,
    McpRefused,
    PromptGet,
    ResourceRead,
    ToolCall,
    UnknownPrompt,
    UnknownResource,
    UnknownTool,
    error_result,
    json_result,
)
from proxy.errors import AuthError

OBJ = {"type": "object"}


@dataclass(frozen=True)
class Agent:
    agent: str
    on_behalf_of: str | None = None

    @property
    def key(self) -> str:
        return self.agent if self.on_behalf_of is None else f"{self.agent}\x00{self.on_behalf_of}"


def _tool(name: str, description: str, schema: dict[str, Any] | None = None, **kw: Any) -> Tool:
    return Tool(name=name, description=description, input_schema=schema or OBJ, **kw)


READ = _tool("crm_read", "Read a contact", {"type": "object", "properties": {"id": {"type": "string"}},
                                             "required": ["id"]},
             output_schema={"type": "object", "properties": {"id": {"type": "string"}, "name": {"type": "string"}}},
             annotations=ToolAnnotations(read_only_hint=True))
BOT_TOOLS = [
    READ,
    _tool("crm_update", "Update a contact (refused: not granted live)",
          {"type": "object", "properties": {"id": {"type": "string"}, "intent": {"type": "string"}},
           "required": ["id", "intent"]}),
    _tool("slow_export", "A slow export that reports progress", {"type": "object",
                                                                  "properties": {"steps": {"type": "integer"}}}),
    _tool("echo", "Echo the arguments and _meta back"),
    _tool("boom", "Crashes inside the backend"),
]

# a tool whose schema mirrors arguments into Mcp-Param-* headers (MCP 2026-07-28, x-mcp-header)
REGION = _tool("region_query", "Query one region", {
    "type": "object", "required": ["region", "query"],
    "properties": {"region": {"type": "string", "x-mcp-header": "Region"},
                   "limit": {"type": "integer", "x-mcp-header": "Limit"},
                   "opts": {"type": "object", "properties": {"dry": {"type": "boolean", "x-mcp-header": "Dry"}}},
                   "query": {"type": "string"}}})


class JwtBackend:
    def __init__(self, verifier: Any, *, issuer: str = "https://issuer.example") -> None:
        self.verifier = verifier
        self.issuer = issuer
        self.tools: dict[str, list[Tool]] = {"bot": list(BOT_TOOLS), "other-bot": [READ], "region-bot": [REGION]}
        self.versions: dict[str, int] = {"bot": 1, "other-bot": 1, "region-bot": 1}
        self.events: list[dict[str, Any]] = []
        self.calls: list[ToolCall] = []
        self.cancelled_seen: list[Any] = []
        self.slow_gate: asyncio.Event | None = None

    def set_tools(self, agent: str, tools: Sequence[Tool]) -> None:
        self.tools[agent] = list(tools)
        self.versions[agent] += 1

    async def authenticate(self, request: web.BaseRequest) -> Agent:
        try:
            ident = self.verifier.authenticate(request.headers.get("Authorization"))
        except AuthError as e:
            raise McpAuthError(e.code, e.message, token_presented=e.code != "token_missing") from None
        if ident.agent not in self.tools:
            raise McpAuthError("agent_unknown", "the token's agent is not declared in the rules", status=403)
        return Agent(ident.agent, ident.on_behalf_of)

    def tools_for(self, principal: Agent) -> Sequence[Tool]:
        return self.tools[principal.agent]

    def tools_version(self, principal: Agent) -> object:
        return self.versions[principal.agent]

    async def call_tool(self, call: ToolCall) -> CallToolResult:
        self.calls.append(call)
        names = {t.name for t in self.tools[call.principal.agent]}  # type: ignore[attr-defined]
        if call.name not in names:
            raise UnknownTool(call.name)
        if call.name == "crm_read":
            return json_result({"id": call.arguments.get("id"), "name": "Ada Lovelace"})
        if call.name == "crm_update":
            return error_result("capability_not_granted", "the route is registered but not granted to this agent",
                                status=403, details={"capability": "contact.update"}, request_id="r-123")
        if call.name == "region_query":
            return json_result({"arguments": call.arguments})
        if call.name == "echo":
            return json_result({"arguments": call.arguments, "meta": call.meta, "session": call.session.id,
                                "client": call.session.client_name, "version": call.session.protocol_version,
                                "request_id": call.request_id, "on_behalf_of": call.principal.on_behalf_of})  # type: ignore[attr-defined]
        if call.name == "slow_export":
            steps = int(call.arguments.get("steps", 3))
            done = 0
            for i in range(steps):
                if call.cancelled.is_set():
                    self.cancelled_seen.append(call.request_id)
                    break
                if call.progress is not None:
                    await call.progress(i + 1, steps, f"step {i + 1}")
                    await call.progress(i + 1, steps, "repeated value: dropped")
                if self.slow_gate is not None:
                    await self.slow_gate.wait()
                else:
                    await asyncio.sleep(0.02)
                done += 1
            return json_result({"exported": done, "cancelled": call.cancelled.is_set()})
        raise RuntimeError("the backend crashed")

    def resource_metadata(self, resource: str) -> Mapping[str, Any]:
        return {"authorization_servers": [self.issuer], "scopes_supported": []}

    def record(self, event: Mapping[str, Any]) -> str | None:
        rid = f"rid-{len(self.events)}"
        self.events.append(dict(event) | {"request_id": rid})
        return rid


# --------------------------------------------------------------------------- resources, prompts, logs


LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class ReadsBackend(JwtBackend):
    """Resources (three, and a template), prompts (two) and a tool whose call logs, for ``bot``; nothing of
    the kind for ``other-bot``. ``reads`` records what reached the backend."""

    relays_logs = True

    def __init__(self, verifier: Any) -> None:
        super().__init__(verifier)
        self.tools["bot"].append(_tool("chatty", "Logs at every level (and more)"))
        self.reads: list[Any] = []
        self.rversion = 1

    def resources_for(self, principal: Agent) -> Sequence[Resource]:
        if principal.agent != "bot":
            return []
        return [Resource(name=f"doc{i}", uri=f"test://docs/{i}", mime_type="text/plain") for i in range(3)]

    def resource_templates_for(self, principal: Agent) -> Sequence[ResourceTemplate]:
        return [ResourceTemplate(name="doc", uri_template="test://docs/{n}")] if principal.agent == "bot" else []

    def resources_version(self, principal: Agent) -> object:
        return self.rversion

    async def read_resource(self, read: ResourceRead) -> ReadResourceResult:
        self.reads.append(read)
        if read.principal.agent != "bot" or not read.uri.startswith("test://docs/"):  # type: ignore[attr-defined]
            raise UnknownResource(read.uri)
        if read.uri == "test://docs/limited":
            raise McpRefused(REFUSED, "Refused by Tether (rate_limited): slow down",
                             {"code": "rate_limited", "status": 429, "request_id": "r-9"})
        if read.uri == "test://docs/boom":
            raise RuntimeError("the backend crashed")
        return ReadResourceResult(contents=[TextResourceContents(uri=read.uri, text=f"text of {read.uri}")])

    def prompts_for(self, principal: Agent) -> Sequence[Prompt]:
        if principal.agent != "bot":
            return []
        return [Prompt(name="greet", arguments=[PromptArgument(name="who", required=True)]), Prompt(name="plain")]

    def prompts_version(self, principal: Agent) -> object:
        return 1

    async def get_prompt(self, get: PromptGet) -> GetPromptResult:
        self.reads.append(get)
        if get.principal.agent != "bot" or get.name not in ("greet", "plain"):  # type: ignore[attr-defined]
            raise UnknownPrompt(get.name)
        return GetPromptResult(messages=[PromptMessage(role="user", content=TextContent(
            text=f"Hello {get.arguments.get('who', 'there')}"))])

    async def call_tool(self, call: ToolCall) -> CallToolResult:
        if call.name != "chatty":
            return await super().call_tool(call)
        n = int(call.arguments.get("extra", 0))
        if call.log is not None:
            for level in LEVELS:
                await call.log(level, {"level": level}, "chatty")
            await call.log("verbose", "not a level: dropped")
            await call.log("info", "y" * 40_000)
            for i in range(n):
                await call.log("info", i)
        return json_result({"logged": True, "sink": call.log is not None})


# --------------------------------------------------------------------------- the conformance suite's tools

_PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201e2260bd10000000049454e44ae426082")).decode()
_WAV = base64.b64encode(b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00D\xac\x00\x00\x88X\x01\x00"
                        b"\x02\x00\x10\x00data\x00\x00\x00\x00").decode()


@dataclass(frozen=True)
class Anonymous:
    key: str = "conformance"


class ConformanceBackend:
    """The tools ``@modelcontextprotocol/conformance`` server scenarios expect, for a tools-only server."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.tools = [
            _tool("test_simple_text", "Returns simple text"),
            _tool("test_image_content", "Returns an image"),
            _tool("test_audio_content", "Returns audio"),
            _tool("test_embedded_resource", "Returns an embedded resource"),
            _tool("test_multiple_content_types", "Returns text, an image and a resource"),
            _tool("test_error_handling", "Always fails"),
            _tool("test_tool_with_progress", "Reports progress"),
            _tool("json_schema_2020_12_tool", "Has a JSON Schema 2020-12 input schema", {
                "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"},
                                                                        "city": {"type": "string"}}}},
                "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
                "additionalProperties": False}),
        ]

    async def authenticate(self, request: web.BaseRequest) -> Anonymous:
        return Anonymous()

    def tools_for(self, principal: Any) -> Sequence[Tool]:
        return self.tools

    def tools_version(self, principal: Any) -> object:
        return 1

    async def call_tool(self, call: ToolCall) -> CallToolResult:
        n = call.name
        if n == "test_simple_text":
            return CallToolResult(content=[TextContent(text="This is a simple text response for testing.")])
        if n == "test_image_content":
            return CallToolResult(content=[ImageContent(data=_PNG, mime_type="image/png")])
        if n == "test_audio_content":
            return CallToolResult(content=[AudioContent(data=_WAV, mime_type="audio/wav")])
        if n == "test_embedded_resource":
            return CallToolResult(content=[EmbeddedResource(resource=TextResourceContents(
                uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."))])
        if n == "test_multiple_content_types":
            return CallToolResult(content=[
                TextContent(text="Multiple content types test:"), ImageContent(data=_PNG, mime_type="image/png"),
                EmbeddedResource(resource=TextResourceContents(uri="test://mixed-content-resource",
                                                               mime_type="application/json",
                                                               text='{"test":"data","value":123}'))])
        if n == "test_error_handling":
            return error_result("conformance_error", "This tool intentionally returns an error for testing")
        if n == "test_tool_with_progress":
            for p in (0, 50, 100):
                if call.progress is not None:
                    await call.progress(p, 100)
                await asyncio.sleep(0.05)
            return CallToolResult(content=[TextContent(text="Progress complete")])
        if n == "json_schema_2020_12_tool":
            return json_result({"received": call.arguments})
        raise UnknownTool(n)

    def resource_metadata(self, resource: str) -> Mapping[str, Any]:
        return {"authorization_servers": ["https://issuer.example"]}

    def record(self, event: Mapping[str, Any]) -> str | None:
        self.events.append(dict(event))
        return None


# --------------------------------------------------------------------------- a gateway serving MCP with a test backend


@dataclass
class McpEnv:
    handle: Any  # tests.conftest.GatewayHandle
    backend: Any
    endpoint: Any

    @property
    def base(self) -> str:
        return self.handle.url

    @property
    def url(self) -> str:
        return f"{self.handle.url}{self.endpoint.path}"

    def token(self, agent: str = "bot", on_behalf_of: str | None = None, **kw: Any) -> str:
        return self.handle.token(agent, on_behalf_of, **kw)


async def start_mcp_env(make_gateway: Any, store_url: str, *, backend: str = "jwt",
                        limits: dict[str, Any] | None = None, **mcp_cfg: Any) -> McpEnv:
    """A gateway (no upstream traffic needed) with ``server.mcp`` = ``mcp_cfg`` and a test backend mounted."""
    from proxy.doors.mcp import mount_mcp
    from tests.conftest import base_rules

    rules = base_rules("http://127.0.0.1:9", store_url)
    rules["server"]["mcp"] = mcp_cfg
    if limits:
        rules["server"]["limits"] = limits
    h = await make_gateway(rules)
    be: Any = JwtBackend(h.gw.state.verifier) if backend == "jwt" else ReadsBackend(h.gw.state.verifier) \
        if backend == "reads" else ConformanceBackend()
    ep = mount_mcp(h.gw, be)
    return McpEnv(h, be, ep)
