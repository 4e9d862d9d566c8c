"""Governance: which mode a write runs in, and what the gateway observes about each agent.

``decide`` turns grants (and, as they are added, stored promotions, canary shares and quarantines) into
the mode of one request: ``live`` or ``dry_run``. A composite request runs live only if every write
inside it is live; otherwise it is captured whole.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .exchange import Exchange
    from .gateway import Gateway

log = logging.getLogger("tether.governance")


class Governance:
    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw
        from .alerts import Alerter

        self.alerter = Alerter(gw, list(gw.state.rules.governance.alerts))

    async def start(self) -> None:
        self.alerter.start()

    async def stop(self) -> None:
        await self.alerter.stop()

    async def decide(self, ex: "Exchange") -> str:
        grants = ex.extra.get("grants") or []
        modes = [g.mode for g in grants if g is not None and g.capability.is_write]
        if not modes:
            return "live"
        return "live" if all(m == "live" for m in modes) else "dry_run"

    def observe(self, ex: "Exchange") -> None:
        key = (ex.agent or "-", ex.decision or "-", str(ex.status or "-"))
        self.gw.counters[key] = self.gw.counters.get(key, 0) + 1

    def on_journal_commit(self, seconds: float, records: int) -> None:
        return None

    def on_captured(self, ex: "Exchange") -> None:
        return None

    def on_overload(self) -> None:
        return None

    def on_rollback(self, tx: dict[str, Any]) -> None:
        return None

    def on_review_decided(self, item: dict[str, Any], outcome: str, edited: bool = False) -> None:
        return None

    async def alert(self, event: str, payload: dict[str, Any]) -> None:
        """Journal the alert and queue it for the webhooks (never blocks on delivery)."""
        log.warning("alert %s: %s", event, payload)
        await self.gw._journal_system("alert", alert=event, **{k: v for k, v in payload.items() if k != "event"})
        self.alerter.targets = list(self.gw.state.rules.governance.alerts)
        self.alerter.send(event, payload)
