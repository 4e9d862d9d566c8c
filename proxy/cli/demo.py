"""``tether demo``: every pattern, on your laptop, in a minute, with no SaaS account.

One process starts a stateful mock CRM (accounts, opportunities, contacts, quotes — a real HTTP server
on loopback), Tether in front of it with ``rules/demo.yaml``, and then plays a scripted agent
("renewal-bot") against Tether, narrating each step:

1. a route nobody registered — denied, and the CRM never sees it;
2. a read — passes, with the CRM's own credentials swapped in;
3. a write still in dry-run — captured with a realistic synthetic answer, the CRM untouched;
4. a reviewer approves it — replayed to the CRM, provenance stamped into the record;
5. a live three-step renewal in a transaction whose last step fails — rolled back newest first, the CRM
   exactly as before;
6. a vendor's MCP server behind Tether (the official ``mcp`` SDK's server, in-process), the agent on
   Tether's ``/mcp``: a granted, pinned tool called live, a tool no capability names refused without
   reaching the server, a write tool captured for review, then approved and called once;
7. the renewal again, told through MCP tools: the agent lists its tools (REST capabilities and the
   server's granted tools together), opens a transaction with a tool, and the failed quote rolls it back;
8. a second agent that keeps sending bad writes — its error budget spent, quarantined on the next
   request (its writes forced to dry-run), an alert raised;
9. the audit trail of the run (``journal tail``) and ``journal verify``.

``--keep-running`` leaves everything up afterwards and prints how to try the CLI and the console.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..config import load_rules, parse_rules
from ..journal.lines import human_line
from ..journal.writer import verify
from . import demo_mcp

RULES = Path(__file__).resolve().parents[2] / "rules" / "demo.yaml"


# --------------------------------------------------------------------------- the mock CRM


class MockCRM:
    """A small CRM with REST collections; it records who wrote what and can be told its quote engine is
    down. Records carry a version (ETag), so Tether's undo can use If-Match."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, dict[str, Any]]] = {
            "accounts": {"acme": {"id": "acme", "name": "Acme Corp", "tier": "silver", "renewal_date": "2026-12-31"}},
            "opportunities": {"opp-1": {"id": "opp-1", "account": "acme", "name": "Acme renewal 2027",
                                        "stage": "negotiation", "amount": 120000}},
            "contacts": {},
            "quotes": {},
        }
        for t in self.tables.values():
            for r in t.values():
                r["version"] = 1
        self.quote_engine_down = False
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self._n = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    def state(self) -> dict[str, Any]:
        return copy.deepcopy(self.tables)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs, request.headers.get("Authorization")))
        if request.headers.get("Authorization") != f"Bearer {os.environ.get('CRM_TOKEN', '')}":
            return web.json_response({"error": "invalid credentials"}, status=401)
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] not in self.tables or len(parts) > 2:
            return web.json_response({"error": "not found"}, status=404)
        table = self.tables[parts[0]]
        body = await request.json() if request.body_exists else {}
        if len(parts) == 1:
            if request.method == "GET":
                return web.json_response({"items": list(table.values())})
            if request.method == "POST":
                if parts[0] == "quotes" and self.quote_engine_down:
                    return web.json_response({"error": "quote engine unavailable"}, status=503)
                self._n += 1
                rid = f"{parts[0][:-1]}-{self._n}"
                table[rid] = {**body, "id": rid, "version": 1}
                return web.json_response(table[rid], status=201, headers={"Location": f"/{parts[0]}/{rid}"})
            return web.json_response({"error": "method not allowed"}, status=405)
        rid = parts[1]
        rec = table.get(rid)
        if request.method == "GET":
            if rec is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(rec, headers={"ETag": f'"{rec["version"]}"'})
        if request.method in ("PATCH", "PUT"):
            if rec is None:
                if request.method == "PUT":
                    table[rid] = {**body, "id": rid, "version": 1}
                    return web.json_response(table[rid], status=201)
                return web.json_response({"error": "not found"}, status=404)
            im = request.headers.get("If-Match")
            if im is not None and im.strip('"') != str(rec["version"]):
                return web.json_response({"error": "changed since"}, status=412)
            new = {**rec, **body} if request.method == "PATCH" else {**body, "id": rid}
            new["version"] = rec["version"] + 1
            table[rid] = new
            return web.json_response(new)
        if request.method == "DELETE":
            if rec is None:
                return web.json_response({"error": "not found"}, status=404)
            del table[rid]
            return web.Response(status=204)
        return web.json_response({"error": "method not allowed"}, status=405)


