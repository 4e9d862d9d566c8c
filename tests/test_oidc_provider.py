"""Proof with a real OpenID Provider (issue 25): ``oidc-provider`` from npm (a certified implementation)
runs on loopback with a client-credentials client per agent, an authorization-code client for the
console and one for the agent's application.

* agents get tokens from it and call Tether; keys are rotated at the provider mid-traffic and Tether
  follows without a restart, losing no request;
* a reviewer signs in to the console in headless Chromium through the provider's login page and
  approves an item; a person without the reviewer group is refused; sign-out ends the session; the
  session cookie cannot be used cross-site without the CSRF token;
* a person's ID token from the provider is exchanged at /_tether/token for a delegation token that
  satisfies require_verified_user.

Needs Node.js and ``tests/oidc/node_modules`` (``.ci/run`` runs ``npm ci`` there); the browser test
also needs Playwright and Chromium. Each skips with the reason when its tool is absent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import jwt
import pytest
from aiohttp import web

from tests.chromium import launched_chromium
from tests.conftest import ROOT, base_rules
from tests.fakes import serve_app

OIDC_DIR = ROOT / "tests" / "oidc"
DELEGATION_SECRET = "delegation-secret-0123456789abcdef0123456789"


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Provider:
    """The node process running tests/oidc/server.mjs."""

    def __init__(self, proc: subprocess.Popen[str], issuer: str, log: Path) -> None:
        self.proc, self.issuer, self.log = proc, issuer, log

    async def client_token(self, session: aiohttp.ClientSession, client: str = "agent-bot") -> str:
        async with session.post(f"{self.issuer}/token", data={"grant_type": "client_credentials", "scope": "tether"},
                                headers={"Authorization": _basic(client, f"{client}-secret")}) as r:
            doc = await r.json()
            assert r.status == 200, doc
            return doc["access_token"]

    async def rotate(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.post(f"{self.issuer}/__rotate") as r:
            return await r.json()


class AppCallback:
    """The agent application's redirect endpoint: it receives the authorization code."""

    def __init__(self) -> None:
        self.codes: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.port = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> "AppCallback":
        async def cb(request: web.Request) -> web.Response:
            await self.codes.put(dict(request.query))
            return web.Response(text="signed in; you can close this page")

        app = web.Application()
        app.router.add_get("/cb", cb)
        self.runner, self.port = await serve_app(app)
        return self

    @property
    def redirect(self) -> str:
        return f"http://127.0.0.1:{self.port}/cb"


@pytest.fixture
async def app_cb() -> AsyncIterator[AppCallback]:
    cb = await AppCallback().start()
    yield cb
    assert cb.runner is not None
    await cb.runner.cleanup()


@pytest.fixture
def admin_port() -> int:
    return _free_port()


