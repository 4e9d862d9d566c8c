"""The review queue against hostile agents and careless reviewers.

* Separation of duties: the agent, the person it acted for and any declared agent cannot decide an item;
  an item past its TTL cannot be approved even before the expiry sweep ran; an item captured inside a
  transaction that is no longer open cannot be approved.
* What is replayed is what was checked: an approval (edited or not) re-runs every rule of the capability
  as the rules stand, with caps relative to the record read at approval time.
* The queue cannot fill the disk: per-agent caps on pending items and bytes, each body stored once, list
  endpoints return summaries.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from proxy.policy.identity import mint_token
from tests.conftest import base_rules

pytestmark = pytest.mark.stores


def rules_for(upstream, store, **review):
    rules = base_rules(upstream.url, store)
    rules["agents"]["bot"]["grants"] = ["contact.read", "contact.create", {"capability": "contact.update",
                                                                          "mode": "dry_run"}]
    rules["agents"]["other-bot"]["grants"] = ["contact.read", "contact.create"]
    rules["capabilities"]["contact.update"]["body"] = {
        "allow_fields": ["name", "amount", "note"],
        "constraints": {"amount": {"max_increase_pct": 10}},
        "json_schema": {"type": "object", "properties": {"note": {"type": "string", "maxLength": 40}}},
        "max_bytes": 512,
    }
    rules["server"]["review"] = {"sweep_interval": 3600, **review}  # no sweep runs during these tests
    return rules


async def capture(gw, method="PATCH", path="/api/contacts/7", json=None, **kw) -> str:
    r = await gw.request(method, path, json=json if json is not None else {"amount": 105}, **kw)
    assert r.status in (200, 201), await r.text()
    return r.headers["X-Tether-Dry-Run"]


async def decide(gw, item_id, token, action="approve", **body):
    if action == "reject":
        body.setdefault("reason", "no")
    r = await gw.admin("POST", f"/api/review/items/{item_id}/{action}", json=body, token=token)
    return r.status, await r.json()


# --------------------------------------------------------------------------- separation of duties


async def test_the_person_an_item_was_made_for_cannot_decide_it(make_gateway, upstream, store_url):
    gw = await make_gateway(rules_for(upstream, store_url))
    upstream.put_record("contacts", {"id": "7", "amount": 100})
    item = await capture(gw, on_behalf_of="ae:Jane@acme.example")
    ident = gw.gw.state.rules.identity
    for spelling in ("ae:Jane@acme.example", "jane@acme.example", "JANE@ACME.EXAMPLE", "sso:jane@acme.example"):
        tok = mint_token(ident, spelling, roles=[ident.reviewer_role])
        for action in ("approve", "reject"):
            status, doc = await decide(gw, item, tok, action)
            assert status == 403 and doc["error"]["code"] == "self_approval", (spelling, action, doc)
    assert upstream.seen("PATCH") == []
    status, doc = await decide(gw, item, gw.reviewer_token("rita"))
    assert status == 200 and doc["state"] == "replayed" and len(upstream.seen("PATCH")) == 1


async def test_no_agent_can_decide_items_even_with_a_reviewer_role(make_gateway, upstream, store_url):
    """An agent's issuer may let it choose its claims, reviewer role included."""
    gw = await make_gateway(rules_for(upstream, store_url))
    upstream.put_record("contacts", {"id": "7", "amount": 100})
    item = await capture(gw)
    ident = gw.gw.state.rules.identity
    tokens = [mint_token(ident, "other-bot", roles=[ident.reviewer_role]),           # another declared agent
              mint_token(ident, "rita", actor="other-bot", roles=[ident.reviewer_role]),  # an agent acting for rita
              mint_token(ident, "bot", actor="rita", roles=[ident.reviewer_role])]    # rita "for" the agent
    for tok in tokens:
        status, doc = await decide(gw, item, tok)
        assert status == 403 and doc["error"]["code"] == "self_approval", doc
    assert upstream.seen("PATCH") == []


async def test_an_item_past_its_ttl_cannot_be_approved_before_the_sweep(make_gateway, upstream, store_url):
    gw = await make_gateway(rules_for(upstream, store_url, ttl=0.3))
    upstream.put_record("contacts", {"id": "7", "amount": 100})
    a, b = await capture(gw), await capture(gw, json={"amount": 101})
    await asyncio.sleep(0.6)
    assert (await gw.gw.store.review_get(a))["state"] == "pending"  # the sweep has not run
    for item, action in ((a, "approve"), (b, "reject")):
        status, doc = await decide(gw, item, gw.reviewer_token(), action)
        assert status == 410 and doc["error"]["code"] == "review_expired", doc
        assert (await gw.gw.store.review_get(item))["state"] == "expired"
        status, doc = await decide(gw, item, gw.reviewer_token(), action)
        assert status == 410 and doc["error"]["code"] == "review_expired"
    assert upstream.seen("PATCH") == []
    recs = await gw.journal()
    assert sum(1 for x in recs if x["kind"] == "review" and x["decision"] == "expired") == 2


