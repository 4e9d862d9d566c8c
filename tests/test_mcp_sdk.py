"""The MCP endpoint driven by the official ``mcp`` Python SDK's client, as an agent framework would.

``ClientSession`` over ``streamable_http_client`` (the SDK's Streamable HTTP transport, with the agent's
bearer token on its HTTP client), and the SDK's high-level ``Client`` in its default ``auto`` mode (which
probes the 2026-07-28 ``server/discover`` first and must fall back to the initialize handshake)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed: pip install -e '.[test]'")

import httpx2  # noqa: E402  (the SDK's HTTP client)
import mcp_types as types  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from tests.mcp_backend import READ, McpEnv, start_mcp_env  # noqa: E402


@pytest.fixture
async def env(make_gateway: Any, store_url: str) -> McpEnv:
    return await start_mcp_env(make_gateway, store_url, page_size=2, keepalive=0.5)


@asynccontextmanager
async def sdk_session(env: McpEnv, agent: str = "bot", on_behalf_of: str | None = None,
                      **kw: Any) -> AsyncIterator[ClientSession]:
    token = env.token(agent, on_behalf_of)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx2.Timeout(30, read=60)) as hc:
        async with streamable_http_client(env.url, http_client=hc) as (read, write):
            async with ClientSession(read, write, **kw) as session:
                await session.initialize()
                yield session


async def all_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor = None
    while True:
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools


async def test_two_agents_see_their_own_tools_and_call_them(env):
    async with sdk_session(env, "bot") as bot, sdk_session(env, "other-bot") as other:
        assert [t.name for t in await all_tools(bot)] == ["crm_read", "crm_update", "slow_export", "echo", "boom"]
        assert [t.name for t in await all_tools(other)] == ["crm_read"]
        res = await other.call_tool("crm_read", {"id": "7"})
        assert res.is_error is False and res.structured_content == {"id": "7", "name": "Ada Lovelace"}
        assert isinstance(res.content[0], types.TextContent) and "Ada Lovelace" in res.content[0].text
        with pytest.raises(MCPError) as ei:
            await other.call_tool("echo", {})
        assert ei.value.error.code == types.INVALID_PARAMS and "Unknown tool: echo" in ei.value.error.message
        assert [c.principal.key for c in env.backend.calls] == ["other-bot", "other-bot"]


async def test_a_refusal_is_a_tool_result_the_model_can_read(env):
    async with sdk_session(env) as s:
        res = await s.call_tool("crm_update", {"id": "7", "intent": "renew"})
        assert res.is_error is True
        err = res.structured_content["error"]  # type: ignore[index]
        assert err == {"code": "capability_not_granted", "message": "the route is registered but not granted to this "
                       "agent", "status": 403, "request_id": "r-123", "details": {"capability": "contact.update"}}
        assert "capability_not_granted" in res.content[0].text  # type: ignore[union-attr]


async def test_a_backend_crash_is_an_internal_error(env):
    async with sdk_session(env) as s:
        with pytest.raises(MCPError) as ei:
            await s.call_tool("boom", {})
        assert ei.value.error.code == types.INTERNAL_ERROR
        assert (await s.call_tool("crm_read", {"id": "1"})).is_error is False  # the session carries on


async def test_progress_reaches_the_sdk_callback_before_the_result(env):
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with sdk_session(env) as s:
        res = await s.call_tool("slow_export", {"steps": 4}, progress_callback=on_progress)
    assert res.structured_content == {"exported": 4, "cancelled": False}
    assert seen == [(float(i), 4.0, f"step {i}") for i in (1, 2, 3, 4)]  # the repeated values were dropped


async def test_arguments_meta_identity_and_session_reach_the_backend(env):
    async with sdk_session(env, "bot", on_behalf_of="ae:jane@acme",
                           client_info=types.Implementation(name="renewal-agent", version="2.1")) as s:
        res = await s.call_tool("echo", {"id": "006", "intent": "renew Acme"}, meta={"tether/transaction": "tx-1"})
    out = res.structured_content
    assert out is not None
    assert out["arguments"] == {"id": "006", "intent": "renew Acme"}
    assert out["meta"]["tether/transaction"] == "tx-1"
    assert out["client"] == "renewal-agent" and out["version"] == "2025-11-25"
    assert out["on_behalf_of"] == "ae:jane@acme"
    opened = [e for e in env.backend.events if e["event"] == "mcp_session_opened"]
    assert opened[0]["session"] == out["session"] and opened[0]["client_version"] == "2.1"
    assert opened[0]["principal"] == "bot\x00ae:jane@acme"


async def test_list_changed_reaches_an_open_session(env):
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with sdk_session(env, message_handler=on_message) as s:
        assert len(await all_tools(s)) == 5
        # the SDK opens its GET stream after initialize; give it a moment to be there
        for _ in range(100):
            if any(sess.stream is not None for sess in env.endpoint.sessions):
                break
            await asyncio.sleep(0.02)
        env.backend.set_tools("bot", [READ])  # e.g. a grant removed by a rules reload
        env.endpoint.tools_changed()
        await asyncio.wait_for(changed.wait(), 10)
        assert [t.name for t in await all_tools(s)] == ["crm_read"]
        # a change nobody announces is found by the stream's keep-alive tick
        changed.clear()
        env.backend.set_tools("bot", [READ, READ.model_copy(update={"name": "crm_read_v2"})])
        await asyncio.wait_for(changed.wait(), 10)
        assert [t.name for t in await all_tools(s)] == ["crm_read", "crm_read_v2"]


async def test_closing_the_client_ends_its_session(env):
    async with sdk_session(env) as s:
        await s.send_ping()
    closed = [e for e in env.backend.events if e["event"] == "mcp_session_closed"]
    assert [e["reason"] for e in closed] == ["deleted"]
    assert len(env.endpoint.sessions) == 0
