"""Slack Web API (``/api/<method>``): every method is a POST, and failures come back as HTTP 200.

What Slack does differently, and what this adapter decides about it:

* **Methods, not resources.** ``POST /api/chat.postMessage`` creates, ``chat.update`` updates,
  ``chat.delete`` deletes; reads such as ``conversations.list`` / ``conversations.history`` are POSTs
  too (``slack_sdk``'s WebClient POSTs everything), so their capabilities say ``effect: read`` in the
  rules — then they go live and are never captured, like any read.
  :meth:`SlackAdapter.infer_operation` reads the operation from the method's verb.
* **``{"ok": false}`` with HTTP 200 is a failure** (:meth:`SlackAdapter.is_failure`): inside a
  transaction it triggers the rollback, it never counts as a success, and no id is taken from it.
* **Bodies** are JSON (``chat.postMessage`` from the SDKs) or forms (``chat.delete``); both arrive
  parsed. In a form, ``blocks``/``attachments``/``metadata`` are JSON strings.
* **Undo plans** (transactions):

  ==========================  ==================================================================
  write                       undo
  ==========================  ==================================================================
  chat.postMessage /          ``chat.delete`` with the ``channel`` and ``ts`` of Slack's answer
  chat.meMessage
  chat.scheduleMessage        ``chat.deleteScheduledMessage`` with the answer's
                              ``scheduled_message_id`` (fails, and is flagged, once it was posted)
  reactions.add               ``reactions.remove`` (same channel, timestamp, name)
  chat.update                 ``chat.update`` back to the prior text/blocks/attachments, read
                              before the write with ``conversations.history?channel=&latest=ts&
                              oldest=ts&inclusive=true&limit=1``. The message keeps Slack's
                              "edited" mark. Thread replies are not returned by that read, so
                              updating one is non-compensable (refused live in a transaction
                              unless the capability allows it)
  chat.delete and the rest    non-compensable: a deleted message cannot be restored (a re-post
                              has a new ts, time and author); an ephemeral one cannot be deleted
  ==========================  ==================================================================

* **Provenance** goes into the message's own metadata (Slack's *message metadata*:
  ``{"event_type": "tether_provenance", "event_payload": {...}}``) on ``chat.postMessage``,
  ``chat.update`` and ``chat.scheduleMessage``; when the agent sent its own metadata, the fields join
  its ``event_payload`` (keeping its ``event_type``) and overwrite keys of the same name.

Every method here decides from plain data (no I/O); the gateway sends what they plan.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any
from urllib.parse import urlencode

from .base import (
    JSON_CT,
    Adapter,
    NotCompensable,
    Operation,
    PlannedRequest,
    SyntheticResponse,
    UndoPlan,
)

# Method name -> operation, where the verb alone would mislead.
METHOD_OPERATIONS: dict[str, str] = {
    "chat.postMessage": "create",
    "chat.postEphemeral": "create",
    "chat.meMessage": "create",
    "chat.scheduleMessage": "create",
    "chat.update": "update",
    "chat.delete": "delete",
    "chat.deleteScheduledMessage": "delete",
    "reactions.add": "create",
    "reactions.remove": "delete",
    "pins.add": "create",
    "pins.remove": "delete",
    "conversations.create": "create",
    "conversations.archive": "delete",
    "conversations.rename": "update",
    "conversations.setTopic": "update",
    "conversations.setPurpose": "update",
    "files.delete": "delete",
    "reminders.add": "create",
    "reminders.delete": "delete",
    "bookmarks.add": "create",
    "bookmarks.edit": "update",
    "bookmarks.remove": "delete",
    "users.profile.set": "update",
}

_CREATE_VERBS = ("post", "add", "create", "schedule", "upload", "invite", "open")
_UPDATE_VERBS = ("update", "edit", "set", "rename")
_DELETE_VERBS = ("delete", "remove", "archive", "kick", "revoke")
# Verbs of methods that only read: declared ``effect: write`` by mistake, they have nothing to undo.
_READ_VERBS = ("list", "history", "info", "replies", "members", "test", "get", "lookup", "search", "all",
               "permalink")

# Methods whose body may carry message metadata (where provenance goes).
METADATA_METHODS = frozenset({"chat.postMessage", "chat.update", "chat.scheduleMessage"})
# chat.update parameters that say how to render, not what the message holds.
_UPDATE_STEERING = frozenset({"channel", "ts", "as_user", "link_names", "parse", "reply_broadcast", "token"})
_RESTORABLE = ("text", "blocks", "attachments")

_TS_RE = re.compile(r"[0-9]{1,12}\.[0-9]{1,9}")
_CHANNEL_RE = re.compile(r"[A-Z0-9][A-Z0-9_]{1,40}")
_SCHEDULED_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
DEFAULT_EVENT_TYPE = "tether_provenance"


def method_of(segments: tuple[str, ...] | list[str] | str) -> str | None:
    """``/api/chat.postMessage`` -> ``chat.postMessage``; None for anything else."""
    segs = [s for s in segments.split("/") if s] if isinstance(segments, str) else list(segments)
    if len(segs) == 2 and segs[0] == "api" and segs[1] and not segs[1].startswith("{"):
        return segs[1]
    return None


def _verb(method: str) -> str:
    return method.rsplit(".", 1)[-1].lower()


def _new_ts() -> str:
    return f"{int(time.time())}.{secrets.randbelow(10**6):06d}"


def _json_field(value: Any) -> Any:
    """A form carries blocks/attachments/metadata as JSON text; a JSON body carries them as values."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _written(body: dict[str, Any]) -> dict[str, Any]:
    """What a post/update set that a later read can show: text, blocks, attachments."""
    out: dict[str, Any] = {}
    for key in _RESTORABLE:
        if key in body:
            out[key] = body[key] if key == "text" else _json_field(body[key])
    return out


