"""The reviewer web console (issue 12), driven in headless Chromium against a real gateway and fake upstream.

The gateway and the fake upstream run on the pytest event loop, so the browser is driven with
Playwright's *async* API. Screenshots of every screen are written to ``test-artifacts/console/``.
The browser tests skip with a reason when Playwright or Chromium is missing; the static-file tests
always run.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from proxy.doors.admin.console_routes import CONSOLE_DIR
from tests.chromium import chromium_path, launched_chromium
from tests.conftest import ROOT, base_rules

SHOTS = ROOT / "test-artifacts" / "console"
TIMEOUT_MS = 10_000


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with launched_chromium("browser tests") as b:
        yield b


class Console:
    """Gateways and browser pages of one test; closes the pages before the gateways stop."""

    def __init__(self, make_gateway: Any, browser: Any) -> None:
        self.make_gateway = make_gateway
        self.browser = browser
        self.gateways: list[Any] = []
        self.pages: list[Any] = []

    async def gateway(self, rules: dict[str, Any]) -> Any:
        gw = await self.make_gateway(rules)
        self.gateways.append(gw)
        return gw

    async def page(self, url: str) -> Any:
        page = await self.browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.js_errors = errors  # checked at the end of each test
        self.pages.append(page)
        await page.goto(url)
        return page

    async def close(self) -> None:
        for page in self.pages:
            await page.close()
        await asyncio.sleep(0.1)  # let the server see the connections close (stop() wakes event streams)


@pytest.fixture
async def console(make_gateway: Any, browser: Any) -> AsyncIterator[Console]:
    c = Console(make_gateway, browser)
    yield c
    await c.close()


async def sign_in(page: Any, token: str) -> None:
    await page.fill("#token-input", token)
    await page.click("#signin-form button[type=submit]")
    await page.wait_for_selector("#nav:not([hidden])")


async def unlabelled(page: Any) -> list[str]:
    """Visible form controls and buttons with no accessible name (a label, aria-label or text)."""
    return await page.evaluate("""() => Array.from(document.querySelectorAll('input, select, textarea, button'))
        .filter(e => e.getClientRects().length > 0)
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !(e.tagName === 'BUTTON' && e.textContent.trim()))
        .map(e => e.outerHTML.slice(0, 100))""")


async def shot(page: Any, name: str, full: bool = True) -> None:
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full)


def dry_rules(upstream: Any, tmp_path: Path) -> dict[str, Any]:
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    caps = rules["capabilities"]
    caps["contact.update"]["body"] = {"allow_fields": ["name", "stage"],
                                      "constraints": {"stage": {"enum": ["open", "won"]}}}
    caps["account.update"] = {"upstream": "crm", "method": "PATCH", "path": "/api/accounts/{id}"}
    rules["agents"]["bot"]["grants"] = ["contact.read", "contact.create",
                                        {"capability": "contact.update", "mode": "dry_run"},
                                        "contact.delete", {"capability": "account.update", "mode": "live"}]
    rules["agents"]["renewal-bot"] = {"grants": ["contact.read", {"capability": "contact.update", "mode": "dry_run"}]}
    rules["server"]["transactions"] = {"retry_attempts": 2, "retry_backoff": 0.01, "sweep_interval": 30}
    return rules


# ---------------------------------------------------------------------------------------------- static files


async def test_console_is_served_locally_with_a_strict_policy(make_gateway, upstream, tmp_path):
    gw = await make_gateway(dry_rules(upstream, tmp_path))
    async with gw.session.get(f"{gw.admin_url}/", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/console/"
    async with gw.session.get(f"{gw.admin_url}/console", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/console/"
    async with gw.session.get(f"{gw.admin_url}/console/") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        html = await r.text()
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        assert f'"{name}"' in html
        async with gw.session.get(f"{gw.admin_url}/console/{name}") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith(ctype)
    for bad in ("/console/nope.js", "/console/..%2fadmin.py", "/console/%2e%2e/console_routes.py",
                "/console/.hidden.js", "/console/sub/app.js"):
        async with gw.session.get(f"{gw.admin_url}{bad}") as r:
            assert r.status == 404, bad
    # everything the page loads comes from this listener: no other host is named anywhere
    for f in CONSOLE_DIR.iterdir():
        text = f.read_text()
        assert not re.search(r"(?i)\b(src|href|url)\s*[=(]\s*['\"]?\s*(https?:)?//", text), f.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, f.name
    # the console is static; the data behind it still needs a reviewer token
    async with gw.session.get(f"{gw.admin_url}/api/review/items") as r:
        assert r.status == 401


# ---------------------------------------------------------------------------------------------- in the browser


async def test_sign_in_explains_refusals_and_keeps_the_token_in_the_tab(console, upstream, tmp_path):
    gw = await console.gateway(dry_rules(upstream, tmp_path))
    page = await console.page(f"{gw.admin_url}/")
    assert page.url.endswith("/console/")
    await page.wait_for_selector("#signin:not([hidden])")
    assert await page.evaluate("document.activeElement.id") == "token-input"
    # an agent's token: valid, but not a reviewer
    await page.fill("#token-input", gw.token("bot"))
    await page.click("#signin-form button[type=submit]")
    await page.wait_for_selector("#signin-error:has-text('reviewer_required')")
    assert await page.get_attribute("#token-input", "aria-invalid") == "true"
    await shot(page, "signin-refused", full=False)
    # garbage
    await page.fill("#token-input", "not-a-token")
    await page.click("#signin-form button[type=submit]")
    await page.wait_for_selector("#signin-error:has-text('401')")
    assert await page.evaluate("sessionStorage.length") == 0
    # a reviewer
    token = gw.reviewer_token("rita")
    await sign_in(page, "Bearer " + token)  # pasted with its scheme is fine too
    assert await page.text_content("#who-name") == "rita"
    assert await page.evaluate("sessionStorage.getItem('tether.reviewerToken')") == token
    await page.wait_for_selector("#live-state.live")  # the event stream is connected, with the header
    await page.reload()
    await page.wait_for_selector("#nav:not([hidden])")  # still signed in in this tab
    await page.click("#sign-out")
    await page.wait_for_selector("#signin:not([hidden])")
    assert await page.evaluate("sessionStorage.length") == 0
    assert page.js_errors == []


async def test_review_queue_approve_edit_and_reject_in_the_page(console, upstream, tmp_path):
    gw = await console.gateway(dry_rules(upstream, tmp_path))
    upstream.put_record("contacts", {"id": "5", "name": "Ann Lee", "stage": "open", "email": "ann@acme.example"})
    page = await console.page(f"{gw.admin_url}/console/")
    await sign_in(page, gw.reviewer_token("rita"))
    await page.wait_for_selector("#live-state.live")
    await page.wait_for_selector(".list-pane .empty")

    # dry-run writes made while the page is open appear without a reload
    hostile = 'close the Acme renewal <img src=x onerror="window.__xss=1">'
    r = await gw.request("PATCH", "/api/contacts/5", json={"stage": "won", "name": "Ann Lee"},
                         on_behalf_of="ae:jane@acme", intent=hostile)
    upd = r.headers["X-Tether-Dry-Run"]
    await page.wait_for_selector(f'a.item-link[data-id="{upd}"]')
    await page.wait_for_function("() => document.getElementById('announcer').textContent.includes('new item')")
    r = await gw.request("POST", "/api/contacts", json={"name": "Bo Chen", "stage": "open"},
                         on_behalf_of="ae:jane@acme", intent="add Bo from the discovery call")
    new = r.headers["X-Tether-Dry-Run"]
    r = await gw.request("DELETE", "/api/contacts/5", intent="remove a duplicate of Ann")
    dele = r.headers["X-Tether-Dry-Run"]
    await page.wait_for_selector(f'a.item-link[data-id="{dele}"]')
    ids = await page.eval_on_selector_all("a.item-link", "els => els.map(e => e.dataset.id)")
    assert ids == [dele, new, upd]  # newest first
    await page.wait_for_function("() => document.getElementById('queue-count').textContent === '3'")

    # filter by agent and capability
    await page.select_option("select[name=capability]", "contact.create")
    await page.wait_for_function("() => document.querySelectorAll('a.item-link').length === 1")
    await page.select_option("select[name=capability]", "")
    await page.wait_for_function("() => document.querySelectorAll('a.item-link').length === 3")
    await page.evaluate("() => document.activeElement.blur()")  # shortcuts are off while a field has focus

    # j/k move through the list; the update shows its diff against the live record
    await page.keyboard.press("j")
    await page.wait_for_selector(f'a.item-link[data-id="{dele}"][aria-current="true"]')
    await page.keyboard.press("j")
    await page.keyboard.press("j")  # quick presses each move one item
    await page.wait_for_selector(f'a.item-link[data-id="{upd}"][aria-current="true"]')
    await page.keyboard.press("k")
    await page.wait_for_selector(f'a.item-link[data-id="{new}"][aria-current="true"]')
    assert await page.evaluate("() => document.activeElement.dataset.id") == new
    assert page.url.endswith(f"#/queue/{new}")
    await page.keyboard.press("j")
    await page.wait_for_selector(f'a.item-link[data-id="{upd}"][aria-current="true"]')
    await page.wait_for_selector("table.diff")
    row = await page.inner_text("table.diff tr.changed")
    assert "stage" in row and "open" in row and "won" in row
    assert "changes" in row
    same = await page.inner_text("table.diff tbody tr:not(.changed)")
    assert "name" in same and "same" in same
    detail = await page.inner_text(".detail-pane")
    assert hostile in detail  # shown as text, never as markup
    # the headline, first in the item and in the list
    headline = await page.inner_text("#item-headline")
    assert headline.startswith("bot, for jane@acme (AE), wants to change contact 'Ann Lee': stage open → won")
    assert "because: close the Acme renewal" in headline
    assert "wants to change contact" in await page.inner_text(f'a.item-link[data-id="{upd}"] .item-headline')
    assert "ae:jane@acme" in detail and "PATCH" in detail and "/api/contacts/5" in detail
    assert '"stage": "won"' in detail  # the request body, pretty-printed
    assert "Synthetic response the agent got" in detail and "Status 200" in detail
    await page.wait_for_selector("#ev-h + .evidence, .evidence")
    assert "Reviewed" in await page.inner_text(".evidence")
    assert await page.evaluate("window.__xss") is None
    assert await page.locator(".detail-pane img").count() == 0
    await shot(page, "queue", full=False)
    await shot(page, "item-detail")

    # e: edit, then approve; a broken rule is named with its field and nothing is sent
    await page.keyboard.press("e")
    await page.wait_for_selector("form.editor input[name=stage]")
    assert await page.evaluate("document.activeElement.name") == "stage"
    await page.fill("form.editor input[name=stage]", "lost")
    await page.click("form.editor button[type=submit]")
    err = page.locator(".edit-error .error-box")
    await err.wait_for()
    text = await err.inner_text()
    assert "constraint violated" in text and "stage" in text
    assert await page.get_attribute("form.editor input[name=stage]", "aria-invalid") == "true"
    assert upstream.seen("PATCH") == []
    assert await unlabelled(page) == []
    await shot(page, "item-edit-refused")
    await page.fill("form.editor input[name=stage]", "won")
    await page.fill("form.editor input[name=name]", "Ann Lee-Smith")
    await page.click("form.editor button[type=submit]")
    await page.wait_for_selector("#flash:has-text('replayed with your edits; the upstream answered 200')")
    sent = upstream.seen("PATCH")
    assert len(sent) == 1 and sent[0].json() == {"stage": "won", "name": "Ann Lee-Smith"}
    assert sent[0].headers["X-Tether-Reviewer"] == "rita"
    assert upstream.records["contacts"]["5"]["name"] == "Ann Lee-Smith"
    await page.wait_for_function("id => !document.querySelector(`a.item-link[data-id='${id}']`)", arg=upd)
    # the console moved on to the next pending item by itself
    await page.wait_for_selector(f'a.item-link[data-id="{new}"][aria-current="true"]')
    await page.wait_for_selector("#item-title:has-text('contact.create')")
    assert page.url.endswith(f"#/queue/{new}")

    # a: approve the create (after a confirmation)
    await page.click(f'a.item-link[data-id="{new}"]')
    await page.wait_for_selector("#item-title:has-text('contact.create')")
    await page.focus(f'a.item-link[data-id="{new}"]')
    await page.keyboard.press("a")
    await page.wait_for_selector("#action-dialog[open]")
    await page.fill("#action-dialog input[name=note]", "checked with Jane")
    await page.click("#action-submit")
    await page.wait_for_selector("#flash:has-text('replayed as sent; the upstream answered 201')")
    assert [x.json() for x in upstream.seen("POST")] == [{"name": "Bo Chen", "stage": "open"}]

    # r: reject the delete; a reason is required
    await page.click(f'a.item-link[data-id="{dele}"]')
    await page.wait_for_selector("#item-title:has-text('contact.delete')")
    await page.focus(f'a.item-link[data-id="{dele}"]')
    await page.keyboard.press("r")
    await page.wait_for_selector("#action-dialog[open]")
    await page.click("#action-submit")
    await page.wait_for_selector("#action-error:has-text('needs a reason')")
    assert await unlabelled(page) == []
    await page.fill("#action-dialog textarea[name=reason]", "not a duplicate: Ann has two roles")
    await page.click("#action-submit")
    await page.wait_for_selector("#flash:has-text('Rejected')")
    assert upstream.seen("DELETE") == []
    item = await (await gw.admin("GET", f"/api/review/items/{dele}")).json()
    assert item["state"] == "rejected" and item["decision"]["reason"] == "not a duplicate: Ann has two roles"
    assert item["decision"]["by"] == "rita"
    recs = await gw.journal()
    assert any(x["kind"] == "review" and x["decision"] == "rejected" and x["review_item"] == dele
               and x["reason"] == "not a duplicate: Ann has two roles" for x in recs)
    approved = await (await gw.admin("GET", f"/api/review/items/{new}")).json()
    assert approved["state"] == "replayed" and approved["decision"]["note"] == "checked with Jane"
    await page.wait_for_selector(".list-pane .empty")
    await page.wait_for_function("() => document.getElementById('queue-count').textContent === ''")

    # ? opens the help
    await page.keyboard.press("?")
    await page.wait_for_selector("#help-dialog[open]")
    await page.keyboard.press("Escape")
    assert page.js_errors == []


async def test_journal_transactions_and_agents_screens(console, upstream, tmp_path):
    gw = await console.gateway(dry_rules(upstream, tmp_path))
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    r = await gw.request("POST", "/api/contacts", json={"name": "Dup"}, on_behalf_of="ae:jane@acme",
                         intent="add the duplicate contact")
    item = r.headers["X-Tether-Dry-Run"]
    await gw.admin("POST", f"/api/review/items/{item}/reject", json={"reason": "already in the CRM"})
    await gw.request("GET", "/api/nope", intent="probe")
    h = {"X-Tether-Transaction": "renewal-acme"}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h, intent="upgrade Acme to gold")
    upstream.fail("PATCH", "/api/accounts/a1", status=500, times=100)
    async with gw.session.post(f"{gw.url}/_tether/transactions/renewal-acme/rollback", headers=gw.headers()) as resp:
        assert (await resp.json())["state"] == "needs_attention"
    await gw.admin("POST", "/api/agents/renewal-bot/quarantine", json={"reason": "wrote to the wrong accounts"})

    page = await console.page(f"{gw.admin_url}/console/#/journal")
    await sign_in(page, gw.reviewer_token("rita"))

    # journal: chain status, search, a record in its full context
    await page.wait_for_selector(".chain.ok:has-text('Chain intact')")
    await page.wait_for_selector("table.journal")
    assert await unlabelled(page) == []
    await shot(page, "journal")
    await page.fill("input[name=q]", "duplicate contact")
    await page.press("input[name=q]", "Enter")
    # the agent's request and the reviewer's rejection both carry the intent
    await page.wait_for_function("() => document.querySelectorAll('table.journal tbody tr').length === 2")
    kinds = await page.eval_on_selector_all("table.journal tbody tr td:nth-child(3)",
                                            "tds => tds.map(t => t.textContent)")
    assert kinds == ["review", "request"]
    await page.click("table.journal tbody tr:last-child a")
    await page.wait_for_selector("#rec-h")
    ctx = await page.inner_text("#screen")
    assert "add the duplicate contact" in ctx and "ae:jane@acme" in ctx and "dry run" in ctx
    assert "Review item" in ctx and "rejected" in ctx and "already in the CRM" in ctx and "rita" in ctx
    await shot(page, "journal-record")
    await page.click("text=Back to the journal")
    await page.fill("input[name=q]", "")
    await page.select_option("select[name=decision]", "denied")
    await page.press("input[name=q]", "Enter")
    await page.wait_for_function("() => document.querySelectorAll('table.journal tbody tr').length === 1")
    assert "route_not_registered" in await page.inner_text("table.journal tbody")
    await page.click("text=Clear")
    await page.wait_for_function("() => document.querySelectorAll('table.journal tbody tr').length > 5")
    # new records arrive live
    top = await page.eval_on_selector("table.journal tbody tr a", "a => a.textContent")
    await gw.request("GET", "/api/nope-again", intent="live probe")
    await page.wait_for_function("top => document.querySelector('table.journal tbody tr a').textContent !== top",
                                 arg=top)
    assert "live probe" in await page.inner_text("table.journal tbody tr:first-child")

    # transactions: the stuck one with its steps; retry the rollback once the upstream is back
    await page.click("#nav a[data-screen=transactions]")
    await page.wait_for_selector('a.item-link[data-id="renewal-acme"]')
    await page.click('a.item-link[data-id="renewal-acme"]')
    await page.wait_for_selector(".tx-detail ol.steps")
    steps = await page.inner_text(".tx-detail ol.steps")
    assert "account.update" in steps and "failed" in steps and "PATCH /api/accounts/a1" in steps
    assert await unlabelled(page) == []
    await shot(page, "transactions")
    upstream.failures.clear()
    await page.click("text=Retry the rollback…")
    await page.wait_for_selector("#action-dialog[open]")
    await page.click("#action-submit")
    await page.wait_for_selector("#flash:has-text('rolled back')")
    await page.wait_for_selector("#tx-title .badge.state-rolled_back")
    tx = await (await gw.admin("GET", "/api/transactions/renewal-acme")).json()
    assert tx["state"] == "rolled_back"
    assert upstream.records["accounts"]["a1"]["tier"] == "silver"

    # agents: SLIs, budget, grant modes and evidence; release the quarantined one
    await page.keyboard.press("4")
    await page.wait_for_selector("#agent-renewal-bot-h")
    card = await page.inner_text("section.card.quarantined")
    assert "renewal-bot" in card and "wrote to the wrong accounts" in card
    bot = await page.inner_text("section[aria-labelledby=agent-bot-h]")
    assert "Error budget left" in bot and "contact.create" in bot and "dry run" in bot and "1 reviewed" in bot
    assert await unlabelled(page) == []
    await shot(page, "agents")
    await page.click("#agent-renewal-bot-release")
    await page.wait_for_selector("#action-dialog[open]")
    await page.fill("#action-dialog textarea[name=reason]", "fixed the account mapping")
    await page.click("#action-submit")
    await page.wait_for_selector("#flash:has-text('released')")
    await page.wait_for_function("() => !document.querySelector('section.card.quarantined')")
    agents = (await (await gw.admin("GET", "/api/agents")).json())["agents"]
    assert [a["quarantined"] for a in agents if a["agent"] == "renewal-bot"] == [None]
    assert page.js_errors == []


async def test_without_the_event_stream_the_console_polls(console, upstream, tmp_path):
    """A proxy that buffers or drops the streamed /api/events must not leave the queue stale."""
    gw = await console.gateway(dry_rules(upstream, tmp_path))
    page = await console.browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console.pages.append(page)
    await page.route("**/api/events", lambda route: route.abort())
    await page.goto(f"{gw.admin_url}/console/")
    await sign_in(page, gw.reviewer_token())
    await page.wait_for_selector("#live-state.polling")
    await page.wait_for_selector(".list-pane .empty")
    r = await gw.request("POST", "/api/contacts", json={"name": "Cy"}, intent="add Cy")
    await page.wait_for_selector(f'a.item-link[data-id="{r.headers["X-Tether-Dry-Run"]}"]', timeout=8000)


# ---------------------------------------------------------------------------------------------- issue 26


async def no_sideways_scroll(page: Any) -> None:
    width = await page.evaluate("() => document.documentElement.clientWidth")
    scroll = await page.evaluate("() => document.documentElement.scrollWidth")
    assert scroll <= width, f"the page scrolls sideways: {scroll}px of content in {width}px"


async def test_phone_layout_at_390px(console, upstream, tmp_path):
    """On a phone an item opens full screen (and goes back), tables become cards, nothing scrolls sideways."""
    gw = await console.gateway(dry_rules(upstream, tmp_path))
    upstream.put_record("contacts", {"id": "5", "name": "Ann Lee", "stage": "open"})
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    r = await gw.request("PATCH", "/api/contacts/5", json={"stage": "won"}, on_behalf_of="ae:jane@acme.example",
                         intent="close the Acme renewal before the end of the quarter, as agreed with procurement")
    first = r.headers["X-Tether-Dry-Run"]
    r = await gw.request("POST", "/api/contacts", json={"name": "Bo Chen", "stage": "open"}, intent="add Bo")
    second = r.headers["X-Tether-Dry-Run"]
    h = {"X-Tether-Transaction": "renewal-acme-with-a-rather-long-transaction-name"}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h, intent="upgrade Acme")
    async with gw.session.post(f"{gw.url}/_tether/transactions/{h['X-Tether-Transaction']}/rollback",
                               headers=gw.headers()) as resp:
        assert (await resp.json())["state"] == "rolled_back"

    page = await console.browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.js_errors = []
    page.on("pageerror", lambda e: page.js_errors.append(str(e)))
    console.pages.append(page)
    await page.goto(f"{gw.admin_url}/console/")
    await sign_in(page, gw.reviewer_token("rita"))
    await page.wait_for_selector(f'a.item-link[data-id="{first}"]')
    assert not await page.is_visible(".detail-pane")  # the list has the screen
    await no_sideways_scroll(page)
    await shot(page, "phone-queue", full=False)

    await page.tap(f'a.item-link[data-id="{first}"]')
    await page.wait_for_selector("#item-headline")
    assert await page.is_visible(".detail-pane") and not await page.is_visible(".list-pane")
    assert "wants to change contact 'Ann Lee': stage open → won" in await page.inner_text("#item-headline")
    await page.wait_for_selector("table.diff")
    await no_sideways_scroll(page)
    await shot(page, "phone-item")
    # decide from the phone: it moves on to the next item, still full screen
    await page.tap("button.primary:has-text('Approve')")
    await page.wait_for_selector("#action-dialog[open]")
    await page.tap("#action-submit")
    await page.wait_for_selector("#flash:has-text('replayed as sent')")
    await page.wait_for_selector(f"#item-headline:has-text('create contact')")
    assert page.url.endswith(f"#/queue/{second}")
    await page.tap("a.back-link")
    await page.wait_for_selector(".list-pane", state="visible")
    assert not await page.is_visible(".detail-pane")

    # the journal is cards: no header row, one card per record, each cell labelled
    await page.goto(f"{gw.admin_url}/console/#/journal")
    await page.wait_for_selector("table.journal tbody tr")
    assert await page.eval_on_selector("table.journal thead", "e => getComputedStyle(e).display") == "none"
    assert await page.eval_on_selector("table.journal tbody tr", "e => getComputedStyle(e).display") == "block"
    assert await page.eval_on_selector("table.journal tbody td:nth-child(4)", "e => e.dataset.label") == "Agent"
    await no_sideways_scroll(page)
    await shot(page, "phone-journal", full=False)

    # a transaction's steps are cards in words, the raw JSON tucked away
    await page.goto(f"{gw.admin_url}/console/#/transactions/{h['X-Tether-Transaction']}")
    await page.wait_for_selector(".tx-detail ol.steps li.step")
    steps = await page.inner_text(".tx-detail ol.steps")
    assert "Undo:" in steps and "tier → silver" in steps
    assert not await page.is_visible(".tx-detail details pre")
    await no_sideways_scroll(page)
    await shot(page, "phone-transaction")

    await page.goto(f"{gw.admin_url}/console/#/agents")
    await page.wait_for_selector("figure.chart svg")
    await no_sideways_scroll(page)
    await shot(page, "phone-agents", full=False)
    assert page.js_errors == []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_offline_says_so_and_catches_up(console, upstream, tmp_path):
    """The gateway goes down: the console says "offline — retrying", and catches up when it is back."""
    rules = dry_rules(upstream, tmp_path)
    rules["server"]["admin_listen"] = f"127.0.0.1:{free_port()}"
    gw = await console.gateway(rules)
    page = await console.page(f"{gw.admin_url}/console/")
    await sign_in(page, gw.reviewer_token())
    await page.wait_for_selector("#live-state.live")
    await page.wait_for_selector(".list-pane .empty")

    await gw.gw.stop(grace=0.5)
    await page.wait_for_selector("#live-state.offline:has-text('offline — retrying')", timeout=30_000)
    assert "polling" not in await page.inner_text("#live-state")
    await shot(page, "offline", full=False)

    gw2 = await console.gateway(rules)  # back, on the same admin port and store
    assert gw2.admin_url == gw.admin_url
    r = await gw2.request("POST", "/api/contacts", json={"name": "Cy"}, intent="add Cy while you were away")
    await page.wait_for_selector(f'a.item-link[data-id="{r.headers["X-Tether-Dry-Run"]}"]', timeout=30_000)
    await page.wait_for_selector("#live-state.live", timeout=30_000)
    assert page.js_errors == []


async def test_charts_are_drawn_from_the_store(console, upstream, tmp_path):
    rules = dry_rules(upstream, tmp_path)
    rules["governance"] = {"error_budget": {"window": "1h", "max_bad_ratio": 0.2, "min_requests": 100}}
    gw = await console.gateway(rules)
    upstream.put_record("contacts", {"id": "5", "name": "Ann", "stage": "open"})
    for _ in range(4):
        await gw.request("GET", "/api/contacts/5")
    for _ in range(3):
        await gw.request("GET", "/api/not-registered")  # denials: bad outcomes
    items = [(await gw.request("POST", "/api/contacts", json={"name": n}, intent="add")).headers["X-Tether-Dry-Run"]
             for n in ("A", "B", "C")]
    await gw.admin("POST", f"/api/review/items/{items[0]}/approve", json={})
    await gw.admin("POST", f"/api/review/items/{items[1]}/approve", json={})
    await gw.admin("POST", f"/api/review/items/{items[2]}/reject", json={"reason": "no"})
    await gw.admin("POST", "/api/agents/renewal-bot/quarantine", json={"reason": "test"})
    recs = await gw.journal()
    bot_requests = len([r for r in recs if r["kind"] == "request" and r["agent"] == "bot"])
    crm_requests = len([r for r in recs if r["kind"] == "request" and r.get("upstream") == "crm"
                        and r["decision"] != "replay"])

    page = await console.page(f"{gw.admin_url}/console/#/agents")
    await sign_in(page, gw.reviewer_token())
    card = "section[aria-labelledby=agent-bot-h]"
    await page.wait_for_selector(f"{card} figure.chart[data-chart=requests] svg rect")
    desc = await page.text_content(f"{card} figure.chart[data-chart=requests] desc")
    assert desc.startswith(f"{bot_requests} requests over the last 24 hours")
    bars = await page.eval_on_selector_all(f"{card} figure.chart[data-chart=requests] rect title",
                                           "ts => ts.map(t => t.textContent)")
    assert sum(int(t.split(": ")[1].split(" ")[0]) for t in bars) == bot_requests
    bad = f"{card} figure.chart[data-chart=bad]"
    assert "budget 20%" in await page.text_content(f"{bad} svg")
    # bad outcomes: the three denials and the rejected review, against all its requests
    assert (await page.text_content(f"{bad} desc")).startswith(f"4 bad outcomes of {bot_requests} requests")
    assert await page.locator(f"{bad} line.threshold").count() == 1
    approval = f"{card} figure.chart[data-chart=approval]"
    assert (await page.text_content(f"{approval} desc")).startswith("2 approved, 1 rejected (67% approved)")
    assert "gate 95%" in await page.text_content(f"{approval} svg")
    assert await page.locator(f"{approval} polyline.rate, {approval} circle.rate").count() >= 1
    # a quarantine is marked on the agent's charts
    q = "section[aria-labelledby=agent-renewal-bot-h] figure.chart[data-chart=requests]"
    assert await page.locator(f"{q} g.marker.quarantined").count() == 1
    # upstreams: traffic from the journal; quota said to be untracked, until a tracker reports it
    up = "section[data-upstream=crm]"
    assert (await page.text_content(f"{up} figure.chart[data-chart=traffic] desc")).startswith(f"{crm_requests} requests")
    assert "Not reported" in await page.inner_text(f"{up} figure[data-chart=quota]")
    await shot(page, "agents-charts")
    # the upstream says how much quota is left (IETF/X-RateLimit headers): the quota guard records it
    upstream.response_headers = {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": "420"}
    assert (await gw.request("GET", "/api/contacts/1")).status in (200, 404)
    upstream.response_headers = {}
    await page.select_option("select[name=range]", "7d")
    await page.wait_for_selector(f"{up} figure.chart[data-chart=quota] svg")
    assert "now 420 of 1000" in await page.text_content(f"{up} figure.chart[data-chart=quota] desc")
    assert "over the last 7 days" in await page.text_content(f"{card} figure.chart[data-chart=requests] desc")
    assert page.js_errors == []


async def test_partial_names_tampered_records_and_recent_rollbacks(console, upstream, tmp_path):
    from tests.conftest import store_sql

    rules = dry_rules(upstream, tmp_path)
    gw = await console.gateway(rules)
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    await gw.request("GET", "/api/contacts/5", on_behalf_of="ae:jane@acme.example", intent="look up Ann")
    h = {"X-Tether-Transaction": "demo-renewal"}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h, intent="upgrade Acme")
    async with gw.session.post(f"{gw.url}/_tether/transactions/demo-renewal/rollback", headers=gw.headers()) as resp:
        assert (await resp.json())["state"] == "rolled_back"
    recs = await gw.journal()
    target = next(r["seq"] for r in recs if r.get("intent") == "look up Ann")

    page = await console.page(f"{gw.admin_url}/console/#/journal")
    await sign_in(page, gw.reviewer_token())
    await page.wait_for_selector("table.journal tbody tr")
    await page.fill("input[name=user]", "jane")  # a part of ae:jane@acme.example
    await page.press("input[name=user]", "Enter")
    await page.wait_for_function("() => document.querySelectorAll('table.journal tbody tr').length >= 1 && "
                                 "[...document.querySelectorAll('table.journal tbody tr')].every(tr => "
                                 "tr.textContent.includes('ae:jane@acme.example'))")

    # someone with the database rewrites the record: its own page says so
    store_sql(str(tmp_path / "t.db"), f"UPDATE journal SET record = replace(record, 'look up Ann', 'look up Bob') "
                                      f"WHERE seq = {target}")
    await page.goto(f"{gw.admin_url}/console/#/journal/{target}")
    await page.wait_for_selector(".tamper[role=alert]")
    assert "altered" in await page.inner_text(".tamper")
    await shot(page, "journal-record-tampered", full=False)
    await page.goto(f"{gw.admin_url}/console/#/journal/{target - 1}")
    await page.wait_for_selector("#rec-h")
    assert await page.locator(".tamper").count() == 0

    # the transactions page opens on recent activity, rollbacks included
    await page.goto(f"{gw.admin_url}/console/#/transactions")
    await page.wait_for_selector('a.item-link[data-id="demo-renewal"]')
    assert "rolled back" in await page.inner_text('a.item-link[data-id="demo-renewal"]')
    assert page.js_errors == []


async def test_agent_text_is_inert_in_the_console(console, upstream, tmp_path):
    """Control and bidi characters an agent put in its text are shown as escapes, in every screen."""
    gw = await console.gateway(dry_rules(upstream, tmp_path))
    r = await gw.request("POST", "/api/contacts", json={"name": "Bo"}, intent="add Bo")
    item = r.headers["X-Tether-Dry-Run"]
    hostile = "approve me\u202e\u2066 evil\u2069\x1b[2J\r\nline two"
    # whatever the input rules let through, or an old record holds: the view must stay inert
    # (its stored headline dropped too, so every view composes one from the hostile text)
    await gw.gw.store.review_transition(item, ("pending",), "pending", {"intent": hostile, "headline": None})
    from proxy.journal.writer import base_record

    await gw.gw.journal.write(base_record("request", agent="bot", intent=hostile, decision="denied",
                                          method="GET", path="/x", reason="route_not_registered"))
    page = await console.page(f"{gw.admin_url}/console/#/queue/{item}")
    await sign_in(page, gw.reviewer_token())
    await page.wait_for_selector("#item-headline")
    for where in ("#item-headline", ".detail-pane dl.facts", f'a.item-link[data-id="{item}"]'):
        text = await page.inner_text(where)
        assert "\\u202e" in text and "\\x1b" in text and "\\r\\n" in text, where
        for bad in ("\u202e", "\u2066", "\x1b", "\r"):
            assert bad not in text, (where, repr(bad))
    await page.goto(f"{gw.admin_url}/console/#/journal")
    await page.wait_for_selector("table.journal tbody tr")
    text = await page.inner_text("table.journal tbody tr:first-child")
    assert "\\u202e" in text and "\u202e" not in text
    assert page.js_errors == []


def test_the_screenshot_script_writes_every_screen(tmp_path):
    """`python -m proxy.cli.console_shots` (what a reviewer of the project runs to look at the console)."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is not installed; the screenshot script needs it")
    if chromium_path() is None:
        pytest.skip("Chromium is not installed; the screenshot script needs it")
    from proxy.cli.console_shots import main

    assert main(["--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    for screen in ("queue", "item", "journal", "journal-record", "transactions", "agents"):
        assert f"{screen}.png" in names and f"phone-{screen}.png" in names, names
    for p in tmp_path.glob("*.png"):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p.name


async def test_a_tool_items_and_tool_steps_read_in_the_console(console, upstream, tmp_path):
    """A captured call of an MCP upstream's tool (kind: tool) and a transaction of tool calls, in the page:
    the headline names the tool, the detail shows its arguments, approval calls it once; the steps show the
    undo tool."""
    from tests.test_mcp_gateway import Crm, crm_rules, tools  # the fake CRM behind Tether (needs the mcp SDK)

    crm = Crm(tmp_path)
    gw = await console.gateway(crm_rules(upstream.url, str(tmp_path / "t.db"), tmp_path))
    async with tools(gw, "drafter", on_behalf_of="ae:jane@acme") as s:
        res = await s.call_tool("crm_create_customer", {"name": "Dee", "email": "dee@example.com",
                                                        "intent": "add Dee from the fair"})
        item = res.structured_content["review_item"]
    async with tools(gw) as s:
        tx = (await s.call_tool("tether_transaction_begin", {"name": "tool tx"})).structured_content["id"]
        await s.call_tool("crm_create_customer", {"name": "Eve", "email": "eve@example.com", "intent": "x",
                                                  "transaction": tx})
    page = await console.page(f"{gw.admin_url}/console/")
    await sign_in(page, gw.reviewer_token("rita"))
    await page.click(f'a.item-link[data-id="{item}"]')
    await page.wait_for_selector("#item-headline")
    headline = await page.inner_text("#item-headline")
    assert "wants to call tool create_customer on upstream crmtool: name Dee" in headline
    assert "dee@example.com" not in headline  # a sensitive argument
    detail = await page.inner_text(".detail-pane")
    assert "tools/call" in detail and "create_customer" in detail and '"name": "Dee"' in detail
    await page.focus(f'a.item-link[data-id="{item}"]')
    await page.keyboard.press("a")
    await page.wait_for_selector("#action-dialog[open]")
    await page.click("#action-submit")
    await page.wait_for_selector("#flash:has-text('replayed')")
    assert [c["arguments"]["name"] for c in crm.calls("create_customer")] == ["Eve", "Dee"]
    await page.click("#nav a[data-screen=transactions]")
    await page.click(f'a.item-link[data-id="{tx}"]')
    await page.wait_for_selector(".tx-detail ol.steps li.step")
    steps = await page.inner_text(".tx-detail ol.steps")
    assert "crm.create_customer" in steps and "tools/call" in steps and "delete_customer" in steps
    assert page.js_errors == []