async def test_an_item_is_approved_only_while_its_transaction_is_open_and_then_undone_with_it(make_gateway, upstream,
                                                                                              store_url):
    gw = await make_gateway(rules_for(upstream, store_url))
    upstream.put_record("contacts", {"id": "7", "amount": 100})
    items = {}
    for tx in ("t-commit", "t-rollback", "t-open"):
        items[tx] = await capture(gw, headers={"X-Tether-Transaction": tx})
    for tx, action in (("t-commit", "commit"), ("t-rollback", "rollback")):
        async with gw.session.post(f"{gw.url}/_tether/transactions/{tx}/{action}", headers=gw.headers()) as r:
            assert r.status == 200, await r.text()
    for tx in ("t-commit", "t-rollback"):
        status, doc = await decide(gw, items[tx], gw.reviewer_token())
        assert status == 409 and doc["error"]["code"] == "transaction_closed", doc
        assert (await gw.gw.store.review_get(items[tx]))["state"] == "pending"  # it can still be rejected
    assert upstream.seen("PATCH") == []
    # while the transaction is open, the approved replay becomes one of its steps: its rollback undoes it
    status, doc = await decide(gw, items["t-open"], gw.reviewer_token())
    assert status == 200 and doc["state"] == "replayed"
    assert upstream.records["contacts"]["7"]["amount"] == 105
    async with gw.session.get(f"{gw.url}/_tether/transactions/t-open", headers=gw.headers()) as r:
        tx = await r.json()
    assert [s["state"] for s in tx["steps"]] == ["armed"] and tx["steps"][0]["review_item"] == items["t-open"]
    async with gw.session.post(f"{gw.url}/_tether/transactions/t-open/rollback", headers=gw.headers()) as r:
        assert r.status == 200 and (await r.json())["state"] == "rolled_back"
    assert upstream.records["contacts"]["7"]["amount"] == 100


# --------------------------------------------------------------------------- what is replayed is what was checked


async def test_an_edit_is_held_to_every_rule_including_caps_relative_to_the_record_now(make_gateway, upstream, store_url):
    gw = await make_gateway(rules_for(upstream, store_url))
    upstream.put_record("contacts", {"id": "7", "amount": 100})
    item = await capture(gw, json={"amount": 105})  # +5%: within the 10% cap
    tok = gw.reviewer_token()
    for edit, status, code in (({"amount": 500}, 422, "constraint_violated"),       # +400%
                               ({"amount": 105, "owner": "me"}, 422, "field_not_allowed"),
                               ({"note": "x" * 41}, 422, "schema_violation"),
                               ({"note": "y" * 40, "name": "z" * 600}, 413, "body_too_large")):
        got, doc = await decide(gw, item, tok, edit=edit)
        assert (got, doc["error"]["code"]) == (status, code), (edit, doc)
    assert upstream.seen("PATCH") == [] and (await gw.gw.store.review_get(item))["state"] == "pending"
    # the record moves under the item: the cap is judged against the record as it is when approved
    upstream.records["contacts"]["7"]["amount"] = 50
    got, doc = await decide(gw, item, tok)  # unedited: 105 is now +110%
    assert got == 422 and doc["error"]["code"] == "constraint_violated" and "from 50 to 105" in doc["error"]["message"]
    got, doc = await decide(gw, item, tok, edit={"amount": 54})
    assert got == 200 and doc["state"] == "replayed"
    assert [r.json() for r in upstream.seen("PATCH")] == [{"amount": 54}]


async def test_an_unedited_approval_is_held_to_the_rules_in_force_now(make_gateway, upstream, store_url):
    import yaml

    rules = rules_for(upstream, store_url)
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "7", "amount": 100})
    item = await capture(gw, json={"amount": 101, "note": "ok"})
    rules["capabilities"]["contact.update"]["body"]["allow_fields"] = ["amount"]  # note no longer allowed
    gw.rules_path.write_text(yaml.safe_dump(rules))
    assert (await gw.gw.reload("test"))[0]
    got, doc = await decide(gw, item, gw.reviewer_token())
    assert got == 422 and doc["error"]["code"] == "field_not_allowed"
    assert upstream.seen("PATCH") == []


# --------------------------------------------------------------------------- the queue cannot fill the disk


