"""Deciding review items where reviewers already are: Slack.

With ``server.review.slack`` set, each new review item is posted to a channel as an interactive
message — its headline, the fields it changes, **Approve** / **Reject** buttons and a link to the
console (posting and updating is done by :mod:`proxy.doors.admin.review_notify`). A click reaches the admin listener
at ``POST /slack/interactions`` (the Slack app's *Interactivity request URL*), where this module:

1. **verifies the request** with the app's signing secret, as Slack specifies: ``X-Slack-Signature`` must
   be ``v0=`` + hex HMAC-SHA256 of ``v0:{X-Slack-Request-Timestamp}:{raw body}``, compared in constant
   time, and the timestamp within five minutes of now (either way). A signature seen before in this
   process is refused as a replay (and every decision is exactly-once in the store anyway, so a replay
   reaching another replica finds the item decided). Each refusal is a 401 and a journal record;
2. **maps the Slack user to a reviewer** through ``server.review.slack.reviewers`` (Slack user id ->
   reviewer identity). An unmapped user cannot decide; they are told so in an ephemeral message;
3. **decides through the review service** — the same path as the console, the CLI and the admin API,
   so every rule of that path applies (separation of duties: the agent, and the person it acted for,
   cannot approve; the item must still be pending; an approval is replayed and journaled with the
   reviewer's identity). Approve asks Slack for a confirmation first; Reject opens a dialog for the
   reason (a rejection always has one). A refusal is shown to the clicker only (ephemeral);
4. journals the click itself (``kind=review, event=slack_action``) with the Slack user and the mapped
   reviewer. The message is then updated with the outcome ("Approved by rita — replayed as sent
   (upstream answered 200)") by the notifier, whichever way the item was decided.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import aiohttp
import orjson
from aiohttp import web

from ...config import SlackReviewConfig
from ...errors import TetherError
from ...inert import slack_text
from ...journal.writer import base_record
from ...policy.identity import Identity
from ...safety.headline import headline_of
from ...secret import Secret, SecretUnavailable

if TYPE_CHECKING:
    from ...core.runtime import Runtime

log = logging.getLogger("tether.slack")

WINDOW = 300.0  # seconds: Slack's own recommendation for the replay window
APPROVE, REJECT, OPEN = "tether_approve", "tether_reject", "tether_open"
REJECT_VIEW = "tether_reject_reason"
MAX_BODY = 64 * 1024  # interaction payloads are small; anything larger is not from Slack
REFUSALS_PER_MINUTE = 60


class SlackError(Exception):
    """A Slack Web API call failed (``ok: false`` or no answer)."""


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """Slack's request signature: ``v0=`` + hex HMAC-SHA256 over ``v0:{timestamp}:{body}``."""
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    return "v0=" + hmac.new(secret.encode("utf-8"), base, hashlib.sha256).hexdigest()


def check_signature(secret: str, timestamp: str | None, sig: str | None, body: bytes, now: float) -> str | None:
    """None when the request is Slack's and fresh, else why not (for the journal and the 401)."""
    if not timestamp or not sig:
        return "missing X-Slack-Request-Timestamp or X-Slack-Signature"
    if not timestamp.isdigit() or len(timestamp) > 12:
        return "malformed X-Slack-Request-Timestamp"
    if abs(now - int(timestamp)) > WINDOW:
        return "stale X-Slack-Request-Timestamp (outside the five-minute window)"
    if not sig.startswith("v0="):
        return "unknown signature version"
    if not hmac.compare_digest(signature(secret, timestamp, body).encode(), sig.encode("utf-8", "replace")):
        return "signature does not verify"
    return None


