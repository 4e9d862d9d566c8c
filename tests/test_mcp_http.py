"""The MCP endpoint's protocol edges over raw HTTP: sessions and their owners, versions, Origin/Host,
authentication and RFC 9728, malformed JSON-RPC, batches, notifications, GET/DELETE, limits.

Drives a real gateway on loopback with aiohttp, byte for byte as a hostile or sloppy client would;
the backend is tests/mcp_backend.py's (JWT verified by the gateway's own verifier)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
import yarl

from proxy.config import ConfigError, parse_rules
from tests.conftest import base_rules
from tests.mcp_backend import READ, McpEnv, start_mcp_env

JSON_AND_SSE = "application/json, text/event-stream"


@pytest.fixture
async def env(make_gateway: Any, store_url: str) -> McpEnv:
    return await start_mcp_env(make_gateway, store_url, page_size=2, keepalive=0.2,
                               allowed_origins=["https://console.example.com", "http://localhost:*"])


class Client:
    """A minimal hand-rolled MCP client: every header and byte under the test's control."""

    def __init__(self, env: McpEnv, http: aiohttp.ClientSession, agent: str = "bot") -> None:
        self.env = env
        self.http = http
        self.agent = agent
        self.sid: str | None = None
        self.version: str | None = None
        self.next_id = 0

    def headers(self, **extra: str) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.env.token(self.agent)}", "Content-Type": "application/json",
             "Accept": JSON_AND_SSE}
        if self.sid:
            h["Mcp-Session-Id"] = self.sid
        if self.version:
            h["MCP-Protocol-Version"] = self.version
        h.update(extra)
        return {k: v for k, v in h.items() if v != ""}

    async def post(self, body: Any, **headers: str) -> tuple[aiohttp.ClientResponse, Any]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.http.post(self.env.url, data=data, headers=self.headers(**headers)) as r:
            raw = await r.read()
            if r.content_type == "text/event-stream":
                return r, [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
            return r, orjson.loads(raw) if raw else None

    async def initialize(self, version: str = "2025-11-25", **headers: str) -> dict[str, Any]:
        self.sid = self.version = None
        r, body = await self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw-test", "version": "9"}}},
            **headers)
        assert r.status == 200, body
        self.sid = r.headers["Mcp-Session-Id"]
        self.version = body["result"]["protocolVersion"]
        r, _ = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert r.status == 202
        return body

    async def call(self, method: str, params: dict[str, Any] | None = None, **headers: str) -> tuple[
            aiohttp.ClientResponse, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            msg["params"] = params
        return await self.post(msg, **headers)


@pytest.fixture
def client(env: McpEnv, http: aiohttp.ClientSession) -> Client:
    return Client(env, http)


# --------------------------------------------------------------------------- lifecycle and versions


@pytest.mark.parametrize("asked,got", [
    ("2024-11-05", "2024-11-05"), ("2025-03-26", "2025-03-26"), ("2025-06-18", "2025-06-18"),
    ("2025-11-25", "2025-11-25"), ("2024-10-07", "2025-11-25"), ("2026-07-28", "2025-11-25"),
    ("1999-01-01", "2025-11-25")])
async def test_initialize_negotiates_every_version_sdks_speak(env, client, asked, got):
    body = await client.initialize(asked)
    res = body["result"]
    assert res["protocolVersion"] == got
    assert res["capabilities"] == {"tools": {"listChanged": True}}
    assert res["serverInfo"]["name"] == "tether"
    assert "resultType" not in res  # a 2026-07-28 field: not on handshake-era wires
    assert len(client.sid) >= 40 and all(0x21 <= ord(c) <= 0x7E for c in client.sid)
    opened = [e for e in env.backend.events if e["event"] == "mcp_session_opened"]
    assert opened[-1] | {} == opened[-1] and opened[-1]["protocol_version"] == got
    assert opened[-1]["requested_version"] == asked and opened[-1]["client_name"] == "raw-test"
    r, body = await client.call("ping")
    assert body == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def test_initialize_params_are_validated(client):
    r, body = await client.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}})
    assert r.status == 200 and body["error"]["code"] == -32602 and "Field required" in body["error"]["message"]
    assert "Mcp-Session-Id" not in r.headers
    r, body = await client.post({"jsonrpc": "2.0", "method": "initialize", "params": {}})
    assert r.status == 400 and body["error"]["data"]["code"] == "jsonrpc_invalid"


