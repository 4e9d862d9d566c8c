"""Credential rewriting: bearer, basic, API key, OAuth2 client credentials; rotation without restart."""

from __future__ import annotations

import base64
import os
import time

from aiohttp import web

from tests.conftest import base_rules


async def _gw_with(make_gateway, upstream, tmp_path, credentials, **up_extra):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["upstreams"]["crm"]["credentials"] = credentials
    rules["upstreams"]["crm"].update(up_extra)
    return await make_gateway(rules)


async def test_basic_auth(make_gateway, upstream, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_BASIC_PW", "s3cret")
    gw = await _gw_with(make_gateway, upstream, tmp_path,
                        {"type": "basic", "username": "svc", "password_env": "TEST_BASIC_PW"})
    r = await gw.request("GET", "/echo")
    assert r.status == 200
    assert upstream.received[-1].headers["Authorization"] == "Basic " + base64.b64encode(b"svc:s3cret").decode()


async def test_api_key_header_and_agent_copy_stripped(make_gateway, upstream, tmp_path):
    gw = await _gw_with(make_gateway, upstream, tmp_path,
                        {"type": "api_key", "header": "X-Api-Key", "value": {"value": "real-key"}})
    r = await gw.request("GET", "/echo", headers={"X-Api-Key": "agent-guess"})
    assert r.status == 200
    got = upstream.received[-1]
    assert [v for k, v in got.header_items if k.lower() == "x-api-key"] == ["real-key"]
    assert "Authorization" not in got.headers
    # an alias of the credential header (X_Api_Key) is refused, not forwarded
    r = await gw.request("GET", "/echo", headers={"X_Api_Key": "agent-guess"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "ambiguous_request"


async def test_credential_query_param_is_refused(make_gateway, upstream, tmp_path):
    gw = await _gw_with(make_gateway, upstream, tmp_path, {"type": "bearer", "token": {"value": "t"}},
                        credential_params=["hapikey", "api_key"])
    r = await gw.request("GET", "/echo?hapikey=guess")
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "credential_in_request"
    assert upstream.received == []


async def test_secret_file_rotation_is_picked_up_without_restart(make_gateway, upstream, tmp_path):
    f = tmp_path / "token"
    f.write_text("first-token\n")
    gw = await _gw_with(make_gateway, upstream, tmp_path, {"type": "bearer", "token_file": str(f)})
    r = await gw.request("GET", "/echo")
    assert upstream.received[-1].headers["Authorization"] == "Bearer first-token"
    f.write_text("second-token\n")
    os.utime(f, (time.time() + 3, time.time() + 3))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = await gw.request("GET", "/echo")
        assert r.status == 200
        if upstream.received[-1].headers["Authorization"] == "Bearer second-token":
            break
        import asyncio

        await asyncio.sleep(0.2)
    assert upstream.received[-1].headers["Authorization"] == "Bearer second-token"


async def test_oauth2_client_credentials_fetched_cached_and_refreshed(make_gateway, upstream, tmp_path):
    calls: list[dict] = []

    async def token_endpoint(request: web.Request) -> web.Response:
        form = dict(await request.post())
        calls.append({"auth": request.headers.get("Authorization"), **form})
        # short lifetime: with refresh_before=1 the second token is fetched after ~1 s
        return web.json_response({"access_token": f"oauth-{len(calls)}", "token_type": "bearer", "expires_in": 2})

    app = web.Application()
    app.router.add_post("/oauth/token", token_endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        gw = await _gw_with(make_gateway, upstream, tmp_path, {
            "type": "oauth2_client_credentials", "token_url": f"http://127.0.0.1:{port}/oauth/token",
            "client_id": "tether", "client_secret": {"value": "cs"}, "scope": "crm.write", "refresh_before": 1})
        import asyncio

        rs = await asyncio.gather(*[gw.request("GET", "/echo") for _ in range(10)])
        assert all(r.status == 200 for r in rs)
        assert len(calls) == 1  # single flight
        assert calls[0]["grant_type"] == "client_credentials" and calls[0]["scope"] == "crm.write"
        assert calls[0]["auth"] == "Basic " + base64.b64encode(b"tether:cs").decode()
        assert {r.headers["Authorization"] for r in upstream.received} == {"Bearer oauth-1"}
        await asyncio.sleep(1.2)
        await gw.request("GET", "/echo")
        assert len(calls) == 2
        assert upstream.received[-1].headers["Authorization"] == "Bearer oauth-2"
    finally:
        await runner.cleanup()


async def test_oauth2_token_endpoint_down_fails_closed(make_gateway, upstream, tmp_path):
    gw = await _gw_with(make_gateway, upstream, tmp_path, {
        "type": "oauth2_client_credentials", "token_url": "http://127.0.0.1:1/oauth/token",
        "client_id": "tether", "client_secret": {"value": "CLIENT-SECRET-XYZ"}})
    r = await gw.request("GET", "/echo")
    assert r.status == 502
    assert (await r.json())["error"]["code"] == "upstream_unavailable"
    assert upstream.received == []
    assert "CLIENT-SECRET-XYZ" not in await r.text()
    assert "CLIENT-SECRET-XYZ" not in repr(await gw.journal())