class _Seen:
    """Signatures accepted in the last five minutes (replay refusal within this process)."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_time(self, sig: str, now: float) -> bool:
        while self._seen:
            k, t = next(iter(self._seen.items()))
            if now - t <= WINDOW * 2:
                break
            self._seen.popitem(last=False)
        if sig in self._seen:
            return False
        self._seen[sig] = now
        return True


class SlackReviews:
    """The Slack side of reviewing: the Web API client, message layout and the interaction callback.

    Built once per gateway; reads ``server.review.slack`` from the rules in force at each use, so a
    rules reload that changes the channel, the reviewers or the secrets takes effect at once."""

    def __init__(self, gw: "Runtime") -> None:
        self.gw = gw
        self._secrets: dict[tuple[str, int], Secret] = {}
        self._seen = _Seen()
        self._pending: set[asyncio.Task[Any]] = set()
        self._refusals: list[float] = [0.0, 0, 0]  # window start, journaled, suppressed

    @property
    def cfg(self) -> SlackReviewConfig | None:
        return self.gw.state.rules.server.review.slack

    def _secret(self, name: str) -> str:
        cfg = self.cfg
        assert cfg is not None
        ref = getattr(cfg, name)
        key = (name, id(ref))
        sec = self._secrets.get(key)
        if sec is None:
            sec = self._secrets[key] = Secret(ref, f"server.review.slack.{name}")
        return sec.get()

    # -- the Web API ------------------------------------------------------------------------------

    async def call(self, method: str, **args: Any) -> dict[str, Any]:
        """One Slack Web API call (JSON body, bot token). Raises SlackError on ``ok: false``."""
        cfg = self.cfg
        session = self.gw.session
        if cfg is None or session is None:
            raise SlackError("Slack is not configured")
        try:
            token = self._secret("bot_token")
        except SecretUnavailable as exc:
            raise SlackError(str(exc)) from None
        try:
            async with session.post(f"{cfg.api_url.rstrip('/')}/{method}", data=orjson.dumps(args),
                                    headers={"Authorization": f"Bearer {token}",
                                             "Content-Type": "application/json; charset=utf-8"},
                                    timeout=aiohttp.ClientTimeout(total=10)) as r:
                raw = await r.read()
                if r.status == 429:
                    raise SlackError(f"{method}: rate limited (Retry-After {r.headers.get('Retry-After')})")
                doc = orjson.loads(raw) if raw else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, OSError) as exc:
            raise SlackError(f"{method}: {type(exc).__name__}: {exc}") from None
        if not isinstance(doc, dict) or not doc.get("ok"):
            raise SlackError(f"{method}: {doc.get('error') if isinstance(doc, dict) else 'bad answer'}")
        return doc

    # -- messages ---------------------------------------------------------------------------------

    def console_link(self, item_id: str) -> str | None:
        cfg = self.cfg
        if cfg is None or not cfg.console_url:
            return None
        return cfg.console_url.rstrip("/") + "/#/queue/" + item_id

    def _head_blocks(self, item: dict[str, Any], headline: dict[str, Any], title: str) -> list[dict[str, Any]]:
        fields = headline.get("fields") or []
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}*\n{slack_text(headline.get('text'))}"}}]
        if fields:
            lines = []
            for f in fields[:10]:
                from ...safety.headline import show_value

                old = f"{slack_text(show_value(f['from']))} → " if f.get("known") else ""
                lines.append(f"• *{slack_text(f['label'])}*: {old}{slack_text(show_value(f['to']))}")
            if len(fields) > 10:
                lines.append(f"… and {len(fields) - 10} more")
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": "\n".join(lines)}})
        ctx = [f"agent *{slack_text(item.get('agent'))}*"]
        if item.get("on_behalf_of"):
            ctx.append(f"for *{slack_text(item['on_behalf_of'])}*")
        ctx.append(f"capability `{slack_text(item.get('capability'))}`")
        ctx.append(f"item `{slack_text(item.get('id'))}`")
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(ctx)}]})
        return blocks

    def pending_message(self, item: dict[str, Any], headline: dict[str, Any]) -> dict[str, Any]:
        blocks = self._head_blocks(item, headline, "Review needed")
        buttons: list[dict[str, Any]] = [
            {"type": "button", "action_id": APPROVE, "style": "primary", "value": item["id"],
             "text": {"type": "plain_text", "text": "Approve"},
             "confirm": {"title": {"type": "plain_text", "text": "Approve and send?"},
                         "text": {"type": "mrkdwn", "text": "The call is sent to the upstream now, as "
                                                            f"{slack_text(item.get('agent'))}."},
                         "confirm": {"type": "plain_text", "text": "Approve and send"},
                         "deny": {"type": "plain_text", "text": "Cancel"}}},
            {"type": "button", "action_id": REJECT, "style": "danger", "value": item["id"],
             "text": {"type": "plain_text", "text": "Reject…"}},
        ]
        link = self.console_link(item["id"])
        if link:
            buttons.append({"type": "button", "action_id": OPEN, "url": link,
                            "text": {"type": "plain_text", "text": "Open in the console"}})
        blocks.append({"type": "actions", "block_id": "tether_decide", "elements": buttons})
        # the fallback text is read as mrkdwn too (notifications): escaped like the blocks
        return {"text": f"Review needed: {slack_text(headline.get('text'))}"[:3000], "blocks": blocks}

    def outcome_message(self, item: dict[str, Any], headline: dict[str, Any]) -> dict[str, Any]:
        blocks = self._head_blocks(item, headline, "Review")
        outcome = outcome_text(item)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": slack_text(outcome)}})
        link = self.console_link(item["id"])
        if link:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"<{link}|Open in the console>"}]})
        return {"text": f"{slack_text(outcome)}: {slack_text(headline.get('text'))}"[:3000], "blocks": blocks}

    # -- the interaction callback -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        cfg = self.cfg
        if cfg is None:
            raise TetherError("not_found", "Slack reviewing is not configured (server.review.slack)")
        body = b""
        if (request.content_length or 0) <= MAX_BODY:
            while len(body) <= MAX_BODY:
                chunk = await request.content.read(MAX_BODY + 1 - len(body))
                if not chunk:
                    break
                body += chunk
        else:
            body = b"x" * (MAX_BODY + 1)  # refused below without reading it
        now = time.time()
        ts, sig = request.headers.get("X-Slack-Request-Timestamp"), request.headers.get("X-Slack-Signature")
        try:
            secret = self._secret("signing_secret")
        except SecretUnavailable as exc:
            await self._journal("slack_refused", reason=f"signing secret unavailable: {exc}")
            raise TetherError("internal_error", "the Slack signing secret is unavailable") from None
        problem = "body too large" if len(body) > MAX_BODY else check_signature(secret, ts, sig, body, now)
        if problem is None and not self._seen.first_time(sig or "", now):
            problem = "replayed request (this signature was already used)"
        if problem is not None:
            await self._journal("slack_refused", reason=problem)
            raise TetherError("token_invalid_signature", f"Slack request refused: {problem}", status=401)
        try:
            form = parse_qs(body.decode("utf-8"), strict_parsing=True)
            payload = orjson.loads(form["payload"][0])
            if not isinstance(payload, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError, KeyError, IndexError, orjson.JSONDecodeError):
            await self._journal("slack_refused", reason="malformed interaction payload")
            raise TetherError("bad_request", "not a Slack interaction payload") from None
        kind = payload.get("type")
        if kind == "block_actions":
            return await self._block_actions(payload)
        if kind == "view_submission" and (payload.get("view") or {}).get("callback_id") == REJECT_VIEW:
            return await self._reject_submitted(payload)
        return web.Response(status=200)

    def _user(self, payload: dict[str, Any]) -> tuple[str, str | None]:
        user = payload.get("user") or {}
        uid = str(user.get("id") or "")
        cfg = self.cfg
        return uid, (cfg.reviewers.get(uid) if cfg is not None else None)

    def reviewer_identity(self, name: str, slack_user: str) -> Identity:
        role = self.gw.state.verifier.cfg.reviewer_role
        return Identity(agent=name, on_behalf_of=None, roles=(role,), claims={"sub": name, "via": "slack",
                                                                             "slack_user": slack_user})

    async def _block_actions(self, payload: dict[str, Any]) -> web.Response:
        actions = payload.get("actions") or []
        action = actions[0] if actions and isinstance(actions[0], dict) else {}
        action_id, item_id = action.get("action_id"), action.get("value")
        if action_id not in (APPROVE, REJECT) or not isinstance(item_id, str):
            return web.Response(status=200)  # the console link button, or something not ours
        uid, who = self._user(payload)
        channel = str((payload.get("channel") or {}).get("id") or (payload.get("container") or {}).get("channel_id") or "")
        await self._journal("slack_action", item=item_id, slack_user=uid, reviewer=who,
                            action="approve" if action_id == APPROVE else "reject")
        if who is None:
            self._spawn(self._tell(channel, uid, "You are not mapped to a Tether reviewer, so you cannot decide "
                                                 "review items. Ask an administrator to add your Slack user id "
                                                 f"({uid}) to server.review.slack.reviewers."))
            return web.Response(status=200)
        if action_id == REJECT:
            trigger = payload.get("trigger_id")
            self._spawn(self._open_reject_dialog(str(trigger or ""), item_id, channel, uid))
            return web.Response(status=200)
        self._spawn(self._approve(item_id, who, uid, channel))
        return web.Response(status=200)

    async def _approve(self, item_id: str, who: str, uid: str, channel: str) -> None:
        try:
            await self.gw.review.approve(item_id, self.reviewer_identity(who, uid), note=f"approved in Slack by {uid}")
        except TetherError as err:
            await self._refused(item_id, uid, who, channel, err)
        except Exception:  # noqa: BLE001 - a background decision must never vanish silently
            log.exception("Slack approval of %s failed", item_id)
            await self._tell(channel, uid, f"Tether could not approve {item_id}: internal error (see the logs).")

    async def _refused(self, item_id: str, uid: str, who: str, channel: str, err: TetherError) -> None:
        await self._journal("slack_refused", item=item_id, slack_user=uid, reviewer=who, reason=err.code)
        await self._tell(channel, uid, f"Tether refused: {slack_text(err.message)} ({err.code}).")
        if err.code == "already_decided":
            await refresh_message(self, item_id)

    async def _open_reject_dialog(self, trigger: str, item_id: str, channel: str, uid: str) -> None:
        view = {"type": "modal", "callback_id": REJECT_VIEW,
                "private_metadata": orjson.dumps({"item": item_id, "channel": channel}).decode(),
                "title": {"type": "plain_text", "text": "Reject the item"},
                "submit": {"type": "plain_text", "text": "Reject"},
                "close": {"type": "plain_text", "text": "Cancel"},
                "blocks": [{"type": "input", "block_id": "reason",
                            "label": {"type": "plain_text", "text": "Why? (kept in the journal)"},
                            "element": {"type": "plain_text_input", "action_id": "reason", "multiline": True,
                                        "min_length": 1, "max_length": 2000}}]}
        try:
            await self.call("views.open", trigger_id=trigger, view=view)
        except SlackError as exc:
            log.warning("could not open the reject dialog: %s", exc)
            await self._tell(channel, uid, f"Could not open the reject dialog ({exc}); reject {item_id} "
                                           "in the console or with `tether review reject`.")

    async def _reject_submitted(self, payload: dict[str, Any]) -> web.Response:
        view = payload.get("view") or {}
        try:
            meta = orjson.loads(view.get("private_metadata") or "{}")
            item_id = str(meta["item"])
            channel = str(meta.get("channel") or "")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _view_error("the dialog lost its item; reject it in the console")
        reason = (((view.get("state") or {}).get("values") or {}).get("reason") or {}).get("reason") or {}
        text = str(reason.get("value") or "").strip()
        uid, who = self._user(payload)
        await self._journal("slack_action", item=item_id, slack_user=uid, reviewer=who, action="reject")
        if who is None:
            return _view_error("you are not mapped to a Tether reviewer")
        if not text:
            return _view_error("a rejection needs a reason")
        try:
            await self.gw.review.reject(item_id, self.reviewer_identity(who, uid), text)
        except TetherError as err:
            await self._journal("slack_refused", item=item_id, slack_user=uid, reviewer=who, reason=err.code)
            if err.code == "already_decided":
                    self._spawn(refresh_message(self, item_id))
            return _view_error(f"{err.message} ({err.code})")
        return web.json_response({"response_action": "clear"})

    async def _tell(self, channel: str, uid: str, text: str) -> None:
        """An ephemeral message to the one user (through the Web API, never a URL from the payload)."""
        if not channel or not uid:
            return
        try:
            await self.call("chat.postEphemeral", channel=channel, user=uid, text=text)
        except SlackError as exc:
            log.warning("could not tell %s: %s", uid, exc)

    def _refusal_allowed(self, now: float) -> bool:
        """At most REFUSALS_PER_MINUTE refusal records a minute: the endpoint faces Slack (and so possibly
        the internet), and unsigned junk must not be able to fill the journal. The rest are counted."""
        if now - self._refusals[0] >= 60:
            if self._refusals[2]:
                log.warning("%d more refused Slack requests in the last minute were not journaled", self._refusals[2])
            self._refusals = [now, 0, 0]
        if self._refusals[1] >= REFUSALS_PER_MINUTE:
            self._refusals[2] += 1
            return False
        self._refusals[1] += 1
        return True

    async def _journal(self, event: str, **fields: Any) -> None:
        if event == "slack_refused" and "item" not in fields and not self._refusal_allowed(time.time()):
            return
        rec = base_record("review", decision=event)
        rec.update({"event": event, "via": "slack", **{k: v for k, v in fields.items() if v is not None}})
        if "item" in rec:
            rec["review_item"] = rec.pop("item")
        try:
            await self.gw.journal.write(rec)
        except Exception as exc:  # noqa: BLE001 - the decision itself is journaled by the review service
            log.error("could not journal %s: %s", event, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _view_error(message: str) -> web.Response:
    return web.json_response({"response_action": "errors", "errors": {"reason": message[:150]}})


def outcome_text(item: dict[str, Any]) -> str:
    """What became of an item, in words: "Approved by rita — replayed as sent (upstream answered 200)"."""
    state = item.get("state")
    dec = item.get("decision") or {}
    rep = item.get("replay") or {}
    by = dec.get("by") or "?"
    how = "replayed with the reviewer's edits" if dec.get("edited") else "replayed as sent"
    if state == "replayed":
        return f"✅ Approved by {by} — {how} (upstream answered {rep.get('status')})"
    if state == "replay_failed":
        return f"⚠️ Approved by {by}, but the replay failed ({rep.get('status') or rep.get('error')})"
    if state == "approved":
        return f"⏳ Approved by {by} — replaying…"
    if state == "rejected":
        return f"❌ Rejected by {by}: {dec.get('reason') or ''}".rstrip(": ")
    if state == "expired":
        return "⌛ Expired without a decision"
    return f"State: {state}"


async def refresh_message(slack: "SlackReviews", item_id: str) -> None:
    """Show an item's outcome in its Slack message (buttons removed); nothing when it has none."""
    gw = slack.gw
    item = await gw.store.review_get(item_id)
    where = (item or {}).get("slack") or {}
    if item is None or not where.get("ts") or slack.cfg is None:
        return
    try:
        msg = slack.outcome_message(item, headline_of(gw, item)) if item.get("state") != "pending" \
            else slack.pending_message(item, headline_of(gw, item))
        await slack.call("chat.update", channel=where["channel"], ts=where["ts"], **msg)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not update the Slack message of %s: %s", item_id, exc)
