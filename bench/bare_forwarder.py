"""The baseline: a bare reverse proxy in ~60 lines — aiohttp on uvloop, one pooled ClientSession.

No policy at all: it forwards method, path, query, headers (minus hop-by-hop) and body to one upstream
and returns the upstream's status, headers and body. Tether is measured against this, so it does the
same transport work Tether must do and nothing else.

    python bench/bare_forwarder.py --port 9000 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                 "upgrade", "host", "content-length"})


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def handler(request: web.BaseRequest) -> web.Response:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
        body = await request.read() if request.body_exists else None
        url = URL(upstream + request.raw_path, encoded=True)
        async with session.request(request.method, url, headers=headers, data=body,
                                   allow_redirects=False) as resp:
            data = await resp.read()
            out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in HOP)
            return web.Response(body=data, status=resp.status, headers=out)

    server = web.Server(handler, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"event": "ready", "listeners": {"main": f"http://127.0.0.1:{port}"}}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    args = ap.parse_args()
    try:
        uvloop.run(main(args.port, args.upstream.rstrip("/")))
    except KeyboardInterrupt:
        pass
