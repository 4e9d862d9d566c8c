"""The Slack adapter's decisions, from plain data (no sockets)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from adapters import get_adapter
from adapters.base import AdapterOptionsError, NotCompensable, Operation, UndoPlan
from adapters.slack import SlackAdapter, method_of

A = SlackAdapter()


def op(method_name: str, body: Any = None, *, operation: str | None = None, form: bool = False) -> Operation:
    path = f"/api/{method_name}"
    kind = operation or A.infer_operation("POST", path, "write")
    cap = SimpleNamespace(name=f"cap.{method_name}", operation=kind, config=SimpleNamespace(allow_accounts=[]))
    return Operation(method="POST", path=path, segments=("api", method_name), body=body,
                     content_type="application/x-www-form-urlencoded" if form else "application/json; charset=utf-8",
                     capability=cap)


def history(*messages: dict[str, Any], ok: bool = True) -> dict[str, Any]:
    if not ok:
        return {"ok": False, "error": "missing_scope"}
    return {"ok": True, "messages": list(messages), "has_more": False}


def test_registered_by_name() -> None:
    assert isinstance(get_adapter("slack"), SlackAdapter)
    with pytest.raises(AdapterOptionsError):
        get_adapter("slack", {"provenance_event_type": "has space"})
    with pytest.raises(AdapterOptionsError):
        get_adapter("slack", {"bogus": 1})


@pytest.mark.parametrize("name,expected", [
    ("chat.postMessage", "create"), ("chat.scheduleMessage", "create"), ("chat.update", "update"),
    ("chat.delete", "delete"), ("reactions.add", "create"), ("reactions.remove", "delete"),
    ("conversations.setTopic", "update"), ("conversations.invite", "create"), ("usergroups.users.update", "update"),
    ("files.remote.remove", "delete"), ("chat.unfurl", "action"), ("conversations.mark", "action"),
])
def test_operation_from_the_method_name(name: str, expected: str) -> None:
    assert A.infer_operation("POST", f"/api/{name}", "write") == expected


def test_declared_reads_stay_reads_and_odd_templates_are_actions() -> None:
    assert A.infer_operation("POST", "/api/conversations.list", "read") == "read"
    assert A.infer_operation("POST", "/api/{method}", "write") == "action"
    assert A.infer_operation("POST", "/other/chat.postMessage", "write") == "action"
    assert method_of("/api/chat.update") == "chat.update" and method_of(("api",)) is None


@pytest.mark.parametrize("status,body,failed", [
    (200, {"ok": True, "ts": "1.1"}, False),
    (200, {"ok": False, "error": "channel_not_found"}, True),
    (429, {"ok": False, "error": "ratelimited"}, True),
    (500, None, True),
    (200, None, False),
    (200, {"no_ok_field": 1}, False),
])
def test_ok_false_with_200_is_a_failure(status: int, body: Any, failed: bool) -> None:
    assert A.is_failure(status, body) is failed


def test_already_undone_is_slacks_message_not_found() -> None:
    o = op("chat.postMessage", {"channel": "C1", "text": "x"})
    plan = A.arm_undo(A.plan_undo(o, None), o, 200, {}, {"ok": True, "channel": "C1", "ts": "1.1"})
    assert A.undo_already_done(plan, 200, {"ok": False, "error": "message_not_found"})
    assert A.undo_already_done(plan, 404, None)
    assert not A.undo_already_done(plan, 200, {"ok": False, "error": "channel_not_found"})
    assert not A.undo_already_done(plan, 200, {"ok": True})
    restore = A.plan_undo(op("chat.update", {"channel": "C1", "ts": "5.5", "text": "n"}),
                          history({"ts": "5.5", "text": "o"}))
    assert not A.undo_already_done(restore, 200, {"ok": False, "error": "message_not_found"})


def test_created_ids_are_channel_and_ts_only_when_ok() -> None:
    o = op("chat.postMessage", {"channel": "C1", "text": "x"})
    answer = {"ok": True, "channel": "C1", "ts": "1700000001.000100"}
    assert A.created_ids(o, 200, {}, answer) == ["C1/1700000001.000100"]
    assert A.created_ids(o, 200, {}, {"ok": False, "error": "channel_not_found"}) == []
    sched = op("chat.scheduleMessage", {"channel": "C1", "text": "x", "post_at": 2000000000})
    assert A.created_ids(sched, 200, {}, {"ok": True, "channel": "C1", "scheduled_message_id": "Q123"}) == ["Q123"]
    upd = op("chat.update", {"channel": "C1", "ts": "1.1", "text": "y"})
    assert A.created_ids(upd, 200, {}, {"ok": True, "channel": "C1", "ts": "1.1"}) == []


def test_synthetic_post_is_shaped_like_slacks_answer() -> None:
    r = A.synthetic_response(op("chat.postMessage", {"channel": "C1", "text": "hi", "blocks": [{"type": "divider"}]}),
                             "dr_1")
    assert r.status == 200 and r.body["ok"] is True and r.body["channel"] == "C1"
    whole, _, frac = r.body["ts"].partition(".")
    assert whole.isdigit() and len(frac) == 6
    assert r.body["message"]["text"] == "hi" and r.body["message"]["ts"] == r.body["ts"]
    assert r.body["message"]["blocks"] == [{"type": "divider"}]
    # a form carries blocks as JSON text; the answer shows them decoded
    r = A.synthetic_response(op("chat.postMessage", {"channel": "C1", "blocks": '[{"type":"divider"}]'}, form=True),
                             "dr_1")
    assert r.body["message"]["blocks"] == [{"type": "divider"}]


@pytest.mark.parametrize("name,body,keys", [
    ("chat.update", {"channel": "C1", "ts": "1.1", "text": "new"}, {"ok", "channel", "ts", "text", "message"}),
    ("chat.delete", {"channel": "C1", "ts": "1.1"}, {"ok", "channel", "ts"}),
    ("chat.scheduleMessage", {"channel": "C1", "text": "x", "post_at": "2000000000"},
     {"ok", "channel", "scheduled_message_id", "post_at", "message"}),
    ("reactions.add", {"channel": "C1", "timestamp": "1.1", "name": "tada"}, {"ok"}),
])
def test_synthetic_answers_for_other_methods(name: str, body: dict[str, Any], keys: set[str]) -> None:
    r = A.synthetic_response(op(name, body), "dr_1")
    assert r.status == 200 and r.body["ok"] is True and set(r.body) == keys


def test_post_undo_is_armed_with_channel_and_ts_from_the_answer() -> None:
    o = op("chat.postMessage", {"channel": "#general", "text": "hi"})
    plan = A.plan_undo(o, None)
    assert plan.kind == "delete" and "{created_id}" in plan.request.path  # unarmed: never sent
    plan = UndoPlan.from_dict(plan.to_dict())  # survives the store
    armed = A.arm_undo(plan, o, 200, {}, {"ok": True, "channel": "C0GEN", "ts": "1700000001.000100"})
    assert armed.request.method == "POST" and armed.request.path == "/api/chat.delete"
    assert armed.request.body == {"channel": "C0GEN", "ts": "1700000001.000100"}
    assert A.check_request(armed) is None


@pytest.mark.parametrize("answer", [
    {"ok": False, "error": "channel_not_found"},
    {"ok": True, "channel": "C0GEN"},
    {"ok": True, "channel": "C0GEN", "ts": "../../x"},
    {"ok": True, "channel": "c/../x", "ts": "1.1"},
    None,
])
def test_arming_refuses_answers_that_name_nothing_safe(answer: Any) -> None:
    o = op("chat.postMessage", {"channel": "C1", "text": "hi"})
    with pytest.raises(NotCompensable):
        A.arm_undo(A.plan_undo(o, None), o, 200, {}, answer)


def test_scheduled_message_undo_deletes_the_schedule() -> None:
    o = op("chat.scheduleMessage", {"channel": "C1", "text": "later", "post_at": "2000000000"})
    armed = A.arm_undo(A.plan_undo(o, None), o, 200, {},
                       {"ok": True, "channel": "C1", "scheduled_message_id": "Q1298393284"})
    assert armed.request.path == "/api/chat.deleteScheduledMessage"
    assert armed.request.body == {"channel": "C1", "scheduled_message_id": "Q1298393284"}


def test_reaction_undo_removes_it() -> None:
    plan = A.plan_undo(op("reactions.add", {"channel": "C1", "timestamp": "1.1", "name": "tada"}), None)
    assert plan.request.path == "/api/reactions.remove"
    assert plan.request.body == {"channel": "C1", "timestamp": "1.1", "name": "tada"}
    with pytest.raises(NotCompensable):
        A.plan_undo(op("reactions.add", {"channel": "C1"}), None)


def test_update_pre_image_is_the_one_message_by_ts() -> None:
    o = op("chat.update", {"channel": "C1", "ts": "1700000001.000100", "text": "new"})
    pre = A.pre_image_request(o)
    assert pre.method == "GET" and pre.path == "/api/conversations.history"
    assert "channel=C1" in pre.query and "latest=1700000001.000100" in pre.query
    assert "oldest=1700000001.000100" in pre.query and "inclusive=true" in pre.query and "limit=1" in pre.query
    assert A.pre_image_request(op("chat.update", {"channel": "C1", "ts": "not-a-ts", "text": "x"})) is None
    assert A.pre_image_request(op("chat.postMessage", {"channel": "C1", "text": "x"})) is None


def test_update_undo_restores_only_what_it_touched() -> None:
    before = {"type": "message", "ts": "5.5", "text": "old", "blocks": [{"type": "divider"}]}
    plan = A.plan_undo(op("chat.update", {"channel": "C1", "ts": "5.5", "text": "new", "as_user": True}),
                       history(before))
    assert plan.kind == "restore" and plan.request.path == "/api/chat.update"
    assert plan.request.body == {"channel": "C1", "ts": "5.5", "text": "old"}
    assert plan.expect == {"text": "new"}
    # blocks the message did not have are removed with an empty list
    plan = A.plan_undo(op("chat.update", {"channel": "C1", "ts": "6.6", "blocks": '[{"type":"divider"}]'}, form=True),
                       history({"ts": "6.6", "text": "plain"}))
    assert plan.request.body == {"channel": "C1", "ts": "6.6", "blocks": [], "text": "plain"}


@pytest.mark.parametrize("pre_image", [history(ok=False), history({"ts": "9.9", "text": "other"}), None])
def test_update_without_a_readable_pre_image_is_not_compensable(pre_image: Any) -> None:
    with pytest.raises(NotCompensable):
        A.plan_undo(op("chat.update", {"channel": "C1", "ts": "5.5", "text": "x"}), pre_image)


def test_update_of_metadata_is_not_compensable() -> None:
    with pytest.raises(NotCompensable, match="metadata"):
        A.plan_undo(op("chat.update", {"channel": "C1", "ts": "5.5", "text": "x", "metadata": {}}),
                    history({"ts": "5.5", "text": "y"}))


def test_restore_check_compares_with_what_the_agent_wrote() -> None:
    plan = A.plan_undo(op("chat.update", {"channel": "C1", "ts": "5.5", "text": "new"}),
                       history({"ts": "5.5", "text": "old"}))
    check = A.check_request(plan)
    assert check is not None and "latest=5.5" in check.query
    assert A.current_matches(plan, history({"ts": "5.5", "text": "new", "edited": {}}))
    assert not A.current_matches(plan, history({"ts": "5.5", "text": "changed by a human"}))
    assert not A.current_matches(plan, history())  # deleted meanwhile
    assert not A.current_matches(plan, history(ok=False))


@pytest.mark.parametrize("name,body", [
    ("chat.delete", {"channel": "C1", "ts": "1.1"}),
    ("chat.postEphemeral", {"channel": "C1", "user": "U1", "text": "x"}),
    ("conversations.kick", {"channel": "C1", "user": "U1"}),
    ("conversations.history", {"channel": "C1"}),
])
def test_non_compensable_methods(name: str, body: dict[str, Any]) -> None:
    with pytest.raises(NotCompensable):
        A.plan_undo(op(name, body), None)


def test_provenance_goes_into_message_metadata() -> None:
    fields = {"tether_agent": "notifier", "tether_intent": "deploy done"}
    body = A.stamp_provenance(op("chat.postMessage", {"channel": "C1", "text": "x"}), fields)
    assert body == {"channel": "C1", "text": "x",
                    "metadata": {"event_type": "tether_provenance", "event_payload": fields}}
    # the agent's own metadata keeps its event type; forged provenance keys are overwritten
    own = {"event_type": "deploy", "event_payload": {"build": 42, "tether_agent": "forged"}}
    body = A.stamp_provenance(op("chat.postMessage", {"channel": "C1", "text": "x", "metadata": own}), fields)
    assert body["metadata"] == {"event_type": "deploy", "event_payload": {"build": 42, **fields}}
    # in a form, metadata is JSON text
    body = A.stamp_provenance(op("chat.postMessage", {"channel": "C1", "text": "x"}, form=True), fields)
    assert json.loads(body["metadata"])["event_payload"] == fields
    # methods without message metadata are left alone; so is metadata Slack would not accept
    assert A.stamp_provenance(op("chat.delete", {"channel": "C1", "ts": "1.1"}), fields) is None
    bad = op("chat.postMessage", {"channel": "C1", "metadata": "not json"}, form=True)
    assert A.stamp_provenance(bad, fields) is None
    custom = SlackAdapter({"provenance_event_type": "acme_audit"})
    assert custom.stamp_provenance(op("chat.update", {"channel": "C1", "ts": "1.1", "text": "x"}),
                                   fields)["metadata"]["event_type"] == "acme_audit"