# --------------------------------------------------------------------------- narration


class Narrator:
    def __init__(self, color: bool) -> None:
        self.color = color
        self.step = 0

    def _c(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def title(self, text: str) -> None:
        self.step += 1
        print()
        print(self._c("1;36", f"── {self.step}. {text} " + "─" * max(0, 70 - len(text))))

    def say(self, text: str) -> None:
        print(f"   {text}")

    def request(self, method: str, path: str, extra: str = "") -> None:
        print(self._c("33", f"   agent → Tether: {method} {path}") + (f"  {extra}" if extra else ""))

    def answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        shown = orjson.dumps(body).decode() if body is not None else ""
        if len(shown) > 180:
            shown = shown[:177] + "..."
        tag = "32" if status < 400 else "31"
        print(self._c(tag, f"   Tether → agent: {status}") + f" {shown}")
        for k, v in (headers or {}).items():
            print(f"                   {k}: {v}")

    def state(self, label: str, doc: Any, who: str = "CRM") -> None:
        print(self._c("35", f"   {who} {label}: ") + orjson.dumps(doc).decode())

    def refused(self, text: str) -> None:
        print(self._c("31", "   Tether → agent: ") + text)


def strip_mcp_upstreams(doc: dict[str, Any]) -> list[str]:
    """Leave the rules' MCP upstreams out (their capabilities and grants too), for a run without their
    servers; returns the upstreams removed."""
    gone = [n for n, u in doc["upstreams"].items() if (u or {}).get("kind") == "mcp"]
    caps = [c for c, v in doc["capabilities"].items() if v.get("upstream") in gone]
    for n in gone:
        del doc["upstreams"][n]
    for c in caps:
        del doc["capabilities"][c]
    for agent in doc["agents"].values():
        agent["grants"] = [g for g in agent["grants"]
                           if (g if isinstance(g, str) else g["capability"]) not in caps]
    return gone


# --------------------------------------------------------------------------- the script


def demo_ports(args: argparse.Namespace) -> tuple[int, int]:
    """The agent and admin ports: as given (0 = any free port); else free ports for a run that ends by
    itself, and 8100/8199 for --keep-running unless another Tether already holds them."""
    port, admin = args.port, args.admin_port
    if not args.keep_running:
        return (0 if port is None else port), (0 if admin is None else admin)
    if port is None:
        port = 8100 if _port_free(8100) else 0
    if admin is None:
        admin = 8199 if _port_free(8199) else 0
    return port, admin


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def run_demo(args: argparse.Namespace) -> int:
    from ..app.gateway import Gateway
    from ..policy.identity import mint_token

    os.environ.setdefault("CRM_TOKEN", "crm-demo-token-" + secrets.token_hex(4))
    os.environ.setdefault("TETHER_DEV_JWT_SECRET", secrets.token_hex(32))
    n = Narrator(color=sys.stdout.isatty() and not args.no_color)
    crm = MockCRM()
    await crm.start()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tether-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(workdir / "tether-demo.db")
    base = load_rules(args.rules)
    doc = base.model_dump(mode="python")
    doc["upstreams"]["crm"]["url"] = f"http://127.0.0.1:{crm.port}"
    billing: demo_mcp.BillingServer | None = None
    no_mcp = demo_mcp.missing() if "billing" in doc["upstreams"] else "the rules have no billing upstream"
    if no_mcp is None:
        billing = demo_mcp.BillingServer()
        try:
            doc["upstreams"]["billing"]["url"] = await billing.start()
        except Exception as exc:  # noqa: BLE001 - the rest of the demo runs without it
            no_mcp, billing = f"its MCP server could not start ({exc})", None
    if billing is None:
        strip_mcp_upstreams(doc)
    doc["server"]["store"] = store
    doc["server"]["journal"]["mirror_file"] = str(workdir / "journal.jsonl")
    port, admin_port = demo_ports(args)
    doc["server"]["listen"] = f"127.0.0.1:{port}"
    doc["server"]["admin_listen"] = f"127.0.0.1:{admin_port}"
    rules = parse_rules(doc, str(args.rules))
    gw = Gateway(rules)
    try:
        await gw.start()
    except OSError as exc:
        print(f"tether demo: {exc}; is another Tether running there? Pass --port/--admin-port "
              "(0 picks a free port).", file=sys.stderr)
        await crm.stop()
        if billing is not None:
            await billing.stop()
        return 1
    url = f"http://127.0.0.1:{gw.listeners[0].bound_port}/crm"
    admin = f"http://127.0.0.1:{gw.admin_port}"
    ident = rules.identity
    agent_token = mint_token(ident, "ae:jane@acme.example", actor="renewal-bot")
    eager_token = mint_token(ident, "eager-bot")
    reviewer_token = mint_token(ident, "rita@acme.example", roles=[ident.reviewer_role], ttl=8 * 3600)
    first_seq = (await gw.store.journal_head())[0] + 1
    outcome: dict[str, Any] = {"store": store}
    try:
        async with aiohttp.ClientSession() as s:
            async def call(method: str, path: str, *, token: str = agent_token, intent: str | None = None,
                           json: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
                h = {"Authorization": f"Bearer {token}", **(headers or {})}
                if intent:
                    h["X-Tether-Intent"] = intent
                async with s.request(method, path if path.startswith("http") else url + path, json=json,
                                     headers=h) as r:
                    data = await r.read()
                    return r.status, (orjson.loads(data) if data else None), r.headers

            print(f"Tether demo — mock CRM on 127.0.0.1:{crm.port}, Tether on {url}, admin on {admin}")
            print("Agent: renewal-bot, acting on behalf of ae:jane@acme.example (an Account Executive)")

            n.title("A route nobody registered is denied (default deny)")
            before = len(crm.seen)
            n.request("GET", "/crm/admin/export")
            st, body, h = await call("GET", "/admin/export")
            n.answer(st, body)
            n.say(f"The CRM received {len(crm.seen) - before} requests: nothing reached it.")
            outcome["denied"] = st

            n.title("A read passes; the agent never holds the CRM's credentials")
            n.request("GET", "/crm/accounts/acme")
            st, body, h = await call("GET", "/accounts/acme")
            n.answer(st, body)
            method, path, auth = crm.seen[-1]
            n.say(f"The CRM saw {method} {path} with its own credential ({auth[:14]}…), not the agent's token.")

            n.title("A write still in dry-run is captured, not sent")
            contact = {"account": "acme", "name": "Sam Buyer", "role": "procurement", "email": "sam@acme.example"}
            n.request("POST", "/crm/contacts", "X-Tether-Intent: add the buyer to the renewal")
            st, body, h = await call("POST", "/contacts", intent="add the buyer to the renewal", json=contact)
            item = h.get("X-Tether-Dry-Run")
            n.answer(st, body, {"X-Tether-Dry-Run": item})
            n.say("The agent got a realistic answer (a created contact with an id) and carries on.")
            n.state("contacts", list(crm.tables["contacts"].values()))

            n.title("A reviewer approves it; Tether replays exactly that call")
            async with s.post(f"{admin}/api/review/items/{item}/approve", json={"note": "buyer confirmed"},
                              headers={"Authorization": f"Bearer {reviewer_token}"}) as r:
                approved = await r.json()
            n.say(f"rita@acme.example approved {item}: state {approved['state']}, "
                  f"the CRM answered {approved['replay']['status']}.")
            n.state("contacts", list(crm.tables["contacts"].values()))
            n.say("Provenance is stamped into the record itself (last_agent, last_on_behalf_of, last_intent).")
            outcome["approved"] = approved["state"]

            n.title("A live three-step renewal in a transaction; the last step fails")
            snapshot = {"opportunity": dict(crm.tables["opportunities"]["opp-1"]),
                        "account": dict(crm.tables["accounts"]["acme"])}
            n.state("before", {k: {f: v[f] for f in ("stage", "tier", "amount") if f in v}
                               for k, v in snapshot.items()})
            st, tx, _ = await call("POST", f"http://127.0.0.1:{gw.listeners[0].bound_port}/_tether/transactions",
                                   json={"name": "renew Acme Corp", "deadline": "10m"})
            txh = {"X-Tether-Transaction": tx["id"]}
            n.say(f"Opened transaction {tx['id']}.")
            for method, path, payload, why in (
                    ("PATCH", "/opportunities/opp-1", {"stage": "closed_won"}, "close the renewal"),
                    ("PATCH", "/accounts/acme", {"tier": "gold"}, "upgrade Acme to gold"),
                    ("POST", "/quotes", {"account": "acme", "opportunity": "opp-1", "amount": 126000,
                                         "term_months": 12}, "issue the renewal quote")):
                if path == "/quotes":
                    crm.quote_engine_down = True
                    n.say("(the CRM's quote engine goes down)")
                n.request(method, f"/crm{path}", f"intent: {why}")
                st, body, h = await call(method, path, intent=why, json=payload, headers=txh)
                n.answer(st, body, {"X-Tether-Transaction-State": h["X-Tether-Transaction-State"]}
                         if "X-Tether-Transaction-State" in h else None)
            crm.quote_engine_down = False
            st, txd, _ = await call("GET", f"http://127.0.0.1:{gw.listeners[0].bound_port}/_tether/transactions/"
                                           f"{tx['id']}")
            for step in reversed(txd["steps"]):
                plan = (step.get("plan") or {}).get("request") or {}
                undo = f"undo {plan.get('method')} {plan.get('path')}" if plan else "nothing to undo"
                n.say(f"step {step['id']}: {step['method']} {step['path']} → {step['state']} ({undo})")
            after = {"opportunity": crm.tables["opportunities"]["opp-1"], "account": crm.tables["accounts"]["acme"]}
            n.state("after ", {k: {f: v[f] for f in ("stage", "tier", "amount") if f in v} for k, v in after.items()})
            n.say(f"Transaction {txd['state']}: undone newest first; the CRM is as it was before.")
            outcome["transaction"] = txd["state"]

            n.title("A vendor's MCP server behind Tether: pinned tools only, writes reviewed")
            if billing is None:
                n.say(f"Left out: {no_mcp}.")
                outcome["mcp_upstream"] = {"skipped": no_mcp}
            else:
                outcome["mcp_upstream"] = await _mcp_upstream(
                    n, s, f"http://127.0.0.1:{gw.listeners[0].bound_port}/mcp", agent_token, reviewer_token, admin,
                    billing)

            n.title("The same renewal through MCP: the capabilities are the agent's tools")
            outcome["mcp"] = await _mcp_renewal(n, s, f"http://127.0.0.1:{gw.listeners[0].bound_port}/mcp",
                                                agent_token, crm)

            n.title("An agent that keeps misbehaving is quarantined")
            n.say("eager-bot sends opportunity updates with stages the rules do not allow…")
            for i in range(5):
                st, body, _ = await call("PATCH", "/opportunities/opp-1", token=eager_token,
                                         intent="push the deal", json={"stage": "won-ish"})
                n.answer(st, body)
            n.request("PATCH", "/crm/opportunities/opp-1", "(a valid write this time)")
            st, body, h = await call("PATCH", "/opportunities/opp-1", token=eager_token, intent="push the deal",
                                     json={"stage": "proposal"})
            n.answer(st, body, {k: h[k] for k in ("X-Tether-Quarantined", "X-Tether-Dry-Run") if k in h})
            n.say("Its error budget is spent: its writes now go to the review queue; reads still work. "
                  f"The CRM's opportunity stage is still {crm.tables['opportunities']['opp-1']['stage']!r}.")
            outcome["quarantined"] = h.get("X-Tether-Quarantined") == "true"

            n.title("The audit trail of this run, and its verification")
            await gw.journal.flush(5)
            rows = await gw.store.journal_query(after_seq=first_seq - 1, limit=10000)
            for r in rows:
                rec = r.record()
                if rec["kind"] in ("request", "review", "tx", "governance") and rec.get("event") not in (
                        "steps_recorded",):
                    print("   " + human_line(r.seq, rec))
            res = await verify(gw.store)
            n.say(f"journal verify: {'OK' if res.ok else 'FAIL'} — {res.checked} records, hash chain intact."
                  if res.ok else f"journal verify: FAIL at {res.broken_seq}: {res.problem}")
            outcome["verified"] = res.ok
            outcome["crm"] = crm.state()
            if args.state_file:
                Path(args.state_file).write_bytes(orjson.dumps(outcome, option=orjson.OPT_INDENT_2))

        if args.keep_running:
            print()
            print("Everything is still running. Try it yourself (in another terminal):")
            print(f"  export TETHER_ADMIN_URL={admin} TETHER_ADMIN_TOKEN={reviewer_token}")
            print("  tether review list                # the review queue (eager-bot's captured write)")
            print("  tether agents status              # SLIs, budgets, quarantine")
            print(f"  tether journal tail -f --store {store}")
            print("  tether tx list --state rolled_back")
            print(f"  reviewer console: {admin}/console/  (paste the TETHER_ADMIN_TOKEN above)")
            print(f"  as the agent: curl -H 'Authorization: Bearer {agent_token}' {url}/accounts/acme")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            print("Press Ctrl-C to stop.", flush=True)  # (after the handlers: a signal from now on stops cleanly)
            await stop.wait()
    finally:
        await gw.stop(grace=1)
        await crm.stop()
        if billing is not None:
            await billing.stop()
    ok = (outcome.get("verified") and outcome.get("transaction") == "rolled_back" and outcome.get("quarantined")
          and outcome.get("mcp") == "rolled_back" and (billing is None or outcome["mcp_upstream"].get("ok")))
    return 0 if ok else 1


class _Rpc:
    """An MCP client in a few lines — plain JSON-RPC over Streamable HTTP, as Claude, the OpenAI Agents SDK
    or LangGraph speak it — so the demo needs nothing beyond Tether itself on the agent's side."""

    def __init__(self, s: aiohttp.ClientSession, url: str, token: str) -> None:
        self.s, self.url = s, url
        self.h = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
        self.ids = iter(range(1, 1000))

    async def __call__(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The result, or ``{"error": {...}}`` for a JSON-RPC error."""
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params or {}}
        async with self.s.post(self.url, json=body, headers=self.h) as r:
            if "Mcp-Session-Id" in r.headers:
                self.h["Mcp-Session-Id"] = r.headers["Mcp-Session-Id"]
            doc = orjson.loads(await r.read())
        return doc["result"] if "result" in doc else {"error": doc.get("error")}

    async def open(self) -> str:
        init = await self("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                         "clientInfo": {"name": "tether-demo", "version": "1"}})
        async with self.s.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                               headers=self.h):
            pass
        return str(init["protocolVersion"])


async def _mcp_upstream(n: "Narrator", s: aiohttp.ClientSession, url: str, token: str, reviewer_token: str,
                        admin: str, billing: "demo_mcp.BillingServer") -> dict[str, Any]:
    """A vendor's MCP server behind Tether: what the agent sees of it, and what reaches it."""
    n.say(f"{demo_mcp.NAME} (the official mcp SDK's server) offers {len(demo_mcp.TOOLS)} tools: "
          + ", ".join(t.name for t in demo_mcp.TOOLS) + ". Tether is its only client; renewal-bot connects to "
          "Tether's /mcp as its MCP server.")
    n.say("The rules grant renewal-bot get_invoice (a read) and issue_credit (a write: dry-run), each pinned to "
          "the definition a person approved; no capability names export_customers.")
    rpc = _Rpc(s, url, token)
    await rpc.open()
    listed = [t for t in (await rpc("tools/list"))["tools"] if t["name"].startswith("billing_")]
    for t in listed:
        mode = "  [dry-run: a person reviews each call]" if "Dry-run" in t["description"] else ""
        n.say(f"  {t['name']:<22} {t['description'].split('. ')[0][:60]}{mode}")

    async def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
        n.request("tools/call", name, orjson.dumps(args).decode()[:100])
        res = await rpc("tools/call", {"name": name, "arguments": args})
        if "error" in res:
            err = res["error"]
            n.refused(f"JSON-RPC error {err['code']}: {err['message']}")
        else:
            n.answer(200, res.get("structuredContent") or {"text": res["content"][0]["text"][:200]})
        return res

    await call("billing_get_invoice", {"number": "INV-1002"})
    for name in ("export_customers", "billing_export_customers"):
        await call(name, {})
    n.say(f"The billing server received {len(billing.calls)} call(s): "
          + ", ".join(t for t, _ in billing.calls) + " — never export_customers.")
    res = await call("billing_issue_credit", {"invoice": "INV-1002", "amount": 480, "reason": "late delivery",
                                              "intent": "credit Acme 10% for the late delivery"})
    item = (res.get("structuredContent") or {}).get("review_item")
    n.say(f"Captured for review as {item}; the billing server still received {len(billing.calls)} call(s).")
    async with s.post(f"{admin}/api/review/items/{item}/approve", json={"note": "goodwill credit agreed"},
                      headers={"Authorization": f"Bearer {reviewer_token}"}) as r:
        decided = await r.json()
    replay = decided.get("replay") or {}
    credit = ((replay.get("body") or {}).get("structuredContent") or {}).get("credit_id")
    n.say(f"rita@acme.example approved it: Tether called issue_credit once, exactly as captured "
          f"(credit {credit}); state {decided.get('state')}.")
    n.state("calls received", [t for t, _ in billing.calls], who=demo_mcp.NAME)
    calls = [[t, a] for t, a in billing.calls]
    ok = (calls == [["get_invoice", {"number": "INV-1002"}],
                    ["issue_credit", {"invoice": "INV-1002", "amount": 480, "reason": "late delivery"}]]
          and decided.get("state") == "replayed" and [t["name"] for t in listed] == ["billing_get_invoice",
                                                                                     "billing_issue_credit"])
    return {"ok": ok, "listed": [t["name"] for t in listed], "calls": calls, "review_item": item,
            "review_state": decided.get("state")}


async def _mcp_renewal(n: "Narrator", s: aiohttp.ClientSession, url: str, token: str, crm: "MockCRM") -> str:
    """The renewal again, as an MCP client (Claude, the OpenAI Agents SDK, LangGraph) would run it."""
    rpc = _Rpc(s, url, token)
    version = await rpc.open()
    n.say(f"MCP session open (protocol {version}); renewal-bot's tools are its grants:")
    tools = (await rpc("tools/list"))["tools"]
    for t in tools:
        if not t["name"].startswith("tether_"):
            n.say(f"  {t['name']:<20} {t['description'][:90]}")

    async def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
        n.request("tools/call", name, orjson.dumps(args).decode()[:100])
        res = await rpc("tools/call", {"name": name, "arguments": args})
        shown = res.get("structuredContent") or {"text": res["content"][0]["text"][:200]}
        sc = res.get("structuredContent") or {}
        status = (res.get("_meta") or {}).get("tether/status") or (sc.get("upstream_error") or {}).get("status") \
            or (sc.get("error") or {}).get("status") or 200
        n.answer(int(status), shown)
        return res

    tx = (await call("tether_transaction_begin", {"name": "renew Acme Corp (MCP)", "deadline": "10m"}))
    tx_id = tx["structuredContent"]["id"]
    await call("opportunity_update", {"id": "opp-1", "body": {"stage": "closed_won"}, "intent": "close the renewal",
                                      "transaction": tx_id})
    await call("account_update", {"id": "acme", "body": {"tier": "gold"}, "intent": "upgrade Acme to gold",
                                  "transaction": tx_id})
    crm.quote_engine_down = True
    n.say("(the CRM's quote engine goes down again)")
    res = await call("quote_create", {"body": {"account": "acme", "opportunity": "opp-1", "amount": 126000,
                                               "term_months": 12}, "intent": "issue the renewal quote",
                                      "transaction": tx_id})
    crm.quote_engine_down = False
    n.say("The failed step is a tool error the model can read" + (" (isError)." if res.get("isError") else "."))
    status = (await rpc("tools/call", {"name": "tether_transaction_status", "arguments": {"transaction": tx_id}}))
    state = status["structuredContent"]["state"]
    n.say(f"Transaction {state}; the opportunity is {crm.tables['opportunities']['opp-1']['stage']!r} and Acme "
          f"is {crm.tables['accounts']['acme']['tier']!r} again. Same rules, same journal, another door.")
    return str(state)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..logs import setup_logging
    from .main import run_async

    setup_logging("error")
    try:
        return run_async(run_demo(args))
    except KeyboardInterrupt:
        return 130


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="see every pattern in a minute: a mock CRM, Tether, a scripted agent",
                       description=__doc__.split("\n\n")[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-running", action="store_true",
                   help="leave the mock CRM and Tether up afterwards and print next steps")
    p.add_argument("--port", type=int, metavar="PORT",
                   help="Tether's agent port on 127.0.0.1 (0: any free port; default: free, or 8100 with "
                        "--keep-running when it is free)")
    p.add_argument("--admin-port", type=int, metavar="PORT",
                   help="the admin/console port (0: any free port; default: free, or 8199 with --keep-running "
                        "when it is free)")
    p.add_argument("--rules", default=str(RULES), help="rules file (default: rules/demo.yaml)")
    p.add_argument("--store", help="journal/queue store (default: a new SQLite file in a temp folder)")
    p.add_argument("--workdir", help="folder for the store and the journal mirror (default: a temp folder)")
    p.add_argument("--state-file", help="write the run's observable results (CRM state, outcomes) as JSON")
    p.add_argument("--no-color", action="store_true", help="plain output")
    p.set_defaults(func=cmd_demo)
