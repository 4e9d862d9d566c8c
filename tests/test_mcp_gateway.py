"""MCP servers behind Tether, end to end: the official ``mcp`` SDK's client on Tether's ``/mcp`` and the fake
CRM (the SDK's MCPServer, started by Tether over stdio and supervised) as the upstream.

The agent's tool list merges its REST capabilities and its granted, pinned upstream tools; every call runs
the shared stages (grant, intent, field rules, rate limits, mode, journal, dry-run capture, transactions)
and reaches the server only when they pass — the server's own log of the calls it received
(``MCP_CRM_CALLS``) is the proof. Dry-run captures are approved and replayed once; transactions of tool
calls are rolled back with the tools' undo templates; a tool whose definition changes after it was pinned
is hidden and refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
import pytest

mcp = pytest.importorskip("mcp", reason="the mcp SDK (test extra) is not installed: pip install -e '.[test]'")

import httpx2  # noqa: E402
import mcp_types as types  # noqa: E402
from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from proxy.mcp_upstream import build_mcp_upstream, definition_digest  # noqa: E402
from tests.conftest import GatewayHandle, _in_thread, base_rules  # noqa: E402
from tests.mcp_upstreams import CRM, mcp_config  # noqa: E402

_DIGESTS: dict[str, str] = {}


def crm_digests() -> dict[str, str]:
    """The fake CRM's tool definition digests, as `tether rules import-mcp` would pin them (listed once)."""
    if not _DIGESTS:
        async def listing() -> None:
            up = build_mcp_upstream("crm", mcp_config(command=[sys.executable, str(CRM), "stdio"]))
            await up.start()
            try:
                _DIGESTS.update({t.name: definition_digest(t) for t in await up.list_tools()})
            finally:
                await up.close()
        _in_thread(listing)
    return _DIGESTS


def crm_rules(rest_url: str, store: str, tmp: Path, **upstream: Any) -> dict[str, Any]:
    pins = crm_digests()
    rules = base_rules(rest_url, store)
    rules["server"]["mcp"] = {"path": "/mcp"}
    rules["server"]["transactions"] = {"retry_attempts": 2, "retry_backoff": 0.05}
    rules["upstreams"]["crmtool"] = {
        "kind": "mcp", "command": [sys.executable, str(CRM), "stdio"],
        "env": {"MCP_CRM_STATE": str(tmp / "crm.json"), "MCP_CRM_CALLS": str(tmp / "calls.jsonl")},
        "client_capabilities": ["sampling"], "timeouts": {"call": 3}, "max_result_bytes": "64KB", **upstream}

    def tool(name: str, **kw: Any) -> dict[str, Any]:
        return {"upstream": "crmtool", "tool": name, "pin": pins[name], **kw}

    caps = rules["capabilities"]
    caps.update({
        "crm.create_customer": tool("create_customer", body={"allow_fields": ["name", "email"]},
                                    audit_fields=["name", "email"], sensitive_fields=["email"],
                                    undo={"tool": "delete_customer", "arguments": {"id": "{result.structuredContent.id}"}}),
        "crm.update_customer": tool("update_customer", body={"allow_fields": ["id", "name", "email"]},
                                    pre_image={"tool": "get_customer", "arguments": {"id": "{arguments.id}"}},
                                    undo={"tool": "update_customer", "arguments": {
                                        "id": "{arguments.id}", "name": "{pre_image.structuredContent.name}",
                                        "email": "{pre_image.structuredContent.email}"}}),
        "crm.delete_customer": tool("delete_customer"),
        "crm.get_customer": tool("get_customer", effect="read"),
        "crm.list_customers": tool("list_customers", effect="read"),
        "crm.annotate": tool("annotate"),
        "crm.slow": tool("slow", effect="read"),
        "crm.progress_steps": tool("progress_steps", effect="read"),
        "crm.ask_sampling": tool("ask_sampling", effect="read"),
        "crm.rug_pull": tool("rug_pull"),
        "crm.stats": tool("stats", effect="read"),
        "crm.big": tool("big", effect="read"),
        "crm.log_levels": tool("log_levels", effect="read"),
        "crm.add_note": tool("add_note", effect="read"),
        "crm.blobs": {"upstream": "crmtool", "resource": "crm://blobs/{name}", "rate_limit": {"per_minute": 3}},
        "crm.follow_up": {"upstream": "crmtool", "prompt": "follow_up", "audit_fields": ["name"],
                          "body": {"allow_fields": ["name"], "constraints": {"name": {"max_length": 40}}}},
        "crm.customer_doc": {"upstream": "crmtool", "resource": "crm://customers/{id}"},
    })
    live = {"mode": "live"}
    rules["agents"]["bot"]["grants"] = [
        "contact.read", "crm.get_customer", "crm.list_customers", "crm.slow", "crm.progress_steps", "crm.ask_sampling",
        {"capability": "crm.create_customer", **live}, {"capability": "crm.update_customer", **live},
        {"capability": "crm.delete_customer", **live}, {"capability": "crm.annotate", **live},
        {"capability": "crm.rug_pull", **live}, "crm.follow_up", "crm.customer_doc"]
    rules["agents"]["drafter"] = {"grants": ["crm.get_customer", "crm.create_customer"]}  # writes: dry-run
    rules["agents"]["auditor"] = {"grants": ["crm.stats", "crm.big", "crm.slow", "crm.log_levels", "crm.blobs",
                                             "crm.add_note", "crm.customer_doc"]}
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
    return {t.name: t for t in (await s.list_tools()).tools}


