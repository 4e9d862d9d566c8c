"""A server nobody here wrote behind Tether: ``@modelcontextprotocol/server-everything`` (npm, Streamable
HTTP), driven through Tether's ``/mcp`` by the official ``mcp`` Python SDK client.

Between Tether and the server sits a recording pass-through (every JSON-RPC message the server receives,
as it receives it): the proof, on the server's side, that a tool the rules do not name, or whose
definition no longer has its pin, is never called, and that an approved dry-run call is sent once."""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
import pytest
from aiohttp import ClientSession as HttpSession
from aiohttp import web

mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed: pip install -e '.[test]'")

import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from proxy.mcp_upstream import build_mcp_upstream, definition_digest  # noqa: E402
from tests.conftest import GatewayHandle, base_rules  # noqa: E402
from tests.mcp_upstreams import everything_http, everything_missing, mcp_config  # noqa: E402

pytestmark = pytest.mark.skipif(everything_missing() is not None, reason=everything_missing() or "")

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


class Recorder:
    """A pass-through in front of the server: records each JSON-RPC message it is sent, streams answers."""

    def __init__(self, target: str, add_headers: dict[str, str] | None = None) -> None:
        self.target = target
        self.add_headers = add_headers or {}
        self.messages: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.http: HttpSession | None = None

    async def start(self) -> "Recorder":
        self.http = HttpSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/mcp"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("method") == "tools/call"
                and (tool is None or (m.get("params") or {}).get("name") == tool)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if body:
            msg = orjson.loads(body)
            self.messages.extend(msg if isinstance(msg, list) else [msg])
        assert self.http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP} | self.add_headers
        async with self.http.request(request.method, self.target, headers=headers, data=body or None) as up:
            resp = web.StreamResponse(status=up.status, headers={k: v for k, v in up.headers.items()
                                                                if k.lower() not in _HOP})
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                pass
            return resp


@pytest.fixture
async def everything() -> AsyncIterator[Recorder]:
    srv = everything_http().start()
    rec = await Recorder(srv.url).start()
    try:
        yield rec
    finally:
        await rec.stop()
        srv.stop()


async def pins_of(url: str) -> dict[str, str]:
    up = build_mcp_upstream("ev", mcp_config(url=url))
    await up.start()
    try:
        return {t.name: definition_digest(t) for t in await up.list_tools()}
    finally:
        await up.close()


@asynccontextmanager
async def tools(gw: GatewayHandle, agent: str = "bot") -> AsyncIterator[ClientSession]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {gw.token(agent)}"},
                                  timeout=httpx2.Timeout(30, read=60)) as hc:
        async with streamable_http_client(f"{gw.url}/mcp", http_client=hc) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


