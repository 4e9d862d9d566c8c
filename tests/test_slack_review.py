"""Deciding review items in Slack (issue 26 item 2), against a fake Slack that posts signed interaction
payloads to the admin listener the way Slack does — and wrongly signed, stale and replayed ones."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import pytest

from proxy.doors.admin.slack_review import APPROVE, REJECT, check_signature, signature
from tests.conftest import base_rules
from tests.slack_fake import SlackFake

CHANNEL = "C0GENERAL"
RITA, NOBODY, AGENT_ITSELF, JANE = "U0RITA", "U0NOBODY", "U0RENEWBOT", "U0JANE"


@pytest.fixture
async def slack() -> AsyncIterator[SlackFake]:
    fake = await SlackFake().start()
    yield fake
    await fake.stop()


def slack_rules(upstream: Any, slack: SlackFake, store: str) -> dict[str, Any]:
    rules = base_rules(upstream.url, store)
    rules["capabilities"]["opportunity.update"] = {
        "upstream": "crm", "method": "PATCH", "path": "/api/opportunities/{id}",
        "display": {"object": "Opportunity", "name": ["name"]}}
    rules["agents"]["renewal-bot"] = {"grants": [{"capability": "opportunity.update", "mode": "dry_run"}]}
    rules["server"]["review"] = {"read_current": True, "slack": {
        "channel": CHANNEL, "bot_token": slack.token, "signing_secret": slack.signing_secret,
        "api_url": f"{slack.url}/api", "console_url": "https://tether.acme.example/console/",
        "reviewers": {RITA: "rita", AGENT_ITSELF: "renewal-bot", JANE: "ae:jane@acme.example"}}}
    return rules


async def until(pred: Any, timeout: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = pred()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


def posted(slack: SlackFake, item_id: str) -> dict[str, Any] | None:
    for msg in slack.messages(CHANNEL):
        for block in msg.get("blocks") or []:
            for el in block.get("elements") or []:
                if el.get("value") == item_id or item_id in str(el.get("text", "")):
                    return msg
    return None


def button_values(msg: dict[str, Any]) -> dict[str, str]:
    return {el["action_id"]: el.get("value", el.get("url")) for b in msg.get("blocks") or [] if b["type"] == "actions"
            for el in b["elements"]}


async def capture(gw: Any, upstream: Any, intent: str = "renew Acme Corp", stage: str = "proposal") -> str:
    r = await gw.request("PATCH", "/api/opportunities/opp-1", agent="renewal-bot", on_behalf_of="ae:jane@acme.example",
                         intent=intent, json={"stage": stage})
    assert r.status == 200
    return r.headers["X-Tether-Dry-Run"]


def test_the_signature_is_slacks_scheme():
    """Checked against the Slack SDK's own verifier (slack_sdk.signature), which implements the scheme."""
    from slack_sdk.signature import SignatureVerifier

    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    body = b"payload=%7B%22type%22%3A%22block_actions%22%7D"
    sdk = SignatureVerifier(secret, clock=type("C", (), {"now": staticmethod(lambda: 1531420618.0)})())
    assert signature(secret, "1531420618", body) == sdk.generate_signature(timestamp="1531420618", body=body)
    assert sdk.is_valid(body, "1531420618", signature(secret, "1531420618", body))
    good = signature(secret, "1531420618", body)
    assert check_signature(secret, "1531420618", good, body, now=1531420618 + 299) is None
    assert "stale" in check_signature(secret, "1531420618", good, body, now=1531420618 + 301)
    assert "stale" in check_signature(secret, "1531420618", good, body, now=1531420618 - 301)
    assert "does not verify" in check_signature(secret, "1531420618", good, body + b"x", now=1531420618)
    assert "does not verify" in check_signature("other", "1531420618", good, body, now=1531420618)
    assert check_signature(secret, None, good, body, now=1531420618) is not None


