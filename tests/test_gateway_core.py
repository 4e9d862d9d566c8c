"""Gateway core over real sockets: pass-through, default deny, credentials, provenance, streaming."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest

from tests.conftest import SECRET, UPSTREAM_TOKEN, base_rules
from tests.procs import GatewayProcess


async def test_allowed_read_and_write_pass_through(gateway, upstream):
    upstream.put_record("contacts", {"id": "7", "name": "Ada", "email": "ada@example.com"})
    r = await gateway.request("GET", "/api/contacts/7")
    assert r.status == 200
    assert (await r.json())["email"] == "ada@example.com"
    r = await gateway.request("PATCH", "/api/contacts/7", json={"name": "Ada L."})
    assert r.status == 200, await r.text()
    assert upstream.records["contacts"]["7"]["name"] == "Ada L."
    r = await gateway.request("POST", "/api/contacts", json={"name": "Bob"})
    assert r.status == 201
    assert r.headers["Location"].startswith("/api/contacts/")
    assert [x.method for x in upstream.received] == ["GET", "PATCH", "POST"]


async def test_unregistered_route_is_denied_and_upstream_sees_nothing(gateway, upstream):
    for method, path in [("GET", "/api/accounts/1"), ("POST", "/api/contacts/7/merge"), ("PUT", "/api/contacts/7"),
                         ("GET", "/api/contacts/7/secrets"), ("GET", "/")]:
        r = await gateway.request(method, path)
        assert r.status == 403, (method, path)
        body = await r.json()
        assert body["error"]["code"] == "route_not_registered"
        assert body["error"]["request_id"] == r.headers["X-Tether-Request-Id"]
    assert upstream.received == []


async def test_registered_but_not_granted_is_denied(gateway, upstream):
    r = await gateway.request("PATCH", "/api/contacts/7", agent="other-bot", json={"name": "x"})
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "capability_not_granted"
    r = await gateway.request("GET", "/api/contacts/7", agent="stranger")
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "agent_unknown"
    assert upstream.received == []


async def test_upstream_gets_its_own_credentials_never_the_agents(gateway, upstream):
    agent_token = gateway.token("bot")
    r = await gateway.request("GET", "/echo", headers={"Authorization": f"Bearer {agent_token}",
                                                        "Cookie": "session=agent", "Proxy-Authorization": "x"})
    assert r.status == 200
    got = upstream.received[-1]
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    flat = repr(got.header_items) + got.raw_path
    assert agent_token not in flat
    assert "Cookie" not in got.headers and "Proxy-Authorization" not in got.headers
    assert got.headers["Host"] == f"127.0.0.1:{upstream.port}"


async def test_provenance_headers_added_and_spoofs_stripped(gateway, upstream):
    r = await gateway.request(
        "GET", "/echo", on_behalf_of="ae:jane@acme", intent="renew Acme Corp",
        headers={"X-Tether-Agent": "admin-bot", "X-Tether-On-Behalf-Of": "ceo", "X-Tether-Request-Id": "forged",
                 "X-Tether-Authz-Event": "forged", "X-Forwarded-For": "10.0.0.1", "Forwarded": "for=1.2.3.4",
                 "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert r.status == 200
    got = upstream.received[-1]
    h = got.headers
    assert h["X-Tether-Agent"] == "bot"
    assert h["X-Tether-On-Behalf-Of"] == "ae:jane@acme"
    assert h["X-Tether-Intent"] == "renew Acme Corp"
    assert h["X-Tether-Request-Id"] == r.headers["X-Tether-Request-Id"]
    # a read goes out while its intent record commits: its sequence number is not known yet, so the
    # authorisation event is not claimed (the request id ties the call to its record)
    assert "X-Tether-Authz-Event" not in h
    assert h["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    names = [k.lower() for k, _ in got.header_items]
    assert names.count("x-tether-agent") == 1 and names.count("x-tether-on-behalf-of") == 1
    assert "x-forwarded-for" not in names and "forwarded" not in names
    assert "forged" not in repr(got.header_items)
    # a write's intent record is durable before it leaves: it carries the record's sequence number
    upstream.put_record("contacts", {"id": "9", "name": "N"})
    r = await gateway.request("PATCH", "/api/contacts/9", json={"name": "M"}, intent="fix the name",
                              headers={"X-Tether-Authz-Event": "forged"})
    assert r.status == 200
    seq = upstream.received[-1].headers["X-Tether-Authz-Event"]
    assert seq.isdigit()
    recs = await gateway.journal()
    assert [x for x in recs if x["seq"] == int(seq)][0]["intent"] == "fix the name"


@pytest.mark.parametrize("query", [
    "a=1&b=2&a=3",
    "q=SELECT%20Id%20FROM%20Account%20WHERE%20Name%3D%27A%26B%27",
    "x=%E2%9C%93&y=+plus+&z=",
    "empty=&&flag",
    "order=desc&limit=10&offset=20&fields=a,b,c",
])
async def test_query_string_is_forwarded_byte_exact(gateway, upstream, query):
    url = f"{gateway.upstream_url('crm')}/echo?{query}"
    async with gateway.session.get(aiohttp.client.URL(url, encoded=True), headers=gateway.headers()) as r:
        assert r.status == 200
    assert upstream.received[-1].raw_path == f"/echo?{query}"


async def test_hop_by_hop_headers_dropped_both_ways(gateway, upstream):
    r = await gateway.request("GET", "/echo", headers={"Connection": "keep-alive, X-Custom-Hop", "X-Custom-Hop": "1",
                                                       "Keep-Alive": "timeout=5", "TE": "trailers",
                                                       "X-End-To-End": "kept"})
    assert r.status == 200
    got = upstream.received[-1].headers
    assert "X-Custom-Hop" not in got and "Keep-Alive" not in got and "TE" not in got
    assert got["X-End-To-End"] == "kept"
    # response: the upstream's Connection names X-Hop, so it is dropped; end-to-end headers come back
    assert "X-Hop" not in r.headers
    assert r.headers["X-Upstream"] == "fake"
    assert r.headers["Set-Cookie"] == "sid=1"


async def test_connection_header_naming_tether_headers_is_refused(gateway, upstream):
    r = await gateway.request("GET", "/echo", headers={"Connection": "X-Tether-Intent"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "ambiguous_request"
    assert upstream.received == []


async def test_status_and_body_come_back_unchanged(gateway, upstream):
    upstream.fail("GET", "/api/contacts/9", status=418, body={"teapot": True})
    r = await gateway.request("GET", "/api/contacts/9")
    assert r.status == 418
    assert await r.json() == {"teapot": True}


async def test_write_needs_intent(gateway, upstream):
    r = await gateway.request("POST", "/api/contacts", intent=None, json={"name": "x"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "intent_required"
    r = await gateway.request("GET", "/api/contacts", intent=None)
    assert r.status == 200  # reads need none
    assert [x.method for x in upstream.received] == ["GET"]


async def test_unreachable_upstream_is_502_and_slow_one_504(make_gateway, tmp_path, upstream):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    rules = base_rules(f"http://127.0.0.1:{dead_port}", str(tmp_path / "a.db"))
    rules["upstreams"]["slow"] = {"url": upstream.url, "timeouts": {"connect": 2, "read": 0.3}}
    rules["capabilities"]["slow.wait"] = {"upstream": "slow", "method": "GET", "path": "/slow"}
    rules["agents"]["bot"]["grants"].append("slow.wait")
    gw = await make_gateway(rules)
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 502
    assert (await r.json())["error"]["code"] == "upstream_unavailable"
    r = await gw.request("GET", "/slow?seconds=2", upstream="slow")
    assert r.status == 504
    assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_path_prefix_routing_on_main_listener(gateway, upstream):
    upstream.put_record("contacts", {"id": "3", "name": "C"})
    async with gateway.session.get(f"{gateway.url}/crm/api/contacts/3", headers=gateway.headers()) as r:
        assert r.status == 200
    assert upstream.received[-1].path == "/api/contacts/3"
    async with gateway.session.get(f"{gateway.url}/nope/api/contacts/3", headers=gateway.headers()) as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "route_not_registered"


async def test_dedicated_listener_per_upstream(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["upstreams"]["crm"]["listen"] = "127.0.0.1:0"
    gw = await make_gateway(rules)
    base = gw.upstream_url("crm")
    assert base != f"{gw.url}/crm"
    upstream.put_record("contacts", {"id": "4", "name": "D"})
    async with gw.session.get(f"{base}/api/contacts/4", headers=gw.headers()) as r:
        assert r.status == 200
        assert (await r.json())["name"] == "D"


async def test_whoami_lists_capabilities_and_modes(gateway):
    async with gateway.session.get(f"{gateway.url}/_tether/whoami",
                                   headers=gateway.headers(on_behalf_of="ae:jane")) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["agent"] == "bot" and doc["on_behalf_of"] == "ae:jane"
    caps = {c["name"]: c for c in doc["capabilities"]}
    assert caps["contact.update"]["mode"] == "live"
    assert caps["contact.read"]["effect"] == "read"
    async with gateway.session.get(f"{gateway.url}/_tether/whoami") as r:
        assert r.status == 401


async def test_health_and_readiness(gateway):
    for path in ("/_tether/healthz", "/_tether/readyz"):
        async with gateway.session.get(gateway.url + path) as r:
            assert r.status == 200, path
    async with gateway.session.get(gateway.admin_url + "/_tether/readyz") as r:
        doc = await r.json()
        assert doc["ready"] is True and doc["checks"]["store"] == "ok"


async def test_readiness_fails_when_a_credential_is_missing(make_gateway, upstream, tmp_path, monkeypatch):
    monkeypatch.delenv("TETHER_TEST_MISSING_TOKEN", raising=False)
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["upstreams"]["crm"]["credentials"] = {"type": "bearer", "token_env": "TETHER_TEST_MISSING_TOKEN"}
    gw = await make_gateway(rules)
    async with gw.session.get(gw.url + "/_tether/readyz") as r:
        assert r.status == 503
        doc = await r.json()
        assert "TETHER_TEST_MISSING_TOKEN" in doc["checks"]["credentials"]["crm"]
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 502
    body = await r.json()
    assert body["error"]["code"] == "upstream_unavailable"
    assert upstream.received == []


async def test_large_request_body_is_refused_with_413(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["limits"] = {"max_body_bytes": 1024}
    gw = await make_gateway(rules)
    r = await gw.request("POST", "/api/contacts", data=b'{"a": "' + b"x" * 5000 + b'"}',
                         headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "body_too_large"
    assert upstream.received == []


async def test_errors_are_json_with_request_id(gateway):
    async with gateway.session.get(f"{gateway.upstream_url('crm')}/api/contacts/1") as r:
        assert r.status == 401
        assert r.headers["Content-Type"].startswith("application/json")
        body = await r.json()
        assert set(body["error"]) >= {"code", "message", "request_id"}
        assert body["error"]["request_id"] == r.headers["X-Tether-Request-Id"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.slow
async def test_100mb_response_streams_with_bounded_memory(upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    proc = GatewayProcess(rules, tmp_path).start()
    try:
        from proxy.config import parse_rules
        from proxy.policy.identity import mint_token

        token = mint_token(parse_rules(rules).identity, "bot")
        before = proc.rss_kb()
        size = 100 * 1024 * 1024
        got = 0
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proc.url}/crm/big?bytes={size}", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
                assert r.content_length == size
                async for chunk in r.content.iter_chunked(1 << 20):
                    got += len(chunk)
        assert got == size
        peak = proc.peak_rss_kb()
        # the whole body would add ~100 MB; streaming keeps the peak within a few MB of the baseline
        assert peak - before < 30 * 1024, (before, peak)
    finally:
        proc.stop()


async def test_every_method_is_proxied(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        rules["capabilities"][f"echo.{m.lower()}"] = {"upstream": "crm", "method": m, "path": "/echo/m",
                                                      **({"effect": "write"} if m not in ("GET", "HEAD", "OPTIONS") else {})}
        rules["agents"]["bot"]["grants"].append({"capability": f"echo.{m.lower()}", "mode": "live"}
                                                if m not in ("GET", "HEAD", "OPTIONS") else f"echo.{m.lower()}")
    gw = await make_gateway(rules)
    for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        r = await gw.request(m, "/echo/m", data=b"{}" if m in ("POST", "PUT", "PATCH") else None,
                             headers={"Content-Type": "application/json"} if m in ("POST", "PUT", "PATCH") else None)
        assert r.status == 200, (m, await r.text())
    assert [x.method for x in upstream.received] == ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def test_trace_and_connect_are_refused(gateway, upstream):
    for m in ("TRACE", "CONNECT"):
        r = await gateway.request(m, "/echo")
        assert r.status in (400, 405), m
    assert upstream.received == []


async def test_concurrent_requests_share_one_session(gateway, upstream):
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    rs = await asyncio.gather(*[gateway.request("GET", "/api/contacts/1") for _ in range(50)])
    assert all(r.status == 200 for r in rs)
    assert len(upstream.received) == 50
    assert gateway.gw.session is not None and not gateway.gw.session.closed


def test_secret_never_in_repr():
    from proxy.config import SecretRef
    from proxy.secret import Secret

    s = Secret(SecretRef(value=SECRET), "x")
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert SECRET not in repr(SecretRef(value=SECRET))
    assert orjson.dumps({"k": str(s)}).decode().find(SECRET) == -1