async def test_server_everything_behind_tether(make_gateway: Any, upstream: Any, store_url: str,
                                               everything: Recorder) -> None:
    pins = await pins_of(everything.url)
    assert {"echo", "get-sum", "get-env", "get-tiny-image", "toggle-simulated-logging"} <= set(pins)
    everything.messages.clear()
    rules = base_rules(upstream.url, store_url)
    rules["server"]["mcp"] = {"path": "/mcp"}
    rules["upstreams"]["ev"] = {"kind": "mcp", "url": everything.url}
    rules["capabilities"].update({
        "ev.echo": {"upstream": "ev", "tool": "echo", "effect": "read", "pin": pins["echo"]},
        "ev.get-sum": {"upstream": "ev", "tool": "get-sum", "effect": "read", "pin": pins["get-sum"]},
        # the server says it is not read-only; the rules say write, and dry-run (no mode: never live by default)
        "ev.toggle-simulated-logging": {"upstream": "ev", "tool": "toggle-simulated-logging",
                                        "pin": pins["toggle-simulated-logging"]},
        # a tool with a strict outputSchema, granted as a write (dry-run): its "captured" answer must not be
        # held to that schema by the client
        "ev.get-structured-content": {"upstream": "ev", "tool": "get-structured-content",
                                      "pin": pins["get-structured-content"]},
        # pinned to another definition than the one the server lists (a rug pull, seen at start)
        "ev.get-tiny-image": {"upstream": "ev", "tool": "get-tiny-image", "effect": "read",
                              "pin": "sha256:" + "ab" * 32},
    })
    rules["agents"]["bot"]["grants"] = ["ev.echo", "ev.get-sum", "ev.toggle-simulated-logging", "ev.get-tiny-image",
                                        "ev.get-structured-content"]
    gw = await make_gateway(rules)
    async with tools(gw) as s:
        listed = {t.name: t for t in (await s.list_tools()).tools}
        assert {n for n in listed if n.startswith("ev_")} == {"ev_echo", "ev_get-sum", "ev_toggle-simulated-logging",
                                                              "ev_get-structured-content"}
        assert listed["ev_get-structured-content"].output_schema is None
        res = await s.call_tool("ev_get-structured-content", {"location": "New York", "intent": "weather, reviewed"})
        assert res.is_error is False and res.structured_content["dry_run"] is True
        assert "review" in listed["ev_toggle-simulated-logging"].description
        assert "intent" in listed["ev_toggle-simulated-logging"].input_schema["required"]
        # granted read-only tools, live
        res = await s.call_tool("ev_echo", {"message": "hello through Tether"})
        assert res.is_error is False and res.content[0].text == "Echo: hello through Tether"
        res = await s.call_tool("ev_get-sum", {"a": 2, "b": 40})
        assert res.is_error is False and "42" in res.content[0].text
        # a tool the server lists but the rules do not name: unknown, never sent
        with pytest.raises(MCPError) as ei:
            await s.call_tool("get-env", {})
        assert ei.value.error.code == types.INVALID_PARAMS
        with pytest.raises(MCPError):
            await s.call_tool("ev_get-env", {})
        # the changed definition: hidden, refused, never sent
        res = await s.call_tool("ev_get-tiny-image", {})
        assert res.is_error and res.structured_content["error"]["code"] == "tool_definition_changed"
        # a write tool in dry-run: captured, approved, replayed exactly once
        res = await s.call_tool("ev_toggle-simulated-logging", {"intent": "see the server's logs"})
        assert res.is_error is False and res.structured_content["dry_run"] is True
        item = res.structured_content["review_item"]
        assert everything.calls("toggle-simulated-logging") == []
        r = await gw.admin("POST", f"/api/review/items/{item}/approve", json={})
        assert r.status == 200, await r.text()
        st = (await s.call_tool("tether_review_status", {"item": item})).structured_content
        assert st["state"] == "replayed" and st["replay"]["status"] == 200
        assert "logging" in st["replay"]["body"]["content"][0]["text"].lower()
    sent = [(m["params"]["name"], m["params"].get("arguments")) for m in everything.calls()]
    assert sent == [("echo", {"message": "hello through Tether"}), ("get-sum", {"a": 2, "b": 40}),
                    ("toggle-simulated-logging", {})]
    # the agent's ids, tokens and progress tokens never reach the server: Tether's own integer ids
    assert all(type(m.get("id")) is int for m in everything.messages if "id" in m)
    recs = await gw.journal()
    assert {r.get("error") for r in recs if r["kind"] == "request"} >= {"capability_not_granted",
                                                                       "tool_definition_changed"}


async def test_server_everything_resources_and_prompts_behind_tether(make_gateway: Any, upstream: Any, store_url: str,
                                                                      everything: Recorder) -> None:
    """Its resources and prompts, as granted: a template and the static documents are listed and read under
    Tether's URIs, one prompt is listed and fetched; the blob template and the other prompts are neither
    listed nor sent (the pass-through's record)."""
    rules = base_rules(upstream.url, store_url)
    rules["server"]["mcp"] = {"path": "/mcp"}
    rules["upstreams"]["ev"] = {"kind": "mcp", "url": everything.url}
    rules["capabilities"].update({
        "ev.text": {"upstream": "ev", "resource": "demo://resource/dynamic/text/{resourceId}"},
        "ev.docs": {"upstream": "ev", "resource": "demo://resource/static/document/{name}"},
        "ev.args": {"upstream": "ev", "prompt": "args-prompt"},
    })
    rules["agents"]["bot"]["grants"] = ["ev.text", "ev.docs", "ev.args"]
    gw = await make_gateway(rules)
    everything.messages.clear()
    async with tools(gw) as s:
        templates = [t.uri_template for t in (await s.list_resource_templates()).resource_templates]
        assert templates == ["tether://ev/demo://resource/dynamic/text/{resourceId}"]  # not the blob template
        docs = [str(r.uri) for r in (await s.list_resources()).resources]
        assert docs and all(u.startswith("tether://ev/demo://resource/static/document/") for u in docs)
        prompts = (await s.list_prompts()).prompts
        assert [(p.name, p.title) for p in prompts] == [("ev_args", "Arguments Prompt")]
        assert {a.name for a in prompts[0].arguments} == {"city", "state"}
        text = await s.read_resource("tether://ev/demo://resource/dynamic/text/1")
        assert text.contents[0].text.startswith("Resource 1: This is a plaintext resource")
        doc = await s.read_resource(docs[0])
        assert doc.contents[0].text
        got = await s.get_prompt("ev_args", {"city": "Lyon"})
        assert got.messages[0].content.text == "What's weather in Lyon?"
        for uri in ("tether://ev/demo://resource/dynamic/blob/1", "demo://resource/dynamic/text/1"):
            with pytest.raises(MCPError) as ei:
                await s.read_resource(uri)
            assert ei.value.error.code == types.INVALID_PARAMS
        for name in ("simple-prompt", "ev_simple-prompt", "args-prompt"):
            with pytest.raises(MCPError):
                await s.get_prompt(name, {"city": "Lyon"})
    reads = [m["params"]["uri"] for m in everything.messages if m.get("method") == "resources/read"]
    assert reads == ["demo://resource/dynamic/text/1", docs[0][len("tether://ev/"):]]
    gets = [(m["params"]["name"], m["params"].get("arguments")) for m in everything.messages
            if m.get("method") == "prompts/get"]
    assert gets == [("args-prompt", {"city": "Lyon"})]


