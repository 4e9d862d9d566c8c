"""Transactional Safety Nets against a stateful fake upstream."""

from __future__ import annotations

import asyncio
import copy
import json
import time

import aiohttp
import pytest

from proxy.config import parse_rules
from proxy.policy.identity import mint_token
from tests.conftest import base_rules
from tests.procs import GatewayProcess, run_cli

pytestmark = pytest.mark.stores  # every test here runs on SQLite and on PostgreSQL


def tx_rules(upstream, store, webhook=None, **tx_cfg):
    rules = base_rules(upstream.url, store)
    caps = rules["capabilities"]
    caps["account.update"] = {"upstream": "crm", "method": "PATCH", "path": "/api/accounts/{id}"}
    caps["quote.create"] = {"upstream": "crm", "method": "POST", "path": "/api/quotes"}
    caps["account.delete"] = {"upstream": "crm", "method": "DELETE", "path": "/api/accounts/{id}"}
    caps["payment.refund"] = {"upstream": "crm", "method": "POST", "path": "/api/refunds",
                              "compensation": "non_compensable"}
    caps["note.create"] = {"upstream": "crm", "method": "POST", "path": "/api/notes",
                           "compensation": "non_compensable", "allow_live_without_compensation": True}
    caps["contact.update"]["on_failure"] = "keep"
    live = lambda c: {"capability": c, "mode": "live"}  # noqa: E731
    rules["agents"]["bot"]["grants"] = ["contact.read", live("contact.create"), live("contact.update"),
                                        live("account.update"), live("quote.create"), live("account.delete"),
                                        live("payment.refund"), live("note.create")]
    rules["agents"]["other-bot"]["grants"] = [live("contact.create")]
    rules["server"]["transactions"] = {"retry_attempts": 3, "retry_backoff": 0.05, "sweep_interval": 0.2, **tx_cfg}
    if webhook is not None:
        rules["governance"] = {"alerts": [{"url": webhook.url}]}
    return rules


def state(upstream):
    return copy.deepcopy({k: v for k, v in upstream.records.items() if v})


async def test_three_step_workflow_whose_last_step_fails_is_undone(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "acme", "name": "Acme", "tier": "silver", "arr": 100})
    before = state(upstream)
    h = {"X-Tether-Transaction": "renewal-1"}
    r1 = await gw.request("POST", "/api/contacts", json={"name": "Jane"}, headers=h, intent="renew Acme")
    r2 = await gw.request("PATCH", "/api/accounts/acme", json={"tier": "gold", "arr": 150}, headers=h)
    assert r1.status == 201 and r2.status == 200
    assert upstream.records["accounts"]["acme"]["tier"] == "gold"
    upstream.fail("POST", "/api/quotes", status=500)
    r3 = await gw.request("POST", "/api/quotes", json={"amount": 150}, headers=h)
    assert r3.status == 500
    assert r3.headers["X-Tether-Transaction-State"] == "rolled_back"
    after = state(upstream)
    # versions moved on, everything else is exactly as before
    for coll in after:
        for rec in after[coll].values():
            rec.pop("version", None)
    for coll in before:
        for rec in before[coll].values():
            rec.pop("version", None)
    assert after == before
    # undo ran newest first: restore the account, then delete the contact
    undo = [(x.method, x.path) for x in upstream.received if x.headers.get("X-Tether-Intent", "").startswith("rollback")
            and x.method != "GET"]
    assert undo == [("PATCH", "/api/accounts/acme"), ("DELETE", f"/api/contacts/{(await r1.json())['id']}")]
    async with gw.session.get(f"{gw.url}/_tether/transactions/renewal-1", headers=gw.headers()) as r:
        tx = await r.json()
    assert tx["state"] == "rolled_back"
    assert [s["state"] for s in tx["steps"]] == ["compensated", "compensated", "not_applied"]
    recs = await gw.journal()
    assert [x["event"] for x in recs if x["kind"] == "tx" and x["event"].startswith("step_compensated")] == \
        ["step_compensated", "step_compensated"]


async def test_explicit_open_commit_and_rollback(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "a1", "name": "A", "tier": "silver"})
    async with gw.session.post(f"{gw.url}/_tether/transactions", json={"name": "upgrade", "deadline": "10m"},
                               headers=gw.headers()) as r:
        assert r.status == 201
        tx = await r.json()
    assert tx["state"] == "open" and tx["deadline"] > time.time() + 500
    h = {"X-Tether-Transaction": tx["id"]}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h)
    assert upstream.records["accounts"]["a1"]["tier"] == "gold"
    async with gw.session.post(f"{gw.url}/_tether/transactions/{tx['id']}/rollback", headers=gw.headers()) as r:
        assert r.status == 200
        assert (await r.json())["state"] == "rolled_back"
    assert upstream.records["accounts"]["a1"]["tier"] == "silver"
    # a committed transaction keeps its writes and takes no more
    async with gw.session.post(f"{gw.url}/_tether/transactions", json={}, headers=gw.headers()) as r:
        tx2 = await r.json()
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "platinum"}, headers={"X-Tether-Transaction": tx2["id"]})
    async with gw.session.post(f"{gw.url}/_tether/transactions/{tx2['id']}/commit", headers=gw.headers()) as r:
        assert (await r.json())["state"] == "committed"
    r = await gw.request("PATCH", "/api/accounts/a1", json={"tier": "x"}, headers={"X-Tether-Transaction": tx2["id"]})
    assert r.status == 409 and (await r.json())["error"]["code"] == "transaction_closed"
    assert upstream.records["accounts"]["a1"]["tier"] == "platinum"


