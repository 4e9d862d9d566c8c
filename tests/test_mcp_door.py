"""The MCP front door over the real pipeline, driven by the official ``mcp`` Python SDK's client.

Each agent's grants are its tools; a tool call runs the same shared stages as a REST request (grant,
field rules, rate limits, mode, the intent record, dry-run capture, transactions, forwarding), so each
policy is shown holding on both doors side by side."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed: pip install -e '.[test]'")

import httpx2  # noqa: E402  (the SDK's HTTP client)
import mcp_types as types  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from tests.conftest import GatewayHandle, base_rules  # noqa: E402

pytestmark = pytest.mark.stores


def mcp_rules(upstream_url: str, store: str) -> dict[str, Any]:
    rules = base_rules(upstream_url, store)
    rules["server"]["mcp"] = {"path": "/mcp"}
    caps = rules["capabilities"]
    caps["contact.read"]["description"] = "Read one contact."
    caps["contact.update"]["body"] = {"allow_fields": ["name", "stage"],
                                      "constraints": {"stage": {"enum": ["open", "won", "lost"]}}}
    caps["contact.update"]["rate_limit"] = {"per_minute": 6, "burst": 6}
    rules["agents"]["bot"]["grants"] = [
        "contact.read", "contact.list", {"capability": "contact.update", "mode": "live"},
        {"capability": "contact.create", "mode": "live"}, {"capability": "contact.delete", "mode": "live"}]
    rules["agents"]["drafter"] = {"grants": ["contact.read", {"capability": "contact.create"}]}  # dry-run
    return rules


@asynccontextmanager
async def tools(gw: GatewayHandle, agent: str = "bot", on_behalf_of: str | None = None,
                **kw: Any) -> AsyncIterator[ClientSession]:
    token = gw.token(agent, on_behalf_of)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx2.Timeout(30, read=60)) as hc:
        async with streamable_http_client(f"{gw.url}/mcp", http_client=hc) as (read, write):
            async with ClientSession(read, write, **kw) as session:
                await session.initialize()
                yield session


async def listed(s: ClientSession) -> dict[str, types.Tool]:
    out: dict[str, types.Tool] = {}
    cursor = None
    while True:
        page = await s.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        out.update({t.name: t for t in page.tools})
        cursor = page.next_cursor
        if not cursor:
            return out


@pytest.fixture
async def gw(make_gateway: Any, upstream: Any, store_url: str) -> GatewayHandle:
    return await make_gateway(mcp_rules(upstream.url, store_url))


async def test_each_agent_sees_exactly_its_grants_as_tools(gw):
    async with tools(gw, "bot") as bot, tools(gw, "other-bot") as other, tools(gw, "drafter") as drafter:
        mine = await listed(bot)
        assert set(mine) == {"contact_read", "contact_list", "contact_update", "contact_create", "contact_delete",
                             "tether_transaction_begin", "tether_transaction_commit", "tether_transaction_rollback",
                             "tether_transaction_status", "tether_review_status"}
        assert set(await listed(other)) == {"contact_read"}  # reads only: no transaction tools either
        read, update, delete = mine["contact_read"], mine["contact_update"], mine["contact_delete"]
        assert read.annotations.read_only_hint is True and read.description.startswith("Read one contact.")
        assert read.input_schema["required"] == ["id"] and "intent" not in read.input_schema["properties"]
        assert update.annotations.read_only_hint is False and update.annotations.destructive_hint is False
        assert delete.annotations.destructive_hint is True and delete.annotations.idempotent_hint is True
        assert set(update.input_schema["required"]) == {"id", "intent"}  # a write must say why
        body = update.input_schema["properties"]["body"]
        assert body["properties"]["stage"] == {"enum": ["open", "won", "lost"]} and body["additionalProperties"] is False
        dtools = await listed(drafter)
        assert "human to review" in dtools["contact_create"].description  # what dry-run means, in words


async def test_reads_and_live_writes_reach_the_upstream_with_identity_and_intent(gw, upstream):
    upstream.put_record("contacts", {"id": "7", "name": "Ada", "stage": "open"})
    async with tools(gw, "bot", on_behalf_of="ae:jane@acme.example",
                     client_info=types.Implementation(name="renewal-agent", version="2.1")) as s:
        res = await s.call_tool("contact_read", {"id": "7"})
        assert res.is_error is False and res.structured_content["name"] == "Ada"
        res = await s.call_tool("contact_update", {"id": "7", "body": {"stage": "won"}, "intent": "renew Ada"})
        assert res.is_error is False, res
    sent = upstream.seen("PATCH")
    assert len(sent) == 1 and sent[0].json() == {"stage": "won"}
    assert sent[0].headers["X-Tether-Intent"] == "renew Ada" and sent[0].headers["X-Tether-Agent"] == "bot"
    assert sent[0].headers["X-Tether-On-Behalf-Of"] == "ae:jane@acme.example"
    assert sent[0].headers["Authorization"] == "Bearer UPSTREAM-SECRET-TOKEN"  # the agent's token never travels
    recs = await gw.journal()
    intent = [r for r in recs if r["kind"] == "request" and r.get("capability") == "contact.update"][0]
    assert intent["channel"] == "mcp" and intent["mcp"]["tool"] == "contact_update"
    assert intent["mcp"]["client"] == "renewal-agent" and intent["intent"] == "renew Ada"
    assert intent["path"] == "/api/contacts/7" and intent["decision"] == "live"
    outcome = [r for r in recs if r["kind"] == "outcome" and r.get("intent_seq") == intent["seq"]][0]
    assert outcome["status"] == 200 and outcome["channel"] == "mcp"


async def test_refusals_are_tool_errors_and_nothing_reaches_the_upstream(gw, upstream):
    async with tools(gw) as s:
        res = await s.call_tool("contact_update", {"id": "7", "body": {"stage": "won"}})  # no intent
        assert res.is_error and res.structured_content["error"]["code"] == "intent_required"
        res = await s.call_tool("contact_update", {"id": "7", "body": {"owner": "x"}, "intent": "steal"})
        assert res.is_error and res.structured_content["error"]["code"] == "field_not_allowed"
        res = await s.call_tool("contact_update", {"id": "7", "body": {"stage": "closed"}, "intent": "close"})
        assert res.is_error and res.structured_content["error"]["code"] == "constraint_violated"
        res = await s.call_tool("contact_update", {"id": "../admin", "body": {}, "intent": "x"})
        assert res.is_error and res.structured_content["error"]["code"] == "ambiguous_request"
        res = await s.call_tool("contact_update", {"id": "7", "body": {"_method": "DELETE"}, "intent": "x"})
        assert res.is_error and res.structured_content["error"]["code"] in ("ambiguous_request", "field_not_allowed")
        with pytest.raises(MCPError) as ei:  # a tool the agent was not given: the protocol's error
            await s.call_tool("admin_everything", {})
        assert ei.value.error.code == types.INVALID_PARAMS
    assert upstream.seen("PATCH") == []
    recs = await gw.journal()
    denials = [r for r in recs if r["kind"] == "request" and r.get("channel") == "mcp" and r["decision"] == "denied"]
    assert {r["error"] for r in denials} >= {"intent_required", "field_not_allowed", "constraint_violated",
                                             "ambiguous_request", "capability_not_granted"}


async def test_dry_run_capture_approval_and_replay_through_tools(gw, upstream):
    async with tools(gw, "drafter", on_behalf_of="ae:jane@acme.example") as s:
        res = await s.call_tool("contact_create", {"body": {"name": "Grace"}, "intent": "add Grace"})
        assert res.is_error is False
        doc = res.structured_content
        assert doc["dry_run"] is True and doc["applied"] is False and doc["review_item"].startswith("dr_")
        assert upstream.seen("POST") == []  # nothing applied yet
        item = doc["review_item"]
        status = await s.call_tool("tether_review_status", {"item": item})
        assert status.structured_content["state"] == "pending"
        r = await gw.admin("POST", f"/api/review/items/{item}/approve", json={})
        assert r.status == 200, await r.text()
        status = await s.call_tool("tether_review_status", {"item": item})
        assert status.structured_content["state"] == "replayed"
        assert status.structured_content["replay"]["status"] == 201
    posted = upstream.seen("POST")
    assert len(posted) == 1 and posted[0].json() == {"name": "Grace"}
    async with tools(gw, "bot") as other:  # another agent cannot follow someone else's item
        res = await other.call_tool("tether_review_status", {"item": item})
        assert res.is_error and res.structured_content["error"]["code"] == "not_found"


async def test_a_transaction_run_through_tools_is_rolled_back(gw, upstream):
    upstream.put_record("contacts", {"id": "5", "name": "Acme", "stage": "open"})
    async with tools(gw) as s:
        tx = (await s.call_tool("tether_transaction_begin", {"name": "renew Acme", "deadline": "5m"}))
        tx_id = tx.structured_content["id"]
        res = await s.call_tool("contact_update", {"id": "5", "body": {"stage": "won"}, "intent": "close the renewal",
                                                   "transaction": tx_id})
        assert res.is_error is False
        res = await s.call_tool("contact_create", {"body": {"name": "Acme quote"}, "intent": "quote",
                                                   "transaction": tx_id})
        created = res.structured_content["id"]
        assert upstream.records["contacts"][created]["name"] == "Acme quote"
        st = await s.call_tool("tether_transaction_status", {"transaction": tx_id})
        assert [x["state"] for x in st.structured_content["steps"]] == ["armed", "armed"]
        rb = await s.call_tool("tether_transaction_rollback", {"transaction": tx_id})
        assert rb.is_error is False and rb.structured_content["state"] == "rolled_back"
    assert upstream.records["contacts"]["5"]["stage"] == "open"  # restored
    assert created not in upstream.records["contacts"]  # the created quote deleted, newest first


async def test_rate_limits_quarantine_and_promotion_hold_on_both_doors(gw, upstream):
    upstream.put_record("contacts", {"id": "1", "name": "A", "stage": "open"})
    async with tools(gw) as s:
        # one bucket (6 per minute) spent alternately by the two doors
        outcomes = []
        for i in range(8):
            if i % 2:
                r = await gw.request("PATCH", "/api/contacts/1", json={"stage": "open"}, intent=f"rest {i}")
                outcomes.append(("rest", r.status))
            else:
                res = await s.call_tool("contact_update", {"id": "1", "body": {"stage": "open"}, "intent": f"mcp {i}"})
                outcomes.append(("mcp", 429 if res.is_error and res.structured_content["error"]["code"] == "rate_limited"
                                 else 200))
        assert [st for _, st in outcomes] == [200] * 6 + [429] * 2, outcomes
        # a quarantined agent's writes are captured, whichever door they come by
        r = await gw.admin("POST", "/api/agents/bot/quarantine", json={"reason": "test"})
        assert r.status == 200
        res = await s.call_tool("contact_create", {"body": {"name": "Q"}, "intent": "during quarantine"})
        assert res.structured_content["dry_run"] is True
        r = await gw.request("POST", "/api/contacts", json={"name": "Q2"}, intent="during quarantine")
        assert "X-Tether-Dry-Run" in r.headers
        assert upstream.seen("POST") == []


async def test_a_promotion_changes_the_tool_and_is_announced(gw, upstream):
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with tools(gw, "drafter", message_handler=on_message) as s:
        before = (await listed(s))["contact_create"]
        assert "review" in before.description
        r = await gw.admin("POST", "/api/promotions", json={"agent": "drafter", "capability": "contact.create",
                                                           "to": "live", "force": True, "reason": "pilot"})
        assert r.status in (200, 201), await r.text()
        await asyncio.wait_for(changed.wait(), 10)
        after = (await listed(s))["contact_create"]
        assert "review" not in after.description
        res = await s.call_tool("contact_create", {"body": {"name": "Live now"}, "intent": "promoted"})
        assert res.is_error is False and "dry_run" not in (res.structured_content or {})
    assert len(upstream.seen("POST")) == 1


async def test_journal_tail_filters_by_channel(gw, upstream, tmp_path):
    import subprocess
    import sys

    upstream.put_record("contacts", {"id": "3", "name": "C", "stage": "open"})
    async with tools(gw) as s:
        assert (await s.call_tool("contact_read", {"id": "3"})).is_error is False
    assert (await gw.request("GET", "/api/contacts/3")).status == 200
    await gw.gw.journal.flush(5)

    def tail(*extra: str) -> list[dict]:
        import json

        r = subprocess.run([sys.executable, "-m", "proxy", "journal", "tail", "--store", gw.gw.server_cfg.store,
                            "--json", "-n", "50", *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    mcp_recs = tail("--channel", "mcp")
    assert mcp_recs and all(x.get("channel") == "mcp" for x in mcp_recs)
    assert {x["kind"] for x in mcp_recs} >= {"request", "outcome"}
    rest_recs = tail("--channel", "rest")
    assert rest_recs and all("channel" not in x or x["channel"] == "rest" for x in rest_recs)