async def test_session_required_then_unknown_then_initialize_again(env, client):
    r, body = await client.call("tools/list")
    assert r.status == 400 and body["error"]["data"]["code"] == "mcp_session_required"
    assert body["id"] is None and body["error"]["data"]["request_id"] == r.headers["X-Tether-Request-Id"]
    client.sid = "no-such-session"
    r, body = await client.call("tools/list")
    assert r.status == 404 and body["error"]["data"]["code"] == "mcp_session_not_found"
    r, body = await client.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}})
    assert r.status == 400 and body["error"]["data"]["code"] == "mcp_session_exists"
    refused = [e for e in env.backend.events if e["event"] == "mcp_refused"]
    assert [e["reason"] for e in refused] == ["mcp_session_required", "mcp_session_not_found", "mcp_session_exists"]
    assert all(e["principal"] == "bot" for e in refused)


async def test_a_session_is_refused_to_another_principal_as_if_it_did_not_exist(env, http, client):
    await client.initialize()
    thief = Client(env, http, agent="other-bot")
    thief.sid, thief.version = client.sid, client.version
    for method in ("tools/list", "ping"):
        r, body = await thief.call(method)
        assert r.status == 404 and body["error"]["data"]["code"] == "mcp_session_not_found"
    async with http.get(env.url, headers=thief.headers(Accept="text/event-stream")) as r:
        assert r.status == 404
    async with http.delete(env.url, headers=thief.headers()) as r:
        assert r.status == 404
    # the owner's session is untouched and still lists the owner's tools
    r, body = await client.call("tools/list")
    assert r.status == 200 and [t["name"] for t in body["result"]["tools"]] == ["crm_read", "crm_update"]
    assert [e["principal"] for e in env.backend.events if e.get("reason") == "mcp_session_not_found"] == \
        ["other-bot"] * 4
    # the same agent acting for a human is another principal too (the backend's key includes on-behalf-of)
    r, body = await client.call("ping", Authorization=f"Bearer {env.token('bot', on_behalf_of='ae:jane')}")
    assert r.status == 404


async def test_protocol_version_header_must_name_a_supported_version(env, client):
    await client.initialize("2025-06-18")
    r, body = await client.call("ping", **{"MCP-Protocol-Version": "2031-01-01"})
    assert r.status == 400 and body["error"]["code"] == -32022
    assert body["error"]["data"]["supported"] == ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25",
                                                  "2026-07-28"]
    assert body["error"]["data"]["requested"] == "2031-01-01"
    r, body = await client.post({"jsonrpc": "2.0", "id": 5, "method": "ping"},
                                **{"MCP-Protocol-Version": "2025-06-18, 2025-11-25"})
    assert r.status == 400
    r, body = await client.call("ping", **{"MCP-Protocol-Version": ""})  # absent: the session's version
    assert r.status == 200 and body["result"] == {}
    # another supported version in the header (the conformance suite sends 2025-03-26 on any session):
    # served, by the session's version -- here a batch stays refused, as 2025-06-18 has none
    r, body = await client.call("ping", **{"MCP-Protocol-Version": "2025-11-25"})
    assert r.status == 200 and body["result"] == {}
    r, body = await client.post([{"jsonrpc": "2.0", "id": 9, "method": "ping"}],
                                **{"MCP-Protocol-Version": "2025-03-26"})
    assert r.status == 400 and body["error"]["data"]["code"] == "mcp_batch_not_supported"


async def test_repeated_session_or_version_headers_are_ambiguous(env, http, client):
    await client.initialize()
    h = client.headers()
    raw = [(k, v) for k, v in h.items()] + [("Mcp-Session-Id", "other")]
    async with http.post(env.url, data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}', headers=raw) as r:
        assert r.status == 400 and (await r.json())["error"]["data"]["code"] == "ambiguous_request"


# --------------------------------------------------------------------------- Origin, Host, authentication


