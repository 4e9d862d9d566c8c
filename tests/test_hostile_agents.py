"""Hostile agents (issue 20): attacks sent the way a prompt-injected agent would, through the real pipeline.

Each test checks what reached the upstream, what the journal kept and what the agent got back. The
table-shaped attacks (paths, overrides, headers) live in ``test_bypass.py``; these need more set-up:
a journal to inspect, a transaction to roll back, a scripted upstream, a second listener.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.policy.identity import mint_token
from tests.conftest import UPSTREAM_TOKEN, base_rules
from tests.fakes import serve_app


def _live(cap: str) -> dict[str, str]:
    return {"capability": cap, "mode": "live"}


async def _journal_text(gw: Any, mirror: Path | None = None) -> str:
    recs = await gw.journal()
    text = orjson.dumps(recs).decode()
    if mirror is not None:
        await gw.gw.journal.flush(5)
        text += mirror.read_text() if mirror.exists() else ""
    return text


# --------------------------------------------------------------------------- item 7: credentials kept out


async def test_a_refused_credential_is_never_journaled_verbatim(make_gateway, upstream, tmp_path):
    mirror = tmp_path / "mirror.jsonl"
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["server"]["journal"] = {"mirror_file": str(mirror)}
    rules["upstreams"]["crm"]["credential_params"] = ["api_key"]
    gw = await make_gateway(rules)
    for query in ("api_key=STOLEN-KEY-1", "a=1;api_key=STOLEN-KEY-2", "API%5FKEY=STOLEN-KEY-3&b=2"):
        r = await gw.request("GET", f"/echo?{query}")
        assert r.status == 400 and (await r.json())["error"]["code"] == "credential_in_request"
    assert upstream.received == []
    text = await _journal_text(gw, mirror)
    assert "STOLEN-KEY" not in text
    queries = [r["query"] for r in await gw.journal() if r.get("reason") == "credential_in_request"]
    assert queries == ["api_key=[redacted]", "a=1;api_key=[redacted]", "API_KEY=[redacted]&b=2"]


async def test_adapter_credential_params_are_refused_without_configuration(make_gateway, upstream, tmp_path):
    """HubSpot's hapikey and Slack's token are credentials whatever the rules file says."""
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["upstreams"]["hs"] = {"url": upstream.url, "adapter": "hubspot",
                                "credentials": {"type": "bearer", "token": {"value": UPSTREAM_TOKEN}}}
    rules["capabilities"]["hs.contacts"] = {"upstream": "hs", "method": "GET", "path": "/crm/v3/objects/contacts"}
    rules["agents"]["bot"]["grants"].append("hs.contacts")
    gw = await make_gateway(rules)
    r = await gw.request("GET", "/crm/v3/objects/contacts?limit=1;hapikey=STOLEN", upstream="hs")
    assert r.status == 400 and (await r.json())["error"]["code"] == "credential_in_request"
    assert upstream.received == []
    assert "STOLEN" not in await _journal_text(gw)


# --------------------------------------------------------------------------- item 8: agent text


@pytest.mark.parametrize("sub", ["ceo\u202e@acme", "jane\u2028decision=live", "x\u0085y", "a\u2066b"])
async def test_identities_with_bidi_or_separators_are_refused(gateway, upstream, sub):
    ident = gateway.gw.state.rules.identity
    token = mint_token(ident, sub, actor="bot")
    async with gateway.session.get(f"{gateway.url}/crm/echo", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "token_malformed"
    async with gateway.session.get(f"{gateway.url}/_tether/whoami", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 401
    assert upstream.received == []
    assert sub not in await _journal_text(gateway)


@pytest.mark.parametrize("name, ok", [("renew Acme", True), ("x" * 200, True), ("x" * 201, False), (42, False),
                                      (["a"], False), ({"a": 1}, False), ("renew\u202eemcA", False),
                                      ("a\nb", False), ("a\u2029b", False)])
async def test_transaction_names_are_short_inert_strings(gateway, name, ok):
    async with gateway.session.post(f"{gateway.url}/_tether/transactions", headers=gateway.headers(),
                                    json={"name": name}) as r:
        doc = await r.json()
        if ok:
            assert r.status == 201 and doc["name"] == name
        else:
            assert r.status == 400 and doc["error"]["code"] == "bad_request", doc
    txs = await gateway.gw.store.tx_list(limit=10)
    assert len(txs) == (1 if ok else 0)


# --------------------------------------------------------------------------- item 11: undo targets


@pytest.mark.parametrize("evil_id", ["7?force=true", "7#x", "7/notes", "../7", "%37", "7\u2215x"])
async def test_an_id_from_the_upstream_cannot_aim_an_undo_elsewhere(make_gateway, upstream, tmp_path, evil_id):
    """The upstream answers a create with an id that would turn its undo (DELETE .../<id>) into a delete
    of another record (id 7, someone else's). The step is left for a human; nothing is deleted."""
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "7", "name": "someone else's"})
    upstream.fail("POST", "/api/contacts", status=201, body={"id": evil_id, "name": "new"})
    h = {"X-Tether-Transaction": "tx-evil-id"}
    r = await gw.request("POST", "/api/contacts", json={"name": "new"}, headers=h)
    assert r.status == 201
    async with gw.session.post(f"{gw.url}/_tether/transactions/tx-evil-id/rollback", headers=gw.headers()) as resp:
        tx = await resp.json()
    assert tx["state"] == "needs_attention", tx
    assert [s["state"] for s in tx["steps"]] == ["unknown"]
    assert "7" in upstream.records["contacts"]
    assert [x for x in upstream.received if x.method == "DELETE"] == []


