"""An incremental ``text/event-stream`` parser with size limits (WHATWG HTML, "Server-sent events").

Why not a library: aiohttp has no SSE client, and ``aiohttp-sse-client`` / ``httpx-sse`` bring their own
request stack; what the MCP client needs is the parsing rules alone, bounded: a server that sends one
endless line, or an event of gigabytes, is cut off at ``max_event_bytes`` (:class:`EventTooLarge`) instead
of filling memory. Lines end with CRLF, LF or CR; ``data`` lines join with LF; ``id`` sets the last
event id (kept across events, for ``Last-Event-ID`` on reconnection); ``retry`` the reconnection delay;
comments (``:``) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass


class EventTooLarge(Exception):
    """A line or an event exceeded the parser's limit."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None


class SseParser:
    __slots__ = ("_max", "_buf", "_data", "_data_size", "_event", "_pending_cr", "last_event_id", "retry_ms")

    def __init__(self, max_event_bytes: int) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._pending_cr = False
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Parse ``chunk``; return the events it completed."""
        out: list[SseEvent] = []
        if self._pending_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = False
        self._buf += chunk
        buf = self._buf
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start)
            if lf < 0 and cr < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                end, nxt = cr, cr + 1
                if nxt < n and buf[nxt] == 0x0A:
                    nxt += 1
                elif nxt == n:
                    self._pending_cr = True
            else:
                end, nxt = lf, lf + 1
            ev = self._line(bytes(buf[start:end]))
            if ev is not None:
                out.append(ev)
            start = nxt
        del buf[:start]
        if len(buf) > self._max:
            raise EventTooLarge(f"a line longer than {self._max} bytes")
        return out

    def _line(self, raw: bytes) -> SseEvent | None:
        if not raw:
            if not self._data:
                self._event = ""
                return None
            ev = SseEvent(self._event or "message", "\n".join(self._data), self.last_event_id)
            self._data, self._data_size, self._event = [], 0, ""
            return ev
        line = raw.decode("utf-8", "replace")
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_size += len(value) + 1
            if self._data_size > self._max:
                raise EventTooLarge(f"an event larger than {self._max} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        return None
