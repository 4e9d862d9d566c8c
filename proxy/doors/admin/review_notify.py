"""Telling people about review items: a complete headline, a Slack message, a ``review_pending`` alert.

The notifier follows the journal (the source of truth for what happened, whichever replica or worker
did it) from the admin side of the gateway:

* a new dry-run capture (``kind=request, decision=dry_run``): with ``server.review.read_current`` the
  item's record is read once through the gateway (the same read as the console's diff) so that its
  headline names the record and each field's current value (otherwise the headline names what the body
  says, and is completed when a reviewer first opens the item); the headline is stored on the item.
  Then, when configured, the item is posted to Slack (:mod:`proxy.doors.admin.slack_review`) and a
  ``review_pending`` alert is sent to the webhooks that list that event;
* a decision (``kind=review``: approved, rejected, expired) or a replay's outcome: the item's Slack
  message is updated with the outcome, its buttons removed.

One replica (or worker) at a time does this, under the store lease ``review-notify``; the others only
follow. Items are marked ``notified`` when handled, and pending items not yet marked are picked up when
the notifier starts, so a restart loses no post (a crash between posting and marking can post twice).
At most ``max_posts_per_pass`` items are read and posted per pass (one pass a second at most); a burst
beyond that is summarised in one Slack message, so a flood of captures can neither flood the upstream
with reads nor Slack with messages. Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ...safety.headline import headline_for

if TYPE_CHECKING:
    from ...core.runtime import Runtime

from .slack_review import SlackReviews, refresh_message

log = logging.getLogger("tether.review_notify")

LEASE = "review-notify"
MIN_INTERVAL = 1.0
POLL = 2.0  # other processes' commits do not wake this one
DECIDED = ("approved", "rejected", "expired")


async def annotate(gw: "Runtime", item_id: str, updates: dict[str, Any]) -> dict[str, Any] | None:
    """Store fields on an item without changing its state (a compare-and-set on its current state)."""
    for _ in range(5):
        item = await gw.store.review_get(item_id)
        if item is None:
            return None
        if await gw.store.review_transition(item_id, (item["state"],), item["state"], updates):
            item.update(updates)
            return item
    return None


async def complete_headline(gw: "Runtime", item: dict[str, Any], *, read: bool | None = None) -> dict[str, Any]:
    """The headline, with the record read now when ``read`` (default: ``server.review.read_current``) and
    the item is pending; stored on the item."""
    current = None
    want = gw.server_cfg.review.read_current if read is None else read
    read = False
    if want and item.get("state") == "pending":
        try:
            d = await asyncio.wait_for(gw.review.diff(item), 15)
            current, read = d.get("current"), d.get("error") is None
        except Exception as exc:  # noqa: BLE001 - the headline then names what the body says
            log.info("could not read the record of %s for its headline: %s", item.get("id"), exc)
    hl = headline_for(gw, item, current, read=read)
    hl["at"] = time.time()
    await annotate(gw, item["id"], {"headline": hl})
    return hl


class ReviewNotifier:
    def __init__(self, gw: "Runtime", slack: "SlackReviews") -> None:
        self.gw = gw
        self.slack = slack
        self.cursor = 0
        self._last = 0.0

    def _active(self) -> bool:
        cfg = self.gw.server_cfg.review
        return cfg.slack is not None or cfg.read_current or self._alerting()

    def _alerting(self) -> bool:
        from ...safety.alerts import wanted

        return any(wanted(t, "review_pending") for t in self.gw.state.rules.governance.alerts)

    async def run(self) -> None:
        gw = self.gw
        self.cursor = (await gw.store.journal_head())[0]
        ev = gw.journal.subscribe()
        started = False
        idle = False
        try:
            while not gw.draining:
                try:
                    await asyncio.wait_for(ev.wait(), POLL)
                except asyncio.TimeoutError:
                    pass
                ev.clear()
                wait = self._last + MIN_INTERVAL - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._last = time.monotonic()
                try:
                    if not self._active():
                        idle = True  # nothing to tell anyone: no store query while it stays so
                        continue
                    if idle:
                        idle = False
                        self.cursor = (await gw.store.journal_head())[0]
                    if not await gw.store.try_lease(LEASE, gw.instance_id, 15.0):
                        self.cursor = (await gw.store.journal_head())[0]
                        continue
                    if not started:
                        started = True
                        await self.catch_up()
                    await self.run_pass()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep following; the next pass retries
                    log.error("review notifier pass failed: %s", exc)
        finally:
            gw.journal.unsubscribe(ev)

    async def catch_up(self) -> None:
        """Pending items not yet notified (captured just before a restart)."""
        items = await self.gw.store.review_list(state="pending", limit=self._cap())
        todo = [it["id"] for it in reversed(items) if not it.get("notified")]
        await self._new_items(todo)

    def _cap(self) -> int:
        s = self.gw.server_cfg.review.slack
        return s.max_posts_per_pass if s is not None else 20

    async def run_pass(self) -> None:
        store = self.gw.store
        head = (await store.journal_head())[0]
        if head <= self.cursor:
            return
        limit = 1000
        queries = [{"kind": "request", "decision": "dry_run"}, {"kind": "review"},
                   {"kind": "outcome", "decision": "replay"}]
        found = []
        upto = head
        for f in queries:
            rows = await store.journal_query(after_seq=self.cursor, before_seq=head + 1, filters=f, limit=limit)
            found.append(rows)
            if len(rows) == limit:
                upto = min(upto, rows[-1].seq)
        new: list[str] = []
        decided: list[str] = []
        for i, rows in enumerate(found):
            for r in rows:
                if r.seq > upto:
                    continue
                rec = r.record()
                item_id = rec.get("review_item")
                if not item_id:
                    continue
                if i == 0:
                    new.append(item_id)
                elif i == 1 and rec.get("decision") not in DECIDED:
                    continue
                else:
                    decided.append(item_id)
        self.cursor = upto
        await self._new_items(list(dict.fromkeys(new)))
        for item_id in dict.fromkeys(decided):
            await refresh_message(self.slack, item_id)

    async def _new_items(self, ids: list[str]) -> None:
        cap = self._cap()
        for item_id in ids[:cap]:
            item = await self.gw.store.review_get(item_id)
            if item is None or item.get("notified"):
                continue
            await self.notify(item)
        if len(ids) > cap:
            more = len(ids) - cap
            log.warning("%d review items captured in one pass beyond the %d notified one by one", more, cap)
            if self.slack.cfg is not None:
                link = self.slack.cfg.console_url
                text = (f"… and {more} more item{'s' if more > 1 else ''} are waiting for review"
                        + (f": <{link.rstrip('/')}/#/queue|open the queue>" if link else " (see the console)"))
                try:
                    await self.slack.call("chat.postMessage", channel=self.slack.cfg.channel, text=text)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not post the summary: %s", exc)
            for item_id in ids[cap:]:
                await annotate(self.gw, item_id, {"notified": time.time()})

    async def notify(self, item: dict[str, Any]) -> None:
        gw = self.gw
        hl = await complete_headline(gw, item)
        updates: dict[str, Any] = {"notified": time.time()}
        cfg = self.slack.cfg
        if cfg is not None and item.get("state") == "pending":
            try:
                doc = await self.slack.call("chat.postMessage", channel=cfg.channel,
                                            **self.slack.pending_message(item, hl))
                updates["slack"] = {"channel": doc.get("channel"), "ts": doc.get("ts")}
            except Exception as exc:  # noqa: BLE001 - the console and the CLI still have it
                log.warning("could not post review item %s to Slack: %s", item["id"], exc)
                updates["slack"] = {"error": str(exc)}
        if self._alerting():
            await gw.governance.alert("review_pending", {
                "item": item["id"], "headline": hl.get("text"), "agent": item.get("agent"),
                "on_behalf_of": item.get("on_behalf_of"), "capability": item.get("capability"),
                "console": self.slack.console_link(item["id"])})
        await annotate(gw, item["id"], updates)
        if "slack" in updates and updates["slack"].get("ts"):
            # decided while it was being posted: show the outcome at once
            fresh = await gw.store.review_get(item["id"])
            if fresh is not None and fresh.get("state") != "pending":
                await refresh_message(self.slack, item["id"])