class Crm:
    """The fake CRM's files: its records and the calls it received (its own log)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        p = self.tmp / "calls.jsonl"
        out = [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
        return [c for c in out if tool is None or c.get("tool") == tool]

    def fetched(self) -> list[dict[str, Any]]:
        """The resources/read and prompts/get the server received."""
        return [c for c in self.calls() if "tool" not in c]

    def records(self) -> dict[str, Any]:
        p = self.tmp / "crm.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def put(self, rid: str, **fields: Any) -> None:
        db = self.records()
        db[rid] = {"id": rid, **fields}
        (self.tmp / "crm.json").write_text(json.dumps(db))


@pytest.fixture
async def gw(make_gateway: Any, upstream: Any, store_url: str, tmp_path: Path) -> GatewayHandle:
    return await make_gateway(crm_rules(upstream.url, store_url, tmp_path))


@pytest.fixture
def crm(tmp_path: Path) -> Crm:
    return Crm(tmp_path)


def err(res: types.CallToolResult) -> str | None:
    return (res.structured_content or {}).get("error", {}).get("code") if res.is_error else None


async def test_the_tool_list_merges_rest_and_pinned_upstream_tools(gw: GatewayHandle) -> None:
    async with tools(gw) as s, tools(gw, "drafter") as d:
        mine = await listed(s)
        upstream_tools = {n for n in mine if n.startswith("crm_")}
        assert upstream_tools == {"crm_get_customer", "crm_list_customers", "crm_slow", "crm_progress_steps",
                                  "crm_ask_sampling", "crm_create_customer", "crm_update_customer",
                                  "crm_delete_customer", "crm_annotate", "crm_rug_pull"}
        assert "contact_read" in mine  # the REST capability beside them
        # never: tools the server lists but no capability names, nor the granted prompt and resource
        assert not {n for n in mine if any(w in n for w in ("whoami", "stats", "big", "follow_up", "customer_doc"))}
        create, get, delete = mine["crm_create_customer"], mine["crm_get_customer"], mine["crm_delete_customer"]
        assert create.description.startswith("Create a customer record")  # the pinned description
        assert set(create.input_schema["required"]) == {"name", "email", "intent"}
        assert "transaction" in create.input_schema["properties"]
        assert "intent" not in get.input_schema.get("properties", {})  # reads: the tool's own arguments only
        # hints from the capability's effect, never the server's annotations (it says create is not destructive)
        assert create.annotations.read_only_hint is False and create.annotations.destructive_hint is True
        assert get.annotations.read_only_hint is True and delete.annotations.read_only_hint is False
        annotate = mine["crm_annotate"].input_schema
        assert {"intent", "tether_intent", "transaction"} <= set(annotate["properties"])  # only what collides is renamed
        assert set(annotate["required"]) == {"id", "intent", "tether_intent"}
        dtools = await listed(d)
        assert set(dtools) == {"crm_get_customer", "crm_create_customer", "tether_transaction_begin",
                               "tether_transaction_commit", "tether_transaction_rollback", "tether_transaction_status",
                               "tether_review_status"}
        assert "human to review" in dtools["crm_create_customer"].description


async def test_reads_and_live_writes_reach_the_server_and_the_journal_keeps_digests(gw: GatewayHandle, crm: Crm) -> None:
    async with tools(gw, "bot", on_behalf_of="ae:jane@acme.example") as s:
        res = await s.call_tool("crm_create_customer", {"name": "Ada", "email": "ada@example.com",
                                                        "intent": "onboard Ada"})
        assert res.is_error is False, res
        cid = res.structured_content["id"]
        assert res.meta["tether/request_id"]
        got = await s.call_tool("crm_get_customer", {"id": cid})
        assert got.structured_content == {"id": cid, "name": "Ada", "email": "ada@example.com"}
        res = await s.call_tool("crm_annotate", {"id": cid, "intent": "buys in Q3", "tether_intent": "note the plan"})
        assert res.is_error is False, res
        missing = await s.call_tool("crm_get_customer", {"id": "cus_nope"})
        assert missing.is_error and missing.structured_content is None  # the tool's own error, relayed
    assert crm.records()[cid]["intent"] == "buys in Q3"  # the tool's argument, not Tether's
    assert [c["arguments"] for c in crm.calls("annotate")] == [{"id": cid, "intent": "buys in Q3"}]
    assert crm.calls("create_customer") == [{"tool": "create_customer",
                                             "arguments": {"name": "Ada", "email": "ada@example.com"}}]
    recs = await gw.journal()
    intent = next(r for r in recs if r["kind"] == "request" and r.get("capability") == "crm.create_customer")
    assert intent["channel"] == "mcp" and intent["method"] == "tools/call" and intent["path"] == "create_customer"
    assert intent["upstream"] == "crmtool" and intent["intent"] == "onboard Ada" and intent["decision"] == "live"
    assert intent["on_behalf_of"] == "ae:jane@acme.example" and intent["mcp"]["tool"] == "crm_create_customer"
    assert intent["body_sha256"] == hashlib.sha256(orjson.dumps({"name": "Ada", "email": "ada@example.com"})).hexdigest()
    assert intent["audit"] == {"name": "Ada", "email": "[redacted]"} and intent["redacted"] == ["email"]
    outcome = next(r for r in recs if r["kind"] == "outcome" and r.get("intent_seq") == intent["seq"])
    assert len(outcome["result_sha256"]) == 64 and outcome["result_bytes"] > 0 and outcome["tool_error"] is False
    # the result itself is never journaled (only its digest): the server-minted id appears nowhere
    assert cid not in json.dumps(recs)
    assert "ada@example.com" not in json.dumps(recs)
    r = await gw.admin("GET", "/api/stats?since=1h&buckets=4")  # the console's charts count the MCP upstream
    assert r.status == 200
    stats = await r.json()
    assert sum(stats["upstreams"]["crmtool"]["requests"]) == 4 and sum(stats["agents"]["bot"]["requests"]) >= 4


async def test_refused_calls_never_reach_the_server(gw: GatewayHandle, crm: Crm) -> None:
    crm.put("cus_1", name="Bo", email="bo@example.com")
    async with tools(gw) as s:
        for name in ("crm_whoami", "whoami", "crm_follow_up", "crm_customer_doc", "stats"):
            with pytest.raises(MCPError) as ei:  # unregistered tools, a prompt, a resource: unknown tools
                await s.call_tool(name, {})
            assert ei.value.error.code == types.INVALID_PARAMS
        res = await s.call_tool("crm_create_customer", {"name": "X", "email": "x@example.com"})
        assert err(res) == "intent_required"
        res = await s.call_tool("crm_create_customer", {"name": "X", "email": "x@example.com", "admin": True,
                                                        "intent": "sneak a field in"})
        assert err(res) == "field_not_allowed"
        res = await s.call_tool("crm_update_customer", {"id": "cus_1", "email": "x@example.com", "intent": "fix",
                                                        "transaction": "tx-bad id!"})
        assert err(res) == "bad_request"
    async with tools(gw, "other-bot") as o:  # holds contact.read only
        with pytest.raises(MCPError):
            await o.call_tool("crm_delete_customer", {"id": "cus_1", "intent": "x"})
    assert crm.calls() == []  # the server saw none of it
    assert crm.records()["cus_1"]["email"] == "bo@example.com"
    recs = await gw.journal()
    denied = {r.get("error") for r in recs if r["kind"] == "request" and r.get("decision") == "denied"}
    assert {"capability_not_granted", "intent_required", "field_not_allowed", "bad_request"} <= denied


@pytest.mark.stores  # review items and transaction steps: both stores
async def test_dry_run_is_captured_approved_and_replayed_exactly_once(gw: GatewayHandle, crm: Crm) -> None:
    async with tools(gw, "drafter", on_behalf_of="ae:jane@acme.example") as s:
        res = await s.call_tool("crm_create_customer", {"name": "Grace", "email": "grace@example.com",
                                                        "intent": "add Grace after the call"})
        assert res.is_error is False, res
        doc = res.structured_content
        assert doc["dry_run"] is True and doc["applied"] is False and "review" in res.content[0].text
        item_id = doc["review_item"]
        assert crm.calls() == []  # nothing called yet
        r = await gw.admin("GET", f"/api/review/items/{item_id}")
        assert r.status == 200
        item = await r.json()
        assert item["request"]["kind"] == "tool" and item["request"]["tool"] == "create_customer"
        assert item["request"]["body_json"] == {"name": "Grace", "email": "grace@example.com"}
        assert item["agent"] == "drafter" and item["on_behalf_of"] == "ae:jane@acme.example"
        text = item["headline"]["text"]
        assert "wants to call tool create_customer on upstream crmtool" in text and "add Grace" in text
        assert "grace@example.com" not in text  # a sensitive argument is redacted in headlines
        from proxy.cli.review import render_item

        shown = render_item(item)  # `tether review show`
        assert "Tool create_customer on MCP upstream crmtool, called with:" in shown and '"name": "Grace"' in shown
        r = await gw.admin("GET", f"/api/review/items/{item_id}/diff")
        assert r.status == 200 and {f["field"] for f in (await r.json())["fields"]} == {"name", "email"}
        r = await gw.admin("GET", "/api/review/items?state=pending")
        assert r.status == 200 and [i["id"] for i in (await r.json())["items"]] == [item_id]
        # an edit is checked against the capability's rules again: refused, nothing called
        r = await gw.admin("POST", f"/api/review/items/{item_id}/approve",
                           json={"edit": {"name": "Grace", "email": "g@example.com", "vip": True}})
        assert r.status == 422, await r.text()
        assert crm.calls() == []
        r = await gw.admin("POST", f"/api/review/items/{item_id}/approve",
                           json={"edit": {"name": "Grace Hopper", "email": "grace@example.com"}})
        assert r.status == 200, await r.text()
        r = await gw.admin("POST", f"/api/review/items/{item_id}/approve", json={})
        assert r.status == 409  # decided once
        st = await s.call_tool("tether_review_status", {"item": item_id})
        replay = st.structured_content["replay"]
        assert st.structured_content["state"] == "replayed" and replay["status"] == 200
        created = replay["body"]["structuredContent"]
        assert created["name"] == "Grace Hopper"
    assert crm.calls("create_customer") == [{"tool": "create_customer",
                                             "arguments": {"name": "Grace Hopper", "email": "grace@example.com"}}]
    assert crm.records()[created["id"]]["name"] == "Grace Hopper"
    recs = await gw.journal()
    replayed = [r for r in recs if r.get("decision") == "replay" and r.get("review_item") == item_id]
    assert {r["kind"] for r in replayed} == {"request", "outcome"}
    assert all(r["method"] == "tools/call" and r["path"] == "create_customer" for r in replayed)


@pytest.mark.stores  # review items and transaction steps: both stores
async def test_a_transaction_of_tool_calls_is_rolled_back_newest_first(gw: GatewayHandle, crm: Crm) -> None:
    crm.put("cus_acme", name="Acme", email="old@acme.example")
    async with tools(gw) as s:
        tx = (await s.call_tool("tether_transaction_begin", {"name": "renew Acme"})).structured_content["id"]
        res = await s.call_tool("crm_update_customer", {"id": "cus_acme", "email": "new@acme.example",
                                                        "intent": "new billing contact", "transaction": tx})
        assert res.is_error is False, res
        res = await s.call_tool("crm_create_customer", {"name": "Acme EU", "email": "eu@acme.example",
                                                        "intent": "a subsidiary", "transaction": tx})
        created = res.structured_content["id"]
        st = (await s.call_tool("tether_transaction_status", {"transaction": tx})).structured_content
        assert [x["state"] for x in st["steps"]] == ["armed", "armed"]
        assert st["steps"][1]["plan"]["request"] == {"method": "tools/call", "path": "delete_customer", "query": "",
                                                     "content_type": "application/json", "headers": {},
                                                     "body": {"id": created}}
        # a write tool without undo cannot run live inside the transaction: refused, never sent
        res = await s.call_tool("crm_delete_customer", {"id": "cus_acme", "intent": "tidy", "transaction": tx})
        assert err(res) == "non_compensable_in_transaction"
        rb = await s.call_tool("tether_transaction_rollback", {"transaction": tx})
        assert rb.structured_content["state"] == "rolled_back", rb
    assert crm.records()["cus_acme"] == {"id": "cus_acme", "name": "Acme", "email": "old@acme.example"}
    assert created not in crm.records()
    tools_called = [c["tool"] for c in crm.calls()]
    # the pre-image read, the update, the create; then undone newest first: delete the created, re-read, restore
    assert tools_called == ["get_customer", "update_customer", "create_customer", "delete_customer", "get_customer",
                            "update_customer"]
    assert "delete_customer" not in tools_called[:3]


async def test_a_failed_tool_step_rolls_the_transaction_back(gw: GatewayHandle, crm: Crm) -> None:
    async with tools(gw) as s:
        tx = (await s.call_tool("tether_transaction_begin", {})).structured_content["id"]
        first = await s.call_tool("crm_create_customer", {"name": "One", "email": "one@example.com",
                                                          "intent": "first", "transaction": tx})
        cid = first.structured_content["id"]
        bad = await s.call_tool("crm_create_customer", {"name": "Two", "intent": "second, without email",
                                                        "transaction": tx})
        assert bad.is_error  # the server refused it (its own validation): a failed step
        st = (await s.call_tool("tether_transaction_status", {"transaction": tx})).structured_content
        assert st["state"] == "rolled_back"
        assert [x["state"] for x in st["steps"]] == ["compensated", "not_applied"]
    assert cid not in crm.records()


async def test_a_record_changed_behind_the_agent_is_a_conflict_not_overwritten(gw: GatewayHandle, crm: Crm) -> None:
    crm.put("cus_c", name="Cy", email="cy@example.com")
    async with tools(gw) as s:
        tx = (await s.call_tool("tether_transaction_begin", {})).structured_content["id"]
        res = await s.call_tool("crm_update_customer", {"id": "cus_c", "email": "cy@new.example", "intent": "fix",
                                                        "transaction": tx})
        assert res.is_error is False
        crm.put("cus_c", name="Cy", email="someone-else@example.com")  # a person changed it meanwhile
        rb = await s.call_tool("tether_transaction_rollback", {"transaction": tx})
        assert rb.structured_content["state"] == "needs_attention"
        assert rb.structured_content["steps"][0]["state"] == "conflict"
    assert crm.records()["cus_c"]["email"] == "someone-else@example.com"  # not overwritten
    assert [c["tool"] for c in crm.calls()] == ["get_customer", "update_customer", "get_customer"]


@pytest.mark.stores  # review items and transaction steps: both stores
async def test_a_deadline_rollback_by_the_sweep_undoes_tool_steps(gw: GatewayHandle, crm: Crm) -> None:
    """Crash recovery: an open transaction past its deadline is rolled back by the sweep (which also runs at
    start), its tool steps undone from the store alone."""
    crm.put("cus_s", name="Sam", email="sam@example.com")
    async with tools(gw) as s:
        tx = (await s.call_tool("tether_transaction_begin", {"deadline": "1s"})).structured_content["id"]
        res = await s.call_tool("crm_update_customer", {"id": "cus_s", "name": "Samuel", "intent": "full name",
                                                        "transaction": tx})
        assert res.is_error is False
    assert crm.records()["cus_s"]["name"] == "Samuel"
    await asyncio.sleep(1.2)
    assert await gw.gw.transactions.sweep() >= 1
    assert crm.records()["cus_s"] == {"id": "cus_s", "name": "Sam", "email": "sam@example.com"}


async def test_a_changed_definition_is_hidden_refused_and_alerted_once(gw: GatewayHandle, crm: Crm) -> None:
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    crm.put("cus_r", name="Rex", email="rex@example.com")
    async with tools(gw, message_handler=on_message) as s:
        assert "crm_delete_customer" in await listed(s)
        res = await s.call_tool("crm_rug_pull", {"intent": "test the server"})
        assert res.is_error is False
        await asyncio.wait_for(changed.wait(), 15)
        assert "crm_delete_customer" not in await listed(s)
        res = await s.call_tool("crm_delete_customer", {"id": "cus_r", "intent": "tidy up"})
        assert err(res) == "tool_definition_changed"
        assert res.structured_content["error"]["details"]["state"] == "changed"
        await s.call_tool("crm_rug_pull", {"intent": "again: the same new definition"})
        await asyncio.sleep(0.5)
    assert crm.calls("delete_customer") == [] and "cus_r" in crm.records()
    recs = await gw.journal()
    alerts = [r for r in recs if r.get("event") == "alert" and r.get("alert") == "tool_definition_changed"]
    assert len(alerts) == 1 and alerts[0]["tool"] == "delete_customer" and alerts[0]["upstream"] == "crmtool"
    refused = [r for r in recs if r["kind"] == "request" and r.get("error") == "tool_definition_changed"]
    assert refused and refused[0]["capability"] == "crm.delete_customer"


async def test_progress_timeouts_and_server_requests(gw: GatewayHandle, crm: Crm) -> None:
    seen: list[float] = []

    async def progress(p: float, total: float | None, message: str | None) -> None:
        seen.append(p)

    async with tools(gw) as s:
        res = await s.call_tool("crm_progress_steps", {"steps": 3}, progress_callback=progress)
        assert res.content[0].text == "3 steps" and seen == [1.0, 2.0, 3.0]
        res = await s.call_tool("crm_slow", {"seconds": 30})  # timeouts.call is 3s: a tool error, not a hang
        assert err(res) == "upstream_timeout"
        assert res.structured_content["error"]["details"]["applied"] is None
        res = await s.call_tool("crm_ask_sampling", {"prompt": "hello"})
        assert res.is_error is False and res.content[0].text.startswith("refused")  # the server was told no
    recs = await gw.journal()
    # over stdio a server's request cannot be tied to the call it belongs to: refused and journaled as the
    # upstream's (over HTTP it is the caller's: test_over_streamable_http_server_requests_are_the_callers)
    asked = [r for r in recs if r.get("event") == "mcp_upstream_server_request"]
    assert [(r["upstream"], r["method"], r["decision"], r["tool"]) for r in asked] == [
        ("crmtool", "sampling/createMessage", "refused", None)]


async def test_over_streamable_http_server_requests_are_the_callers(make_gateway: Any, upstream: Any, store_url: str,
                                                                    tmp_path: Path, monkeypatch: Any) -> None:
    from tests.mcp_upstreams import crm_http

    monkeypatch.setenv("CRM_MCP_TOKEN", "crm-secret")
    srv = crm_http(tmp_path, MCP_CRM_TOKEN="crm-secret", MCP_CRM_CALLS=str(tmp_path / "calls.jsonl")).start()
    try:
        rules = crm_rules(upstream.url, store_url, tmp_path)
        rules["upstreams"]["crmtool"] = {"kind": "mcp", "url": srv.url, "client_capabilities": ["sampling"],
                                         "credentials": {"type": "bearer", "token_env": "CRM_MCP_TOKEN"}}
        h = await make_gateway(rules)
        async with tools(h, on_behalf_of="ae:jane@acme.example") as s:
            res = await s.call_tool("crm_ask_sampling", {"prompt": "hello"})
            assert res.is_error is False and res.content[0].text.startswith("refused")
            res = await s.call_tool("crm_create_customer", {"name": "Http", "email": "h@example.com", "intent": "x"})
            assert res.is_error is False
        recs = await h.journal()
    finally:
        srv.stop()
    asked = [r for r in recs if r.get("event") == "mcp_upstream_server_request" and r.get("agent") == "bot"]
    assert len(asked) == 1 and asked[0]["on_behalf_of"] == "ae:jane@acme.example"
    assert asked[0]["method"] == "sampling/createMessage" and asked[0]["decision"] == "refused"
    assert asked[0]["capability"] == "crm.ask_sampling" and asked[0]["tool"] == "ask_sampling"
    assert [c["tool"] for c in Crm(tmp_path).calls()] == ["ask_sampling", "create_customer"]


async def test_an_upstream_that_cannot_list_hides_its_tools(make_gateway: Any, upstream: Any, store_url: str,
                                                             tmp_path: Path) -> None:
    rules = crm_rules(upstream.url, store_url, tmp_path)
    rules["upstreams"]["crmtool"]["command"] = [sys.executable, "-c", "import sys; sys.exit(3)"]
    rules["upstreams"]["crmtool"]["timeouts"] = {"connect": 2, "call": 3}
    h = await make_gateway(rules)
    async with tools(h) as s:
        assert not [n for n in await listed(s) if n.startswith("crm_")]
        res = await s.call_tool("crm_get_customer", {"id": "cus_1"})
        assert err(res) == "upstream_unavailable"
        assert (await s.call_tool("contact_read", {"id": "1"})).is_error in (True, False)  # REST still served
    ok, checks = await h.gw.readiness()
    assert checks["mcp_upstreams"]["crmtool"].startswith("tools hidden")


async def test_a_reload_keeps_an_unchanged_upstream_and_rechecks_pins(gw: GatewayHandle) -> None:
    import yaml

    rt = gw.gw.state.mcp_upstreams["crmtool"]
    pid = rt.client.transport.proc.pid  # type: ignore[attr-defined]
    doc = yaml.safe_load(gw.rules_path.read_text())
    doc["agents"]["other-bot"]["grants"].append("crm.get_customer")
    gw.rules_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    ok, _ = await gw.gw.reload("test")
    assert ok and gw.gw.state.mcp_upstreams["crmtool"] is rt and rt.client.transport.proc.pid == pid  # type: ignore[attr-defined]
    async with tools(gw, "other-bot") as s:
        assert "crm_get_customer" in await listed(s)
    doc["capabilities"]["crm.get_customer"]["pin"] = "sha256:" + "0" * 64  # a pin the server's tool lacks
    gw.rules_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    ok, _ = await gw.gw.reload("test")
    assert ok and gw.gw.state.mcp_upstreams["crmtool"] is rt
    async with tools(gw, "other-bot") as s:
        assert "crm_get_customer" not in await listed(s)
        res = await s.call_tool("crm_get_customer", {"id": "x"})
        assert err(res) == "tool_definition_changed"
    doc["upstreams"]["crmtool"]["timeouts"] = {"call": 5}  # another configuration: a new client
    gw.rules_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    ok, _ = await gw.gw.reload("test")
    assert ok and gw.gw.state.mcp_upstreams["crmtool"] is not rt
    for _ in range(100):
        if rt.closed:
            break
        await asyncio.sleep(0.05)
    assert rt.closed


async def test_cancellation_reaches_the_server_and_huge_results_are_refused(gw: GatewayHandle) -> None:
    import anyio

    async with tools(gw, "auditor") as s:
        with anyio.move_on_after(1.0):  # the client gives up: the SDK sends notifications/cancelled
            await s.call_tool("crm_slow", {"seconds": 2.5})
        for _ in range(100):
            stats = (await s.call_tool("crm_stats", {})).structured_content
            if stats["cancelled"]:
                break
            await asyncio.sleep(0.05)
        assert len(stats["cancelled"]) == 1  # the server stopped the call: Tether passed the cancellation on
        res = await s.call_tool("crm_big", {"size": 200_000})  # over the upstream's max_result_bytes
        assert err(res) == "upstream_response_too_large"
        assert (await s.call_tool("crm_big", {"size": 10})).content[0].text == "x" * 10
    recs = await gw.journal()
    slow = [r for r in recs if r["kind"] == "outcome" and r.get("capability") == "crm.slow"]
    assert slow and slow[0]["error"] == "call_cancelled"


async def test_rules_cases_run_beside_an_mcp_upstream_without_starting_it(tmp_path: Path, upstream: Any) -> None:
    """`tether rules test` judges REST cases; a rules file with an MCP upstream is served without it (its
    server is never started) and its capabilities and grants are left out of the case run."""
    import yaml

    from proxy.cli.casetest import run_cases

    rules = crm_rules(upstream.url, str(tmp_path / "unused.db"), tmp_path)
    marker = tmp_path / "started"
    rules["upstreams"]["crmtool"]["command"] = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "r.cases.yaml").write_text(yaml.safe_dump({"rules": "r.yaml", "cases": [
        {"name": "a REST read", "agent": "bot", "request": {"method": "GET", "path": "/api/contacts/1", "upstream": "crm"},
         "expect": {"decision": "live", "capability": "contact.read"}},
        {"name": "a REST write not granted", "agent": "other-bot",
         "request": {"method": "DELETE", "path": "/api/contacts/1", "upstream": "crm"},
         "expect": {"decision": "denied", "code": "capability_not_granted"}}]}))
    results = await run_cases(tmp_path / "r.cases.yaml")
    assert [r.ok for r in results] == [True, True], [r.describe() for r in results]
    assert not marker.exists()


async def test_the_rest_door_does_not_reach_an_mcp_upstream(gw: GatewayHandle, crm: Crm) -> None:
    r = await gw.request("POST", "/mcp", upstream="crmtool", json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                                                  "params": {"name": "delete_customer"}})
    assert r.status in (403, 404)
    assert crm.calls() == []


# --------------------------------------------------------------------------- resources and prompts


async def test_granted_resources_and_prompts_are_listed_and_served(gw: GatewayHandle, crm: Crm) -> None:
    """The agent sees only the resources, templates and prompts its grants name (under namespaced URIs and
    names), reads and gets them through the pipeline; the server saw exactly those requests."""
    crm.put("cus_1", name="Bo", email="bo@example.com")
    async with tools(gw, on_behalf_of="ae:jane@acme.example") as s:
        caps = s.server_capabilities
        assert caps.resources is not None and caps.resources.list_changed is True
        assert caps.prompts is not None and caps.prompts.list_changed is True and caps.logging is not None
        resources = (await s.list_resources()).resources
        # the static index inside the granted template; never crm://admin/export
        assert [str(r.uri) for r in resources] == ["tether://crmtool/crm://customers/index"]
        templates = (await s.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["tether://crmtool/crm://customers/{id}"]  # not invoices
        prompts = (await s.list_prompts()).prompts
        assert [p.name for p in prompts] == ["crm_follow_up"]  # not internal_notes
        assert prompts[0].arguments[0].name == "name" and "Prompt follow_up of MCP server crmtool" in \
            prompts[0].description
        doc = await s.read_resource("tether://crmtool/crm://customers/cus_1")
        assert json.loads(doc.contents[0].text) == {"id": "cus_1", "name": "Bo", "email": "bo@example.com"}
        assert doc.meta["tether/request_id"]
        index = await s.read_resource("tether://crmtool/crm://customers/index")
        assert json.loads(index.contents[0].text) == ["cus_1"]
        got = await s.get_prompt("crm_follow_up", {"name": "Bo"})
        assert got.messages[0].content.text == "Write a short follow-up email to Bo."
    assert crm.fetched() == [{"resource": "crm://customers/cus_1"}, {"resource": "crm://customers/index"},
                             {"prompt": "follow_up", "arguments": {"name": "Bo"}}]
    recs = await gw.journal()
    read = [r for r in recs if r.get("capability") == "crm.customer_doc"]
    intent = next(r for r in read if r["kind"] == "request" and r["path"] == "crm://customers/cus_1")
    assert intent["method"] == "resources/read" and intent["upstream"] == "crmtool" and intent["decision"] == "live"
    assert intent["on_behalf_of"] == "ae:jane@acme.example" and intent["channel"] == "mcp"
    assert intent["mcp"]["resource"] == "tether://crmtool/crm://customers/cus_1"
    outcome = next(r for r in read if r["kind"] == "outcome" and r["intent_seq"] == intent["seq"])
    assert len(outcome["result_sha256"]) == 64 and outcome["result_bytes"] > 0 and outcome["forwarded"] is True
    prompt = next(r for r in recs if r["kind"] == "request" and r.get("capability") == "crm.follow_up")
    assert prompt["method"] == "prompts/get" and prompt["path"] == "follow_up" and prompt["audit"] == {"name": "Bo"}
    assert prompt["body_sha256"] == hashlib.sha256(orjson.dumps({"name": "Bo"})).hexdigest()
    # what the resources and the prompt said is nowhere in the journal (digests only)
    assert "bo@example.com" not in json.dumps(recs) and "follow-up email" not in json.dumps(recs)


async def test_ungranted_resources_and_prompts_are_refused_without_reaching_the_server(gw: GatewayHandle,
                                                                                        crm: Crm) -> None:
    crm.put("cus_1", name="Bo", email="bo@example.com")
    async with tools(gw) as s:
        for uri in ("tether://crmtool/crm://admin/export",  # a static resource no template grants
                    "tether://crmtool/crm://invoices/7",  # a template not granted
                    "crm://customers/cus_1",  # the server's own URI, not Tether's
                    "tether://crmtool/crm://customers/../admin/export",  # a traversal through the granted template
                    "tether://crmtool/crm://customers/%2e%2e",
                    "tether://crmtool/crm://customers/cus_1/notes",
                    "tether://other/crm://customers/cus_1"):  # another upstream
            with pytest.raises(MCPError) as ei:
                await s.read_resource(uri)
            assert ei.value.error.code == types.INVALID_PARAMS and ei.value.error.data["code"] == "unknown_resource"
        with pytest.raises(MCPError) as ei:
            await s.get_prompt("crm_internal_notes")
        assert ei.value.error.code == types.INVALID_PARAMS and ei.value.error.data["code"] == "unknown_prompt"
        for name in ("internal_notes", "follow_up"):  # the server's names are not the agent's
            with pytest.raises(MCPError):
                await s.get_prompt(name, {"name": "x"})
        # the prompt's field rules apply to its arguments: refused before the server, with Tether's code
        with pytest.raises(MCPError) as ei:
            await s.get_prompt("crm_follow_up", {"name": "Bo", "cc": "boss@example.com"})
        assert ei.value.error.code == types.INVALID_PARAMS and ei.value.error.data["code"] == "field_not_allowed"
        with pytest.raises(MCPError) as ei:
            await s.get_prompt("crm_follow_up", {"name": "B" * 41})
        assert ei.value.error.data["code"] == "constraint_violated" and ei.value.error.data["request_id"]
    async with tools(gw, "drafter") as d:  # holds no resource or prompt
        assert (await d.list_resources()).resources == [] and (await d.list_prompts()).prompts == []
        with pytest.raises(MCPError):
            await d.read_resource("tether://crmtool/crm://customers/cus_1")
        with pytest.raises(MCPError):
            await d.get_prompt("crm_follow_up", {"name": "Bo"})
    assert crm.fetched() == []  # the server saw none of it
    recs = await gw.journal()
    denied = [r for r in recs if r["kind"] == "request" and r.get("decision") == "denied"]
    assert {r["method"] for r in denied} >= {"resources/read", "prompts/get"}
    assert {r["error"] for r in denied} >= {"capability_not_granted", "field_not_allowed", "constraint_violated"}


async def test_resource_reads_are_rate_limited_and_size_capped(gw: GatewayHandle, crm: Crm) -> None:
    async with tools(gw, "auditor") as s:
        assert "tether://crmtool/crm://blobs/{name}" in [
            t.uri_template for t in (await s.list_resource_templates()).resource_templates]
        with pytest.raises(MCPError) as ei:  # 200 kB, over the upstream's max_result_bytes (64 KB)
            await s.read_resource("tether://crmtool/crm://blobs/huge")
        assert ei.value.error.code == -32010 and ei.value.error.data["code"] == "upstream_response_too_large"
        small = await s.read_resource("tether://crmtool/crm://blobs/abc")
        assert small.contents[0].blob == "YWJj"
        assert (await s.read_resource("tether://crmtool/crm://blobs/abc")).contents[0].blob == "YWJj"
        with pytest.raises(MCPError) as ei:  # three a minute
            await s.read_resource("tether://crmtool/crm://blobs/abc")
        assert ei.value.error.code == -32010 and ei.value.error.data["code"] == "rate_limited"
    assert [c["resource"] for c in crm.fetched()] == ["crm://blobs/huge", "crm://blobs/abc", "crm://blobs/abc"]


# --------------------------------------------------------------------------- log messages


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # setLevel: gone in 2026-07-28
async def test_log_messages_of_a_call_reach_the_agent_at_its_level(make_gateway: Any, upstream: Any, store_url: str,
                                                                   tmp_path: Path) -> None:
    """A server's notifications/message on a call's stream (Streamable HTTP) are relayed on the agent's
    response stream before the result, filtered by the session's logging/setLevel (2026-07-28: the
    request's _meta log level, none without it), capped; the journal keeps a count, not what they say."""
    from mcp.client.client import Client

    from tests.mcp_upstreams import crm_http

    srv = crm_http(tmp_path, MCP_CRM_CALLS=str(tmp_path / "calls.jsonl")).start()
    try:
        rules = crm_rules(upstream.url, store_url, tmp_path)
        rules["upstreams"]["crmtool"] = {"kind": "mcp", "url": srv.url}
        h = await make_gateway(rules)
        seen: list[types.LoggingMessageNotificationParams] = []

        async def on_log(params: types.LoggingMessageNotificationParams) -> None:
            seen.append(params)

        async with tools(h, "auditor", logging_callback=on_log) as s:
            assert s.server_capabilities.logging is not None
            res = await s.call_tool("crm_log_levels", {})
            assert res.content[0].text == "logged four"
            assert [(p.level, p.data) for p in seen] == [
                ("debug", "debug: the details"), ("info", "info: looking up the customer"),
                ("warning", "warning: the record is stale"), ("error", "error: the mail server refused")]
            seen.clear()
            await s.set_logging_level("warning")
            await s.call_tool("crm_log_levels", {"big": 100_000})
            assert [p.level for p in seen] == ["warning", "error"]
            seen.clear()
            await s.set_logging_level("info")
            await s.call_tool("crm_log_levels", {"big": 100_000})
            assert [p.level for p in seen] == ["info", "warning", "error", "info"]
            big = seen[-1].data
            assert big.startswith("(log data of 100002 bytes, cut by Tether") and len(big) < 5000
        # 2026-07-28: a request asks for log messages with its _meta log level, and gets none without it
        for level, expected in ((None, []), ("error", ["error"])):
            seen.clear()
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {h.token('auditor')}"}) as hc:
                async with Client(streamable_http_client(f"{h.url}/mcp", http_client=hc), mode="2026-07-28",
                                  cache=None, logging_callback=on_log, log_level=level) as c:
                    assert (await c.call_tool("crm_log_levels", {})).content[0].text == "logged four"
            assert [p.level for p in seen] == expected
        recs = await h.journal()
    finally:
        srv.stop()
    outcomes = [r for r in recs if r["kind"] == "outcome" and r.get("capability") == "crm.log_levels"]
    assert [r.get("log_messages") for r in outcomes] == [4, 5, 5, None, 4]
    assert "mail server" not in json.dumps(recs) and "xxxxxxxx" not in json.dumps(recs)