async def test_a_salesforce_created_id_must_be_a_salesforce_id(make_gateway, tmp_path):
    """Salesforce's adapter holds created ids to its id format before planning DELETE .../<id>."""
    from adapters import get_adapter
    from adapters.base import NotCompensable, Operation, PlannedRequest, UndoPlan

    ad = get_adapter("salesforce")
    cap = type("C", (), {"operation": "create", "name": "x"})()
    op = Operation("POST", "/services/data/v59.0/sobjects/Account", capability=cap,
                   segments=("services", "data", "v59.0", "sobjects", "Account"), body={"Name": "a"})
    for bad in ("001000000000001AAA?x", "../001000000000001", "001000000000001/x"):
        plan = UndoPlan("delete", PlannedRequest("DELETE", "/services/data/v59.0/sobjects/Account/{created_id}"))
        with pytest.raises(NotCompensable):
            ad.arm_undo(plan, op, 201, {}, {"id": bad, "success": True, "errors": []})
    plan = UndoPlan("delete", PlannedRequest("DELETE", "/services/data/v59.0/sobjects/Account/{created_id}"))
    good = ad.arm_undo(plan, op, 201, {}, {"id": "001000000000001AAA", "success": True, "errors": []})
    assert good.request.path.endswith("/001000000000001AAA")


# --------------------------------------------------------------------------- item 14: admin Host check


async def test_the_loopback_admin_listener_answers_loopback_names_only(gateway):
    port = gateway.gw.admin_port
    h = {"Authorization": f"Bearer {gateway.reviewer_token()}"}
    for host, status in (("127.attacker.example", 400), (f"127.attacker.example:{port}", 400),
                         (f"localhost.evil.example:{port}", 400), ("evil.example", 400),
                         (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), (f"[::1]:{port}", 200)):
        for path in ("/api/review/items", "/metrics", "/_tether/healthz"):
            async with gateway.session.get(f"{gateway.admin_url}{path}", headers={**h, "Host": host}) as r:
                assert r.status == status, (host, path, r.status)
                if status == 400:
                    assert (await r.json())["error"]["code"] == "ambiguous_request"