async def test_transactions_belong_to_their_agent(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    await gw.request("POST", "/api/contacts", json={"name": "x"}, headers={"X-Tether-Transaction": "mine"})
    r = await gw.request("POST", "/api/contacts", agent="other-bot", json={"name": "y"},
                         headers={"X-Tether-Transaction": "mine"})
    assert r.status == 403 and (await r.json())["error"]["code"] == "transaction_not_owned"
    for method, suffix in (("GET", ""), ("POST", "/rollback"), ("POST", "/commit")):
        async with gw.session.request(method, f"{gw.url}/_tether/transactions/mine{suffix}",
                                      headers=gw.headers("other-bot")) as r:
            assert r.status == 403, (method, suffix)
    assert len(upstream.seen("POST")) == 1


async def test_non_compensable_write_is_refused_live_in_a_transaction(make_gateway, upstream, store_url):
    rules = tx_rules(upstream, store_url)
    rules["agents"]["dry-bot"] = {"grants": ["payment.refund"]}  # dry-run
    gw = await make_gateway(rules)
    h = {"X-Tether-Transaction": "t-refund"}
    r = await gw.request("POST", "/api/refunds", json={"amount": 5}, headers=h)
    assert r.status == 403 and (await r.json())["error"]["code"] == "non_compensable_in_transaction"
    r = await gw.request("POST", "/api/refunds", agent="dry-bot", json={"amount": 5}, headers={"X-Tether-Transaction": "t2"})
    assert r.status == 201 and "X-Tether-Dry-Run" in r.headers
    # explicitly allowed: runs live, recorded as non-compensable
    r = await gw.request("POST", "/api/notes", json={"text": "hi"}, headers=h)
    assert r.status == 201
    # outside a transaction the refund runs live
    r = await gw.request("POST", "/api/refunds", json={"amount": 5})
    assert r.status == 201
    assert [x.path for x in upstream.seen("POST")] == ["/api/notes", "/api/refunds"]


async def test_failing_compensation_is_retried_to_completion(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    h = {"X-Tether-Transaction": "t-retry"}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h)
    upstream.fail("PATCH", "/api/accounts/a1", status=503, times=2)
    async with gw.session.post(f"{gw.url}/_tether/transactions/t-retry/rollback", headers=gw.headers()) as r:
        tx = await r.json()
    assert tx["state"] == "rolled_back", tx
    assert tx["steps"][0]["attempts"] == 3
    assert upstream.records["accounts"]["a1"]["tier"] == "silver"


async def test_compensation_that_always_fails_needs_attention_and_alerts(make_gateway, upstream, webhook, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url, webhook))
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    h = {"X-Tether-Transaction": "t-stuck"}
    c = await gw.request("POST", "/api/contacts", json={"name": "c"}, headers=h)
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h)
    upstream.fail("PATCH", "/api/accounts/a1", status=500, times=100)
    async with gw.session.post(f"{gw.url}/_tether/transactions/t-stuck/rollback", headers=gw.headers()) as r:
        tx = await r.json()
    assert tx["state"] == "needs_attention"
    assert len(tx["remaining_steps"]) == 2  # the failed step and the older one, never silently dropped
    alert = await webhook.wait_for(lambda a: a["event"] == "needs_attention")
    assert alert["transaction"] == "t-stuck"
    # the contact was not deleted yet (strict reverse order)
    assert (await c.json())["id"] in upstream.records["contacts"]
    # the upstream recovers; the CLI retry finishes the rollback
    upstream.failures.clear()
    env = {"TETHER_ADMIN_URL": gw.admin_url, "TETHER_ADMIN_TOKEN": gw.reviewer_token()}
    r = await asyncio.to_thread(run_cli, "tx", "list", "--state", "needs_attention", env=env)
    assert "t-stuck" in r.stdout
    r = await asyncio.to_thread(run_cli, "tx", "retry", "t-stuck", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rolled_back" in r.stdout
    assert upstream.records["accounts"]["a1"]["tier"] == "silver"
    assert (await c.json())["id"] not in upstream.records["contacts"]
    r = await asyncio.to_thread(run_cli, "tx", "show", "t-stuck", env=env)
    assert "compensated" in r.stdout and "PATCH /api/accounts/a1" in r.stdout


async def test_concurrent_change_is_flagged_conflict_not_overwritten(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "a1", "tier": "silver", "owner": "ann"})
    h = {"X-Tether-Transaction": "t-conflict"}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h)
    # someone else edits the same field after the agent
    upstream.records["accounts"]["a1"]["tier"] = "bronze"
    async with gw.session.post(f"{gw.url}/_tether/transactions/t-conflict/rollback", headers=gw.headers()) as r:
        tx = await r.json()
    assert tx["state"] == "needs_attention"
    assert tx["steps"][0]["state"] == "conflict"
    assert upstream.records["accounts"]["a1"]["tier"] == "bronze"
    # a human may decide to skip it
    r = await gw.admin("POST", "/api/transactions/t-conflict/retry", json={"resolve_conflicts": "skip"})
    assert (await r.json())["state"] == "rolled_back"
    assert upstream.records["accounts"]["a1"]["tier"] == "bronze"