async def test_2026_clients_read_and_get_and_reloads_announce_list_changes(gw: GatewayHandle, crm: Crm) -> None:
    """The stateless revision serves the same resources and prompts (Mcp-Name mirrors the URI or the name);
    a reload that takes the grants away tells both kinds of clients their lists changed."""
    import yaml
    from mcp.client.client import Client
    from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged

    crm.put("cus_9", name="Nia", email="nia@example.com")
    changed: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, (types.ResourceListChangedNotification, types.PromptListChangedNotification)):
            changed.append(type(message).__name__)

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {gw.token('bot')}"}) as hc, \
            tools(gw, message_handler=on_message) as s:
        async with Client(streamable_http_client(f"{gw.url}/mcp", http_client=hc), mode="auto", cache=None) as c:
            assert c.protocol_version == "2026-07-28"  # server/discover, then stateless requests
            assert c.server_capabilities.resources is not None and c.server_capabilities.prompts is not None
            assert [p.name for p in (await c.list_prompts()).prompts] == ["crm_follow_up"]
            assert [t.uri_template for t in (await c.list_resource_templates()).resource_templates] == [
                "tether://crmtool/crm://customers/{id}"]
            doc = await c.read_resource("tether://crmtool/crm://customers/cus_9")
            assert json.loads(doc.contents[0].text)["name"] == "Nia"
            got = await c.get_prompt("crm_follow_up", {"name": "Nia"})
            assert got.messages[0].content.text == "Write a short follow-up email to Nia."
            with pytest.raises(MCPError) as ei:
                await c.read_resource("tether://crmtool/crm://admin/export")
            assert ei.value.error.data["code"] == "unknown_resource"
            assert [p.name for p in (await s.list_prompts()).prompts] == ["crm_follow_up"]
            await s.list_resources()
            async with c.listen(prompts_list_changed=True, resources_list_changed=True) as sub:
                assert sub.honored.prompts_list_changed and sub.honored.resources_list_changed
                doc = yaml.safe_load(gw.rules_path.read_text())
                doc["agents"]["bot"]["grants"] = [g for g in doc["agents"]["bot"]["grants"]
                                                  if g not in ("crm.follow_up", "crm.customer_doc")]
                gw.rules_path.write_text(yaml.safe_dump(doc, sort_keys=False))
                ok, _ = await gw.gw.reload("test")
                assert ok
                events: set[type] = set()
                async with asyncio.timeout(10):
                    while events != {PromptsListChanged, ResourcesListChanged}:
                        events.add(type(await sub.__anext__()))
            assert (await c.list_prompts()).prompts == []
            with pytest.raises(MCPError):
                await c.get_prompt("crm_follow_up", {"name": "Nia"})
        for _ in range(100):  # the session's GET stream
            if len(changed) >= 2:
                break
            await asyncio.sleep(0.05)
        assert sorted(changed) == ["PromptListChangedNotification", "ResourceListChangedNotification"]
        assert (await s.list_resource_templates()).resource_templates == []
        with pytest.raises(MCPError):
            await s.read_resource("tether://crmtool/crm://customers/cus_9")
    assert crm.fetched() == [{"resource": "crm://customers/cus_9"}, {"prompt": "follow_up", "arguments": {"name": "Nia"}}]


