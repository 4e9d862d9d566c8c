"""Screenshots of every screen of the reviewer console: ``python -m proxy.cli.console_shots [--out DIR]``.

For anyone reviewing the project who wants to look rather than run: one process starts the demo's mock
CRM and Tether on it (``rules/demo.yaml``, on free ports, a fresh SQLite store), plays a little agent
traffic through the real pipeline — a dry-run change waiting for review (the headline), a create, a
rejected item, a transaction rolled back after its last step failed, an agent quarantined — and opens
each screen in headless Chromium at desktop width and at 390 px, writing one PNG per screen.

So that the charts have a shape, the 24 hours before the run are seeded with journal records of the
same shapes the pipeline writes (requests, denials, review decisions), written through the journal
into the same hash chain; everything after that is live traffic.

Needs Playwright for Python and a Chromium (``apt-get install chromium``, or ``TETHER_TEST_CHROMIUM``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCREENS_DESKTOP = (1360, 900)
SCREENS_PHONE = (390, 844)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    for cand in (os.environ.get("TETHER_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if cand and (shutil.which(cand) or (os.path.isabs(cand) and os.access(cand, os.X_OK))):
            return shutil.which(cand) or cand
    return None


async def seed_history(gw: Any, hours: int = 24) -> None:
    """Journal records spread over the past day, shaped like the pipeline's (see the module docstring)."""
    from ..journal.writer import base_record, now_iso

    rnd = random.Random(26)
    now = time.time()
    for h in range(hours, 0, -1):
        t0 = now - h * 3600
        busy = 4 + int(6 * (1 + math.sin(h / 3.5)))
        for i in range(busy):
            t = t0 + i * 3600 / busy
            agent = "renewal-bot" if i % 3 else "eager-bot"
            bad = agent == "eager-bot" and rnd.random() < (0.5 if h < 6 else 0.12)
            rec = base_record("request", agent=agent, on_behalf_of="ae:jane@acme.example" if agent == "renewal-bot" else None,
                              intent="keep the renewal moving", capability="opportunity.read", upstream="crm",
                              method="GET", path="/opportunities/opp-1", decision="denied" if bad else "live",
                              reason="constraint_violated" if bad else None)
            rec["ts"] = now_iso(t)
            await gw.journal.write(rec)
        if h % 3 == 0:
            for decision in ("approved", "approved", "approved", "rejected" if h % 6 == 0 else "approved"):
                rec = base_record("review", agent="renewal-bot", on_behalf_of="ae:jane@acme.example",
                                  capability="contact.create", upstream="crm", method="POST", path="/contacts",
                                  decision=decision)
                rec.update({"event": decision, "reviewer": "rita@acme.example", "ts": now_iso(t0 + 1800)})
                await gw.journal.write(rec)


async def play(gw: Any, crm: Any, tokens: dict[str, str]) -> dict[str, Any]:
    """Live traffic through the real pipeline; returns the ids the screens are opened on."""
    import aiohttp

    base = f"http://127.0.0.1:{gw.listeners[0].bound_port}"
    admin = f"http://127.0.0.1:{gw.admin_port}"
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        async def call(method: str, path: str, token: str, intent: str | None = None, **kw: Any) -> Any:
            h = {"Authorization": f"Bearer {token}", **({"X-Tether-Intent": intent} if intent else {}),
                 **kw.pop("headers", {})}
            async with s.request(method, base + path, headers=h, **kw) as r:
                await r.read()
                return r

        async def review(action: str, item: str, body: dict[str, Any]) -> None:
            async with s.post(f"{admin}/api/review/items/{item}/{action}", json=body,
                              headers={"Authorization": f"Bearer {tokens['reviewer']}"}) as r:
                await r.read()

        r = await call("POST", "/crm/contacts", tokens["renewal"], "add the buyer to the renewal",
                       json={"account": "acme", "name": "Sam Buyer", "role": "procurement", "email": "sam@acme.example"})
        out["create"] = r.headers.get("X-Tether-Dry-Run")
        r = await call("POST", "/crm/contacts", tokens["renewal"], "add the old champion back",
                       json={"account": "acme", "name": "Pat Gone", "role": "champion"})
        await review("reject", r.headers["X-Tether-Dry-Run"], {"reason": "Pat left Acme in March"})
        r = await call("PATCH", "/crm/opportunities/opp-1", tokens["renewal"], "renew Acme Corp",
                       json={"stage": "proposal"})
        out["item"] = r.headers.get("X-Tether-Dry-Run")
        await call("GET", "/crm/admin/export", tokens["renewal"])
        r = await call("POST", "/_tether/transactions", tokens["renewal"], json={"name": "renew Acme Corp", "deadline": "10m"})
        tx = (await r.json())["id"]
        out["tx"] = tx
        txh = {"X-Tether-Transaction": tx}
        await call("PATCH", "/crm/accounts/acme", tokens["renewal"], "upgrade Acme to gold", json={"tier": "gold"},
                   headers=txh)
        crm.quote_engine_down = True
        await call("POST", "/crm/quotes", tokens["renewal"], "issue the renewal quote",
                   json={"account": "acme", "opportunity": "opp-1", "amount": 126000}, headers=txh)
        crm.quote_engine_down = False
        for _ in range(6):
            await call("PATCH", "/crm/opportunities/opp-1", tokens["eager"], "push the deal", json={"stage": "won-ish"})
        await call("PATCH", "/crm/opportunities/opp-1", tokens["eager"], "push the deal", json={"stage": "proposal"})
    await gw.journal.flush(5)
    rows = await gw.store.journal_query(filters={"kind": "request", "decision": "dry_run"}, descending=True, limit=1)
    out["record"] = rows[0].seq if rows else 1
    return out