def test_host_policy_is_exact():
    from proxy.core.listeners import host_allowed

    loop = {"loopback": True, "wildcard": False}
    for ok in ("127.0.0.1", "127.0.0.1:8100", "127.9.8.7:1", "localhost", "LOCALHOST:80", "[::1]:8100", "::1"):
        assert host_allowed(ok, "127.0.0.1", **loop), ok
    for bad in ("127.attacker.example", "127.0.0.1.nip.io", "localhost.evil.example", "127.0.0.1:80x", "",
                "evil.example", "[::1]x", "127.1"):
        assert not host_allowed(bad, "127.0.0.1", **loop), bad
    assert host_allowed("10.0.0.5:8100", "10.0.0.5", loopback=False, wildcard=False)
    assert not host_allowed("10.0.0.6:8100", "10.0.0.5", loopback=False, wildcard=False)


# --------------------------------------------------------------------------- item 16: vendor headers


async def test_vendor_session_and_tenant_headers(make_gateway, upstream, tmp_path):
    """X-SFDC-Session never reaches Salesforce (nor anyone); Stripe-Account reaches only Stripe, and only
    when allowed; both are stripped on a generic upstream."""
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    cred = {"type": "bearer", "token": {"value": UPSTREAM_TOKEN}}
    rules["upstreams"]["sf"] = {"url": upstream.url, "adapter": "salesforce", "credentials": cred}
    rules["upstreams"]["stripe"] = {"url": upstream.url, "adapter": "stripe", "credentials": cred}
    caps = rules["capabilities"]
    caps["sf.account.read"] = {"upstream": "sf", "method": "GET",
                               "path": "/services/data/{version}/sobjects/Account/{id}"}
    caps["stripe.customer.read"] = {"upstream": "stripe", "method": "GET", "path": "/v1/customers/{customer}",
                                    "allow_accounts": ["acct_allowed"]}
    rules["agents"]["bot"]["grants"] += ["sf.account.read", "stripe.customer.read"]
    gw = await make_gateway(rules)
    vendor = {"X-SFDC-Session": "00D!stolen", "Stripe-Account": "acct_allowed", "Stripe-Context": "ctx_x"}

    r = await gw.request("GET", "/services/data/v59.0/sobjects/Account/001000000000001AAA", upstream="sf",
                         headers=vendor)
    assert r.status == 200
    got = upstream.received[-1]
    assert not {"x-sfdc-session", "stripe-account", "stripe-context"} & {k.lower() for k in got.headers}
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"

    r = await gw.request("GET", "/echo", headers=vendor)
    assert r.status == 200
    assert not {"x-sfdc-session", "stripe-account", "stripe-context"} & {k.lower() for k in upstream.received[-1].headers}

    r = await gw.request("GET", "/v1/customers/cus_123", upstream="stripe",
                         headers={"X-SFDC-Session": "00D!stolen", "Stripe-Account": "acct_allowed"})
    assert r.status == 200
    got = {k.lower(): v for k, v in upstream.received[-1].headers.items()}
    assert got.get("stripe-account") == "acct_allowed" and "x-sfdc-session" not in got
    n = len(upstream.received)
    r = await gw.request("GET", "/v1/customers/cus_123", upstream="stripe", headers={"Stripe-Account": "acct_evil"})
    assert r.status == 403 and (await r.json())["error"]["code"] == "tenant_switch_refused"
    assert len(upstream.received) == n


# --------------------------------------------------------------------------- item 12: reflected credential


