"""End to end: the official slack_sdk WebClient pointed at Tether (base_url), a stateful Slack fake behind it.

The WebClient is synchronous (urllib), so each call runs in a thread while Tether serves on the test's
event loop. It POSTs every method — reads included — so the read capabilities say ``effect: read``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

slack_sdk = pytest.importorskip("slack_sdk")
from slack_sdk import WebClient  # noqa: E402
from slack_sdk.errors import SlackApiError  # noqa: E402

from tests.conftest import SECRET  # noqa: E402
from tests.slack_fake import BOT_USER, SlackFake  # noqa: E402

BOT_TOKEN = "xoxb-upstream-bot-token-0123456789"




def slack_rules(fake_url: str, store: str, **upstream_extra: Any) -> dict[str, Any]:
    live = lambda c: {"capability": c, "mode": "live"}  # noqa: E731
    caps: dict[str, Any] = {
        "chat.post": {"upstream": "slack", "method": "POST", "path": "/api/chat.postMessage"},
        "chat.update": {"upstream": "slack", "method": "POST", "path": "/api/chat.update"},
        "chat.delete": {"upstream": "slack", "method": "POST", "path": "/api/chat.delete"},
        "conversations.list": {"upstream": "slack", "method": "POST", "path": "/api/conversations.list",
                               "effect": "read"},
        "conversations.history": {"upstream": "slack", "method": "POST", "path": "/api/conversations.history",
                                  "effect": "read"},
        "auth.test": {"upstream": "slack", "method": "POST", "path": "/api/auth.test", "effect": "read"},
    }
    return {
        "version": 1,
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", "store": store,
                   "transactions": {"retry_attempts": 2, "retry_backoff": 0.05, "sweep_interval": 0.2}},
        "identity": {"hs_secret": {"value": SECRET}},
        "upstreams": {"slack": {"url": fake_url, "adapter": "slack",
                                "credentials": {"type": "bearer", "token": {"value": BOT_TOKEN}},
                                **upstream_extra}},
        "agents": {
            "notifier": {"grants": [live("chat.post"), live("chat.update"), live("chat.delete"),
                                    "conversations.list", "conversations.history", "auth.test"]},
            "drafter": {"grants": ["chat.post", "conversations.list"]},  # writes unset: dry-run
        },
        "capabilities": caps,
    }


@pytest.fixture
async def fake() -> AsyncIterator[SlackFake]:
    f = await SlackFake(token=BOT_TOKEN).start()
    yield f
    await f.stop()


@pytest.fixture
async def slack_gw(make_gateway: Any, fake: SlackFake, tmp_path: Path) -> Any:
    return await make_gateway(slack_rules(fake.url, str(tmp_path / "slack.db"),
                                          provenance={"record_fields": {"agent": "tether_agent",
                                                                        "on_behalf_of": "tether_on_behalf_of"}}))


def client(gw: Any, agent: str = "notifier", on_behalf_of: str | None = "ops:sam", **headers: str) -> WebClient:
    h = {"X-Tether-Intent": "tell the team the deploy finished", **headers}
    return WebClient(token=gw.token(agent, on_behalf_of), base_url=gw.upstream_url("slack") + "/api/", headers=h,
                     timeout=10)


async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def rollback(gw: Any, tx: str, agent: str = "notifier") -> dict[str, Any]:
    async with gw.session.post(f"{gw.url}/_tether/transactions/{tx}/rollback", headers=gw.headers(agent)) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_post_passes_through_with_the_bot_token_and_provenance(slack_gw: Any, fake: SlackFake) -> None:
    wc = client(slack_gw)
    resp = await call(wc.chat_postMessage, channel="C0GENERAL", text="deploy 42 is live",
                      blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": "*deploy 42* is live"}}])
    assert resp["ok"] is True and resp["channel"] == "C0GENERAL"
    ts = resp["ts"]
    [got] = fake.seen("chat.postMessage")
    assert got.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert got.headers["X-Tether-Agent"] == "notifier" and got.headers["X-Tether-On-Behalf-Of"] == "ops:sam"
    sent = got.json()
    # unchanged apart from provenance, which rides in the message metadata
    assert sent["channel"] == "C0GENERAL" and sent["text"] == "deploy 42 is live"
    assert sent["blocks"][0]["text"]["text"] == "*deploy 42* is live"
    assert sent["metadata"] == {"event_type": "tether_provenance",
                                "event_payload": {"tether_agent": "notifier", "tether_on_behalf_of": "ops:sam"}}
    [stored] = fake.messages("C0GENERAL")
    assert stored["ts"] == ts and stored["text"] == "deploy 42 is live"
    assert stored["metadata"]["event_payload"]["tether_agent"] == "notifier"
    # the agent's JWT never reached Slack
    assert all("Bearer ey" not in r.headers.get("Authorization", "") for r in fake.received)


async def test_form_encoded_post_passes_through(slack_gw: Any, fake: SlackFake) -> None:
    wc = client(slack_gw)
    resp = await call(wc.api_call, "chat.postMessage", data={"channel": "#random", "text": "form post"})
    assert resp["ok"] is True and resp["channel"] == "C0RANDOM"
    [got] = fake.seen("chat.postMessage")
    assert got.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    from urllib.parse import parse_qs

    form = parse_qs(got.body.decode())
    assert form["channel"] == ["#random"] and form["text"] == ["form post"]
    assert json.loads(form["metadata"][0])["event_payload"]["tether_agent"] == "notifier"


async def test_reads_are_posts_that_go_live_and_are_never_captured(slack_gw: Any, fake: SlackFake) -> None:
    fake.add_message("C0GENERAL", "earlier")
    wc = client(slack_gw, agent="drafter")  # drafter's writes are dry-run; its reads are not
    chans = await call(wc.conversations_list)
    assert {c["id"] for c in chans["channels"]} >= {"C0GENERAL", "C0RANDOM"}
    wc2 = client(slack_gw)
    hist = await call(wc2.conversations_history, channel="C0GENERAL")
    assert [m["text"] for m in hist["messages"]] == ["earlier"]
    me = await call(wc2.auth_test)
    assert me["user_id"] == BOT_USER
    assert [r.method for r in fake.seen("conversations.list")] == ["POST"]
    assert len(fake.seen("conversations.history")) == 1 and len(fake.seen("auth.test")) == 1
    items = (await (await slack_gw.admin("GET", "/api/review/items")).json())["items"]
    assert items == []
    recs = [r for r in await slack_gw.journal() if r["kind"] == "request"
            and r.get("capability") in ("conversations.list", "conversations.history", "auth.test")]
    assert len(recs) == 3 and {r["decision"] for r in recs} == {"live"}


async def test_ok_false_surfaces_as_slack_api_error_and_counts_as_failure(slack_gw: Any, fake: SlackFake) -> None:
    wc = client(slack_gw)
    with pytest.raises(SlackApiError) as info:
        await call(wc.chat_postMessage, channel="C0NOPE", text="to nowhere")
    assert info.value.response.status_code == 200
    assert info.value.response["error"] == "channel_not_found"
    assert len(fake.seen("chat.postMessage")) == 1  # it was forwarded; Slack said no
    outcomes = [r for r in await slack_gw.journal() if r["kind"] == "outcome" and r.get("capability") == "chat.post"]
    assert outcomes and outcomes[-1].get("upstream_failure") is True and not outcomes[-1].get("upstream_ids")


async def test_dry_run_post_returns_a_response_the_sdk_accepts(slack_gw: Any, fake: SlackFake) -> None:
    wc = client(slack_gw, agent="drafter")
    resp = await call(wc.chat_postMessage, channel="C0GENERAL", text="draft announcement")
    assert resp["ok"] is True and resp["channel"] == "C0GENERAL"
    assert resp["message"]["text"] == "draft announcement"
    whole, _, frac = resp["ts"].partition(".")
    assert whole.isdigit() and len(frac) == 6
    assert {k.lower(): v for k, v in resp.headers.items()}["x-tether-dry-run"].startswith("dr_")
    assert fake.seen("chat.postMessage") == [] and fake.messages("C0GENERAL") == []


async def test_two_posts_in_a_transaction_roll_back_to_nothing(slack_gw: Any, fake: SlackFake) -> None:
    before = fake.add_message("C0GENERAL", "a message from before")
    wc = client(slack_gw, **{"X-Tether-Transaction": "announce-1"})
    r1 = await call(wc.chat_postMessage, channel="C0GENERAL", text="step one")
    r2 = await call(wc.api_call, "chat.postMessage", data={"channel": "C0RANDOM", "text": "step two"})  # form
    assert {m["ts"] for m in fake.messages("C0GENERAL")} == {before["ts"], r1["ts"]}
    assert [m["ts"] for m in fake.messages("C0RANDOM")] == [r2["ts"]]
    tx = await rollback(slack_gw, "announce-1")
    assert tx["state"] == "rolled_back", tx
    assert [s["state"] for s in tx["steps"]] == ["compensated", "compensated"]
    assert fake.messages("C0GENERAL") == [before] and fake.messages("C0RANDOM") == []
    deletes = fake.seen("chat.delete")
    assert [d.json() for d in deletes] == [{"channel": "C0RANDOM", "ts": r2["ts"]},
                                           {"channel": "C0GENERAL", "ts": r1["ts"]}]  # newest first
    assert all(d.headers["Authorization"] == f"Bearer {BOT_TOKEN}" for d in deletes)


async def test_a_failed_post_rolls_back_the_transaction(slack_gw: Any, fake: SlackFake) -> None:
    wc = client(slack_gw, **{"X-Tether-Transaction": "announce-2"})
    r1 = await call(wc.chat_postMessage, channel="C0GENERAL", text="step one")
    assert fake.messages("C0GENERAL")[0]["ts"] == r1["ts"]
    with pytest.raises(SlackApiError) as info:
        await call(wc.chat_postMessage, channel="C0PRIVATE", text="step two")
    assert info.value.response["error"] == "not_in_channel"
    rh = {k.lower(): v for k, v in info.value.response.headers.items()}
    assert rh["x-tether-transaction-state"] == "rolled_back"
    assert fake.messages("C0GENERAL") == []
    async with slack_gw.session.get(f"{slack_gw.url}/_tether/transactions/announce-2",
                                    headers=slack_gw.headers("notifier")) as r:
        tx = await r.json()
    assert [s["state"] for s in tx["steps"]] == ["compensated", "not_applied"]


async def test_update_in_a_transaction_rolls_back_to_the_prior_text(slack_gw: Any, fake: SlackFake) -> None:
    msg = fake.add_message("C0GENERAL", "deploy 41 is live")
    fake.add_message("C0GENERAL", "a later message")
    wc = client(slack_gw, **{"X-Tether-Transaction": "fix-typo"})
    resp = await call(wc.chat_update, channel="C0GENERAL", ts=msg["ts"], text="deploy 42 is live")
    assert resp["ok"] is True
    assert fake.messages("C0GENERAL")[0]["text"] == "deploy 42 is live"
    # the pre-image was read with conversations.history pinned to that one ts
    [pre] = [r for r in fake.seen("conversations.history")]
    assert pre.method == "GET" and f"latest={msg['ts']}" in pre.query and "inclusive=true" in pre.query
    tx = await rollback(slack_gw, "fix-typo")
    assert tx["state"] == "rolled_back", tx
    assert fake.messages("C0GENERAL")[0]["text"] == "deploy 41 is live"
    undo = fake.seen("chat.update")[-1].json()
    assert undo == {"channel": "C0GENERAL", "ts": msg["ts"], "text": "deploy 41 is live"}


async def test_update_changed_by_someone_else_is_a_conflict(slack_gw: Any, fake: SlackFake) -> None:
    msg = fake.add_message("C0GENERAL", "v1")
    wc = client(slack_gw, **{"X-Tether-Transaction": "fix-2"})
    await call(wc.chat_update, channel="C0GENERAL", ts=msg["ts"], text="v2")
    fake.channels["C0GENERAL"]["messages"][0]["text"] = "v3 by a human"
    tx = await rollback(slack_gw, "fix-2")
    assert tx["state"] == "needs_attention" and tx["steps"][0]["state"] == "conflict"
    assert fake.messages("C0GENERAL")[0]["text"] == "v3 by a human"


async def test_delete_is_refused_live_inside_a_transaction(slack_gw: Any, fake: SlackFake) -> None:
    msg = fake.add_message("C0GENERAL", "keep me")
    wc = client(slack_gw, **{"X-Tether-Transaction": "cleanup"})
    with pytest.raises(SlackApiError) as info:
        await call(wc.chat_delete, channel="C0GENERAL", ts=msg["ts"])
    assert info.value.response.status_code == 403
    assert info.value.response["error"]["code"] == "non_compensable_in_transaction"
    assert fake.seen("chat.delete") == [] and fake.messages("C0GENERAL") == [msg]
    # outside a transaction the same delete goes through (form-encoded, as the SDK sends it)
    resp = await call(client(slack_gw).chat_delete, channel="C0GENERAL", ts=msg["ts"])
    assert resp["ok"] is True and fake.messages("C0GENERAL") == []
    assert fake.seen("chat.delete")[0].headers["Content-Type"].startswith("application/x-www-form-urlencoded")


async def test_a_message_deleted_meanwhile_counts_as_undone(slack_gw: Any, fake: SlackFake) -> None:
    wc = client(slack_gw, **{"X-Tether-Transaction": "announce-3"})
    r1 = await call(wc.chat_postMessage, channel="C0GENERAL", text="oops")
    fake.channels["C0GENERAL"]["messages"].clear()  # a human deleted it first
    tx = await rollback(slack_gw, "announce-3")
    assert tx["state"] == "rolled_back", tx
    assert [d.json() for d in fake.seen("chat.delete")][-1] == {"channel": "C0GENERAL", "ts": r1["ts"]}