def _is_form(op: Operation) -> bool:
    ct = (op.content_type or "").split(";", 1)[0].strip().lower()
    return ct == "application/x-www-form-urlencoded"


class SlackAdapter(Adapter):
    """Slack Web API. Option ``provenance_event_type`` (default ``tether_provenance``): the
    ``event_type`` of the message metadata Tether adds when the agent sent none."""

    name = "slack"
    credential_params = ("token",)  # Slack reads a token from the query and from form bodies too

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("id_pattern", "provenance_event_type")

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.event_type = str(self.options.get("provenance_event_type", DEFAULT_EVENT_TYPE))
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", self.event_type):
            from .base import AdapterOptionsError

            raise AdapterOptionsError("provenance_event_type must be 1-100 of A-Z a-z 0-9 _ . -")

    # -- matching -------------------------------------------------------------------------------

    def infer_operation(self, method: str, template: str, effect: str) -> str:
        if effect == "read":
            return "read"
        name = method_of(template)
        if name is None:
            return "action"
        if name in METHOD_OPERATIONS:
            return METHOD_OPERATIONS[name]
        verb = _verb(name)
        if verb.startswith(_CREATE_VERBS):
            return "create"
        if verb.startswith(_UPDATE_VERBS):
            return "update"
        if verb.startswith(_DELETE_VERBS):
            return "delete"
        return "action"

    # -- dry-run --------------------------------------------------------------------------------

    def new_id(self, op: Operation) -> str:
        return _new_ts()

    # -- what it does, in words -----------------------------------------------------------------

    _ACTION_WORDS = {"chat.postMessage": "post a message in", "chat.postEphemeral": "post a private message in",
                     "chat.scheduleMessage": "schedule a message in", "chat.meMessage": "post a message in",
                     "chat.update": "edit a message in", "chat.delete": "delete a message in",
                     "reactions.add": "react to a message in", "reactions.remove": "remove a reaction in",
                     "pins.add": "pin a message in", "pins.remove": "unpin a message in",
                     "conversations.create": "create", "conversations.archive": "archive",
                     "conversations.invite": "invite people to", "conversations.kick": "remove someone from",
                     "conversations.setTopic": "set the topic of", "conversations.setPurpose": "set the purpose of",
                     "conversations.rename": "rename"}

    def describe(self, op: Operation, record: Any = None) -> "Description":
        """``post a message in`` channel ``#sales`` (channel ids are shown as they are)."""
        from .base import Description

        name = method_of(op.segments or op.path) or ""
        body = op.body if isinstance(op.body, dict) else {}
        channel = body.get("channel") or body.get("name")
        shown = None
        if isinstance(channel, str) and channel:
            shown = channel if channel.startswith("#") or _CHANNEL_RE.fullmatch(channel) else "#" + channel
        action = self._ACTION_WORDS.get(name) or f"call {name or op.path} in"
        return Description(action, "channel", shown, None)

    def field_label(self, field_name: str) -> str:
        return {"text": "text", "ts": "message", "thread_ts": "thread"}.get(field_name, super().field_label(field_name))

    def synthetic_response(self, op: Operation, item_id: str) -> SyntheticResponse:
        """What Slack answers, ``ok: true`` included (the SDKs raise on anything else)."""
        name = method_of(op.segments or op.path) or ""
        body = op.body if isinstance(op.body, dict) else {}
        channel = body.get("channel")
        if name in ("chat.postMessage", "chat.meMessage", "chat.scheduleMessage", "chat.postEphemeral"):
            ts = self.new_id(op)
            message: dict[str, Any] = {"type": "message", "subtype": None, "text": body.get("text", ""),
                                       "user": "U0TETHERDRY", "bot_id": "B0TETHERDRY", "ts": ts, "team": "T0TETHERDRY"}
            for key in ("blocks", "attachments", "thread_ts", "metadata"):
                if key in body:
                    message[key] = _json_field(body[key])
            message = {k: v for k, v in message.items() if v is not None}
            if name == "chat.postEphemeral":
                return self._ok({"message_ts": ts})
            if name == "chat.scheduleMessage":
                message.pop("ts", None)
                return self._ok({"channel": channel, "scheduled_message_id": f"Q0DRYRUN{secrets.token_hex(4).upper()}",
                                 "post_at": body.get("post_at"), "message": message})
            return self._ok({"channel": channel, "ts": ts, "message": message})
        if name == "chat.update":
            message = {"type": "message", "text": body.get("text", ""), "user": "U0TETHERDRY", "bot_id": "B0TETHERDRY",
                       "edited": {"user": "U0TETHERDRY", "ts": self.new_id(op)}}
            for key in ("blocks", "attachments"):
                if key in body:
                    message[key] = _json_field(body[key])
            return self._ok({"channel": channel, "ts": body.get("ts"), "text": body.get("text", ""),
                             "message": message})
        if name == "chat.delete":
            return self._ok({"channel": channel, "ts": body.get("ts")})
        if name == "chat.deleteScheduledMessage":
            return self._ok({})
        return self._ok({})

    @staticmethod
    def _ok(fields: dict[str, Any]) -> SyntheticResponse:
        return SyntheticResponse(200, {"ok": True, **fields}, content_type="application/json")

    # -- outcome --------------------------------------------------------------------------------

    def is_failure(self, status: int, body: Any) -> bool:
        """HTTP errors, and Slack's own: ``{"ok": false, "error": ...}`` with 200."""
        if status >= 400:
            return True
        return isinstance(body, dict) and body.get("ok") is False

    def undo_already_done(self, plan: UndoPlan, status: int, body: Any) -> bool:
        """Does this answer (to an undo step, or to the read before it) show that what the step would
        remove is already gone? Slack says so with ``{"ok": false, "error": "message_not_found"}``
        under HTTP 200, never with a 404. (Proposed gateway hook; see the report.)"""
        if plan.kind != "delete":
            return False
        if status in (404, 410):
            return True
        return isinstance(body, dict) and body.get("ok") is False and body.get("error") in (
            "message_not_found", "invalid_scheduled_message_id", "no_reaction")

    def created_ids(self, op: Operation, status: int, headers: dict[str, str], body: Any) -> list[str]:
        """A posted message is ``<channel>/<ts>``; a scheduled one its ``scheduled_message_id``."""
        if status >= 300 or not isinstance(body, dict) or body.get("ok") is not True:
            return []
        if getattr(op.capability, "operation", "") != "create":
            return []
        if isinstance(body.get("scheduled_message_id"), str):
            return [body["scheduled_message_id"]]
        channel, ts = body.get("channel"), body.get("ts")
        if isinstance(channel, str) and isinstance(ts, str):
            return [f"{channel}/{ts}"]
        return []

    # -- compensation ---------------------------------------------------------------------------

    @staticmethod
    def _history(channel: str, ts: str) -> PlannedRequest:
        """The one read that returns a single channel message by ts (Slack has no "get message")."""
        query = urlencode({"channel": channel, "latest": ts, "oldest": ts, "inclusive": "true", "limit": "1",
                           "include_all_metadata": "true"})
        return PlannedRequest("GET", "/api/conversations.history", query=query, content_type=None)

    def pre_image_request(self, op: Operation) -> PlannedRequest | None:
        if method_of(op.segments or op.path) != "chat.update" or not isinstance(op.body, dict):
            return None
        channel, ts = op.body.get("channel"), op.body.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str) or not _TS_RE.fullmatch(ts):
            return None
        return self._history(channel, ts)

    def plan_undo(self, op: Operation, pre_image: Any) -> UndoPlan:
        name = method_of(op.segments or op.path) or op.path
        body = op.body if isinstance(op.body, dict) else {}
        if name in ("chat.postMessage", "chat.meMessage"):
            # The path carries the {created_id} placeholder until arm_undo fills channel and ts from
            # Slack's answer: an unarmed plan is then never sent (the gateway reports it unknown).
            expect = _written(body) or None
            return UndoPlan("delete", PlannedRequest("POST", "/api/chat.delete/{created_id}",
                                                     body={"channel": None, "ts": None}, content_type=JSON_CT),
                            expect=expect, note="delete the posted message (channel and ts from Slack's answer)")
        if name == "chat.scheduleMessage":
            return UndoPlan("delete", PlannedRequest("POST", "/api/chat.deleteScheduledMessage/{created_id}",
                                                     body={"channel": None, "scheduled_message_id": None},
                                                     content_type=JSON_CT),
                            note="delete the scheduled message before it is posted")
        if name == "reactions.add":
            if not all(isinstance(body.get(k), str) for k in ("channel", "timestamp", "name")):
                raise NotCompensable("reactions.add without channel, timestamp and name cannot be undone")
            return UndoPlan("delete", PlannedRequest("POST", "/api/reactions.remove",
                                                     body={k: body[k] for k in ("channel", "timestamp", "name")},
                                                     content_type=JSON_CT),
                            note="remove the reaction")
        if name == "chat.update":
            return self._undo_update(body, pre_image)
        if name == "chat.delete":
            raise NotCompensable("a deleted Slack message cannot be restored "
                                 "(a re-post gets a new ts, time and author)")
        if name == "chat.postEphemeral":
            raise NotCompensable("an ephemeral message cannot be deleted through the Web API")
        verb = _verb(name) if isinstance(name, str) else ""
        if verb.startswith(_READ_VERBS):
            raise NotCompensable(f"{name} only reads: declare its capability with effect: read")
        raise NotCompensable(f"the slack adapter has no undo for {name}")

    def _undo_update(self, body: dict[str, Any], pre_image: Any) -> UndoPlan:
        channel, ts = body.get("channel"), body.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            raise NotCompensable("chat.update without channel and ts cannot be undone")
        # Tether's own provenance metadata is not the agent's change: Slack cannot remove message metadata
        # through chat.update, so after a rollback the message keeps the provenance of the undone edit
        unknown = sorted(k for k in body if k not in _UPDATE_STEERING and k not in _RESTORABLE
                         and not (k == "metadata" and self._is_provenance(body[k])))
        if unknown:
            raise NotCompensable(f"chat.update of {', '.join(unknown)}: their prior state cannot be written back")
        before = self._message(pre_image, ts)
        if before is None:
            why = pre_image.get("error") if isinstance(pre_image, dict) and pre_image.get("ok") is False else \
                "conversations.history did not return it (a thread reply?)"
            raise NotCompensable(f"the message {channel}/{ts} could not be read before the update: {why}")
        restore: dict[str, Any] = {"channel": channel, "ts": ts}
        for key in _RESTORABLE:
            if key in body:
                prior = before.get(key)
                restore[key] = prior if prior is not None else ("" if key == "text" else [])
        if "text" not in restore:
            restore["text"] = before.get("text", "")  # Slack wants text (or blocks) on every update
        expect = _written(body)
        return UndoPlan("restore", PlannedRequest("POST", "/api/chat.update", body=restore, content_type=JSON_CT),
                        pre_image=before, expect=expect,
                        note="put the prior text back (the message keeps Slack's 'edited' mark)")

    @staticmethod
    def _message(history: Any, ts: str) -> dict[str, Any] | None:
        if not isinstance(history, dict) or history.get("ok") is not True:
            return None
        for msg in history.get("messages") or []:
            if isinstance(msg, dict) and msg.get("ts") == ts:
                return msg
        return None

    def arm_undo(self, plan: UndoPlan, op: Operation, status: int, headers: dict[str, str], body: Any) -> UndoPlan:
        """Fill channel and ts (or the scheduled message id) from Slack's answer, checked for shape."""
        req = plan.request
        if req is None or "{created_id}" not in req.path:
            return plan
        if not isinstance(body, dict) or body.get("ok") is not True:
            raise NotCompensable("Slack's answer was not ok: nothing to undo can be named")
        channel = body.get("channel")
        if not isinstance(channel, str) or not _CHANNEL_RE.fullmatch(channel):
            raise NotCompensable("Slack's answer named no channel id")
        if "scheduled_message_id" in req.body:
            sid = body.get("scheduled_message_id")
            if not isinstance(sid, str) or not _SCHEDULED_RE.fullmatch(sid):
                raise NotCompensable("Slack's answer named no scheduled_message_id")
            req.body = {"channel": channel, "scheduled_message_id": sid}
        else:
            ts = body.get("ts")
            if not isinstance(ts, str) or not _TS_RE.fullmatch(ts):
                raise NotCompensable("Slack's answer named no message ts")
            req.body = {"channel": channel, "ts": ts}
        req.path = req.path.replace("/{created_id}", "")
        return plan

    def check_request(self, plan: UndoPlan) -> PlannedRequest | None:
        """Before restoring an updated message, read it to see whether someone changed it since.

        Deletes are not checked: a bot's message changes only through its own token, and Slack
        answers "already gone" with ``ok: false`` under HTTP 200, which the gateway would read as a
        conflict (see :meth:`undo_already_done`)."""
        req = plan.request
        if plan.kind != "restore" or req is None or not isinstance(req.body, dict):
            return None
        channel, ts = req.body.get("channel"), req.body.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            return None
        return self._history(channel, ts)

    def current_matches(self, plan: UndoPlan, current: Any) -> bool:
        """The message still shows what the agent wrote (text, blocks, attachments it set)."""
        if plan.kind != "restore":
            return True
        req = plan.request
        ts = req.body.get("ts") if req is not None and isinstance(req.body, dict) else None
        msg = self._message(current, ts) if isinstance(ts, str) else None
        if msg is None:
            return False
        for key, value in (plan.expect or {}).items():
            have = msg.get(key)
            if key == "text":
                if (have or "") != (value or ""):
                    return False
            elif len(have or []) != len(value or []):
                # Slack adds block_id/fallback/id to what it stores: compare how many, not how they look
                return False
        return True

    def check_request_headers(self, op: Operation, headers: Any) -> None:
        """Slack also takes a token as a body or query parameter: an agent sending one would act with a
        credential it must not hold. Refused (Tether injects the bot token as the header)."""
        from proxy.errors import TetherError
        from proxy.normalise import parse_query

        if isinstance(op.body, dict) and "token" in op.body:
            raise TetherError("credential_in_request", "a Slack token in the body is refused; Tether injects "
                                                       "the upstream's own")
        if op.query and any(k == "token" for k, _ in parse_query(op.query)):
            raise TetherError("credential_in_request", "a Slack token in the query is refused")

    # -- provenance -----------------------------------------------------------------------------

    def _is_provenance(self, metadata: Any) -> bool:
        meta = _json_field(metadata)
        return isinstance(meta, dict) and meta.get("event_type") == self.event_type

    def stamp_provenance(self, op: Operation, fields: dict[str, str]) -> Any:
        """Provenance into the message metadata's ``event_payload`` (JSON text inside a form)."""
        if not isinstance(op.body, dict) or not fields:
            return None
        if method_of(op.segments or op.path) not in METADATA_METHODS:
            return None
        form = _is_form(op)
        meta = _json_field(op.body.get("metadata")) if "metadata" in op.body else None
        if meta is None or meta == "":
            meta = {"event_type": self.event_type, "event_payload": {}}
        if not isinstance(meta, dict) or not isinstance(meta.get("event_payload", {}), dict):
            return None  # not metadata Slack would accept: leave the body as sent
        payload = dict(meta.get("event_payload") or {})
        payload.update(fields)
        meta = {**meta, "event_type": meta.get("event_type") or self.event_type, "event_payload": payload}
        return {**op.body, "metadata": json.dumps(meta, separators=(",", ":")) if form else meta}


__all__ = ["METHOD_OPERATIONS", "SlackAdapter", "method_of"]