async def test_origin_is_checked_before_anything_else(env, client, http):
    for bad in ("http://evil.example.com", "null", "https://console.example.com.evil.com", "http://localhost.evil",
                "https://console.example.com:8443", "file://", "javascript:alert(1)"):
        r, body = await client.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}, Origin=bad)
        assert r.status == 403, bad
        assert body["error"]["data"]["code"] == "origin_not_allowed" and body["id"] is None
    assert not [e for e in env.backend.events if e["event"] == "mcp_session_opened"]
    for good in ("https://console.example.com", "https://CONSOLE.example.com:443", "http://localhost:5173"):
        body = await client.initialize(Origin=good)
        assert body["result"]["protocolVersion"] == "2025-11-25"
        r, _ = await client.call("ping", Origin=good)
        assert r.headers["Access-Control-Allow-Origin"] == good
        assert "Mcp-Session-Id" in r.headers["Access-Control-Expose-Headers"]
    async with http.options(env.url, headers={"Origin": "http://localhost:5173",
                                              "Access-Control-Request-Method": "POST"}) as r:
        assert r.status == 204 and "Mcp-Session-Id" in r.headers["Access-Control-Allow-Headers"]
    async with http.options(env.url, headers={"Origin": "http://evil.example.com"}) as r:
        assert r.status == 403


async def test_a_foreign_host_is_refused(env, client):
    r, body = await client.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, Host="evil.example.com")
    assert r.status == 403 and body["error"]["data"]["code"] == "host_not_allowed"


async def test_authentication_failures_are_401_with_rfc9728_challenge(env, client):
    meta_url = f"{env.base}/.well-known/oauth-protected-resource/mcp"
    r, body = await client.call("ping", Authorization="")
    assert r.status == 401 and r.headers["WWW-Authenticate"] == f'Bearer resource_metadata="{meta_url}"'
    assert body["error"]["data"]["code"] == "token_missing"
    r, body = await client.call("ping", Authorization="Bearer not.a.jwt")
    assert r.status == 401 and body["error"]["data"]["code"] == "token_malformed"
    assert r.headers["WWW-Authenticate"].startswith(f'Bearer resource_metadata="{meta_url}", error="invalid_token"')
    r, body = await client.call("ping", Authorization=f"Bearer {env.token('bot', ttl=-60)}")
    assert r.status == 401 and body["error"]["data"]["code"] == "token_expired"
    r, body = await client.call("ping", Authorization=f"Bearer {env.token('stranger')}")
    assert r.status == 403 and body["error"]["data"]["code"] == "agent_unknown"
    assert "WWW-Authenticate" not in r.headers
    # every refusal was journaled through the backend, with the id the answer carries
    reasons = [e["reason"] for e in env.backend.events if e["event"] == "mcp_refused"]
    assert reasons == ["token_missing", "token_malformed", "token_expired", "agent_unknown"]


async def test_a_session_is_no_credential(env, client):
    """Every request is authenticated on its own: a live session id with a bad or expired token is refused."""
    await client.initialize()
    for auth in ("", f"Bearer {env.token('bot', ttl=-60)}"):
        r, body = await client.call("tools/call", {"name": "crm_read", "arguments": {"id": "1"}}, Authorization=auth)
        assert r.status == 401
    assert env.backend.calls == []
    r, body = await client.call("ping")
    assert r.status == 200


async def test_protected_resource_metadata_root_and_path_suffixed(env, http):
    for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
        async with http.get(env.base + path) as r:
            assert r.status == 200, path
            doc = await r.json()
        assert doc == {"resource": env.url, "authorization_servers": ["https://issuer.example"],
                       "scopes_supported": [], "bearer_methods_supported": ["header"]}
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    async with http.post(env.base + "/.well-known/oauth-protected-resource/mcp") as r:
        assert r.status == 405
    async with http.get(env.base + "/.well-known/oauth-protected-resource/other") as r:
        assert r.status == 401 and "jsonrpc" not in await r.json()  # not the endpoint's: the REST door's


async def test_a_host_that_is_not_plain_never_reaches_the_challenge(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url)
    env.handle.gw.listeners[0]._wildcard = True  # as on a 0.0.0.0 bind, which accepts any Host name
    env.handle.gw.listeners[0]._hosts_ok.clear()
    for host in ('evil"x', "a b", "ex ample.com"):
        async with http.post(env.url, data=b"{}", headers={"Host": host, "Content-Type": "application/json"}) as r:
            assert r.status == 403 and "WWW-Authenticate" not in r.headers, host
    async with http.post(env.url, data=b"{}", headers={"Host": "tether.internal:8100",
                                                       "Content-Type": "application/json"}) as r:
        assert r.status == 401 and "http://tether.internal:8100/.well-known/" in r.headers["WWW-Authenticate"]


