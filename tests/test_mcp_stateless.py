"""MCP 2026-07-28 (stateless) on the same endpoint: ``server/discover``, per-request ``_meta``, routing
headers that must agree with the body, ``x-mcp-header`` parameters, ``subscriptions/listen``; raw HTTP
for the edges, then the official Python SDK's ``Client`` in its default (``auto``) and pinned modes."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.transport.jsonrpc import ALL_VERSIONS
from tests.mcp_backend import READ, McpEnv, start_mcp_env

V = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw-modern", "version": "3"}}


@pytest.fixture
async def env(make_gateway: Any, store_url: str) -> McpEnv:
    return await start_mcp_env(make_gateway, store_url, page_size=2, keepalive=0.3)


def b64(v: str) -> str:
    return f"=?base64?{base64.b64encode(v.encode()).decode()}?="


async def post(env: McpEnv, http: aiohttp.ClientSession, method: str, params: dict[str, Any] | None = None, *,
               agent: str = "bot", rid: Any = 1, meta: dict[str, Any] | None = None, raw: Any = None,
               **headers: str) -> tuple[aiohttp.ClientResponse, Any]:
    p = dict(params or {})
    p["_meta"] = {**META, **(meta or {})} if meta is not False else None
    if p["_meta"] is None:
        del p["_meta"]
    body = raw if raw is not None else {"jsonrpc": "2.0", "id": rid, "method": method, "params": p}
    h = {"Authorization": f"Bearer {env.token(agent)}", "Content-Type": "application/json",
         "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": V, "Mcp-Method": method}
    if method == "tools/call" and isinstance(params, dict) and isinstance(params.get("name"), str):
        h["Mcp-Name"] = params["name"]
    h.update(headers)
    h = {k: v for k, v in h.items() if v != ""}
    async with http.post(env.url, data=orjson.dumps(body), headers=h) as r:
        data = await r.read()
        if r.content_type == "text/event-stream":
            return r, [orjson.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: ")]
        return r, orjson.loads(data) if data else None


async def test_discover(env, http):
    r, body = await post(env, http, "server/discover")
    assert r.status == 200 and "Mcp-Session-Id" not in r.headers
    res = body["result"]
    assert res["supportedVersions"] == ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", V]
    assert res["capabilities"]["tools"] == {"listChanged": True} and res["resultType"] == "complete"
    assert res["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "tether"
    assert res["cacheScope"] in ("private", "public") and res["ttlMs"] >= 0


async def test_list_and_call_without_a_session(env, http):
    r, body = await post(env, http, "tools/list")
    res = body["result"]
    assert [t["name"] for t in res["tools"]] == ["crm_read", "crm_update"] and res["nextCursor"]
    assert res["ttlMs"] == 0 and res["cacheScope"] == "private" and res["resultType"] == "complete"
    r, body = await post(env, http, "tools/list", {"cursor": res["nextCursor"]})
    assert [t["name"] for t in body["result"]["tools"]] == ["slow_export", "echo"]
    r, body = await post(env, http, "tools/list", agent="other-bot")
    assert [t["name"] for t in body["result"]["tools"]] == ["crm_read"]
    r, body = await post(env, http, "tools/call", {"name": "echo", "arguments": {"a": 1}},
                         meta={"tether/transaction": "tx-9"}, **{"Mcp-Session-Id": "ignored"})
    assert r.status == 200 and "Mcp-Session-Id" not in r.headers
    res = body["result"]
    assert res["resultType"] == "complete" and res["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "tether"
    out = res["structuredContent"]
    assert out["arguments"] == {"a": 1} and out["meta"]["tether/transaction"] == "tx-9"
    assert out["session"] is None and out["client"] == "raw-modern" and out["version"] == V
    assert not [e for e in env.backend.events if e["event"] == "mcp_session_opened"]
    r, body = await post(env, http, "tools/call", {"name": "crm_update", "arguments": {"id": "1", "intent": "x"}})
    assert r.status == 200 and body["result"]["isError"] is True
    r, body = await post(env, http, "tools/call", {"name": "nope"})
    assert r.status == 400 and body["error"]["code"] == -32602 and body["error"]["message"] == "Unknown tool: nope"


async def test_progress_streams_and_a_closed_stream_cancels(env, http):
    r, events = await post(env, http, "tools/call", {"name": "slow_export", "arguments": {"steps": 2}},
                           meta={"progressToken": "t"})
    assert r.content_type == "text/event-stream"
    assert [e["params"]["progress"] for e in events if e.get("method") == "notifications/progress"] == [1, 2]
    assert events[-1]["result"]["structuredContent"]["exported"] == 2
    # 2026-07-28: closing the response stream is the cancellation
    env.backend.slow_gate = asyncio.Event()
    h = {"Authorization": f"Bearer {env.token()}", "Content-Type": "application/json", "MCP-Protocol-Version": V,
         "Accept": "application/json, text/event-stream", "Mcp-Method": "tools/call", "Mcp-Name": "slow_export"}
    body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {
        "name": "slow_export", "arguments": {"steps": 3}, "_meta": {**META, "progressToken": 1}}}
    resp = await http.post(env.url, data=orjson.dumps(body), headers=h)
    assert (await resp.content.readline()).startswith(b"event: message")
    call = env.backend.calls[-1]
    resp.close()  # the client goes away mid-call
    for _ in range(300):
        env.backend.slow_gate.set()
        env.backend.slow_gate.clear()
        if call.cancelled.is_set():
            break
        await asyncio.sleep(0.01)
    env.backend.slow_gate.set()
    assert call.cancelled.is_set()


@pytest.mark.parametrize("method,params,meta,headers,code,status", [
    ("tools/list", {}, None, {"Mcp-Method": ""}, -32020, 400),
    ("tools/list", {}, None, {"Mcp-Method": "tools/call"}, -32020, 400),
    ("tools/list", {}, None, {"Mcp-Method": "Tools/List"}, -32020, 400),
    ("tools/call", {"name": "echo"}, None, {"Mcp-Name": ""}, -32020, 400),
    ("tools/call", {"name": "echo"}, None, {"Mcp-Name": "crm_read"}, -32020, 400),
    ("tools/call", {"name": "echo"}, None, {"Mcp-Name": b64("crm_read")}, -32020, 400),
    ("tools/call", {"name": "echo"}, None, {"Mcp-Name": "=?base64?ZWNobw?="}, -32020, 400),  # not canonical
    ("tools/list", {}, {"io.modelcontextprotocol/protocolVersion": "2025-11-25"}, {}, -32020, 400),
    ("tools/list", {}, False, {}, -32602, 400),
    ("tools/list", {"_meta": {"io.modelcontextprotocol/protocolVersion": V}}, False, {}, -32602, 400),
    ("ping", {}, None, {}, -32601, 404),
    ("initialize", {}, None, {}, -32601, 404),
    ("resources/list", {}, None, {}, -32601, 404),
    ("tools/call", {"name": 5}, None, {}, -32602, 400),
])
async def test_headers_and_body_must_agree(env, http, method, params, meta, headers, code, status):
    r, body = await post(env, http, method, params, meta=meta, **headers)
    assert (r.status, body["error"]["code"]) == (status, code), body
    assert env.backend.calls == []


async def test_base64_mcp_name_is_decoded(env, http):
    r, body = await post(env, http, "tools/call", {"name": "echo"}, **{"Mcp-Name": b64("echo")})
    assert r.status == 200 and body["result"]["structuredContent"]["arguments"] == {}


async def test_a_body_with_a_modern_meta_but_no_version_header(env, http):
    r, body = await post(env, http, "tools/list", **{"MCP-Protocol-Version": ""})
    assert r.status == 400 and body["error"]["code"] == -32020


async def test_param_headers_mirror_the_arguments(env, http):
    def call(arguments: dict[str, Any], **headers: str) -> Any:
        return post(env, http, "tools/call", {"name": "region_query", "arguments": arguments}, agent="region-bot",
                    **headers)

    good = {"region": "us-west1", "query": "q", "limit": 42, "opts": {"dry": True}}
    r, body = await call(good, **{"Mcp-Param-Region": "us-west1", "mcp-param-limit": "42.0", "Mcp-Param-Dry": "true"})
    assert r.status == 200 and body["result"]["structuredContent"]["arguments"] == good
    r, body = await call({"region": "Zürich ", "query": "q"}, **{"Mcp-Param-Region": b64("Zürich ")})
    assert r.status == 200
    n = len(env.backend.calls)
    for args, headers in [
        (good, {"Mcp-Param-Region": "eu-west1", "Mcp-Param-Limit": "42", "Mcp-Param-Dry": "true"}),  # routed elsewhere
        (good, {"Mcp-Param-Limit": "42", "Mcp-Param-Dry": "true"}),  # a header missing
        (good, {"Mcp-Param-Region": "us-west1", "Mcp-Param-Limit": "41", "Mcp-Param-Dry": "true"}),
        (good, {"Mcp-Param-Region": "us-west1", "Mcp-Param-Limit": "42", "Mcp-Param-Dry": "True"}),
        ({"region": "Zürich", "query": "q"}, {"Mcp-Param-Region": "Zurich"}),
    ]:
        r, body = await call(args, **headers)
        assert r.status == 400 and body["error"]["code"] == -32020, headers
    assert len(env.backend.calls) == n  # none of them reached the backend
    r, body = await call({"region": "us", "query": "q", "limit": None}, **{"Mcp-Param-Region": "us"})
    assert r.status == 200  # no value, no header expected


async def test_no_get_delete_or_batches_in_2026(env, http):
    h = {"Authorization": f"Bearer {env.token()}", "MCP-Protocol-Version": V, "Accept": "text/event-stream"}
    for m in ("GET", "DELETE"):
        async with http.request(m, env.url, headers=h) as r:
            assert r.status == 405
    r, body = await post(env, http, "tools/list", raw=[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}])
    assert r.status == 400
    r, body = await post(env, http, "notifications/whatever", raw={"jsonrpc": "2.0", "method": "notifications/x"})
    assert r.status == 202


async def test_subscriptions_listen(env, http):
    h = {"Authorization": f"Bearer {env.token()}", "Content-Type": "application/json", "MCP-Protocol-Version": V,
         "Accept": "application/json, text/event-stream", "Mcp-Method": "subscriptions/listen"}
    body = {"jsonrpc": "2.0", "id": "sub-1", "method": "subscriptions/listen",
            "params": {"_meta": META, "notifications": {"toolsListChanged": True, "promptsListChanged": True}}}
    resp = await http.post(env.url, data=orjson.dumps(body), headers=h)
    try:
        assert resp.status == 200 and resp.content_type == "text/event-stream"

        async def next_data() -> dict[str, Any]:
            async with asyncio.timeout(10):
                while True:
                    line = await resp.content.readline()
                    assert line, "the stream ended"
                    if line.startswith(b"data: "):
                        return orjson.loads(line[6:])

        ack = await next_data()
        assert ack == {"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": {
            "_meta": {"io.modelcontextprotocol/subscriptionId": "sub-1"}, "notifications": {"toolsListChanged": True}}}
        env.backend.set_tools("bot", [READ])
        env.endpoint.tools_changed()
        assert await next_data() == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed",
                                     "params": {"_meta": {"io.modelcontextprotocol/subscriptionId": "sub-1"}}}
        env.backend.set_tools("bot", [READ, READ.model_copy(update={"name": "crm_read2"})])  # unannounced: polled
        assert (await next_data())["method"] == "notifications/tools/list_changed"
        env.endpoint.close()  # shutdown ends the subscription gracefully
        done = await next_data()
        assert done["id"] == "sub-1" and done["result"]["resultType"] == "complete"
        assert done["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "sub-1"
    finally:
        resp.close()


async def test_listen_streams_per_principal_are_bounded(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url, max_sessions_per_agent=1)
    h = {"Authorization": f"Bearer {env.token()}", "Content-Type": "application/json", "MCP-Protocol-Version": V,
         "Accept": "text/event-stream", "Mcp-Method": "subscriptions/listen"}
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "subscriptions/listen",
                         "params": {"_meta": META, "notifications": {"toolsListChanged": True}}})
    first = await http.post(env.url, data=body, headers=h)
    try:
        await first.content.readline()
        async with http.post(env.url, data=body, headers=h) as r:
            assert r.status == 503 and (await r.json())["error"]["data"]["code"] == "too_many_sessions"
    finally:
        first.close()


# --------------------------------------------------------------------------- the official SDK, modern mode

mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed")


@pytest.mark.parametrize("mode", ["auto", V])
async def test_the_sdk_client_speaks_2026_07_28(env, mode):
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.subscriptions import ToolsListChanged

    progress: list[float] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(p)

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {env.token()}"}) as hc:
        async with Client(streamable_http_client(env.url, http_client=hc), mode=mode, cache=None) as c:
            assert c.session.protocol_version == V
            tools = await c.list_tools()
            assert [t.name for t in tools.tools] == ["crm_read", "crm_update"]
            res = await c.call_tool("crm_read", {"id": "3"})
            assert res.structured_content == {"id": "3", "name": "Ada Lovelace"}
            res = await c.call_tool("slow_export", {"steps": 2}, progress_callback=on_progress)
            assert res.structured_content["exported"] == 2 and progress == [1.0, 2.0]
            async with c.listen(tools_list_changed=True) as sub:
                assert sub.honored.tools_list_changed is True
                env.backend.set_tools("bot", [READ])
                env.endpoint.tools_changed()
                async with asyncio.timeout(10):
                    event = await sub.__anext__()
                assert isinstance(event, ToolsListChanged)
            assert [t.name for t in (await c.list_tools()).tools] == ["crm_read"]
    assert not [e for e in env.backend.events if e["event"] == "mcp_session_opened"]


async def test_the_sdk_client_mirrors_param_headers(env):
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {env.token('region-bot')}"}) as hc:
        async with Client(streamable_http_client(env.url, http_client=hc), mode=V, cache=None) as c:
            await c.list_tools()  # the SDK reads x-mcp-header from the listing
            res = await c.call_tool("region_query", {"region": "eu-central", "query": "q", "limit": 7,
                                                     "opts": {"dry": False}})
            assert res.is_error is False
            assert res.structured_content["arguments"]["region"] == "eu-central"


# --------------------------------------------------------------------------- the plain result fast path


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_plain_tool_results_are_exactly_what_mcp_types_serialises(version, monkeypatch):
    """The door builds the usual tools/call result directly (three pydantic passes saved per call): for
    every protocol version it must equal mcp_types' own serialisation, and anything unusual goes the slow
    way."""
    from mcp_types import CallToolResult, ImageContent, TextContent
    from mcp_types.methods import serialize_server_result

    from proxy.doors.mcp import endpoint as E

    monkeypatch.setattr(E, "_PLAIN_CHECKED", {})

    def slow(r: CallToolResult) -> dict:
        return serialize_server_result("tools/call", version, r.model_dump(by_alias=True, mode="json", exclude_none=True))

    usual = [
        CallToolResult(content=[TextContent(text='{\n  "id": 1\n}')], structured_content={"id": 1, "n": None, "l": [1, {}]},
                       meta={"tether/request_id": "abc"}),
        CallToolResult(content=[TextContent(text="plain text")], meta={"tether/request_id": "abc"}),
        CallToolResult(content=[TextContent(text="")]),
    ]
    for r in usual:
        fast = E.plain_tool_result(version, r)
        assert fast is not None and fast == slow(r)
    assert E._PLAIN_CHECKED == {version: True}
    unusual = [
        CallToolResult(content=[TextContent(text="no")], is_error=True),
        CallToolResult(content=[TextContent(text="a"), TextContent(text="b")]),
        CallToolResult(content=[ImageContent(data="AAAA", mime_type="image/png")]),
        CallToolResult(content=[]),
    ]
    for r in unusual:
        assert E.plain_tool_result(version, r) is None
    # a shape the check finds different (as a new mcp_types might make it): that version goes the slow way
    monkeypatch.setattr(E, "_PLAIN_CHECKED", {})
    monkeypatch.setattr(E, "_plain", lambda v, r: {"content": [], "isError": False})
    assert E.plain_tool_result(version, usual[0]) == slow(usual[0])
    assert E.plain_tool_result(version, usual[0]) is None and E._PLAIN_CHECKED == {version: False}


# --------------------------------------------------------------------------- remembered request validation


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_remembered_validation_accepts_and_refuses_exactly_as_mcp_types(version, monkeypatch):
    """The door remembers the tools/call params mcp_types accepted (arguments left out, the schema takes
    any object there): every verdict must still be mcp_types' own, remembered or not."""
    from mcp_types.methods import validate_client_request
    from pydantic import ValidationError

    from proxy.doors.mcp import wire as W

    monkeypatch.setattr(W, "_valid", set())
    assert version in W._FREE_ARGUMENTS  # every version the SDK knows takes any object as arguments
    meta = {"io.modelcontextprotocol/protocolVersion": version, "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "c", "version": "1"}}

    def verdict(fn, method, params) -> str:
        try:
            fn(method, version, params)
            return "ok"
        except KeyError:
            return "no such method"
        except ValidationError:
            return "invalid"

    cases = [
        ("tools/call", {"name": "t", "arguments": {"id": 1}, "_meta": meta}),
        ("tools/call", {"name": "t", "arguments": {"id": 2, "deep": {"x": [1]}}, "_meta": meta}),  # remembered
        ("tools/call", {"name": "t", "arguments": [1, 2], "_meta": meta}),  # not an object: never remembered
        ("tools/call", {"name": "t", "arguments": "x", "_meta": meta}),
        ("tools/call", {"name": 7, "arguments": {"id": 1}, "_meta": meta}),
        ("tools/call", {"name": "t", "arguments": {"id": 1}, "_meta": {**meta, "progressToken": {"no": 1}}}),
        ("tools/call", {"arguments": {"id": 1}, "_meta": meta}),
        ("tools/list", {"_meta": meta}),
        ("tools/list", {"cursor": 5, "_meta": meta}),
        ("no/such", {"_meta": meta}),
        ("tools/call", {"name": "t", "arguments": {"big": 2 ** 70}, "_meta": meta}),  # not JSON-encodable by orjson
    ]
    for _ in range(2):  # the second pass answers from what the first remembered
        for method, params in cases:
            assert verdict(W.validate_request, method, params) == verdict(validate_client_request, method, params), \
                (method, params)
    assert ("tools/call", version, W.orjson.dumps({**cases[0][1], "arguments": {}})) in W._valid
    assert not any(b'"arguments":[' in k[2] or b'"name":7' in k[2] for k in W._valid)