async def test_etag_makes_a_racing_change_a_conflict(make_gateway, upstream, store_url):
    """Between the check and the undo someone writes: If-Match turns the undo into 412 -> conflict."""
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    h = {"X-Tether-Transaction": "t-etag"}
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers=h)
    original = upstream._rest

    def racing(request, coll, rid, body):
        resp = original(request, coll, rid, body)
        if request.method == "GET" and request.headers.get("X-Tether-Intent") is None and coll == "accounts":
            upstream.records["accounts"]["a1"]["version"] += 1  # a concurrent writer bumps the version
        return resp

    upstream._rest = racing
    async with gw.session.post(f"{gw.url}/_tether/transactions/t-etag/rollback", headers=gw.headers()) as r:
        tx = await r.json()
    undo = [x for x in upstream.seen("PATCH") if "If-Match" in x.headers]
    assert undo, "the undo carried no If-Match"
    assert tx["steps"][0]["state"] == "conflict"
    assert upstream.records["accounts"]["a1"]["tier"] == "gold"


async def test_delete_is_undone_by_recreating_from_the_pre_image(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "a9", "name": "Nine", "tier": "gold"})
    h = {"X-Tether-Transaction": "t-del"}
    r = await gw.request("DELETE", "/api/accounts/a9", headers=h)
    assert r.status == 204 and "a9" not in upstream.records["accounts"]
    async with gw.session.post(f"{gw.url}/_tether/transactions/t-del/rollback", headers=gw.headers()) as r:
        assert (await r.json())["state"] == "rolled_back"
    assert upstream.records["accounts"]["a9"]["name"] == "Nine"
    assert upstream.records["accounts"]["a9"]["tier"] == "gold"


async def test_deadline_rolls_back_automatically(make_gateway, upstream, store_url):
    gw = await make_gateway(tx_rules(upstream, store_url))
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    async with gw.session.post(f"{gw.url}/_tether/transactions", json={"id": "short", "deadline": 0.5},
                               headers=gw.headers()) as r:
        assert r.status == 201
    await gw.request("PATCH", "/api/accounts/a1", json={"tier": "gold"}, headers={"X-Tether-Transaction": "short"})
    await asyncio.sleep(1.2)
    assert upstream.records["accounts"]["a1"]["tier"] == "silver"
    r = await gw.request("PATCH", "/api/accounts/a1", json={"tier": "x"}, headers={"X-Tether-Transaction": "short"})
    assert r.status in (409, 410)


@pytest.mark.slow
async def test_kill9_mid_transaction_rolls_back_after_restart(upstream, tmp_path, store_url):
    rules = tx_rules(upstream, store_url)
    rules["server"]["transactions"]["default_deadline"] = 2
    doc = parse_rules(rules)
    token = mint_token(doc.identity, "bot")
    upstream.put_record("accounts", {"id": "a1", "tier": "silver"})
    proc = GatewayProcess(rules, tmp_path).start()
    h = {"Authorization": f"Bearer {token}", "X-Tether-Intent": "x", "X-Tether-Transaction": "crashy"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proc.url}/crm/api/contacts", json={"name": "c"}, headers=h) as r:
            assert r.status == 201
            cid = (await r.json())["id"]
        async with s.patch(f"{proc.url}/crm/api/accounts/a1", json={"tier": "gold"}, headers=h) as r:
            assert r.status == 200
    proc.kill9()
    assert upstream.records["accounts"]["a1"]["tier"] == "gold"
    await asyncio.sleep(2.2)  # the deadline passes while the gateway is down
    proc2 = GatewayProcess(rules, tmp_path, name="r2.yaml").start()
    try:
        for _ in range(50):
            if upstream.records["accounts"]["a1"]["tier"] == "silver" and cid not in upstream.records["contacts"]:
                break
            await asyncio.sleep(0.1)
        assert upstream.records["accounts"]["a1"]["tier"] == "silver"
        assert cid not in upstream.records["contacts"]
        reviewer = mint_token(doc.identity, "rita", roles=["reviewer"])
        r = await asyncio.to_thread(run_cli, "tx", "show", "crashy", "--json",
                                    env={"TETHER_ADMIN_URL": proc2.admin_url, "TETHER_ADMIN_TOKEN": reviewer})
        assert json.loads(r.stdout)["state"] == "rolled_back"
    finally:
        proc2.stop()
