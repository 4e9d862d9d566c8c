"""MCP servers for the upstream client's tests: the fake CRM (official SDK, stdio or HTTP), the reference
``server-everything`` (npm), and a scriptable hostile server on aiohttp."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson
from aiohttp import web

from proxy.config import McpUpstreamConfig

HERE = Path(__file__).resolve().parent
CRM = HERE / "mcp_crm_server.py"
EVERYTHING = HERE / "node" / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def everything_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (server-everything is a Node package)"
    if not EVERYTHING.exists():
        return ("@modelcontextprotocol/server-everything is not installed: run .ci/run, or (cd tests/node && npm ci)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mcp_config(**kw: Any) -> McpUpstreamConfig:
    return McpUpstreamConfig.model_validate({"kind": "mcp", **kw})


def crm_stdio(tmp_path: Path, *, env: dict[str, Any] | None = None, **kw: Any) -> McpUpstreamConfig:
    return mcp_config(command=[sys.executable, str(CRM), "stdio"], env={"MCP_CRM_STATE": str(tmp_path / "crm.json"),
                                                                      **(env or {})}, **kw)


class ServerProcess:
    """A server started as a subprocess on a loopback port, ready when it says so on stdout/stderr (so a
    port another process took in the meantime is never mistaken for ours), restartable on the same port.
    ``argv(port)`` builds the command line (port 0: the server picks one and says which)."""

    def __init__(self, argv: Callable[[int], list[str]], env: Callable[[int], dict[str, str]], ready: str,
                 stream: str = "stdout", port: int = 0, path: str = "/mcp") -> None:
        self.argv = argv
        self.env = env
        self.ready = re.compile(ready)
        self.stream = stream
        self.port = port
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        out = subprocess.PIPE
        self.proc = subprocess.Popen(self.argv(self.port), env={**os.environ, **self.env(self.port)},
                                     stdout=out if self.stream == "stdout" else subprocess.DEVNULL,
                                     stderr=out if self.stream == "stderr" else subprocess.DEVNULL,
                                     start_new_session=True)
        pipe = self.proc.stdout if self.stream == "stdout" else self.proc.stderr
        assert pipe is not None
        found: list[int] = []

        def watch() -> None:
            for raw in pipe:
                m = self.ready.search(raw.decode(errors="replace"))
                if m is not None and not found:
                    found.append(int(m.group(1)) if m.groups() else self.port)
            # keep draining until the process ends (a full pipe would block it)

        threading.Thread(target=watch, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv(self.port)} exited with {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.argv(self.port)} was not ready within {timeout}s")
            time.sleep(0.05)
        self.port = found[0]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def crm_http(tmp_path: Path, **env: str) -> ServerProcess:
    return ServerProcess(lambda port: [sys.executable, str(CRM), "http", str(port)],
                         lambda port: {"MCP_CRM_STATE": str(tmp_path / "crm.json"), "MCP_CRM_TOKEN": "",
                                       "MCP_CRM_VARIANT": "", "MCP_CRM_SEEN": str(tmp_path / "seen.jsonl"), **env},
                         ready=r"^READY (\d+)")


def seen_requests(tmp_path: Path) -> list[dict[str, Any]]:
    p = tmp_path / "seen.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def everything_http() -> ServerProcess:
    # it cannot listen on port 0 and say which: a free port, and readiness only from its own words (a
    # process that lost the port to another exits with EADDRINUSE instead)
    return ServerProcess(lambda port: ["node", str(EVERYTHING), "streamableHttp"], lambda port: {"PORT": str(port)},
                         ready=r"listening on port", stream="stderr", port=free_port())


class HostileServer:
    """A scriptable MCP server (Streamable HTTP, JSON answers): lists what it is told to, answers calls as
    told, forgets sessions on demand. ``seen`` records (method, headers, body) of every request."""

    def __init__(self) -> None:
        self.tools: list[dict[str, Any]] = [
            {"name": "lookup", "description": "Look a record up.", "inputSchema": {"type": "object"}}]
        self.page_size: int | None = None
        self.loop_cursor = False
        self.version = "2025-06-18"
        self.sessions: set[str] = set()
        self.seen: list[tuple[str, dict[str, str], Any]] = []
        self.call: Callable[[Any, dict[str, Any]], Any] = lambda rid, params: web.json_response(
            {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "ok"}]}})
        self._n = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "HostileServer":
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/mcp"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def forget_sessions(self) -> None:
        self.sessions.clear()

    def methods(self) -> list[str]:
        return [m for m, _, _ in self.seen]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return web.Response(status=405)
        if request.method == "DELETE":
            self.seen.append(("DELETE", dict(request.headers), None))
            return web.Response(status=204)
        body = await request.json()
        self.seen.append((body.get("method", "<response>"), dict(request.headers), body))
        sid = request.headers.get("Mcp-Session-Id")
        method = body.get("method")
        rid = body.get("id")
        if method == "initialize":
            self._n += 1
            new = f"s{self._n}"
            self.sessions.add(new)
            return web.json_response({"jsonrpc": "2.0", "id": rid, "result": {
                "protocolVersion": self.version, "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "hostile", "version": "1"}}}, headers={"Mcp-Session-Id": new})
        if sid not in self.sessions:
            return web.json_response({"jsonrpc": "2.0", "id": None, "error": {"code": -32001,
                                                                           "message": "Session not found"}}, status=404)
        if "id" not in body:
            return web.Response(status=202)
        if method == "tools/list":
            cursor = int((body.get("params") or {}).get("cursor") or 0)
            size = self.page_size or len(self.tools)
            page = self.tools[cursor:cursor + size]
            result: dict[str, Any] = {"tools": page}
            if self.loop_cursor:
                result["nextCursor"] = "0"
            elif cursor + size < len(self.tools):
                result["nextCursor"] = str(cursor + size)
            return web.json_response({"jsonrpc": "2.0", "id": rid, "result": result})
        if method == "tools/call":
            out = self.call(rid, body.get("params") or {})
            if asyncio.iscoroutine(out):
                out = await out
            return out
        return web.json_response({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no"}})


def raw_json(obj_text: str, status: int = 200) -> web.Response:
    """A response body written by hand (duplicate keys, odd shapes)."""
    return web.Response(status=status, body=obj_text.encode(), content_type="application/json")


def result_json(rid: Any, result: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": result}),
                        content_type="application/json")
