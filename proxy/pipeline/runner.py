"""The request pipeline: a fixed sequence of small named stages.

Each stage has one job, reads what earlier stages put on the :class:`~proxy.core.exchange.Exchange`, and
either passes, answers (through the exchange's door: a dry-run capture, for instance) or raises a
:class:`~proxy.errors.TetherError`, which the runner has the door render (a JSON error, a tool error). The runner also makes sure
that *every* request that reached the pipeline leaves a journal record — a denial as one record, a
request that passed the intent stage as an intent record (durable before forwarding) plus an outcome.

The stage list is built once at startup; :data:`STAGE_NAMES` documents the order.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from ..core.exchange import Exchange
from ..core.records import outcome_record, request_record
from ..errors import TetherError
from ..journal.writer import JournalUnavailable

if TYPE_CHECKING:
    from ..core.runtime import Runtime

log = logging.getLogger("tether.pipeline")

Stage = Callable[["Runtime", Exchange], "Awaitable[None] | None"]


class Pipeline:
    def __init__(self, gw: "Runtime", stages: list[tuple[str, Stage]]) -> None:
        self.gw = gw
        self.stages = [(name, fn, inspect.iscoroutinefunction(fn)) for name, fn in stages]
        self.names = [name for name, _ in stages]

    async def run(self, ex: Exchange) -> None:
        gw = self.gw
        stage_name = "?"
        try:
            for stage_name, fn, is_async in self.stages:
                if is_async:
                    await fn(gw, ex)
                else:
                    fn(gw, ex)
                if ex.response is not None:
                    break
        except TetherError as err:
            ex.error = err
            if ex.decision is None:
                ex.decision = "denied"
            ex.reason = err.code
            ex.status = err.status
            ex.door.refuse(ex, err)
        except asyncio.CancelledError:
            # the client went away; still account for the request
            ex.error = TetherError("client_closed")
            ex.decision = ex.decision or "error"
            ex.reason = "client_closed"
            await self._finish(ex, stage_name)
            raise
        except Exception:  # noqa: BLE001 - never leak a traceback to the agent
            log.exception("unexpected error in stage %s (request %s)", stage_name, ex.request_id)
            err = TetherError("internal_error")
            ex.error = err
            ex.decision = ex.decision or "error"
            ex.reason = f"internal_error:{stage_name}"
            ex.status = err.status
            ex.door.refuse(ex, err)
        await self._finish(ex, stage_name)

    async def _finish(self, ex: Exchange, stage_name: str) -> None:
        """Journal what happened and count it. A request refused before the intent stage leaves one
        record (awaited: a denial is evidence too); one that passed it leaves an outcome record."""
        gw = self.gw
        for cleanup in ex.extra.pop("cleanup", ()):
            cleanup()
        pending = ex.extra.pop("intent_commit", None)
        if pending is not None:  # a read forwarded while its record committed, answered without a body
            try:
                ex.intent_seq = await pending
            except (JournalUnavailable, asyncio.CancelledError):
                err = TetherError("journal_unavailable", "the record of this read could not be made durable, "
                                                         "so its answer is withheld")
                ex.error, ex.reason, ex.decision, ex.status = err, err.code, "refused", err.status
                ex.door.refuse(ex, err)
                log.error("the intent record of request %s could not be committed; its answer withheld",
                          ex.request_id)
                gw.observe(ex)
                return  # (no outcome: it would point at a record that does not exist)
        try:
            if ex.intent_seq is None:
                rec = request_record(ex)
                rec["stage"] = stage_name
                try:
                    await gw.journal.write(rec)
                except JournalUnavailable:
                    log.error("could not journal the denial of request %s", ex.request_id)
            else:
                gw.journal.submit(outcome_record(ex), ex.intent_record)
        finally:
            gw.observe(ex)