@pytest.fixture
async def provider(tmp_path: Path, app_cb: AppCallback, admin_port: int) -> AsyncIterator[Provider]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (apt-get install nodejs npm); the oidc-provider tests are skipped")
    if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
        pytest.skip("oidc-provider is not installed: run 'npm ci' in tests/oidc (.ci/run does)")
    log = tmp_path / "oidc-provider.log"
    env = {**os.environ, "CONSOLE_REDIRECT": f"http://127.0.0.1:{admin_port}/auth/callback",
           "APP_REDIRECT": app_cb.redirect, "AGENTS": "agent-bot,agent-other"}
    with open(log, "w") as err:
        proc = subprocess.Popen([node, "server.mjs"], cwd=OIDC_DIR, env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    if not line:
        proc.wait(5)
        raise RuntimeError(f"oidc-provider did not start: {log.read_text()}")
    p = Provider(proc, json.loads(line)["issuer"], log)
    yield p
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


def provider_rules(upstream: Any, tmp_path: Path, op: Provider, admin_port: int) -> dict[str, Any]:
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["admin_listen"] = f"127.0.0.1:{admin_port}"
    rules["identity"] = {
        "issuers": [
            {"issuer": op.issuer, "audience": "tether", "agent_claim": "client_id",
             "agents": {"agent-bot": "bot", "agent-other": "other-bot"}, "keys": {"unknown_kid_interval": 5}},
            {"issuer": op.issuer, "use": "user", "audience": "renewal-app", "user_claim": "sub"},
        ],
        "token_exchange": {"signing_secret": {"value": DELEGATION_SECRET}},
        "console": {"issuer": op.issuer, "client_id": "tether-console", "client_secret": {"value": "console-secret"},
                    "scopes": ["openid", "email", "groups"], "reviewer_claim": "groups", "reviewer_role": "reviewer"},
    }
    grants = rules["agents"]["bot"]["grants"]
    grants[grants.index({"capability": "contact.update", "mode": "live"})] = {"capability": "contact.update",
                                                                               "mode": "dry_run"}
    grants.append({"capability": "contact.delete", "mode": "live", "require_verified_user": True})
    return rules


async def test_agents_follow_a_key_rotation_at_the_provider(make_gateway, upstream, tmp_path, provider, admin_port):
    gw = await make_gateway(provider_rules(upstream, tmp_path, provider, admin_port))
    async with gw.session.get(f"{gw.url}/_tether/readyz") as r:
        assert r.status == 200, await r.text()
    s = gw.session
    old = {c: await provider.client_token(s, c) for c in ("agent-bot", "agent-other")}
    old_kid = jwt.get_unverified_header(old["agent-bot"])["kid"]
    statuses: list[tuple[str, int]] = []
    stop = asyncio.Event()

    async def agent(client: str, fresh: bool) -> None:
        while not stop.is_set():
            token = await provider.client_token(s, client) if fresh else old[client]
            path = "/echo" if client == "agent-bot" else "/api/contacts/1"
            async with s.get(f"{gw.upstream_url('crm')}{path}", headers={"Authorization": f"Bearer {token}"}) as r:
                statuses.append((client, r.status))
            await asyncio.sleep(0.01)

    upstream.put_record("contacts", {"id": "1", "name": "Ann"})
    tasks = [asyncio.ensure_future(agent(c, fresh)) for c in ("agent-bot", "agent-other") for fresh in (False, True)]
    await asyncio.sleep(0.5)
    rotated = await provider.rotate(s)
    assert rotated["kid"] != old_kid
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(statuses) > 20
    assert {st for _, st in statuses} == {200}, [x for x in statuses if x[1] != 200][:5]
    new = await provider.client_token(s, "agent-bot")
    assert jwt.get_unverified_header(new)["kid"] == rotated["kid"]  # the provider signs with the new key
    async with s.get(f"{gw.upstream_url('crm')}/echo", headers={"Authorization": f"Bearer {new}"}) as r:
        assert r.status == 200
    assert {r.headers["X-Tether-Agent"] for r in upstream.received} == {"bot", "other-bot"}


async def person_id_token(browser: Any, provider: Provider, app_cb: AppCallback, login: str) -> str:
    """The person signs in to the agent's application at the provider (in Chromium); the app gets the ID token."""
    from authlib.common.security import generate_token
    from authlib.oauth2.rfc7636 import create_s256_code_challenge

    verifier, state = generate_token(64), generate_token(20)
    url = (f"{provider.issuer}/auth?response_type=code&client_id=renewal-app&scope=openid%20email"
           f"&redirect_uri={app_cb.redirect}&state={state}&nonce=n-{state}"
           f"&code_challenge={create_s256_code_challenge(verifier)}&code_challenge_method=S256")
    page = await browser.new_page()
    try:
        await page.goto(url)
        await page.fill("input[name=login]", login)
        await page.fill("input[name=password]", "any")
        await page.click("button[type=submit]")
        got = await asyncio.wait_for(app_cb.codes.get(), 15)
    finally:
        await page.close()
    assert got["state"] == state
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{provider.issuer}/token", headers={"Authorization": _basic("renewal-app", "app-secret")},
                          data={"grant_type": "authorization_code", "code": got["code"], "code_verifier": verifier,
                                "redirect_uri": app_cb.redirect}) as r:
            doc = await r.json()
            assert r.status == 200, doc
            return doc["id_token"]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launched_chromium("browser sign-in tests") as b:
        yield b