@pytest.mark.stores
async def test_decide_in_slack_signed_mapped_separated_and_journaled(make_gateway, upstream, slack, store_url):
    gw = await make_gateway(slack_rules(upstream, slack, store_url))
    url = f"{gw.admin_url}/slack/interactions"
    upstream.put_record("opportunities", {"id": "opp-1", "name": "Acme renewal 2027", "stage": "negotiation"})
    item = await capture(gw, upstream, intent="renew Acme Corp <!channel> <https://evil.example|approve>")

    # posted with the headline, the change, Approve / Reject and a link to the console
    msg = await until(lambda: posted(slack, item))
    text = str(msg["blocks"])
    assert "renewal-bot, for jane@acme.example (AE), wants to change Opportunity 'Acme renewal 2027'" in text
    assert "negotiation → proposal" in text
    assert "&lt;!channel&gt;" in text and "<!channel>" not in text and "<https://evil" not in text
    assert "<!channel>" not in msg["text"] and "&lt;!channel&gt;" in msg["text"]  # the notification text too
    buttons = button_values(msg)
    assert buttons[APPROVE] == item and buttons[REJECT] == item
    assert buttons["tether_open"] == f"https://tether.acme.example/console/#/queue/{item}"
    stored = await gw.gw.store.review_get(item)
    assert stored["slack"] == {"channel": CHANNEL, "ts": msg["ts"]}

    click = slack.block_action(RITA, APPROVE, item, CHANNEL, msg["ts"])
    # wrongly signed, stale, unsigned: 401 and journaled, nothing decided
    st, answer, _, _ = await slack.interact(url, click, secret="not-the-secret")
    assert st == 401 and answer["error"]["code"] == "token_invalid_signature"
    st, answer, _, _ = await slack.interact(url, click, timestamp=time.time() - 301)
    assert st == 401 and "stale" in answer["error"]["message"]
    st, _, _, _ = await slack.interact(url, click, unsigned=True)
    assert st == 401
    assert (await gw.gw.store.review_get(item))["state"] == "pending"

    # an unmapped Slack user cannot decide: told so, privately
    st, _, _, _ = await slack.interact(url, slack.block_action(NOBODY, APPROVE, item, CHANNEL, msg["ts"]))
    assert st == 200
    await until(lambda: any(e["user"] == NOBODY and "not mapped" in e["text"] for e in slack.ephemeral))
    # the agent itself (mapped by mistake) cannot approve its own item: the review service refuses it
    st, _, _, _ = await slack.interact(url, slack.block_action(AGENT_ITSELF, APPROVE, item, CHANNEL, msg["ts"]))
    assert st == 200
    await until(lambda: any(e["user"] == AGENT_ITSELF and "self_approval" in e["text"] for e in slack.ephemeral))
    assert (await gw.gw.store.review_get(item))["state"] == "pending" and upstream.seen("PATCH") == []

    # a reviewer approves: replayed, journaled with both identities, the message shows the outcome
    st, _, sent_headers, sent_body = await slack.interact(url, click)
    assert st == 200
    await until(lambda: upstream.seen("PATCH"))
    assert upstream.seen("PATCH")[0].headers["X-Tether-Reviewer"] == "rita"
    done = await until(lambda: (m := posted(slack, item)) and "edited" in m and m)
    assert "Approved by rita — replayed as sent (upstream answered 200)" in str(done["blocks"])
    assert not [b for b in done["blocks"] if b["type"] == "actions"]  # no buttons left
    it = await (await gw.admin("GET", f"/api/review/items/{item}")).json()
    assert it["state"] == "replayed" and it["decision"]["by"] == "rita"

    # the very same request again (a replay within the window) is refused and changes nothing
    st, answer, _, _ = await slack.interact(url, None, replay=(sent_headers, sent_body))  # type: ignore[arg-type]
    assert st == 401 and "replayed" in answer["error"]["message"]
    assert len(upstream.seen("PATCH")) == 1

    recs = await gw.journal()
    refused = [r for r in recs if r["kind"] == "review" and r.get("event") == "slack_refused"]
    assert {r["reason"].split(" (")[0] for r in refused} >= {"signature does not verify", "replayed request",
                                                            "missing X-Slack-Request-Timestamp or X-Slack-Signature",
                                                            "self_approval"}
    assert any(r.get("event") == "slack_action" and r.get("slack_user") == RITA and r.get("reviewer") == "rita"
               and r["review_item"] == item for r in recs)
    assert any(r["kind"] == "review" and r["decision"] == "approved" and r["reviewer"] == "rita"
               and r["review_item"] == item for r in recs)