async def test_public_url_names_the_resource(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url, public_url="https://tether.example.com/mcp")
    async with http.get(env.base + "/.well-known/oauth-protected-resource/mcp") as r:
        assert (await r.json())["resource"] == "https://tether.example.com/mcp"
    async with http.post(env.url, data=b"{}", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == \
            'Bearer resource_metadata="https://tether.example.com/.well-known/oauth-protected-resource/mcp"'


# --------------------------------------------------------------------------- malformed messages


@pytest.mark.parametrize("body,status,rpc,code", [
    (b"{not json", 400, -32700, "malformed_json"),
    (b"", 400, -32700, "malformed_json"),
    (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}', 400, -32600, "duplicate_json_key"),
    (b'"ping"', 400, -32600, "jsonrpc_invalid"),
    (b"42", 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"id":1,"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":9007199254740993,"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":[]}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":null}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"method":7}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","extra":1}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"result":{}}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0"}', 400, -32600, "jsonrpc_invalid"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":' + b'[' * 200 + b']' * 200 + b'}', 400, -32600,
     "json_too_deep"),
])
async def test_malformed_messages_get_the_right_jsonrpc_error(env, client, body, status, rpc, code):
    await client.initialize()
    r, answer = await client.post(body)
    assert r.status == status, answer
    assert answer["jsonrpc"] == "2.0" and answer["error"]["code"] == rpc and answer["error"]["data"]["code"] == code
    assert env.backend.calls == []


async def test_a_readable_id_is_echoed_in_an_envelope_error(client):
    await client.initialize()
    r, answer = await client.post(b'{"jsonrpc":"2.0","id":"abc","method":"ping","bogus":true}')
    assert r.status == 400 and answer["id"] == "abc"


@pytest.mark.parametrize("method", ["Tools/List", "TOOLS/CALL", "tools/list ", " ping", "tools/List", "tools.list",
                                    "resources/list", "prompts/list", "logging/setLevel", "completion/complete",
                                    "server/discover", "subscriptions/listen", "tasks/list",
                                    "notifications/initialized", "notifications/cancelled", "rpc.discover"])
async def test_unknown_methods_and_case_tricks_are_method_not_found(env, client, method):
    await client.initialize()
    r, body = await client.call(method, {})
    assert r.status == 200 and body["error"]["code"] == -32601 and body["id"] == client.next_id
    assert env.backend.calls == []
    assert env.backend.events[-1]["reason"] == "method_not_found"


async def test_invalid_params_for_known_methods(env, client):
    await client.initialize()
    for params in ({}, {"name": 7}, {"name": "echo", "arguments": [1, 2]}, {"name": "echo", "arguments": "x"},
                   {"name": "echo", "_meta": "x"}):
        r, body = await client.call("tools/call", params)
        assert r.status == 200 and body["error"]["code"] == -32602, params
    r, body = await client.call("tools/list", {"cursor": 5})
    assert body["error"]["code"] == -32602
    assert env.backend.calls == []


async def test_a_request_method_without_id_is_refused_and_never_runs(env, client):
    await client.initialize()
    r, body = await client.post({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "echo"}})
    assert r.status == 400 and body["error"]["data"]["code"] == "jsonrpc_invalid"
    assert env.backend.calls == []
    r, body = await client.post({"jsonrpc": "2.0", "method": "notifications/whatever", "params": {"x": 1}})
    assert r.status == 202 and body is None  # an unknown notification is ignored, as JSON-RPC asks
    r, body = await client.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"reason": 1}})
    assert r.status == 400  # a known notification with the wrong shape


async def test_content_type_and_accept(env, client):
    await client.initialize()
    r, body = await client.call("ping", **{"Content-Type": "text/plain"})
    assert r.status == 415 and body["error"]["data"]["code"] == "unsupported_media_type"
    r, body = await client.call("ping", Accept="text/html")
    assert r.status == 406
    r, body = await client.call("ping", **{"Content-Type": "application/json; charset=utf-8"}, Accept="*/*")
    assert r.status == 200 and r.content_type == "application/json"
    r, events = await client.call("ping", Accept="text/event-stream")
    assert r.status == 200 and r.content_type == "text/event-stream" and events[0]["result"] == {}


async def test_body_limit(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url, limits={"max_body_bytes": 2048})
    c = Client(env, http)
    await c.initialize()
    r, body = await c.call("tools/call", {"name": "echo", "arguments": {"pad": "x" * 4096}})
    assert r.status == 413 and body["error"]["data"]["code"] == "body_too_large"


