"""Admin API endpoints the console and the CLI use: journal search, record context, verify, diff, events."""

from __future__ import annotations

import asyncio

from tests.conftest import base_rules


async def test_journal_search_record_context_and_verify(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["agents"]["bot"]["grants"].append("contact.delete")  # dry-run
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "1", "name": "A"})
    await gw.request("GET", "/api/contacts/1", intent="look up Acme")
    r = await gw.request("DELETE", "/api/contacts/1", intent="remove duplicate of Acme")
    item = r.headers["X-Tether-Dry-Run"]
    await gw.request("GET", "/api/nope")
    doc = await (await gw.admin("GET", "/api/journal", params={"q": "duplicate"})).json()
    assert {x["kind"] for x in doc["records"]} == {"request"}  # the outcome record carries no intent text
    req = [x for x in doc["records"] if x["kind"] == "request"][0]
    assert req["intent"] == "remove duplicate of Acme"
    doc = await (await gw.admin("GET", "/api/journal", params={"decision": "denied"})).json()
    assert [x["reason"] for x in doc["records"]] == ["route_not_registered"]
    ctx = await (await gw.admin("GET", f"/api/journal/{req['seq']}")).json()
    assert ctx["review_item"]["id"] == item and len(ctx["related"]) == 2
    v = await (await gw.admin("GET", "/api/journal/verify")).json()
    assert v["ok"] is True and v["checked"] > 5
    # paging back
    page1 = await (await gw.admin("GET", "/api/journal", params={"limit": 2})).json()
    page2 = await (await gw.admin("GET", "/api/journal", params={"limit": 2,
                                                                 "before_seq": page1["next_before_seq"]})).json()
    assert page1["records"][-1]["seq"] > page2["records"][0]["seq"]


async def test_review_diff_reads_the_current_record(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["agents"]["bot"]["grants"] = ["contact.update"]
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "4", "name": "Old", "stage": "open"})
    r = await gw.request("PATCH", "/api/contacts/4", json={"stage": "won", "name": "Old"})
    d = await (await gw.admin("GET", f"/api/review/items/{r.headers['X-Tether-Dry-Run']}/diff")).json()
    fields = {f["field"]: f for f in d["fields"]}
    assert fields["stage"] == {"field": "stage", "current": "open", "proposed": "won", "changed": True}
    assert fields["name"]["changed"] is False
    assert d["operation"] == "update" and d["current"]["name"] == "Old"


async def test_events_stream_announces_commits(make_gateway, upstream, tmp_path):
    gw = await make_gateway(base_rules(upstream.url, str(tmp_path / "t.db")))
    async with gw.session.get(f"{gw.admin_url}/api/events",
                              headers={"Authorization": f"Bearer {gw.reviewer_token()}"}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        line = await asyncio.wait_for(resp.content.readline(), 2)
        assert line.startswith(b"event: hello")
        await gw.request("GET", "/api/contacts/1")
        got = b""
        while b"event: journal" not in got:
            got += await asyncio.wait_for(resp.content.readline(), 2)


async def test_review_list_counts_and_urls_and_delete_diff(make_gateway, upstream, tmp_path):
    rules = base_rules(upstream.url, str(tmp_path / "t.db"))
    rules["agents"]["bot"]["grants"] = ["contact.delete", "contact.create"]
    gw = await make_gateway(rules)
    upstream.put_record("contacts", {"id": "9", "name": "Nine"})
    r = await gw.request("DELETE", "/api/contacts/9")
    item = r.headers["X-Tether-Dry-Run"]
    await gw.request("POST", "/api/contacts?x=1", json={"name": "n"})
    doc = await (await gw.admin("GET", "/api/review/items")).json()
    assert doc["pending"] == 2
    urls = sorted(i["upstream_url"] for i in doc["items"])
    assert urls == [f"{upstream.url}/api/contacts/9", f"{upstream.url}/api/contacts?x=1"]
    d = await (await gw.admin("GET", f"/api/review/items/{item}/diff")).json()
    assert d["deletes"] is True and d["current"]["name"] == "Nine"
