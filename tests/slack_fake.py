"""A stateful fake of the Slack Web API on 127.0.0.1, answering the way Slack does.

* ``POST`` (or ``GET``) ``/api/<method>`` with arguments in the query, a form body or a JSON body;
  in a form, ``blocks``/``attachments``/``metadata`` are JSON text.
* ``Authorization: Bearer <token>`` must be the bot token the fake was made with:
  ``{"ok": false, "error": "not_authed"}`` / ``"invalid_auth"`` otherwise.
* Every answer is HTTP 200 with ``{"ok": ...}`` — errors included (``channel_not_found``,
  ``message_not_found``, ``no_text``, ``cant_update_message``...) — except an injected rate limit (429).
* Methods: ``chat.postMessage``, ``chat.update``, ``chat.delete``, ``conversations.list``,
  ``conversations.history`` (``latest``/``oldest``/``inclusive``/``limit``, newest first),
  ``auth.test``; anything else is ``unknown_method``.
* ``received`` records every request; ``fail_next(method, error)`` makes the next call of a method
  fail; ``messages(channel)`` shows a channel's state.
* ``chat.postEphemeral`` (kept in ``ephemeral``) and ``views.open`` (kept in ``views``) for interactive apps.
* Interactivity, as Slack's side of it: :meth:`SlackFake.interact` posts an interaction payload (a button
  click, a dialog submission) to an app's request URL, form-encoded and signed with the app's signing
  secret exactly as Slack signs it — or signed wrongly, with a stale timestamp, or not at all — and
  returns what was sent, so that a test can replay it byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp

from aiohttp import web

from tests.fakes import Received, serve_app

BOT_USER = "U0FAKEBOT"
BOT_ID = "B0FAKEBOT"
TEAM = "T0FAKETEAM"
APP = "A0FAKEAPP"


def _ts_key(ts: str) -> tuple[int, int]:
    whole, _, frac = ts.partition(".")
    return int(whole), int((frac + "000000")[:6])


@dataclass
class SlackFake:
    token: str = "xoxb-fake-bot-token"
    channels: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "C0GENERAL": {"id": "C0GENERAL", "name": "general", "is_member": True, "messages": []},
        "C0RANDOM": {"id": "C0RANDOM", "name": "random", "is_member": True, "messages": []},
        "C0PRIVATE": {"id": "C0PRIVATE", "name": "secret", "is_member": False, "messages": []},
    })
    received: list[Received] = field(default_factory=list)
    failures: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    signing_secret: str = "fake-signing-secret-0123456789abcdef"
    ephemeral: list[dict[str, Any]] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _seq: Any = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, method: str, error: str = "internal_error", status: int = 200) -> None:
        self.failures.setdefault(method, []).append((error, status))

    def seen(self, method: str | None = None) -> list[Received]:
        return [r for r in self.received if method is None or r.path == f"/api/{method}"]

    def messages(self, channel: str) -> list[dict[str, Any]]:
        return list(self.channels[channel]["messages"])

    def add_message(self, channel: str, text: str, user: str = BOT_USER, **extra: Any) -> dict[str, Any]:
        msg = {"type": "message", "text": text, "user": user, "ts": self._next_ts(), "team": TEAM, **extra}
        if user == BOT_USER:
            msg["bot_id"] = BOT_ID
        self.channels[channel]["messages"].append(msg)
        return msg

    async def start(self) -> "SlackFake":
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- plumbing -------------------------------------------------------------------------------

    def _next_ts(self) -> str:
        n = next(self._seq)
        return f"{1700000000 + n}.{n * 100:06d}"

    @staticmethod
    def _reply(doc: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, body=json.dumps(doc).encode(), headers=headers,
                             content_type="application/json", charset="utf-8")

    def _err(self, error: str, **extra: Any) -> web.Response:
        return self._reply({"ok": False, "error": error, **extra})

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.received.append(Received(request.method, request.raw_path, dict(request.headers),
                                      list(request.headers.items()), raw))
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if raw:
            if ctype == "application/json":
                try:
                    doc = json.loads(raw)
                except ValueError:
                    return self._err("invalid_json")
                if not isinstance(doc, dict):
                    return self._err("invalid_json")
                args.update(doc)
            elif ctype == "application/x-www-form-urlencoded":
                args.update(dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True)))
                for key in ("blocks", "attachments", "metadata"):
                    if isinstance(args.get(key), str) and args[key]:
                        try:
                            args[key] = json.loads(args[key])
                        except ValueError:
                            return self._err(f"invalid_{key}")
            else:
                return self._err("invalid_form_data")
        auth = request.headers.get("Authorization", "")
        if not auth:
            return self._err("not_authed")
        if auth != f"Bearer {self.token}":
            return self._err("invalid_auth")
        queued = self.failures.get(method)
        if queued:
            error, status = queued.pop(0)
            if status == 429:
                return self._reply({"ok": False, "error": "ratelimited"}, 429, {"Retry-After": "1"})
            return self._reply({"ok": False, "error": error}, status)
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return self._err("unknown_method")
        return handler(args)

    def _channel(self, value: Any) -> dict[str, Any] | None:
        if not isinstance(value, str) or not value:
            return None
        if value in self.channels:
            return self.channels[value]
        name = value.lstrip("#")
        for ch in self.channels.values():
            if ch["name"] == name:
                return ch
        return None

    @staticmethod
    def _find(ch: dict[str, Any], ts: Any) -> dict[str, Any] | None:
        for msg in ch["messages"]:
            if msg["ts"] == ts:
                return msg
        return None

    # -- methods --------------------------------------------------------------------------------

    def _m_auth_test(self, args: dict[str, Any]) -> web.Response:
        return self._reply({"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "tether-bot",
                            "team_id": TEAM, "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False})

    def _m_chat_postMessage(self, args: dict[str, Any]) -> web.Response:
        ch = self._channel(args.get("channel"))
        if ch is None:
            return self._err("channel_not_found")
        if not ch["is_member"]:
            return self._err("not_in_channel")
        if not (args.get("text") or args.get("blocks") or args.get("attachments")):
            return self._err("no_text")
        msg: dict[str, Any] = {"type": "message", "text": args.get("text", ""), "user": BOT_USER, "bot_id": BOT_ID,
                               "app_id": APP, "ts": self._next_ts(), "team": TEAM,
                               "bot_profile": {"id": BOT_ID, "app_id": APP, "name": "tether-bot", "team_id": TEAM}}
        for key in ("blocks", "attachments", "thread_ts", "metadata"):
            if args.get(key) not in (None, ""):
                msg[key] = args[key]
        ch["messages"].append(msg)
        shown = {k: v for k, v in msg.items() if k != "metadata"}
        return self._reply({"ok": True, "channel": ch["id"], "ts": msg["ts"], "message": shown})

    def _m_chat_update(self, args: dict[str, Any]) -> web.Response:
        ch = self._channel(args.get("channel"))
        if ch is None:
            return self._err("channel_not_found")
        msg = self._find(ch, args.get("ts"))
        if msg is None:
            return self._err("message_not_found")
        if msg.get("user") != BOT_USER:
            return self._err("cant_update_message")
        if "text" not in args and "blocks" not in args and "attachments" not in args:
            return self._err("no_text")
        for key in ("text", "blocks", "attachments", "metadata"):
            if key in args:
                if args[key] in ([], "") and key != "text":
                    msg.pop(key, None)
                else:
                    msg[key] = args[key]
        msg["edited"] = {"user": BOT_USER, "ts": self._next_ts()}
        shown = {k: v for k, v in msg.items() if k not in ("metadata", "ts")}
        return self._reply({"ok": True, "channel": ch["id"], "ts": msg["ts"], "text": msg.get("text", ""),
                            "message": shown})

    def _m_chat_delete(self, args: dict[str, Any]) -> web.Response:
        ch = self._channel(args.get("channel"))
        if ch is None:
            return self._err("channel_not_found")
        msg = self._find(ch, args.get("ts"))
        if msg is None:
            return self._err("message_not_found")
        if msg.get("user") != BOT_USER:
            return self._err("cant_delete_message")
        ch["messages"].remove(msg)
        return self._reply({"ok": True, "channel": ch["id"], "ts": msg["ts"]})

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> web.Response:
        ch = self._channel(args.get("channel"))
        if ch is None:
            return self._err("channel_not_found")
        if not args.get("user"):
            return self._err("user_not_in_channel")
        if not (args.get("text") or args.get("blocks")):
            return self._err("no_text")
        self.ephemeral.append({"channel": ch["id"], "user": args["user"], "text": args.get("text", "")})
        return self._reply({"ok": True, "message_ts": self._next_ts()})

    def _m_views_open(self, args: dict[str, Any]) -> web.Response:
        view = args.get("view")
        if not args.get("trigger_id"):
            return self._err("invalid_arguments")
        if not isinstance(view, dict) or view.get("type") != "modal":
            return self._err("invalid_arguments")
        self.views.append({"trigger_id": args["trigger_id"], "view": view})
        return self._reply({"ok": True, "view": {"id": f"V{len(self.views):08d}", **view}})

    # -- interactivity: Slack calling the app ---------------------------------------------------

    def sign(self, timestamp: str, body: bytes, secret: str | None = None) -> str:
        base = b"v0:" + timestamp.encode() + b":" + body
        return "v0=" + hmac.new((secret or self.signing_secret).encode(), base, hashlib.sha256).hexdigest()

    def block_action(self, user: str, action_id: str, value: str, channel: str, message_ts: str) -> dict[str, Any]:
        """A button click, as Slack describes it to the app."""
        return {"type": "block_actions", "team": {"id": TEAM}, "api_app_id": APP,
                "user": {"id": user, "username": user.lower(), "team_id": TEAM},
                "trigger_id": f"{next(self._seq)}.{TEAM}.trigger", "channel": {"id": channel},
                "container": {"type": "message", "message_ts": message_ts, "channel_id": channel},
                "message": {"ts": message_ts}, "response_url": f"{self.url}/actions/{message_ts}",
                "actions": [{"type": "button", "action_id": action_id, "block_id": "tether_decide", "value": value,
                             "action_ts": str(time.time())}]}

    def view_submission(self, user: str, view: dict[str, Any], values: dict[str, dict[str, str]]) -> dict[str, Any]:
        """A modal's submission: ``values`` is {block_id: {action_id: value}}."""
        state = {b: {a: {"type": "plain_text_input", "value": v} for a, v in acts.items()} for b, acts in values.items()}
        return {"type": "view_submission", "team": {"id": TEAM}, "api_app_id": APP,
                "user": {"id": user, "team_id": TEAM},
                "view": {**view, "id": "V0VIEW", "state": {"values": state}}}

    async def interact(self, url: str, payload: dict[str, Any], *, timestamp: float | None = None,
                       secret: str | None = None, signature: str | None = None, unsigned: bool = False,
                       replay: "tuple[dict[str, str], bytes] | None" = None) -> tuple[int, Any, dict[str, str], bytes]:
        """POST an interaction to the app as Slack does; returns (status, answer, headers sent, body sent)."""
        if replay is not None:
            headers, body = replay
        else:
            body = urlencode({"payload": json.dumps(payload)}).encode()
            ts = str(int(timestamp if timestamp is not None else time.time()))
            headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
                       "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)"}
            if not unsigned:
                headers["X-Slack-Signature"] = signature or self.sign(ts, body, secret)
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=body, headers=headers) as r:
                raw = await r.read()
                try:
                    answer: Any = json.loads(raw) if raw else None
                except ValueError:
                    answer = raw.decode()
                return r.status, answer, headers, body

    def _m_conversations_list(self, args: dict[str, Any]) -> web.Response:
        chans = [{"id": c["id"], "name": c["name"], "is_channel": True, "is_private": False, "is_archived": False,
                  "is_member": c["is_member"], "created": 1600000000, "num_members": 3}
                 for c in self.channels.values()]
        return self._reply({"ok": True, "channels": chans, "response_metadata": {"next_cursor": ""}})

    def _m_conversations_history(self, args: dict[str, Any]) -> web.Response:
        ch = self._channel(args.get("channel"))
        if ch is None or not str(args.get("channel", "")).startswith("C"):
            return self._err("channel_not_found")
        if not ch["is_member"]:
            return self._err("not_in_channel")
        inclusive = str(args.get("inclusive", "")).lower() in ("1", "true")
        latest = _ts_key(str(args["latest"])) if args.get("latest") else None
        oldest = _ts_key(str(args["oldest"])) if args.get("oldest") else None
        try:
            limit = int(args.get("limit", 100))
        except ValueError:
            return self._err("invalid_limit")
        with_meta = str(args.get("include_all_metadata", "")).lower() in ("1", "true")
        picked = []
        for msg in sorted(ch["messages"], key=lambda m: _ts_key(m["ts"]), reverse=True):
            k = _ts_key(msg["ts"])
            if latest is not None and (k > latest or (k == latest and not inclusive)):
                continue
            if oldest is not None and (k < oldest or (k == oldest and not inclusive)):
                continue
            picked.append({k2: v for k2, v in msg.items() if with_meta or k2 != "metadata"})
        return self._reply({"ok": True, "messages": picked[:limit], "has_more": len(picked) > limit, "pin_count": 0,
                            "channel_actions_ts": None, "channel_actions_count": 0,
                            "response_metadata": {"next_cursor": ""}})