# --------------------------------------------------------------------------- batches (2025-03-26 only)


async def test_batches_only_on_2025_03_26_sessions(env, client):
    await client.initialize("2025-11-25")
    r, body = await client.post([{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
    assert r.status == 400 and body["error"]["data"]["code"] == "mcp_batch_not_supported"
    await client.initialize("2025-06-18")
    r, body = await client.post([{"jsonrpc": "2.0", "id": 1, "method": "ping"}])
    assert r.status == 400


async def test_a_2025_03_26_batch_is_answered_as_an_array(env, client):
    await client.initialize("2025-03-26")
    r, body = await client.post([
        {"jsonrpc": "2.0", "id": "a", "method": "ping"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "crm_read", "arguments": {"id": "7"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "Tools/List"},
    ], **{"MCP-Protocol-Version": ""})
    assert r.status == 200 and [m["id"] for m in body] == ["a", 2, 3]
    assert body[0]["result"] == {} and body[1]["result"]["structuredContent"]["name"] == "Ada Lovelace"
    assert body[2]["error"]["code"] == -32601
    r, body = await client.post([{"jsonrpc": "2.0", "method": "notifications/initialized"}])
    assert r.status == 202


@pytest.mark.parametrize("batch,why", [
    ([], "an empty batch"),
    ([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
      {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "crm_read", "arguments": {"id": "1"}}}],
     "used twice"),
    ([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
      {"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {}}], "initialize"),
    ([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}, "junk"], "batch member"),
    ([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
      {"jsonrpc": "2.0", "id": 9, "result": {}}], "awaits no response"),
    ([{"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(33)], "at most 32"),
    ([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}},
      {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "crm_read", "arguments": {"id": "1"}}}],
     "not a notification"),
])
async def test_a_bad_batch_runs_nothing(env, client, batch, why):
    await client.initialize("2025-03-26")
    r, body = await client.post(batch)
    assert r.status == 400 and why in body["error"]["message"]
    assert env.backend.calls == []


# --------------------------------------------------------------------------- calls: SSE, progress, ids, cancellation


async def test_progress_upgrades_the_answer_to_sse(env, client):
    await client.initialize()
    r, events = await client.call("tools/call", {"name": "slow_export", "arguments": {"steps": 3},
                                                 "_meta": {"progressToken": "p1"}})
    assert r.status == 200 and r.content_type == "text/event-stream"
    assert r.headers["Cache-Control"].startswith("no-cache") and r.headers["X-Accel-Buffering"] == "no"
    progress = [e["params"] for e in events if e.get("method") == "notifications/progress"]
    assert progress == [{"progressToken": "p1", "progress": i, "total": 3, "message": f"step {i}"} for i in (1, 2, 3)]
    assert events[-1]["id"] == client.next_id and events[-1]["result"]["structuredContent"] == \
        {"exported": 3, "cancelled": False}
    # no token, or a client that takes JSON only: no progress, one JSON answer
    r, body = await client.call("tools/call", {"name": "slow_export", "arguments": {"steps": 2},
                                               "_meta": {"progressToken": "p2"}}, Accept="application/json")
    assert r.content_type == "application/json" and body["result"]["structuredContent"]["exported"] == 2
    assert env.backend.calls[-1].progress is None


async def test_2024_11_05_progress_has_no_message(client):
    await client.initialize("2024-11-05")
    r, events = await client.call("tools/call", {"name": "slow_export", "arguments": {"steps": 1},
                                                 "_meta": {"progressToken": 5}})
    assert events[0]["params"] == {"progressToken": 5, "progress": 1, "total": 1}


async def test_ids_in_flight_are_unique_and_cancellation_reaches_the_backend(env, client, http):
    await client.initialize()
    env.backend.slow_gate = asyncio.Event()
    slow = asyncio.ensure_future(client.post({"jsonrpc": "2.0", "id": 77, "method": "tools/call",
                                              "params": {"name": "slow_export", "arguments": {"steps": 5}}}))
    for _ in range(200):
        if env.backend.calls:
            break
        await asyncio.sleep(0.01)
    r, body = await client.post({"jsonrpc": "2.0", "id": 77, "method": "tools/call", "params": {"name": "echo"}})
    assert body["error"]["code"] == -32600 and body["error"]["data"]["code"] == "duplicate_id"
    assert len(env.backend.calls) == 1
    r, body = await client.post({"jsonrpc": "2.0", "id": "77", "method": "ping"})  # "77" is another id than 77
    assert body["result"] == {}
    r, _ = await client.post({"jsonrpc": "2.0", "method": "notifications/cancelled",
                              "params": {"requestId": 77, "reason": "user stopped it"}})
    assert r.status == 202
    env.backend.slow_gate.set()
    r, body = await asyncio.wait_for(slow, 10)
    assert body["result"]["structuredContent"]["cancelled"] is True  # the call finished and said so
    assert env.backend.cancelled_seen == [77]
    r, body = await client.post({"jsonrpc": "2.0", "id": 77, "method": "ping"})  # free again
    assert body["result"] == {}


async def test_backend_outcomes(env, client):
    await client.initialize()
    r, body = await client.call("tools/call", {"name": "crm_read", "arguments": {"id": "7"}})
    res = body["result"]
    assert res["structuredContent"] == {"id": "7", "name": "Ada Lovelace"} and res["isError"] is False
    assert '"Ada Lovelace"' in res["content"][0]["text"]
    r, body = await client.call("tools/call", {"name": "crm_update", "arguments": {"id": "7", "intent": "x"}})
    res = body["result"]
    assert res["isError"] is True and res["structuredContent"]["error"]["code"] == "capability_not_granted"
    assert "capability_not_granted" in res["content"][0]["text"] and "r-123" in res["content"][0]["text"]
    r, body = await client.call("tools/call", {"name": "no_such_tool"})
    assert body["error"] == {"code": -32602, "message": "Unknown tool: no_such_tool",
                             "data": {"code": "unknown_tool", "request_id": env.backend.events[-1]["request_id"]}}
    r, body = await client.call("tools/call", {"name": "boom"})
    assert body["error"]["code"] == -32603 and body["error"]["data"]["code"] == "internal_error"
    assert "crashed" not in orjson.dumps(body).decode()  # internals are logged, not sent


async def test_a_failing_backend_fails_closed(env, client, http, monkeypatch):
    await client.initialize()
    get = await http.get(env.url, headers=client.headers(Accept="text/event-stream"))
    try:
        await get.content.readline()

        def broken(principal: Any) -> object:
            raise RuntimeError("store down")

        monkeypatch.setattr(env.backend, "tools_version", broken)
        env.endpoint.tools_changed()
        async with asyncio.timeout(10):
            await get.content.read()  # the GET stream ends instead of hanging
    finally:
        get.close()

    async def no_auth(request: Any) -> Any:
        raise RuntimeError("verifier crashed")

    monkeypatch.setattr(env.backend, "authenticate", no_auth)
    r, body = await client.call("tools/call", {"name": "echo"})
    assert r.status == 500 and body["error"]["code"] == -32603 and body["error"]["data"]["code"] == "internal_error"
    assert "crashed" not in orjson.dumps(body).decode() and env.backend.calls == []


# --------------------------------------------------------------------------- tools/list pagination


async def test_tools_list_pages_and_stale_cursors(env, client):
    await client.initialize()
    names, cursor, pages = [], None, 0
    while True:
        r, body = await client.call("tools/list", {"cursor": cursor} if cursor else None)
        res = body["result"]
        names += [t["name"] for t in res["tools"]]
        pages += 1
        cursor = res.get("nextCursor")
        if not cursor:
            break
    assert names == ["crm_read", "crm_update", "slow_export", "echo", "boom"] and pages == 3
    r, body = await client.call("tools/list")
    cursor = body["result"]["nextCursor"]
    env.backend.set_tools("bot", [READ])
    r, body = await client.call("tools/list", {"cursor": cursor})
    assert body["error"]["code"] == -32602 and body["error"]["data"]["code"] == "invalid_cursor"
    for bad in ("garbage", "", "x" * 100, "OTk5LmFiYw"):
        r, body = await client.call("tools/list", {"cursor": bad})
        assert body["error"]["code"] == -32602, bad
    r, body = await client.call("tools/list")
    assert [t["name"] for t in body["result"]["tools"]] == ["crm_read"] and "nextCursor" not in body["result"]
    tool = body["result"]["tools"][0]
    assert tool["inputSchema"]["required"] == ["id"] and tool["annotations"] == {"readOnlyHint": True}
    assert tool["outputSchema"]["type"] == "object"


# --------------------------------------------------------------------------- GET stream, DELETE, other methods


async def read_events(resp: aiohttp.ClientResponse, n: int, timeout: float = 10) -> list[bytes]:
    out: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            line = await resp.content.readline()
            if not line:
                break
            if line.startswith((b"data: ", b": ")):
                out.append(line.rstrip(b"\n"))
    return out


async def test_get_stream_pushes_list_changed_and_delete_ends_it(env, client, http):
    await client.initialize()
    async with http.get(env.url, headers=client.headers(Accept="application/json")) as r:
        assert r.status == 406
    get = await http.get(env.url, headers=client.headers(Accept="text/event-stream"))
    try:
        assert get.status == 200 and get.content_type == "text/event-stream"
        assert get.headers["Mcp-Session-Id"] == client.sid
        assert await read_events(get, 1) == [b": stream open"]
        async with http.get(env.url, headers=client.headers(Accept="text/event-stream")) as r2:
            assert r2.status == 409
        env.backend.set_tools("bot", [READ])
        env.endpoint.tools_changed()
        lines = await read_events(get, 1)
        assert orjson.loads(lines[0][6:]) == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        # only once per change, keep-alives meanwhile; listing acknowledges it
        r, body = await client.call("tools/list")
        assert [t["name"] for t in body["result"]["tools"]] == ["crm_read"]
        assert await read_events(get, 2) == [b": keep-alive", b": keep-alive"]
        # a change the backend makes without telling the endpoint is found by the keep-alive tick
        env.backend.set_tools("bot", [READ, READ.model_copy(update={"name": "crm_read2"})])
        lines = await read_events(get, 3)
        assert b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}' in lines
        async with http.delete(env.url, headers=client.headers()) as r:
            assert r.status == 204
        async with asyncio.timeout(10):
            rest = await get.content.read()
        assert b"list_changed" not in rest
    finally:
        get.close()
    r, body = await client.call("ping")
    assert r.status == 404
    async with http.delete(env.url, headers=client.headers()) as r:
        assert r.status == 404
    closed = [e for e in env.backend.events if e["event"] == "mcp_session_closed"]
    assert [e["reason"] for e in closed] == ["deleted"]


async def test_get_and_delete_need_a_session(env, client, http):
    async with http.get(env.url, headers=client.headers(Accept="text/event-stream")) as r:
        assert r.status == 400
    async with http.delete(env.url, headers=client.headers()) as r:
        assert r.status == 400
    for method in ("PUT", "PATCH", "HEAD"):
        async with http.request(method, env.url, headers=client.headers()) as r:
            assert r.status == 405 and r.headers["Allow"] == "GET, POST, DELETE"


async def test_paths_near_the_endpoint_are_not_the_endpoint(env, http, client):
    for path in ("/mcp/", "/MCP", "/%6Dcp", "/mcp/../mcp", "//mcp"):
        async with http.post(yarl.URL(env.base + path, encoded=True), data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                             headers=client.headers()) as r:
            body = await r.json()
            assert "jsonrpc" not in body and r.status in (400, 403), path


# --------------------------------------------------------------------------- session bounds


async def test_sessions_per_agent_are_bounded_lru_first(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url, max_sessions_per_agent=2)
    a, b, c, other = Client(env, http), Client(env, http), Client(env, http), Client(env, http, "other-bot")
    await other.initialize()
    await a.initialize()
    await b.initialize()
    await a.call("ping")  # b is now the least recently used
    await c.initialize()
    assert (await b.call("ping"))[0].status == 404
    for cl in (a, c, other):
        assert (await cl.call("ping"))[0].status == 200
    assert [(e["principal"], e["reason"]) for e in env.backend.events if e["event"] == "mcp_session_closed"] == \
        [("bot", "evicted")]
    # a session whose only use is an open GET stream (its client may be long gone) is evicted next...
    get_a = await http.get(env.url, headers=a.headers(Accept="text/event-stream"))
    get_c = await http.get(env.url, headers=c.headers(Accept="text/event-stream"))
    try:
        await c.call("ping")
        d = Client(env, http)
        await d.initialize()
        assert (await a.call("ping"))[0].status == 404
        async with asyncio.timeout(10):
            await get_a.content.read()  # the evicted session's stream was ended
    finally:
        get_a.close()
        get_c.close()
    # ...but never one with a call in flight: with every session busy that way, a new one is refused
    env.backend.slow_gate = asyncio.Event()
    slow = [asyncio.ensure_future(cl.call("tools/call", {"name": "slow_export", "arguments": {"steps": 1}}))
            for cl in (c, d)]
    for _ in range(500):
        if len(env.backend.calls) == 2:
            break
        await asyncio.sleep(0.01)
    e = Client(env, http)
    r, body = await e.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}})
    assert r.status == 503 and body["error"]["data"]["code"] == "too_many_sessions" and r.headers["Retry-After"]
    env.backend.slow_gate.set()
    for f in slow:
        r, body = await asyncio.wait_for(f, 10)
        assert body["result"]["structuredContent"]["exported"] == 1
    assert [(e["principal"], e["reason"]) for e in env.backend.events if e["event"] == "mcp_session_closed"] == \
        [("bot", "evicted"), ("bot", "evicted")]


async def test_idle_sessions_expire(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url, session_idle_timeout=0.3)
    a, b = Client(env, http), Client(env, http)
    await a.initialize()
    await b.initialize()
    for _ in range(4):
        await asyncio.sleep(0.15)
        assert (await b.call("ping"))[0].status == 200  # b keeps itself alive
    assert (await a.call("ping"))[0].status == 404
    assert [e["reason"] for e in env.backend.events if e["event"] == "mcp_session_closed"] == ["expired"]


async def test_global_session_bound(make_gateway, store_url, http):
    env = await start_mcp_env(make_gateway, store_url, max_sessions=2)
    await Client(env, http).initialize()
    await Client(env, http, "other-bot").initialize()
    r, body = await Client(env, http).post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}})
    assert r.status == 503