# Conformance 0.1.13's server scenarios about a server's tools and protocol. The suite's tool scenarios call
# the tools of its own reference server (test_simple_text, ...), which server-everything does not have: run
# directly against it and through Tether, they must come out the same (resources and prompts are served
# under Tether's own URIs and names, which the suite's scenarios do not know; completions and server-to-client
# requests are not served by Tether's front door: docs/mcp.md).
CONFORMANCE_COMPARED = ("server-initialize", "ping", "tools-list", "tools-call-simple-text", "tools-call-image",
                        "tools-call-audio", "tools-call-embedded-resource", "tools-call-mixed-content",
                        "tools-call-error", "tools-call-with-progress", "json-schema-2020-12",
                        "server-sse-multiple-streams")
CONFORMANCE = Path(__file__).resolve().parent / "node" / "node_modules" / "@modelcontextprotocol" / "conformance" / \
    "dist" / "index.js"


async def conformance(url: str, out: Path) -> dict[str, str]:
    """{scenario: PASS|FAIL} of the suite's server scenarios against ``url``."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(CONFORMANCE), "server", "--url", url, "--suite", "all", "-o", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(CONFORMANCE.parents[4]))
    async with asyncio.timeout(240):
        await proc.communicate()
    results: dict[str, str] = {}
    for checks in out.glob("server-*/checks.json"):
        m = re.fullmatch(r"server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z", checks.parent.name)
        assert m is not None
        got = json.loads(checks.read_text())
        results[m.group(1)] = "FAIL" if any(c["status"] == "FAILURE" for c in got) else "PASS"
    return results


@pytest.mark.skipif(not CONFORMANCE.exists(), reason="@modelcontextprotocol/conformance is not installed: run .ci/run")
async def test_conformance_against_server_everything_directly_and_through_tether(
        make_gateway: Any, upstream: Any, store_url: str, everything: Recorder, tmp_path: Path) -> None:
    pins = await pins_of(everything.url)
    rules = base_rules(upstream.url, store_url)
    rules["server"]["mcp"] = {"path": "/mcp", "max_sessions_per_agent": 500}
    rules["upstreams"]["ev"] = {"kind": "mcp", "url": everything.url, "tool_names": "bare"}
    rules["capabilities"].update({f"ev.{n}": {"upstream": "ev", "tool": n, "effect": "read", "pin": d}
                                  for n, d in pins.items()})
    rules["agents"]["bot"]["grants"] = [f"ev.{n}" for n in pins]  # every tool, live (reads: no intent asked)
    gw = await make_gateway(rules)
    # the suite sends no token: a pass-through in front of Tether adds the agent's
    front = await Recorder(f"{gw.url}/mcp", {"Authorization": f"Bearer {gw.token('bot')}"}).start()
    try:
        async with tools(gw) as s:  # the agent sees the server's own names (tool_names: bare)
            assert {t.name for t in (await s.list_tools()).tools} >= set(pins)
        direct = await conformance(everything.url, tmp_path / "direct")
        everything.messages.clear()
        through = await conformance(front.url, tmp_path / "tether")
    finally:
        await front.stop()
    compared = {k: direct.get(k) for k in CONFORMANCE_COMPARED}
    assert None not in compared.values(), direct
    # Two scenarios call a tool server-everything does not have (test_simple_text, test_error_handling): its
    # SDK answers that as a tool *result* with isError, which the suite counts as a pass; Tether answers the
    # spec's protocol error for an unknown tool (-32602), which the suite does not. Everything else: the same.
    unknown_tool = {"tools-call-simple-text", "tools-call-error"}
    assert {k: v for k, v in through.items() if k in CONFORMANCE_COMPARED and k not in unknown_tool} == \
        {k: v for k, v in compared.items() if k not in unknown_tool}
    assert compared["server-initialize"] == compared["tools-list"] == compared["ping"] == "PASS"
    recs = await gw.journal()
    refused = {r["mcp"].get("tool") for r in recs  # (the suite's resources and prompts are refused too: not granted)
               if r["kind"] == "request" and r.get("error") == "capability_not_granted"}
    assert {"test_simple_text", "test_error_handling"} <= refused
    assert not [m for m in everything.calls() if m["params"]["name"].startswith("test_")]  # never sent upstream