async def shoot(out_dir: Path) -> list[Path]:
    from playwright.async_api import async_playwright

    from ..app.gateway import Gateway
    from ..config import load_rules, parse_rules
    from ..policy.identity import mint_token
    from .demo import RULES, MockCRM, strip_mcp_upstreams

    os.environ.setdefault("CRM_TOKEN", "crm-shots-" + secrets.token_hex(4))
    os.environ.setdefault("TETHER_DEV_JWT_SECRET", secrets.token_hex(32))
    crm = MockCRM()
    await crm.start()
    work = Path(tempfile.mkdtemp(prefix="tether-shots-"))
    doc = load_rules(RULES).model_dump(mode="python")
    doc["upstreams"]["crm"]["url"] = f"http://127.0.0.1:{crm.port}"
    strip_mcp_upstreams(doc)  # the screenshots show the REST story; the demo's MCP server is not started
    doc["server"].update({"store": str(work / "shots.db"), "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"})
    doc["server"]["review"]["read_current"] = True  # headlines name the record and its current values
    for g in doc["agents"]["renewal-bot"]["grants"]:
        if g["capability"] == "opportunity.update":
            g["mode"] = "dry_run"  # so that a change waits for review (the headline's example)
    gw = Gateway(parse_rules(doc, str(RULES)))
    await gw.start()
    ident = gw.state.rules.identity
    tokens = {"renewal": mint_token(ident, "ae:jane@acme.example", actor="renewal-bot"),
              "eager": mint_token(ident, "eager-bot"),
              "reviewer": mint_token(ident, "rita@acme.example", roles=[ident.reviewer_role], ttl=3600)}
    written: list[Path] = []
    try:
        await seed_history(gw)
        ids = await play(gw, crm, tokens)
        admin = f"http://127.0.0.1:{gw.admin_port}/console/"
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
            try:
                for label, (w, h) in (("", SCREENS_DESKTOP), ("phone-", SCREENS_PHONE)):
                    page = await browser.new_page(viewport={"width": w, "height": h}, is_mobile=bool(label))
                    page.set_default_timeout(15_000)
                    await page.goto(admin)
                    await page.wait_for_selector("#signin:not([hidden])")
                    if not label:
                        written.append(await _shot(page, out_dir, "signin"))
                    await page.fill("#token-input", tokens["reviewer"])
                    await page.click("#signin-form button[type=submit]")
                    await page.wait_for_selector("#nav:not([hidden])")
                    screens = [("queue", "#/queue", "a.item-link"),
                               ("item", f"#/queue/{ids['item']}", "table.diff"),
                               ("journal", "#/journal", "table.journal tbody tr"),
                               ("journal-record", f"#/journal/{ids['record']}", "#rec-h"),
                               ("transactions", f"#/transactions/{ids['tx']}", ".tx-detail ol.steps"),
                               ("agents", "#/agents", "figure.chart svg")]
                    for name, hash_, ready in screens:
                        await page.goto(admin + hash_)
                        await page.wait_for_selector(ready)
                        await page.wait_for_timeout(300)  # let late answers (evidence, diff) settle
                        written.append(await _shot(page, out_dir, label + name, full=name in ("item", "agents")))
                    await page.close()
            finally:
                await browser.close()
    finally:
        await gw.stop(grace=1)
        await crm.stop()
        shutil.rmtree(work, ignore_errors=True)
    return written


async def _shot(page: Any, out_dir: Path, name: str, full: bool = False) -> Path:
    path = out_dir / f"{name}.png"
    await page.screenshot(path=str(path), full_page=full)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proxy.cli.console_shots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="test-artifacts/shots", help="folder for the PNGs (default test-artifacts/shots)")
    args = ap.parse_args(argv)
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("console_shots: Playwright for Python is needed (pip install playwright)", file=sys.stderr)
        return 2
    if chromium() is None:
        print("console_shots: no Chromium found (apt-get install chromium, or set TETHER_TEST_CHROMIUM)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ..logs import setup_logging

    setup_logging("error")
    for path in asyncio.run(shoot(out)):
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
