"""The agent listeners' HTTP connection handling: JSON errors for unparseable requests, slow-loris guard.

aiohttp's C parser (llhttp) refuses malformed requests before any handler runs — a lower-case or unknown
method, a raw non-ASCII byte or NUL in the target, both Content-Length and Transfer-Encoding, a duplicate
Host, an over-long line. By default aiohttp answers those in plain text and nothing is recorded. Here the
refusal becomes Tether's JSON error with a stable code, and it is journaled like any denial.

A client that opens a connection and then trickles the headers of a request (slow-loris) is cut off
once ``limits.client_timeout`` passes without a complete request head; reading the body is bounded by
the same timeout in the ``read_body`` stage.

``Expect: 100-continue`` (RFC 9110 §10.1.1; curl and several SDKs send it with uploads): the client holds
its body back until the server says ``100 Continue``, or gives up waiting after a second or so. aiohttp
answers it only for routed ``web.Application`` handlers; the agent listeners are bare servers, so Tether
sends the 100 itself, from the stage that reads the body (:func:`send_continue`) — after every check that
does not need the body. A request refused before that gets its refusal instead, marked
``Connection: close`` (the body it announced never comes, so the connection cannot carry another request).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from aiohttp import HttpVersion11, http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from ...errors import TetherError

ParseErrorHook = Callable[[web.BaseRequest, TetherError], Awaitable[web.StreamResponse]]


_CONTINUED = web.RequestKey("tether_continued", bool)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def awaits_continue(request: web.BaseRequest) -> bool:
    """The client sent ``Expect: 100-continue`` and still holds its body back (none of it arrived yet,
    no 100 sent). Cheap for the usual request: a body already complete ends the test at once."""
    return (not request.content.is_eof() and request.version == HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue" and _CONTINUED not in request)


async def send_continue(request: web.BaseRequest) -> None:
    """Tell a client waiting on ``Expect: 100-continue`` to send its body (once; only if it waits)."""
    if awaits_continue(request):
        request[_CONTINUED] = True
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # (as aiohttp's own expect handler: the response proper starts now)


def _close_if_body_never_asked(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
                               ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    async def run(request: web.BaseRequest) -> web.StreamResponse:
        resp = await handler(request)
        if awaits_continue(request):
            resp.force_close()  # refused before the body was asked for: it never comes; say so (RFC 9112 §9.6)
        return resp

    return run


def parse_error_to_tether(exc: BaseException | None, message: str, line_limit: int | None = None) -> TetherError:
    """Map an llhttp refusal to Tether's error codes. ``line_limit`` tells the request-line limit from the
    header-field limit (LineTooLong carries the limit it hit)."""
    text = (message or str(exc) or "").split("\n")[0][:200]
    if isinstance(exc, http_exceptions.LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if line_limit is not None and limit == line_limit:
            return TetherError("uri_too_long", "the request target is too long")
        return TetherError("headers_too_large", "a header line is too long")
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return TetherError("method_not_allowed", "unknown or lower-case method refused", status=405)
    if "too many headers" in text.lower():
        return TetherError("headers_too_large", text)
    return TetherError("ambiguous_request", f"the HTTP request could not be parsed unambiguously: {text}")


class GuardedRequestHandler(RequestHandler):
    def __init__(self, manager: Any, *, header_timeout: float, on_parse_error: ParseErrorHook, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._tg_header_timeout = header_timeout
        self._tg_on_parse_error = on_parse_error
        self._tg_pending_since: float | None = None
        self._tg_timer: asyncio.TimerHandle | None = None
        self._tg_busy = 0

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._tg_pending_since = None
        elif data and not self._tg_busy and self._tg_pending_since is None:
            self._tg_pending_since = self._loop.time()
            self._tg_arm()

    def _tg_arm(self) -> None:
        if self._tg_timer is None:
            self._tg_timer = self._loop.call_later(self._tg_header_timeout, self._tg_check)

    def _tg_check(self) -> None:
        self._tg_timer = None
        since = self._tg_pending_since
        if since is None or self._tg_busy or self.transport is None:
            return
        if self._loop.time() - since >= self._tg_header_timeout:
            self.transport.close()  # a request head that never completes
        else:
            self._tg_timer = self._loop.call_at(since + self._tg_header_timeout, self._tg_check)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._tg_timer is not None:
            self._tg_timer.cancel()
            self._tg_timer = None
        super().connection_lost(exc)

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:  # type: ignore[override]
        self._tg_busy += 1
        self._tg_pending_since = None
        if awaits_continue(request):  # (rare: the usual body is complete or absent, and the test ends there)
            request_handler = _close_if_body_never_asked(request_handler)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._tg_busy -= 1
            self._tg_pending_since = None

    def _make_error_handler(self, err_info: Any) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        hook = self._tg_on_parse_error
        line_limit = self.max_line_size

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            err = parse_error_to_tether(err_info.exc, err_info.message, line_limit)
            resp = await hook(request, err)
            resp.force_close()
            return resp

        return handler


class GuardedServer(web.Server):
    """web.Server whose connections use GuardedRequestHandler."""

    def __init__(self, handler: Any, *, header_timeout: float, on_parse_error: ParseErrorHook, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._tg_header_timeout = header_timeout
        self._tg_on_parse_error = on_parse_error

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, header_timeout=self._tg_header_timeout,
                                     on_parse_error=self._tg_on_parse_error, **self._kwargs)
