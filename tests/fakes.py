"""A fake upstream: a real aiohttp server on 127.0.0.1 that records what it received and can fail.

It serves a small stateful REST API (``/api/{collection}`` and ``/api/{collection}/{id}``) so that
dry-run, transactions and rollback can be checked against real state, plus a few special routes:

* ``/big?bytes=N`` streams N bytes; ``/slow?seconds=S`` answers late; ``/echo`` echoes the request;
* ``fail(method, path_prefix, status, times)`` makes matching requests fail;
* ``received`` lists every request (method, raw path with query, headers, body).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


def send_extra_headers(app: web.Application, fake: Any) -> None:
    """Every response of ``app`` also carries ``fake.response_headers`` (as read at that moment): a test
    makes a fake speak a vendor's quota headers (``Sforce-Limit-Info``, ``X-HubSpot-RateLimit-*``, ...)."""
    async def add(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(fake.response_headers)

    app.on_response_prepare.append(add)


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve an aiohttp app on a free loopback port: (runner to clean up, port)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@dataclass
class Received:
    method: str
    raw_path: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes
    peer: Any = None  # (host, port) of the connection it came on

    @property
    def path(self) -> str:
        return self.raw_path.partition("?")[0]

    @property
    def query(self) -> str:
        return self.raw_path.partition("?")[2]

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Failure:
    method: str
    prefix: str
    status: int
    times: int
    body: Any = None
    delay: float = 0.0
    reset: bool = False


@dataclass
class FakeUpstream:
    received: list[Received] = field(default_factory=list)
    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    port: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _runner: web.AppRunner | None = None
    versioned: bool = True
    response_headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, method: str, prefix: str, status: int = 500, times: int = 1, body: Any = None,
             delay: float = 0.0, reset: bool = False) -> None:
        self.failures.append(Failure(method, prefix, status, times, body, delay, reset))

    def seen(self, method: str | None = None, prefix: str = "") -> list[Received]:
        return [r for r in self.received if (method is None or r.method == method) and r.path.startswith(prefix)]

    def put_record(self, collection: str, rec: dict[str, Any]) -> dict[str, Any]:
        rid = str(rec.get("id") or next(self._ids))
        rec = {**rec, "id": rid, "version": 1}
        self.records.setdefault(collection, {})[rid] = rec
        return rec

    async def start(self) -> "FakeUpstream":
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        send_extra_headers(app, self)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, dict(request.headers),
                                      list(request.headers.items()), body,
                                      request.transport.get_extra_info("peername") if request.transport else None))
        for f in self.failures:
            if f.times > 0 and f.method in (request.method, "*") and request.path.startswith(f.prefix):
                f.times -= 1
                if f.delay:
                    await asyncio.sleep(f.delay)
                if f.reset:
                    assert request.transport is not None
                    request.transport.abort()
                    return web.Response(status=500)
                return web.json_response(f.body if f.body is not None else {"error": "injected failure"},
                                         status=f.status)
        path = request.path
        if path == "/big":
            n = int(request.query.get("bytes", "0"))
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = n
            await resp.prepare(request)
            chunk = b"x" * 65536
            left = n
            while left > 0:
                await resp.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
            await resp.write_eof()
            return resp
        if path == "/reset":
            # headers and part of the body, then the connection is torn down
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = int(request.query.get("claim", "50000"))
            await resp.prepare(request)
            await resp.write(b"y" * 10_000)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if path == "/slow":
            await asyncio.sleep(float(request.query.get("seconds", "1")))
            return web.json_response({"slow": True})
        if path == "/echo" or path.startswith("/echo/"):
            return web.json_response({"method": request.method, "raw_path": request.raw_path,
                                      "headers": dict(request.headers), "body": body.decode("latin-1")},
                                     headers={"X-Upstream": "fake", "Connection": "keep-alive, X-Hop",
                                              "X-Hop": "secret-hop", "Set-Cookie": "sid=1"})
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            return self._rest(request, parts[1], parts[2] if len(parts) > 2 else None, body)
        return web.json_response({"ok": True, "path": request.raw_path})

    def _rest(self, request: web.Request, coll: str, rid: str | None, body: bytes) -> web.Response:
        table = self.records.setdefault(coll, {})
        data = orjson.loads(body) if body else {}
        m = request.method
        if rid is None:
            if m == "GET":
                return web.json_response({"items": list(table.values())})
            if m == "POST":
                new_id = str(next(self._ids))
                rec = {**data, "id": new_id, "version": 1}
                table[new_id] = rec
                return web.json_response(rec, status=201, headers={"Location": f"/api/{coll}/{new_id}"})
            return web.json_response({"error": "method"}, status=405)
        rec = table.get(rid)
        if m == "GET":
            if rec is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(rec, headers={"ETag": f'"{rec.get("version", 1)}"'})
        if m == "PUT" and rec is None:
            rec = {**data, "id": rid, "version": 1}
            table[rid] = rec
            return web.json_response(rec, status=201)
        if m in ("PATCH", "PUT"):
            if rec is None:
                return web.json_response({"error": "not found"}, status=404)
            im = request.headers.get("If-Match")
            if im is not None and im.strip('"') != str(rec.get("version", 1)):
                return web.json_response({"error": "precondition failed"}, status=412)
            if m == "PUT":
                rec = {**data, "id": rid}
            else:
                rec = {**rec, **data}
            rec["version"] = int(table[rid].get("version", 1)) + 1
            table[rid] = rec
            return web.json_response(rec)
        if m == "DELETE":
            if rec is None:
                return web.json_response({"error": "not found"}, status=404)
            del table[rid]
            return web.Response(status=204)
        if m == "POST":
            # re-create with a given id (used to undo a delete)
            rec = {**data, "id": rid, "version": 1}
            table[rid] = rec
            return web.json_response(rec, status=201)
        return web.json_response({"error": "method"}, status=405)


@dataclass
class WebhookReceiver:
    """Collects alert webhooks (a real HTTP server on loopback)."""

    received: list[Any] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    fail_first: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> "WebhookReceiver":
        async def hook(request: web.Request) -> web.Response:
            if self.fail_first > 0:
                self.fail_first -= 1
                return web.Response(status=503)
            self.received.append(await request.json())
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self._runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, pred: Any, timeout: float = 5.0) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for r in self.received:
                if pred(r):
                    return r
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching webhook in {timeout}s: {self.received}")