async def test_each_agent_has_a_cap_on_pending_items(make_gateway, upstream, store_url):
    gw = await make_gateway(rules_for(upstream, store_url, max_pending_per_agent=3))
    # a burst: in-flight captures count, so exactly the cap gets in
    rs = await asyncio.gather(*[gw.request("POST", "/api/contacts", json={"name": f"n{i}"}) for i in range(10)])
    assert sorted(r.status for r in rs) == [201] * 3 + [429] * 7
    refused = [r for r in rs if r.status == 429][0]
    err = (await refused.json())["error"]
    assert err["code"] == "review_queue_full" and err["details"]["pending"] == 3
    assert (await gw.gw.store.review_usage("bot"))[0] == 3
    # another agent is not affected
    r = await gw.request("POST", "/api/contacts", json={"name": "x"}, agent="other-bot")
    assert r.status == 201 and "X-Tether-Dry-Run" in r.headers
    # deciding one frees a place
    items = (await (await gw.admin("GET", "/api/review/items", params={"agent": "bot"})).json())["items"]
    status, _ = await decide(gw, items[0]["id"], gw.reviewer_token(), "reject")
    assert status == 200
    assert (await gw.request("POST", "/api/contacts", json={"name": "again"})).status == 201
    assert (await gw.request("POST", "/api/contacts", json={"name": "over"})).status == 429
    recs = await gw.journal()
    full = [x for x in recs if x["kind"] == "request" and x.get("error") == "review_queue_full"]
    assert len(full) == 8 and all(x["decision"] == "denied" and "review_item" not in x for x in full)
    assert upstream.seen("POST") == []


async def test_bodies_are_stored_once_lists_are_summaries_and_bytes_are_capped(make_gateway, upstream, store_url):
    gw = await make_gateway(rules_for(upstream, store_url, max_pending_bytes_per_agent="400k"))
    # a body of control characters: JSON would store each as six bytes (\u0001); kept as base64 instead
    body = bytes(range(1, 32)) * 4000  # 124 kB of valid UTF-8
    r = await gw.request("POST", "/api/contacts", data=body, headers={"Content-Type": "text/plain"})
    assert r.status == 201
    first = r.headers["X-Tether-Dry-Run"]
    count, used = await gw.gw.store.review_usage("bot")
    assert count == 1 and used < len(body) * 1.34 + 20_000, used  # one copy, not six bytes per byte
    # a JSON body is kept once (the parsed form is derived when the item is read)
    big = {"name": "n" * 100_000}
    r = await gw.request("POST", "/api/contacts", json=big)
    assert r.status == 201
    count, used2 = await gw.gw.store.review_usage("bot")
    assert used2 - used < 100_000 + 20_000, used2 - used
    # the list is summaries: its size does not grow with the bodies
    r = await gw.admin("GET", "/api/review/items")
    doc = await r.json()
    assert len(await r.read()) < 5_000 and doc["count"] == 2 and doc["pending"] == 2
    assert all("headers" not in i["request"] and "body_text" not in i["request"] for i in doc["items"])
    it = await (await gw.admin("GET", f"/api/review/items/{first}")).json()
    assert it["request"]["body_b64"] and it["request"]["body_bytes"] == len(body)
    # past the agent's byte budget: refused, nothing stored
    r = await gw.request("POST", "/api/contacts", data=body * 2, headers={"Content-Type": "text/plain"})
    assert r.status == 429 and (await r.json())["error"]["code"] == "review_queue_full"
    assert (await gw.gw.store.review_usage("bot"))[0] == 2
    # the approval replays exactly the captured bytes
    status, doc = await decide(gw, first, gw.reviewer_token())
    assert status == 200 and upstream.seen("POST")[0].body == body


def _can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/bin/mount")


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs for the disk-full test")
async def test_captures_on_a_full_disk_fail_closed_and_recover(make_gateway, upstream, tmp_path, store_backend):
    if store_backend != "sqlite":
        pytest.skip("a full disk is simulated with a small tmpfs under the SQLite file")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        gw = await make_gateway(rules_for(upstream, str(mnt / "t.db")))
        assert (await gw.request("POST", "/api/contacts", json={"name": "before"})).status == 201
        junk = mnt / "junk"
        try:  # fill what is left (creating the file can already fail: then the disk is full as it is)
            with open(junk, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        except OSError:
            pass
        statuses = []
        for i in range(10):
            r = await gw.request("POST", "/api/contacts", json={"name": "x" * 20_000 + str(i)})
            statuses.append(r.status)
        assert 503 in statuses and set(statuses) <= {201, 503}
        junk.unlink(missing_ok=True)
        for _ in range(50):
            r = await gw.request("POST", "/api/contacts", json={"name": "after"})
            if r.status == 201:
                break
            await asyncio.sleep(0.1)
        assert r.status == 201
        item = r.headers["X-Tether-Dry-Run"]
        assert (await gw.gw.store.review_get(item))["state"] == "pending"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