# --------------------------------------------------------------------------- wiring and config


async def test_without_server_mcp_the_path_is_the_rest_doors(make_gateway, store_url, http):
    rules = base_rules("http://127.0.0.1:9", store_url)  # no server.mcp: no MCP endpoint
    h = await make_gateway(rules)
    assert h.gw.mcp is None
    async with http.post(f"{h.url}/mcp", data=b"{}", headers=h.headers()) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "route_not_registered"


async def test_the_endpoint_is_served_on_the_main_listener_only(make_gateway, store_url, http):
    from proxy.doors.mcp import mount_mcp
    from tests.mcp_backend import JwtBackend

    rules = base_rules("http://127.0.0.1:9", store_url)
    rules["server"]["mcp"] = {}
    rules["upstreams"]["crm"]["listen"] = "127.0.0.1:0"
    h = await make_gateway(rules)
    mount_mcp(h.gw, JwtBackend(h.gw.state.verifier))
    async with http.post(f"{h.upstream_url('crm')}/mcp", data=b"{}", headers=h.headers()) as r:
        assert "jsonrpc" not in await r.json()


@pytest.mark.parametrize("mcp,where", [
    ({"path": "mcp"}, "server.mcp.path"),
    ({"path": "/mcp/"}, "server.mcp.path"),
    ({"path": "/_tether/mcp"}, "server.mcp.path"),
    ({"path": "/crm/mcp"}, "server.mcp.path"),
    ({"allowed_origins": ["evil.example.com"]}, "server.mcp.allowed_origins"),
    ({"allowed_origins": ["https://a.example.com/path"]}, "server.mcp.allowed_origins"),
    ({"public_url": "tether.example.com/mcp"}, "server.mcp.public_url"),
    ({"max_sessions_per_agent": 0}, "server.mcp.max_sessions_per_agent"),
    ({"sessions": 3}, "server.mcp.sessions"),
])
def test_config_errors_name_the_key(mcp, where):
    rules = base_rules("http://127.0.0.1:9", "x.db")
    rules["server"]["mcp"] = mcp
    with pytest.raises(ConfigError) as ei:
        parse_rules(rules, "rules.yaml")
    assert where in str(ei.value) and "rules.yaml" in str(ei.value)


def test_config_defaults():
    rules = base_rules("http://127.0.0.1:9", "x.db")
    rules["server"]["mcp"] = {"session_idle_timeout": "10m", "allowed_origins": ["http://localhost:*"]}
    cfg = parse_rules(rules).server.mcp
    assert cfg.path == "/mcp" and cfg.session_idle_timeout == 600 and cfg.max_sessions_per_agent == 16
    assert parse_rules(base_rules("http://127.0.0.1:9", "x.db")).server.mcp is None
