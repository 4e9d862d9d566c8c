"""The Dry-Run Rule: capture, synthetic responses, review, approve-and-replay, reject, expire."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.config import parse_rules
from proxy.policy.identity import mint_token
from tests.conftest import UPSTREAM_TOKEN, base_rules
from tests.procs import GatewayProcess, run_cli

pytestmark = pytest.mark.stores  # every test here runs on SQLite and on PostgreSQL


def dry_rules(upstream, store, **server):
    rules = base_rules(upstream.url, store)
    rules["agents"]["bot"]["grants"] = ["contact.read", "contact.create",  # mode unset: dry-run
                                        {"capability": "contact.update", "mode": "dry_run"}, "contact.delete"]
    rules["capabilities"]["contact.update"]["body"] = {"allow_fields": ["name", "stage"],
                                                       "constraints": {"stage": {"enum": ["open", "won"]}}}
    rules["server"].update(server)
    return rules


async def test_unset_write_mode_is_dry_run_and_never_reaches_upstream(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url))
    r = await gw.request("POST", "/api/contacts", json={"name": "Ann"}, on_behalf_of="ae:jane", intent="add Ann")
    assert r.status == 201
    item_id = r.headers["X-Tether-Dry-Run"]
    body = await r.json()
    assert body["name"] == "Ann" and body["id"].startswith("dryrun-")
    assert r.headers["Location"] == f"/api/contacts/{body['id']}"
    r = await gw.request("DELETE", "/api/contacts/9")
    assert r.status == 204 and "X-Tether-Dry-Run" in r.headers
    assert upstream.received == []
    # reads always go live
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    r = await gw.request("GET", "/api/contacts/1")
    assert r.status == 200 and "X-Tether-Dry-Run" not in r.headers
    # a denial stays a denial in dry-run
    r = await gw.request("PATCH", "/api/contacts/1", json={"owner": "x"})
    assert r.status == 422
    r = await gw.request("PUT", "/api/contacts/1", json={})
    assert r.status == 403
    items = (await (await gw.admin("GET", "/api/review/items")).json())["items"]
    assert {i["id"] for i in items} >= {item_id}
    it = [i for i in items if i["id"] == item_id][0]
    assert it["state"] == "pending" and it["agent"] == "bot" and it["on_behalf_of"] == "ae:jane"
    assert it["intent"] == "add Ann" and it["capability"] == "contact.create"
    assert "headers" not in it["request"] and "body_text" not in it["request"]  # lists carry summaries
    it = await (await gw.admin("GET", f"/api/review/items/{item_id}")).json()
    assert it["request"]["body_json"] == {"name": "Ann"} and it["synthetic"]["status"] == 201
    # nothing secret captured
    flat = json.dumps(it)
    assert "Authorization" not in flat and UPSTREAM_TOKEN not in flat


async def test_approve_replays_exactly_the_captured_request(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url))
    upstream.put_record("contacts", {"id": "5", "name": "Old", "stage": "open"})
    r = await gw.request("PATCH", "/api/contacts/5?notify=false&x=1", json={"stage": "won"},
                         on_behalf_of="ae:jane", intent="close the deal", headers={"X-Custom": "kept"})
    assert r.status == 200
    assert await r.json() == {"id": "5", "stage": "won"}
    item_id = r.headers["X-Tether-Dry-Run"]
    assert upstream.seen("PATCH") == []
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={"note": "ok"},
                       token=gw.reviewer_token("rita"))
    assert r.status == 200, await r.text()
    item = await r.json()
    assert item["state"] == "replayed" and item["replay"]["status"] == 200
    assert item["replay"]["body"]["stage"] == "won"
    sent = upstream.seen("PATCH")
    assert len(sent) == 1
    got = sent[0]
    assert got.raw_path == "/api/contacts/5?notify=false&x=1"
    assert got.json() == {"stage": "won"}
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert got.headers["X-Tether-Agent"] == "bot" and got.headers["X-Tether-On-Behalf-Of"] == "ae:jane"
    assert got.headers["X-Tether-Intent"] == "close the deal" and got.headers["X-Tether-Reviewer"] == "rita"
    assert got.headers["X-Custom"] == "kept"
    assert upstream.records["contacts"]["5"]["stage"] == "won"
    # a second approval is refused
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", token=gw.reviewer_token("bob"))
    assert r.status == 409 and (await r.json())["error"]["code"] == "already_decided"
    assert len(upstream.seen("PATCH")) == 1
    # the journal tells the whole story
    recs = await gw.journal()
    events = [(x["kind"], x["decision"]) for x in recs if x.get("review_item") == item_id or
              (x["kind"] == "request" and x["decision"] == "dry_run")]
    assert ("request", "dry_run") in events
    assert ("review", "approved") in events
    assert ("request", "replay") in events
    replay_rec = [x for x in recs if x["kind"] == "request" and x["decision"] == "replay"][0]
    assert replay_rec["reviewer"] == "rita" and replay_rec["agent"] == "bot"


async def test_reject_and_expire_never_forward(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url, review={"ttl": 0.5, "sweep_interval": 0.2}))
    r1 = await gw.request("POST", "/api/contacts", json={"name": "A"})
    r2 = await gw.request("POST", "/api/contacts", json={"name": "B"})
    a, b = r1.headers["X-Tether-Dry-Run"], r2.headers["X-Tether-Dry-Run"]
    r = await gw.admin("POST", f"/api/review/items/{a}/reject", json={})
    assert r.status == 400
    r = await gw.admin("POST", f"/api/review/items/{a}/reject", json={"reason": "wrong account"})
    assert r.status == 200 and (await r.json())["state"] == "rejected"
    await asyncio.sleep(1.0)
    it = await (await gw.admin("GET", f"/api/review/items/{b}")).json()
    assert it["state"] == "expired"
    r = await gw.admin("POST", f"/api/review/items/{b}/approve")
    assert r.status == 410 and (await r.json())["error"]["code"] == "review_expired"
    assert upstream.received == []
    recs = await gw.journal()
    assert any(x["kind"] == "review" and x["decision"] == "rejected" and x["reason"] == "wrong account" for x in recs)
    assert any(x["kind"] == "review" and x["decision"] == "expired" for x in recs)


async def test_two_reviewers_at_once_replay_exactly_once(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url))
    r = await gw.request("POST", "/api/contacts", json={"name": "Once"})
    item_id = r.headers["X-Tether-Dry-Run"]
    rs = await asyncio.gather(*[gw.admin("POST", f"/api/review/items/{item_id}/approve",
                                         token=gw.reviewer_token(f"r{i}")) for i in range(5)])
    assert sorted(r.status for r in rs) == [200, 409, 409, 409, 409]
    assert len(upstream.seen("POST")) == 1


async def test_admin_api_refuses_agents_and_self_approval(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url))
    r = await gw.request("POST", "/api/contacts", json={"name": "A"})
    item_id = r.headers["X-Tether-Dry-Run"]
    r = await gw.admin("GET", "/api/review/items", token=gw.token("bot"))
    assert r.status == 403 and (await r.json())["error"]["code"] == "reviewer_required"
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", token=gw.token("bot"))
    assert r.status == 403
    # a reviewer token whose identity is the agent itself
    ident = gw.gw.state.rules.identity
    self_token = mint_token(ident, "bot", roles=[ident.reviewer_role])
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", token=self_token)
    assert r.status == 403 and (await r.json())["error"]["code"] == "self_approval"
    async with gw.session.get(f"{gw.admin_url}/api/review/items") as r:
        assert r.status == 401
    # the agent listener does not serve the admin API
    async with gw.session.get(f"{gw.url}/api/review/items", headers={"Authorization": f"Bearer {gw.reviewer_token()}"}) as r:
        assert r.status in (401, 403)
    assert upstream.received == []


async def test_approve_with_edit_is_validated_again(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url))
    upstream.put_record("contacts", {"id": "5", "name": "Old", "stage": "open"})
    r = await gw.request("PATCH", "/api/contacts/5", json={"stage": "won"})
    item_id = r.headers["X-Tether-Dry-Run"]
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={"edit": {"stage": "lost"}})
    assert r.status == 422 and (await r.json())["error"]["code"] == "constraint_violated"
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={"edit": {"owner": "me"}})
    assert r.status == 422 and (await r.json())["error"]["code"] == "field_not_allowed"
    assert upstream.seen("PATCH") == []
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={"edit": {"stage": "open", "name": "New"}})
    assert r.status == 200
    item = await r.json()
    assert item["decision"]["edited"] is True and item["state"] == "replayed"
    assert upstream.seen("PATCH")[0].json() == {"stage": "open", "name": "New"}
    assert any(x.get("edited") for x in await gw.journal() if x["kind"] == "review")


async def test_replay_failure_is_recorded(make_gateway, upstream, store_url):
    gw = await make_gateway(dry_rules(upstream, store_url))
    r = await gw.request("PATCH", "/api/contacts/404", json={"stage": "won"})
    item_id = r.headers["X-Tether-Dry-Run"]
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve")
    item = await r.json()
    assert item["state"] == "replay_failed" and item["replay"]["status"] == 404


async def test_rules_change_after_capture_is_rechecked(make_gateway, upstream, store_url):
    rules = dry_rules(upstream, store_url)
    gw = await make_gateway(rules)
    r = await gw.request("POST", "/api/contacts", json={"name": "A"})
    item_id = r.headers["X-Tether-Dry-Run"]
    import yaml

    rules["agents"]["bot"]["grants"] = ["contact.read"]
    gw.rules_path.write_text(yaml.safe_dump(rules))
    ok, _ = await gw.gw.reload("test")
    assert ok
    r = await gw.admin("POST", f"/api/review/items/{item_id}/approve")
    assert r.status == 409 and "no longer granted" in (await r.json())["error"]["message"]
    assert upstream.received == []


@pytest.mark.slow
async def test_review_items_survive_kill9(upstream, tmp_path, store_url):
    rules = dry_rules(upstream, store_url)
    rules_doc = parse_rules(rules)
    token = mint_token(rules_doc.identity, "bot")
    reviewer = mint_token(rules_doc.identity, "rita", roles=["reviewer"])
    proc = GatewayProcess(rules, tmp_path).start()
    ids = []
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            async with s.post(f"{proc.url}/crm/api/contacts", json={"name": f"n{i}"},
                              headers={"Authorization": f"Bearer {token}", "X-Tether-Intent": "x"}) as r:
                assert r.status == 201
                ids.append(r.headers["X-Tether-Dry-Run"])
        async with s.post(f"{proc.admin_url}/api/review/items/{ids[0]}/reject", json={"reason": "no"},
                          headers={"Authorization": f"Bearer {reviewer}"}) as r:
            assert r.status == 200
    proc.kill9()
    proc2 = GatewayProcess(rules, tmp_path, name="r2.yaml").start()
    try:
        env = {"TETHER_ADMIN_URL": proc2.admin_url, "TETHER_ADMIN_TOKEN": reviewer}
        r = run_cli("review", "list", "--state", "", "--json", env=env)
        assert r.returncode == 0, r.stderr
        states = {i["id"]: i["state"] for i in json.loads(r.stdout)}
        assert states[ids[0]] == "rejected" and all(states[i] == "pending" for i in ids[1:])
        r = run_cli("review", "show", ids[1], env=env)
        assert r.returncode == 0 and "POST /api/contacts" in r.stdout and '"name": "n1"' in r.stdout
        r = await asyncio.to_thread(run_cli, "review", "approve", ids[1], env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "replayed" in r.stdout
        r = run_cli("review", "reject", ids[2], "--reason", "dup", env=env)
        assert r.returncode == 0
    finally:
        proc2.stop()
    assert [x.json()["name"] for x in upstream.seen("POST")] == ["n1"]
