"""Alerts to webhooks: generic JSON or Slack incoming-webhook format; retried; never blocking requests.

``Alerter.send(event, payload)`` puts the alert on a bounded queue and returns at once; a background
task delivers it to every target subscribed to the event, retrying with backoff. A full queue drops
the oldest alert (and says so in the log) rather than grow without bound or slow the request path.
Every alert is also journaled by the caller, so nothing depends on a webhook being up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from ..config import AlertTarget
from ..inert import slack_text

if TYPE_CHECKING:
    from ..core.runtime import Runtime

log = logging.getLogger("tether.alerts")

_TITLES = {
    "quarantine": "Agent quarantined",
    "needs_attention": "Transaction needs attention",
    "review_queue_depth": "Review queue is deep",
    "rules_reload_failed": "Rules reload failed",
    "journal_unavailable": "Journal unavailable",
    "review_pending": "Review needed",
    "quota_low": "Upstream quota at its reserve: agents are held back",
    "tool_definition_changed": "An MCP server changed a pinned tool: hidden and refused until re-approved",
}
# sent only to targets that list them (one alert per captured write is too many for a default)
OPT_IN_EVENTS = frozenset({"review_pending"})


def wanted(target: AlertTarget, event: str) -> bool:
    if target.events is None:
        return event not in OPT_IN_EVENTS
    return event in target.events


def slack_payload(event: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Slack incoming-webhook format. Values can carry agent-controlled text (agent names, intents,
    reasons, headlines): each is made inert and escaped so it can neither mention nor link."""
    title = _TITLES.get(event, event)
    headline = payload.get("headline")
    fields = "\n".join(f"*{slack_text(k)}*: {slack_text(v)}" for k, v in payload.items()
                       if v is not None and k != "headline")
    lead = f"{slack_text(headline)}\n" if headline else ""
    return {"text": f":rotating_light: Tether: {title}" + (f": {slack_text(headline)}" if headline else ""),
            "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": f"*Tether: {title}*\n{lead}{fields}"}}]}


class Alerter:
    def __init__(self, gw: "Runtime", targets: list[AlertTarget], *, attempts: int = 5, backoff: float = 0.5,
                 max_queue: int = 1000) -> None:
        self.gw = gw
        self.targets = targets
        self.attempts = attempts
        self.backoff = backoff
        self._queue: deque[tuple[AlertTarget, dict[str, Any]]] = deque(maxlen=max_queue)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="alerts")

    async def stop(self) -> None:
        if self._task is not None:
            # give queued alerts a moment to go out
            deadline = time.monotonic() + 2.0
            while self._queue and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def send(self, event: str, payload: dict[str, Any]) -> None:
        doc = {"event": event, "ts": time.time(), "gateway": self.gw.instance_id, **payload}
        for t in self.targets:
            if wanted(t, event):
                if len(self._queue) == self._queue.maxlen:
                    log.error("alert queue full; dropping the oldest alert")
                self._queue.append((t, doc))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            target, doc = self._queue.popleft()
            await self._deliver(target, doc)

    async def _deliver(self, target: AlertTarget, doc: dict[str, Any]) -> None:
        body = slack_payload(doc["event"], {k: v for k, v in doc.items() if k != "event"}) \
            if target.format == "slack" else doc
        data = orjson.dumps(body, default=str)
        session = self.gw.session
        for attempt in range(self.attempts):
            try:
                assert session is not None
                async with session.post(target.url, data=data, headers={"Content-Type": "application/json"},
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                    if r.status < 300:
                        self.sent += 1
                        return
                    err = f"HTTP {r.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                err = type(exc).__name__
            await asyncio.sleep(self.backoff * (2 ** attempt))
        self.failed += 1
        log.error("alert %s to %s failed after %d attempts: %s", doc["event"], target.url, self.attempts, err)