async def _reflector() -> tuple[web.AppRunner, int, list[dict[str, str]]]:
    """An upstream that echoes the credential it received: in a header, in a small body, in a large
    streamed body (split across two writes, mid-token), and in a write's answer."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        auth = request.headers.get("Authorization", "")
        body = await request.read()
        if request.path == "/hdr":
            return web.json_response({"ok": True}, headers={"X-Debug": f"you sent {auth}",
                                                            "WWW-Authenticate": f'Bearer error="{auth[7:]}"'})
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            if request.query.get("length"):
                resp.content_length = 70_000 + 2 * len(auth) + 2
            await resp.prepare(request)
            token = auth.encode()
            await resp.write(b"a" * 70_000 + token[:9])
            await asyncio.sleep(0.05)
            await resp.write(token[9:] + b"|" + token + b"\n")
            await resp.write_eof()
            return resp
        return web.json_response({"method": request.method, "echo": auth, "body": body.decode()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, port = await serve_app(app)
    return runner, port, seen


@pytest.fixture
async def reflector():
    runner, port, seen = await _reflector()
    yield port, seen
    await runner.cleanup()


def _reflect_rules(port: int, store: str) -> dict[str, Any]:
    rules = base_rules(f"http://127.0.0.1:{port}", store)
    caps = rules["capabilities"]
    caps["r.hdr"] = {"upstream": "crm", "method": "GET", "path": "/hdr"}
    caps["r.stream"] = {"upstream": "crm", "method": "GET", "path": "/stream"}
    caps["r.small"] = {"upstream": "crm", "method": "GET", "path": "/small"}
    caps["r.write"] = {"upstream": "crm", "method": "PATCH", "path": "/things/{id}"}
    caps["r.review"] = {"upstream": "crm", "method": "PATCH", "path": "/reviewed/{id}"}
    rules["agents"]["bot"]["grants"] += ["r.hdr", "r.stream", "r.small", _live("r.write"), "r.review"]
    return rules


async def test_a_reflected_credential_never_reaches_the_agent(make_gateway, reflector, tmp_path):
    port, seen = reflector
    gw = await make_gateway(_reflect_rules(port, str(tmp_path / "t.db")))
    token = UPSTREAM_TOKEN.encode()
    outcomes = []
    for path, kw in (("/small", {}), ("/hdr", {}), ("/stream", {}), ("/stream?length=1", {}),
                     ("/things/1", {"method": "PATCH", "json": {"a": 1}})):
        method = kw.pop("method", "GET")
        async with gw.session.request(method, f"{gw.url}/crm{path}", headers=gw.headers(), **kw) as r:
            body = await r.read()
            assert r.status == 200, (path, body[:200])
            raw_headers = b"".join(k + b": " + v for k, v in r.raw_headers)
            assert token not in body and token not in raw_headers, path
            assert b"*" * len(token) in body + raw_headers, path  # masked, length kept
            if path.startswith("/stream"):
                assert len(body) == 70_000 + 2 * len(b"Bearer " + token) + 2
            outcomes.append(r.headers["X-Tether-Request-Id"])
    # the upstream did get the credential (that is what it echoed), asked for identity encoding
    assert all(h["Authorization"] == f"Bearer {UPSTREAM_TOKEN}" for h in seen)
    assert all(h.get("Accept-Encoding") == "identity" for h in seen)
    recs = await gw.journal()
    assert UPSTREAM_TOKEN not in orjson.dumps(recs).decode()
    flagged = {r["request_id"] for r in recs if r["kind"] == "outcome" and r.get("credential_reflected")}
    assert flagged == set(outcomes)


async def test_a_reflected_credential_never_reaches_a_review_item(make_gateway, reflector, tmp_path):
    port, _ = reflector
    gw = await make_gateway(_reflect_rules(port, str(tmp_path / "t.db")))
    r = await gw.request("PATCH", "/reviewed/9", json={"a": 1})
    assert r.status == 200
    item_id = r.headers["X-Tether-Dry-Run"]
    a = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={})
    assert a.status == 200, await a.text()
    item = await a.json()
    assert item["state"] == "replayed", item
    assert item["replay"]["body"]["echo"] == "*" * len("Bearer " + UPSTREAM_TOKEN)
    assert UPSTREAM_TOKEN not in orjson.dumps(item).decode()
    assert UPSTREAM_TOKEN not in await _journal_text(gw)


# --------------------------------------------------------------------------- item 5: stream_request


def _stream_rules(upstream_url: str, store: str, **cap: Any) -> dict[str, Any]:
    rules = base_rules(upstream_url, store)
    rules["server"]["limits"] = {"max_body_bytes": 65536}
    rules["capabilities"]["file.upload"] = {"upstream": "crm", "method": "POST", "path": "/files",
                                            "stream_request": True, "compensation": "none", **cap}
    rules["agents"]["bot"]["grants"].append(_live("file.upload"))
    return rules


@pytest.mark.parametrize("extra, grant_mode, where", [
    ({"body": {"allow_fields": ["name"]}}, "live", "capabilities.file.upload.body"),
    ({"audit_fields": ["name"]}, "live", "capabilities.file.upload.audit_fields"),
    ({"promotion": {"min_reviewed": 1}}, "live", "capabilities.file.upload.promotion"),
    ({}, "dry_run", "agents.bot.grants[7]"),
    ({}, "canary", "agents.bot.grants[7]"),
    ({}, None, "agents.bot.grants[7]"),
])
def test_rules_refuse_a_streamed_body_with_body_rules_or_review(tmp_path, extra, grant_mode, where):
    from proxy.cli.lint import lint_data
    from proxy.config import ConfigError, parse_rules
    from tests.procs import run_cli

    rules = _stream_rules("http://127.0.0.1:1", str(tmp_path / "t.db"), **extra)
    rules["agents"]["bot"]["grants"][-1] = {"capability": "file.upload", **({"mode": grant_mode} if grant_mode else {})}
    with pytest.raises(ConfigError) as exc:
        parse_rules(rules, "rules.yaml")
    assert any(path == where and "streams its request body" in why for path, why in exc.value.problems), exc.value
    assert "streamed-body" in [f.code for f in lint_data(rules) if f.path == where]
    if grant_mode is None and not extra:  # once through the real CLI
        f = tmp_path / "rules.yaml"
        f.write_text(json.dumps(rules))
        out = run_cli("rules", "check", "--no-store", str(f))
        assert out.returncode == 1
        assert f"{where}: capability 'file.upload' streams its request body" in out.stdout + out.stderr
        assert "[streamed-body]" in out.stdout + out.stderr


async def _chunks(n: int, size: int = 16384):
    for _ in range(n):
        yield b"z" * size
        await asyncio.sleep(0)


async def test_a_streamed_body_is_forwarded_hashed_and_journaled(make_gateway, upstream, tmp_path):
    gw = await make_gateway(_stream_rules(upstream.url, str(tmp_path / "t.db")))
    payload = b"z" * (16384 * 3)
    async with gw.session.post(f"{gw.url}/crm/files", headers=gw.headers(), data=_chunks(3)) as r:
        assert r.status == 200, await r.text()
        rid = r.headers["X-Tether-Request-Id"]
    assert upstream.received[-1].body == payload
    out = [x for x in await gw.journal() if x["request_id"] == rid and x["kind"] == "outcome"]
    assert out[0]["body_sha256"] == hashlib.sha256(payload).hexdigest() and out[0]["body_bytes"] == len(payload)


async def test_a_streamed_body_is_bounded_while_it_streams(make_gateway, upstream, tmp_path):
    gw = await make_gateway(_stream_rules(upstream.url, str(tmp_path / "t.db")))
    # chunked (no Content-Length): cut off past max_body_bytes, the upstream never gets a whole request
    async with gw.session.post(f"{gw.url}/crm/files", headers=gw.headers(), data=_chunks(12)) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"] == "body_too_large"
        rid = r.headers["X-Tether-Request-Id"]
    await asyncio.sleep(0.2)
    assert [x for x in upstream.received if x.path == "/files"] == []
    out = [x for x in await gw.journal() if x["request_id"] == rid and x["kind"] == "outcome"]
    assert out[0]["error"] == "body_too_large" and out[0]["body_bytes"] > 65536
    # a declared Content-Length over the limit is refused before anything is sent
    n = len(upstream.received)
    async with gw.session.post(f"{gw.url}/crm/files", headers=gw.headers(), data=b"z" * 70000) as r:
        assert r.status == 413
    assert len(upstream.received) == n


async def test_a_quarantined_agent_cannot_stream_a_write_into_review(make_gateway, upstream, tmp_path):
    gw = await make_gateway(_stream_rules(upstream.url, str(tmp_path / "t.db")))
    q = await gw.admin("POST", "/api/agents/bot/quarantine", json={"reason": "test"})
    assert q.status == 200
    async with gw.session.post(f"{gw.url}/crm/files", headers=gw.headers(), data=b"hello") as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "agent_quarantined"
    assert upstream.received == []
    assert await gw.gw.store.review_list(limit=10) == []


# --------------------------------------------------------------------------- item 9: order of checks


class _Ledger:
    """An upstream holding one account (amount 100) whose GET handler records, for each pre-image read,
    whether the journal already held the intent record of the request it was made for."""

    def __init__(self) -> None:
        self.gw: Any = None
        self.reads: list[bool] = []
        self.writes = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            rid = request.headers.get("X-Tether-Request-Id")
            rows = await self.gw.gw.store.journal_query(filters={"request_id": rid, "kind": "request"}, limit=5)
            self.reads.append(bool(rows))
            return web.json_response({"id": request.match_info["id"], "amount": 100, "secret_margin": 42})
        self.writes += 1
        return web.json_response({"id": request.match_info["id"], **(await request.json())})


@pytest.fixture
async def ledger():
    led = _Ledger()
    app = web.Application()
    app.router.add_route("*", "/acct/{id}", led.handle)
    runner, port = await serve_app(app)
    led.port = port  # type: ignore[attr-defined]
    yield led
    await runner.cleanup()


def _ledger_rules(port: int, store: str, *, read_grant: bool, mode: str = "live") -> dict[str, Any]:
    rules = base_rules(f"http://127.0.0.1:{port}", store)
    rules["capabilities"]["acct.read"] = {"upstream": "crm", "method": "GET", "path": "/acct/{id}"}
    rules["capabilities"]["acct.update"] = {"upstream": "crm", "method": "PATCH", "path": "/acct/{id}",
                                            "body": {"allow_fields": ["amount"],
                                                     "constraints": {"amount": {"max_increase_pct": 10}}},
                                            "rate_limit": {"per_minute": 1, "burst": 1}}
    grants = [{"capability": "acct.update", "mode": mode}] + (["acct.read"] if read_grant else [])
    rules["agents"]["clerk"] = {"grants": grants}
    return rules


async def test_rate_limit_and_intent_record_come_before_the_pre_image_read(make_gateway, ledger, tmp_path):
    gw = await make_gateway(_ledger_rules(ledger.port, str(tmp_path / "t.db"), read_grant=True))
    ledger.gw = gw
    statuses = []
    for _ in range(4):
        r = await gw.request("PATCH", "/acct/7", agent="clerk", json={"amount": 105})
        statuses.append(r.status)
    assert statuses == [200, 429, 429, 429]
    # one read of the record, made after its request's intent record was durable; none for the 429s
    assert ledger.reads == [True]
    assert ledger.writes == 1


async def test_a_relative_cap_refusal_hides_the_value_from_an_agent_that_cannot_read_it(make_gateway, ledger,
                                                                                         tmp_path):
    for read_grant in (False, True):
        gw = await make_gateway(_ledger_rules(ledger.port, str(tmp_path / f"t{read_grant}.db"), read_grant=read_grant))
        ledger.gw = gw
        r = await gw.request("PATCH", "/acct/7", agent="clerk", json={"amount": 500})
        err = (await r.json())["error"]
        assert r.status == 422 and err["code"] == "constraint_violated"
        assert err["details"]["rule"] == "max_increase_pct: 10"
        assert ("100" in err["message"]) is read_grant, err["message"]
        # the request id is random hex and may hold "100" by chance: the rest of the answer may not
        body = await r.json()
        body["error"].pop("request_id")
        assert ("100" in orjson.dumps(body).decode()) is read_grant
    assert ledger.writes == 0


async def test_a_dry_run_write_with_a_relative_cap_is_captured_only_once_it_passed(make_gateway, ledger, tmp_path):
    gw = await make_gateway(_ledger_rules(ledger.port, str(tmp_path / "t.db"), read_grant=False, mode="dry_run"))
    ledger.gw = gw
    r = await gw.request("PATCH", "/acct/7", agent="clerk", json={"amount": 500})
    assert r.status == 422
    assert await gw.gw.store.review_list(limit=10) == []
    r = await gw.request("PATCH", "/acct/8", agent="clerk", json={"amount": 105},
                         headers={"X-Tether-Intent": "small raise"})
    assert r.status == 429  # the capability's bucket (1/min) was spent by the refused write
    gw2 = await make_gateway(_ledger_rules(ledger.port, str(tmp_path / "t2.db"), read_grant=False, mode="dry_run"))
    ledger.gw = gw2
    r = await gw2.request("PATCH", "/acct/8", agent="clerk", json={"amount": 105})
    assert r.status == 200 and r.headers.get("X-Tether-Dry-Run")
    items = await gw2.gw.store.review_list(limit=10)
    assert [i["id"] for i in items] == [r.headers["X-Tether-Dry-Run"]]
    assert ledger.reads[-1] is True and ledger.writes == 0
    recs = [x for x in await gw2.journal() if x.get("request_id") == r.headers["X-Tether-Request-Id"]]
    assert [x["kind"] for x in recs] == ["request", "review", "outcome"]


# --------------------------------------------------------------------------- item 13: crossed connections


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


EVIL = _answer(b"EVIL: an answer meant for no one")


class _RawUpstream:
    """A raw keep-alive HTTP/1.1 upstream whose answers are scripted per path, to send the bytes that
    could cross two requests: a second answer glued to the first, one sent while the connection idles
    in the pool, a HEAD 'body' held back, and the answer to a request smuggled in a GET body (sent only
    when the next request arrives on that connection)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[int, str, bytes]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        pending: bytes | None = None  # an answer held back for the next request on this connection
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ")[:2]
                length = next((int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length) if length else b""
                self.requests.append((conn, f"{method} {target}", body))
                if pending is not None:
                    writer.write(pending)  # the late answer goes first: it is what the next request would read
                    pending = None
                if target == "/append":
                    writer.write(_answer(b"A1") + EVIL)
                elif target == "/idle-extra":
                    writer.write(_answer(b"A1"))
                    asyncio.get_running_loop().call_later(0.05, lambda: writer.write(EVIL))
                elif target == "/head":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 32\r\n\r\n")
                    pending = EVIL
                elif target == "/smuggle":
                    writer.write(_answer(b"A1"))
                    pending = EVIL  # what a server that read the GET body as a request would answer late
                else:
                    writer.write(_answer(b"B2 " + target.encode()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream():
    up = _RawUpstream()
    port = await up.start()
    yield up, port
    up.server.close()


@pytest.mark.parametrize("first", ["append", "idle-extra", "head", "smuggle"])
async def test_a_late_or_unsolicited_answer_never_reaches_the_next_request(make_gateway, raw_upstream, tmp_path,
                                                                          first):
    up, port = raw_upstream
    rules = base_rules(f"http://127.0.0.1:{port}", str(tmp_path / "t.db"))
    caps = rules["capabilities"]
    for path in ("append", "idle-extra", "smuggle", "ok"):
        caps[f"raw.{path}"] = {"upstream": "crm", "method": "GET", "path": f"/{path}"}
    caps["raw.head"] = {"upstream": "crm", "method": "HEAD", "path": "/head"}
    rules["agents"]["bot"]["grants"] += [f"raw.{p}" for p in ("append", "idle-extra", "smuggle", "ok", "head")]
    gw = await make_gateway(rules)
    method = "HEAD" if first == "head" else "GET"
    data = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n" if first == "smuggle" else None
    async with gw.session.request(method, f"{gw.url}/crm/{first}", headers=gw.headers(), data=data) as r:
        assert r.status == 200
        if method == "GET":
            assert await r.read() == b"A1"
    await asyncio.sleep(0.15)  # the extra bytes have arrived (or sit waiting for the next request)
    for i in range(3):  # another agent's requests, one after the other
        async with gw.session.get(f"{gw.url}/crm/ok", headers=gw.headers("other-bot")) as r:
            pass
        async with gw.session.get(f"{gw.url}/crm/ok", headers=gw.headers()) as r:
            assert r.status == 200
            assert await r.read() == b"B2 /ok", (first, i)
