"""How the REST door answers: an HTTP response to the agent's SDK, exactly as the upstream sent it.

The shared stages answer through the exchange's door (:class:`proxy.core.exchange.Door`); this one turns
an answer into an aiohttp response — a JSON error for a refusal, the upstream's status, reason and header
bytes for a whole answer (a HEAD keeps its Content-Length), and a stream with back-pressure for anything
large or open-ended (the connection is aborted if it breaks off, so a client never takes a truncated body
for a complete one).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ...core.exchange import Exchange
from ...errors import TetherError
from ...transport.forward import answer, relay
from ..responses import error_response


class RestDoor:
    channel = "rest"

    def refuse(self, ex: Exchange, err: TetherError) -> None:
        ex.response = error_response(err, ex.request_id)

    def answer(self, ex: Exchange, status: int, reason: str | None, headers: Any, body: bytes | None, *,
               upstream: Any = None) -> None:
        if upstream is not None:
            ex.response = answer(upstream, headers, body)
        else:
            ex.response = web.Response(status=status, reason=reason, headers=headers, body=body)

    async def relay(self, ex: Exchange, resp: Any, headers: Any, limit: int | None, needles: Any = None,
                    found: list[bool] | None = None, tap: Any = None) -> tuple[int, str | None]:
        streamed, sent, err = await relay(ex.request, resp, headers, limit, needles, found, tap=tap)
        ex.response = streamed
        return sent, err


REST_DOOR = RestDoor()  # stateless: one for every request
