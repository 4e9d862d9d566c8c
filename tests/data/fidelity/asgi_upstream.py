"""A real upstream served by uvicorn (h11 or httptools) or hypercorn: a bare ASGI app (the server does
the HTTP), for the transport tests. An LLM-style completion answered as an event stream.

    uvicorn --http h11 --port PORT --app-dir tests/data/fidelity asgi_upstream:app
    hypercorn -b 127.0.0.1:PORT --root-path '' asgi_upstream:app
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

_ids = itertools.count(1)
_log: list[str] = []
_items: dict[str, dict[str, Any]] = {}
_release: dict[str, asyncio.Event] = {}


def _event(key: str) -> asyncio.Event:
    return _release.setdefault(key, asyncio.Event())


async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    method, path = scope["method"], scope["path"]
    query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
    data = b""
    while True:  # the request body
        msg = await receive()
        data += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    _log.append(f"{method} {path}")
    if path == "/v1/completions" and method == "POST":
        rid = f"cmpl-{next(_ids)}"
        _items[rid] = {**json.loads(data or b"{}"), "id": rid}
        key = query.get("key", "default")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                                (b"location", f"/v1/completions/{rid}".encode())]})
        await send({"type": "http.response.body", "more_body": True,
                    "body": b'data: {"id": "%s", "delta": "Hel"}\n\n' % rid.encode()})
        await asyncio.wait_for(_event(key).wait(), 20)  # the rest only once the test says so
        for delta in (b"lo", b", world"):
            await send({"type": "http.response.body", "more_body": True,
                        "body": b'data: {"id": "%s", "delta": "%s"}\n\n' % (rid.encode(), delta)})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    if path == "/release":
        _event(query.get("key", "default")).set()
        await _send(send, 200, [], b"")
        return
    if path.startswith("/v1/completions/") and method == "GET" and path[16:] in _items:
        await _send(send, 200, [(b"content-type", b"application/json")], json.dumps(_items[path[16:]]).encode())
        return
    if path.startswith("/v1/completions/") and method == "DELETE":
        _items.pop(path[16:], None)
        await _send(send, 204, [], b"")
        return
    if path == "/log":
        await _send(send, 200, [(b"content-type", b"application/json")], json.dumps(_log).encode())
        return
    await _send(send, 404, [], b"")