async def test_2026_routing_headers_must_name_the_resource_or_prompt(gw: GatewayHandle, crm: Crm) -> None:
    """Mcp-Name mirrors resources/read's uri and prompts/get's name: a request whose header says otherwise is
    refused (400, -32020) and nothing is read."""
    import aiohttp

    v = "2026-07-28"
    meta = {"io.modelcontextprotocol/protocolVersion": v, "io.modelcontextprotocol/clientCapabilities": {}}
    crm.put("cus_2", name="Al", email="al@example.com")
    async with aiohttp.ClientSession() as http:
        async def post(method: str, params: dict[str, Any], name: str | None) -> tuple[int, Any]:
            h = {"Authorization": f"Bearer {gw.token('bot')}", "Content-Type": "application/json",
                 "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": v, "Mcp-Method": method}
            if name is not None:
                h["Mcp-Name"] = name
            body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}
            async with http.post(f"{gw.url}/mcp", data=orjson.dumps(body), headers=h) as r:
                return r.status, orjson.loads(await r.read())

        uri = "tether://crmtool/crm://customers/cus_2"
        for name in (None, "tether://crmtool/crm://customers/cus_3"):
            status, body = await post("resources/read", {"uri": uri}, name)
            assert status == 400 and body["error"]["code"] == -32020
        status, body = await post("prompts/get", {"name": "crm_follow_up", "arguments": {"name": "Al"}}, "other")
        assert status == 400 and body["error"]["code"] == -32020
        status, body = await post("resources/read", {"uri": uri}, uri)
        assert status == 200 and json.loads(body["result"]["contents"][0]["text"])["name"] == "Al"
        assert body["result"]["resultType"] == "complete" and body["result"]["cacheScope"] == "private"
        status, body = await post("resources/read", {"uri": "tether://crmtool/crm://admin/export"},
                                  "tether://crmtool/crm://admin/export")
        assert status == 400 and body["error"]["code"] == -32602
    assert crm.fetched() == [{"resource": "crm://customers/cus_2"}]


async def test_a_server_announcing_new_resources_is_listed_again(gw: GatewayHandle, crm: Crm) -> None:
    """notifications/resources/list_changed from the server (stdio): Tether lists again, and agents whose list
    moved are told."""
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceListChangedNotification):
            changed.set()

    async with tools(gw, "auditor", message_handler=on_message) as s:
        assert [str(r.uri) for r in (await s.list_resources()).resources] == ["tether://crmtool/crm://customers/index"]
        assert (await s.call_tool("crm_add_note", {"name": "vip"})).content[0].text == "added"
        await asyncio.wait_for(changed.wait(), 15)
        uris = [str(r.uri) for r in (await s.list_resources()).resources]
        assert uris == ["tether://crmtool/crm://customers/index", "tether://crmtool/crm://customers/note-vip"]
        assert (await s.read_resource(uris[1])).contents[0].text == "note vip"
