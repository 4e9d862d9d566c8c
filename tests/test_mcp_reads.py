"""The MCP front door's optional parts — resources, prompts, log messages — at the protocol layer, with a
test backend that serves them (``tests/mcp_backend.py``'s ``ReadsBackend``), driven by the official SDK's
client and by raw HTTP: capabilities, pagination, the errors, the log sink's filtering and caps. What
Tether's own backend serves through them (MCP upstreams' granted resources and prompts) is
``tests/test_mcp_gateway.py``'s."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import orjson
import pytest

from tests.mcp_backend import McpEnv, start_mcp_env

mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed: pip install -e '.[test]'")

import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")


@pytest.fixture
async def env(make_gateway: Any, store_url: str) -> McpEnv:
    return await start_mcp_env(make_gateway, store_url, backend="reads", page_size=2)


@asynccontextmanager
async def session(env: McpEnv, agent: str = "bot", **kw: Any) -> AsyncIterator[ClientSession]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {env.token(agent)}"}) as hc:
        async with streamable_http_client(env.url, http_client=hc) as (read, write):
            async with ClientSession(read, write, **kw) as s:
                await s.initialize()
                yield s


async def test_capabilities_lists_and_pages(env: McpEnv) -> None:
    async with session(env) as s:
        caps = s.server_capabilities
        assert caps.resources.list_changed is True and caps.prompts.list_changed is True
        assert caps.logging is not None
        first = await s.list_resources()
        assert [str(r.uri) for r in first.resources] == ["test://docs/0", "test://docs/1"] and first.next_cursor
        rest = await s.list_resources(params=types.PaginatedRequestParams(cursor=first.next_cursor))
        assert [str(r.uri) for r in rest.resources] == ["test://docs/2"] and rest.next_cursor is None
        with pytest.raises(MCPError) as ei:  # a tools/list cursor is not a resources/list one
            tools = await s.list_tools()
            await s.list_resources(params=types.PaginatedRequestParams(cursor=tools.next_cursor))
        assert ei.value.error.code == types.INVALID_PARAMS
        assert [t.uri_template for t in (await s.list_resource_templates()).resource_templates] == ["test://docs/{n}"]
        assert [p.name for p in (await s.list_prompts()).prompts] == ["greet", "plain"]
    async with session(env, "other-bot") as o:
        assert (await o.list_resources()).resources == [] and (await o.list_prompts()).prompts == []


async def test_reads_gets_and_their_errors(env: McpEnv) -> None:
    async with session(env) as s:
        doc = await s.read_resource("test://docs/7")
        assert doc.contents[0].text == "text of test://docs/7"
        got = await s.get_prompt("greet", {"who": "Ada"})
        assert got.messages[0].content.text == "Hello Ada"
        for uri, code, data_code in (("test://other/1", types.INVALID_PARAMS, "unknown_resource"),
                                     ("test://docs/limited", -32010, "rate_limited"),
                                     ("test://docs/boom", types.INTERNAL_ERROR, "internal_error")):
            with pytest.raises(MCPError) as ei:
                await s.read_resource(uri)
            assert (ei.value.error.code, ei.value.error.data["code"]) == (code, data_code)
        with pytest.raises(MCPError) as ei:
            await s.get_prompt("nope")
        assert ei.value.error.code == types.INVALID_PARAMS and ei.value.error.data["code"] == "unknown_prompt"
    read = env.backend.reads[0]
    assert read.uri == "test://docs/7" and read.session.protocol_version == "2025-11-25" and read.principal.agent == "bot"
    refused = [e for e in env.backend.events if e.get("reason") in ("unknown_resource", "unknown_prompt")]
    assert {e["jsonrpc_method"] for e in refused} == {"resources/read", "prompts/get"}


async def test_log_messages_are_filtered_by_level_and_capped(env: McpEnv) -> None:
    seen: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        seen.append(params)

    async with session(env, logging_callback=on_log) as s:
        res = await s.call_tool("chatty", {"extra": 1100})
        assert res.structured_content == {"logged": True, "sink": True}
        levels = [p.level for p in seen]
        assert levels[:8] == ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
        assert seen[0].logger == "chatty" and seen[0].data == {"level": "debug"}
        assert seen[8].data.startswith("(log data of 40002 bytes, cut by Tether")  # "verbose" was dropped
        assert len(seen) == 1000  # at most 1000 a call
        seen.clear()
        await s.set_logging_level("error")
        await s.call_tool("chatty", {})
        assert [p.level for p in seen] == ["error", "critical", "alert", "emergency"]


async def test_without_sse_a_call_gets_no_log_sink(env: McpEnv, http: Any) -> None:
    """A client that accepts JSON only cannot be sent notifications: the call runs without a sink."""
    h = {"Authorization": f"Bearer {env.token()}", "Content-Type": "application/json", "Accept": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    async with http.post(env.url, data=orjson.dumps(init), headers=h) as r:
        h["Mcp-Session-Id"] = r.headers["Mcp-Session-Id"]
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "chatty", "arguments": {}}}
    async with http.post(env.url, data=orjson.dumps(call), headers=h) as r:
        assert r.content_type == "application/json"
        body = orjson.loads(await r.read())
    assert body["result"]["structuredContent"] == {"logged": True, "sink": False}
    lvl = {"jsonrpc": "2.0", "id": 3, "method": "logging/setLevel", "params": {"level": "loud"}}
    async with http.post(env.url, data=orjson.dumps(lvl), headers=h) as r:
        assert orjson.loads(await r.read())["error"]["code"] == types.INVALID_PARAMS


async def test_a_tools_only_backend_serves_none_of_it(make_gateway: Any, store_url: str) -> None:
    env = await start_mcp_env(make_gateway, store_url)  # JwtBackend: tools only
    async with session(env) as s:
        caps = s.server_capabilities
        assert caps.resources is None and caps.prompts is None and caps.logging is None
        with pytest.raises(MCPError) as ei:
            await s.list_resources()
        assert ei.value.error.code == types.METHOD_NOT_FOUND
