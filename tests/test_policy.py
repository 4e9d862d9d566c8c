"""Rate limits, client timeouts, overload and hot reload."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import yaml

from proxy.config import parse_rules
from proxy.policy.identity import mint_token
from proxy.safety.ratelimit import RateLimiter
from tests.conftest import base_rules
from tests.procs import GatewayProcess


def test_token_bucket_all_or_nothing():
    rl = RateLimiter()
    d = [("a", 60.0, 2, 1.0, "a"), ("b", 60.0, 1, 1.0, "b")]
    rl.take(d, now=0.0)
    try:
        rl.take(d, now=0.0)
        raise AssertionError("expected a refusal")
    except Exception as exc:  # TetherError
        assert exc.code == "rate_limited" and exc.headers["Retry-After"] == "1"
    # 'a' kept its second token because the refusal took nothing
    rl.take([("a", 60.0, 2, 1.0, "a")], now=0.0)
    rl.take(d, now=1.01)  # one second later both refilled by one


async def test_grant_limit_gives_429_with_retry_after_and_is_journaled(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["capabilities"]["contact.read"]["rate_limit"] = {"per_minute": 60, "burst": 3}
    gw = await make_gateway(rules)
    statuses = [(await gw.request("GET", "/api/contacts/1")).status for _ in range(5)]
    assert statuses == [404, 404, 404, 429, 429]
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
    assert (await r.json())["error"]["code"] == "rate_limited"
    # other capabilities are not affected
    assert (await gw.request("GET", "/api/contacts")).status == 200
    assert len(upstream.received) == 4
    recs = [x for x in await gw.journal() if x["kind"] == "request" and x["reason"] == "rate_limited"]
    assert len(recs) == 3 and all(x["decision"] == "denied" for x in recs)


async def test_agent_write_limit_and_upstream_limit(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["agents"]["bot"]["rate_limit"] = {"writes_per_minute": 2, "burst": 2}
    gw = await make_gateway(rules)
    codes = [(await gw.request("POST", "/api/contacts", json={"name": "x"})).status for _ in range(3)]
    assert codes == [201, 201, 429]
    assert (await gw.request("GET", "/api/contacts")).status == 200  # reads unaffected by a write limit
    rules2 = base_rules(upstream.url, str(tmp_path / "u.db"))
    rules2["upstreams"]["crm"]["rate_limit"] = {"per_minute": 120, "burst": 2}
    gw2 = await make_gateway(rules2)
    codes = [(await gw2.request("GET", "/api/contacts", agent=a)).status for a in ("bot", "bot", "other-bot")]
    assert codes[:2] == [200, 200] and codes[2] in (403, 429)
    r = await gw2.request("GET", "/api/contacts/1", agent="other-bot")
    assert r.status == 429  # the upstream's bucket is shared by all agents


async def test_slow_loris_headers_are_cut_off(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["limits"] = {"client_timeout": 0.5}
    gw = await make_gateway(rules)
    port = gw.gw.listeners[0].bound_port
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /crm/api/contacts/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await w.drain()
    t0 = time.monotonic()
    closed = False
    try:
        while time.monotonic() - t0 < 3:
            w.write(b"X-Slow: 1\r\n")  # one header at a time, never finishing
            await w.drain()
            await asyncio.sleep(0.1)
            if r.at_eof():
                closed = True
                break
            try:
                data = await asyncio.wait_for(r.read(100), 0.05)
                if data == b"":
                    closed = True
                    break
            except asyncio.TimeoutError:
                pass
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    finally:
        w.close()
    assert closed and time.monotonic() - t0 < 2.0
    # an idle keep-alive connection between requests is not a slow loris
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(f"{gw.url}/_tether/healthz") as resp:
                assert resp.status == 200
            await asyncio.sleep(0.7)


async def test_slow_body_gets_408(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["limits"] = {"client_timeout": 0.5}
    gw = await make_gateway(rules)
    port = gw.gw.listeners[0].bound_port
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write((f"POST /crm/api/contacts HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {gw.token()}\r\n"
             f"X-Tether-Intent: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").encode())
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 3)
    assert b" 408 " in head.split(b"\r\n")[0]
    w.close()
    assert upstream.received == []


async def test_overload_is_a_fast_503(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["limits"] = {"max_in_flight": 2}
    gw = await make_gateway(rules)
    slow = [asyncio.ensure_future(gw.request("GET", "/slow?seconds=1")) for _ in range(2)]
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 503 and (await r.json())["error"]["code"] == "overloaded"
    assert r.headers["Retry-After"] == "1" and time.monotonic() - t0 < 0.5
    assert [x.status for x in await asyncio.gather(*slow)] == [200, 200]
    assert (await gw.request("GET", "/api/contacts/1")).status == 404


async def test_hot_reload_on_file_change_and_bad_file_keeps_old_rules(make_gateway, upstream, tmp_path, webhook):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["governance"] = {"alerts": [{"url": webhook.url}]}
    gw = await make_gateway(rules)
    assert (await gw.request("GET", "/api/contacts")).status == 200
    rules["agents"]["bot"]["grants"].remove("contact.list")
    gw.rules_path.write_text(yaml.safe_dump(rules))
    ok, version = await gw.gw.reload("test")
    assert ok
    assert (await gw.request("GET", "/api/contacts")).status == 403
    # a broken file is rejected; the previous rules stay in force
    gw.rules_path.write_text("version: 1\nupstreams: {crm: {url: nope}}\n")
    ok, err = await gw.gw.reload("test")
    assert not ok and "upstreams.crm.url" in err
    assert (await gw.request("GET", "/api/contacts")).status == 403
    assert (await gw.request("GET", "/api/contacts/1")).status == 404
    recs = await gw.journal()
    assert any(x.get("event") == "rules_reload_failed" for x in recs)
    assert any(x.get("event") == "rules_reloaded" and x.get("rules_version") == version for x in recs)
    await webhook.wait_for(lambda a: a["event"] == "rules_reload_failed")


async def test_a_reload_that_moves_an_upstream_retires_the_old_origins_connections(make_gateway, upstream, tmp_path):
    from tests.fakes import FakeUpstream

    moved = await FakeUpstream().start()
    try:
        rules = base_rules(upstream.url, str(tmp_path / "t.db"))
        gw = await make_gateway(rules)
        assert (await gw.request("GET", "/api/contacts")).status == 200
        old_pool = gw.gw.state.upstreams["crm"].pool
        assert old_pool is not None and len(old_pool.idle) == 1  # a kept-alive connection to the old URL
        rules["upstreams"]["crm"]["url"] = moved.url
        gw.rules_path.write_text(yaml.safe_dump(rules))
        assert (await gw.gw.reload("test"))[0]
        assert old_pool.retired and not old_pool.idle
        for _ in range(100):  # the close reaches the socket on the next loop turns
            if not old_pool.live:
                break
            await asyncio.sleep(0.01)
        assert not old_pool.live
        assert (await gw.request("GET", "/api/contacts")).status == 200
        assert len(moved.received) == 1 and len(upstream.received) == 1
        new_pool = gw.gw.state.upstreams["crm"].pool
        assert new_pool is not None and new_pool is not old_pool and not new_pool.retired
        # a reload that keeps the URL keeps the pool (and its warm connection)
        rules["agents"]["bot"]["grants"].remove("contact.list")
        gw.rules_path.write_text(yaml.safe_dump(rules))
        assert (await gw.gw.reload("test"))[0]
        assert not new_pool.retired and len(new_pool.idle) == 1
    finally:
        await moved.stop()


async def test_sighup_and_file_watch_reload_a_running_process(upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    token = mint_token(parse_rules(rules).identity, "bot")
    proc = GatewayProcess(rules, tmp_path).start()
    h = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession() as s:
            async def status() -> int:
                async with s.get(f"{proc.url}/crm/api/contacts", headers=h) as r:
                    return r.status
            assert await status() == 200
            rules["agents"]["bot"]["grants"].remove("contact.list")
            proc.rules_path.write_text(yaml.safe_dump(rules))
            proc.proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                if await status() == 403:
                    break
                await asyncio.sleep(0.1)
            assert await status() == 403
            # the file watcher alone picks up the next change (no signal)
            rules["agents"]["bot"]["grants"].append("contact.list")
            await asyncio.sleep(1.1)  # a different mtime
            proc.rules_path.write_text(yaml.safe_dump(rules))
            for _ in range(40):
                if await status() == 200:
                    break
                await asyncio.sleep(0.1)
            assert await status() == 200
    finally:
        assert proc.stop() == 0