async def test_reviewer_signs_in_with_the_provider_and_approves(make_gateway, upstream, tmp_path, provider, admin_port,
                                                               browser):
    gw = await make_gateway(provider_rules(upstream, tmp_path, provider, admin_port))
    assert gw.gw.admin_port == admin_port
    upstream.put_record("contacts", {"id": "5", "name": "Ann Lee"})
    token = await provider.client_token(gw.session)
    async with gw.session.patch(f"{gw.upstream_url('crm')}/api/contacts/5", json={"name": "Ann B. Lee"},
                                headers={"Authorization": f"Bearer {token}", "X-Tether-Intent": "fix the name"}) as r:
        item = r.headers["X-Tether-Dry-Run"]

    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(15_000)
    try:
        # someone without the reviewer group is told so, and gets no session
        await page.goto(f"{gw.admin_url}/console/")
        await page.click("#idp-signin-link")
        await page.fill("input[name=login]", "sam")
        await page.fill("input[name=password]", "any")
        await page.click("button[type=submit]")
        await page.wait_for_selector("#signin-failure")
        assert "not a reviewer" in await page.inner_text("#signin-failure")
        assert not [c for c in await context.cookies() if c["name"] == "tether_session"]
        await context.clear_cookies()  # the provider remembers sam; start a new browser session

        # rita is a reviewer: through the provider's login page and back, signed in without pasting anything
        await page.goto(f"{gw.admin_url}/console/")
        await page.click("#idp-signin-link")
        await page.fill("input[name=login]", "rita")
        await page.fill("input[name=password]", "any")
        await page.click("button[type=submit]")
        await page.wait_for_selector("#nav:not([hidden])")
        assert await page.inner_text("#who-name") == "rita@acme.example"
        cookie = [c for c in await context.cookies() if c["name"] == "tether_session"][0]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        assert "domain" not in cookie or cookie["domain"] in ("127.0.0.1", "")

        await page.goto(f"{gw.admin_url}/console/#/queue/{item}")
        await page.wait_for_selector(f'a.item-link[data-id="{item}"][aria-current="true"]')
        # "a" approves the item shown in the detail pane: wait for it, not only for the list's selection
        await page.wait_for_selector(".detail-pane button.primary:has-text('Approve')")
        await page.keyboard.press("a")
        await page.wait_for_selector("#action-dialog[open]")
        await page.click("#action-submit")
        await page.wait_for_selector(".decision .badge.state-replayed")
        assert "PATCH" in [r.method for r in upstream.received if r.path == "/api/contacts/5"]  # replayed
        rows = [r for r in await gw.journal() if r.get("review_item") == item and r.get("reviewer")]
        assert rows and {r["reviewer"] for r in rows} == {"rita@acme.example"}
        assert any(r.get("event") == "console_sign_in" and r.get("reviewer") == "rita@acme.example"
                   for r in await gw.journal())

        # the session cookie alone does not change anything: the console's CSRF token is needed
        jar = {"tether_session": cookie["value"]}
        async with aiohttp.ClientSession(cookies=jar) as s:
            async with s.get(f"{gw.admin_url}/api/review/items") as r:
                assert r.status == 200
            async with s.post(f"{gw.admin_url}/api/review/items/{item}/reject", json={"reason": "x"}) as r:
                assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
            async with s.get(f"{gw.admin_url}/auth/session") as r:
                csrf = (await r.json())["csrf"]
            async with s.post(f"{gw.admin_url}/api/review/items/{item}/reject", json={"reason": "x"},
                              headers={"X-Tether-CSRF": csrf, "Origin": "http://127.0.0.1:1"}) as r:
                assert r.status == 403  # another origin, even of the same host

        # sign out: the cookie is cleared and that session is refused from then on
        await page.click("#sign-out")
        await page.wait_for_selector("#signin:not([hidden])")
        for _ in range(50):
            if not [c for c in await context.cookies() if c["name"] == "tether_session"]:
                break
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession(cookies=jar) as s:
            async with s.get(f"{gw.admin_url}/api/review/items") as r:
                assert r.status == 401
    finally:
        await context.close()


async def test_person_token_from_the_provider_is_exchanged(make_gateway, upstream, tmp_path, provider, admin_port,
                                                           app_cb, browser):
    gw = await make_gateway(provider_rules(upstream, tmp_path, provider, admin_port))
    id_token = await person_id_token(browser, provider, app_cb, "jane")
    agent = await provider.client_token(gw.session)
    # without a verified person the delete is refused
    async with gw.session.delete(f"{gw.upstream_url('crm')}/api/contacts/3",
                                 headers={"Authorization": f"Bearer {agent}", "X-Tether-Intent": "dedupe"}) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "verified_user_required"
    async with gw.session.post(f"{gw.url}/_tether/token", data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": id_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token", "actor_token": agent,
            "actor_token_type": "urn:ietf:params:oauth:token-type:access_token"}) as r:
        doc = await r.json()
        assert r.status == 200, doc
    upstream.put_record("contacts", {"id": "3", "name": "dup"})
    async with gw.session.delete(f"{gw.upstream_url('crm')}/api/contacts/3",
                                 headers={"Authorization": f"Bearer {doc['access_token']}",
                                          "X-Tether-Intent": "dedupe"}) as r:
        assert r.status in (200, 204), await r.text()
        rid = r.headers["X-Tether-Request-Id"]
    assert upstream.received[-1].headers["X-Tether-On-Behalf-Of"] == "jane"
    rec = [x for x in await gw.journal() if x.get("request_id") == rid][0]
    assert rec["agent"] == "bot" and rec["on_behalf_of"] == "jane" and rec["on_behalf_of_proof"] == "verified"
    # the same ID token sent alongside works too (no exchange)
    async with gw.session.get(f"{gw.url}/_tether/whoami", headers={"Authorization": f"Bearer {agent}",
                                                                   "X-Tether-User-Token": id_token}) as r:
        who = await r.json()
        assert (who["agent"], who["on_behalf_of"], who["on_behalf_of_proof"]) == ("bot", "jane", "verified")