async def test_reject_in_slack_asks_for_a_reason_and_other_decisions_update_the_message(make_gateway, upstream,
                                                                                           slack, tmp_path):
    gw = await make_gateway(slack_rules(upstream, slack, str(tmp_path / "t.db")))
    url = f"{gw.admin_url}/slack/interactions"
    upstream.put_record("opportunities", {"id": "opp-1", "name": "Acme renewal 2027", "stage": "negotiation"})
    item = await capture(gw, upstream)
    msg = await until(lambda: posted(slack, item))

    st, _, _, _ = await slack.interact(url, slack.block_action(RITA, REJECT, item, CHANNEL, msg["ts"]))
    assert st == 200
    view = (await until(lambda: slack.views))[0]["view"]
    # a submission without a reason is refused in the dialog itself
    st, answer, _, _ = await slack.interact(url, slack.view_submission(RITA, view, {"reason": {"reason": "  "}}))
    assert st == 200 and answer["response_action"] == "errors"
    st, answer, _, _ = await slack.interact(url, slack.view_submission(RITA, view, {"reason": {"reason": "wrong stage"}}))
    assert st == 200 and answer == {"response_action": "clear"}
    it = await (await gw.admin("GET", f"/api/review/items/{item}")).json()
    assert it["state"] == "rejected" and it["decision"] == {**it["decision"], "by": "rita", "reason": "wrong stage"}
    done = await until(lambda: (m := posted(slack, item)) and "edited" in m and m)
    assert "Rejected by rita: wrong stage" in str(done["blocks"])

    # decided in the console (the admin API): the Slack message follows
    other = await capture(gw, upstream, intent="second try", stage="closed")
    await until(lambda: posted(slack, other))
    await gw.admin("POST", f"/api/review/items/{other}/approve", json={})
    done = await until(lambda: (m := posted(slack, other)) and "edited" in m and "replayed" in str(m["blocks"]) and m)
    assert "Approved by rita — replayed as sent" in str(done["blocks"])
    # a click on the stale message is told it is decided (and nothing more happens)
    st, _, _, _ = await slack.interact(url, slack.block_action(RITA, APPROVE, other, CHANNEL, done["ts"]))
    await until(lambda: any("already_decided" in e["text"] for e in slack.ephemeral))
    assert len(upstream.seen("PATCH")) == 1


async def test_the_person_acted_for_cannot_approve_in_slack(make_gateway, upstream, slack, tmp_path):
    """Separation of duties is the review service's rule (issue 20 item 3); Slack goes through it."""
    gw = await make_gateway(slack_rules(upstream, slack, str(tmp_path / "t.db")))
    url = f"{gw.admin_url}/slack/interactions"
    upstream.put_record("opportunities", {"id": "opp-1", "name": "Acme renewal 2027", "stage": "negotiation"})
    item = await capture(gw, upstream)
    msg = await until(lambda: posted(slack, item))
    from proxy.errors import TetherError
    from proxy.policy.identity import Identity

    try:  # does this build's review service already refuse the on_behalf_of human?
        gw.gw.review._not_self(await gw.gw.store.review_get(item),
                               Identity(agent="ae:jane@acme.example", on_behalf_of=None))
        pytest.skip("the review service does not yet refuse the person an item was made for (issue 20 item 3, "
                    "another branch); Slack decides through it, so this test applies once that lands")
    except TetherError:
        pass
    st, _, _, _ = await slack.interact(url, slack.block_action(JANE, APPROVE, item, CHANNEL, msg["ts"]))
    assert st == 200
    await until(lambda: any(e["user"] == JANE and "Tether refused" in e["text"] for e in slack.ephemeral))
    assert (await gw.gw.store.review_get(item))["state"] == "pending" and upstream.seen("PATCH") == []
