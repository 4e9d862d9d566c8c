"""MCP over stdio: a server shipped as a package, started and supervised by Tether.

The command runs without a shell, in its own process group (so a stop reaches what it spawned), with a
small environment: PATH, HOME, LANG, LC_ALL, TERM, USER, LOGNAME, SHELL, TMPDIR from Tether's own, the
names listed in ``inherit_env``, and the rules' ``env`` (secrets read when the process starts) —
never the rest of Tether's environment, which holds other upstreams' credentials. Messages are
newline-delimited JSON on stdin/stdout; what the server writes to stderr goes to Tether's log (logger
``tether.mcp_upstream.stderr``, one record per line, long lines clipped).

Supervision: a server that exits is started again after ``restart.initial_backoff``, doubling up to
``restart.max_backoff`` (a process that ran ``restart.reset_after`` starts the backoff over); requests in
flight when it died fail (``applied`` unknown), and the next request initializes a new session. A line
over ``max_result_bytes`` is not kept: the call it answers (its id is read from the line's first or last
bytes, where JSON-RPC frames put it) fails with :class:`ResultTooLarge`, the rest of the line is skipped.
``close()`` closes stdin (the spec's way to stop a stdio server), waits ``timeouts.stop``, then sends
SIGTERM to the group, waits as long again, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ResultTooLarge, UpstreamProtocolError, UpstreamUnavailable

if TYPE_CHECKING:
    from .client import McpUpstream, PendingCall

log = logging.getLogger("tether.mcp_upstream")
stderr_log = logging.getLogger("tether.mcp_upstream.stderr")

INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TERM", "USER", "LOGNAME", "SHELL", "TMPDIR", "SYSTEMROOT")
READ_CHUNK = 64 * 1024
STDERR_LINE_MAX = 4000
_ID_HEAD = re.compile(rb'^\s*\{[^{}]{0,200}?"id"\s*:\s*(\d{1,16})\s*[,}]')
_ID_TAIL = re.compile(rb'"id"\s*:\s*(\d{1,16})\s*\}\s*$')


def child_environment(env: Mapping[str, str], inherit: Sequence[str] = ()) -> dict[str, str]:
    """The server's environment: the allow-listed part of Tether's, then ``env`` on top."""
    out = {k: os.environ[k] for k in (*INHERITED, *inherit) if k in os.environ}
    out.update(env)
    return out


class StdioTransport:
    kind = "stdio"

    def __init__(self, name: str, command: Sequence[str], *, env: Callable[[], Mapping[str, str]] | None = None,
                 cwd: str | os.PathLike[str] | None = None, initial_backoff: float = 0.5, max_backoff: float = 30.0,
                 reset_after: float = 60.0, stop_timeout: float = 5.0) -> None:
        self.name = name
        self.command = list(command)
        self.env = env or (lambda: child_environment({}))
        self.cwd = str(Path(cwd)) if cwd is not None else None
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.reset_after = reset_after
        self.stop_timeout = stop_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0  # processes started after the first
        self.last_error: str | None = None
        self._client: McpUpstream | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    def bind(self, client: "McpUpstream") -> None:
        self._client = client

    @property
    def client(self) -> "McpUpstream":
        assert self._client is not None
        return self._client

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def open(self, timeout: float) -> None:
        await self.start()
        if self._up.is_set():
            return
        if self.last_error is not None and self.last_error.startswith("cannot "):
            # the command cannot be started now (missing, not executable, its secret unreadable): say so at
            # once rather than after the timeout; the supervisor keeps trying with its backoff
            raise UpstreamUnavailable(f"the MCP server process is not running: {self.last_error}", upstream=self.name,
                                      applied=False)
        try:
            await asyncio.wait_for(self._up.wait(), timeout)
        except asyncio.TimeoutError:
            raise UpstreamUnavailable(f"the MCP server process is not running"
                                      f"{': ' + self.last_error if self.last_error else ''}",
                                      upstream=self.name, applied=False) from None

    def begin_session(self) -> None:
        pass

    def session_ready(self, protocol_version: str) -> None:
        pass

    def session_open(self, gen: int) -> None:
        pass

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        backoff = self.initial_backoff
        first = True
        while not self._closing:
            try:
                env = dict(self.env())
            except Exception as exc:  # noqa: BLE001 - a secret for env that cannot be read now
                self.last_error = f"cannot build its environment: {exc}"
                log.error("MCP upstream %s: %s", self.name, self.last_error)
                await self._pause(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=env, cwd=self.cwd, start_new_session=True)
            except OSError as exc:
                self.last_error = f"cannot start {self.command[0]!r}: {exc.strerror or exc}"
                log.error("MCP upstream %s: %s", self.name, self.last_error)
                await self._pause(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                continue
            if not first:
                self.restarts += 1
            first = False
            self.proc = proc
            self.last_error = None
            started = time.monotonic()
            self.client._emit({"event": "mcp_upstream_process", "upstream": self.name, "state": "started",
                               "pid": proc.pid, "restarts": self.restarts})
            reader = asyncio.get_running_loop().create_task(self._read_stdout(proc))
            errs = asyncio.get_running_loop().create_task(self._read_stderr(proc))
            self._up.set()
            try:
                rc = await proc.wait()
            finally:
                self._up.clear()
            for t in (reader, errs):
                try:
                    await asyncio.wait_for(t, 2.0)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    t.cancel()
            self.proc = None
            if self._closing:
                break
            self.last_error = f"exited with status {rc}"
            self.client._emit({"event": "mcp_upstream_process", "upstream": self.name, "state": "exited",
                               "returncode": rc})
            self.client._transport_lost(f"the MCP server process exited (status {rc})")
            if time.monotonic() - started >= self.reset_after:
                backoff = self.initial_backoff
            log.warning("MCP upstream %s: the server exited with status %s; starting it again in %.1fs",
                        self.name, rc, backoff)
            await self._pause(backoff)
            backoff = min(self.max_backoff, backoff * 2)

    async def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._closing and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        client = self.client
        cap = client.max_result_bytes
        buf = bytearray()
        skipping: bytearray | None = None  # head of an oversize line, kept to find its id
        tail = bytearray()
        while True:
            chunk = await proc.stdout.read(READ_CHUNK)
            if not chunk:
                return
            start = 0
            while True:
                nl = chunk.find(b"\n", start)
                piece = chunk[start:] if nl < 0 else chunk[start:nl]
                if skipping is not None:
                    tail = (tail + piece)[-256:]
                    if nl < 0:
                        break
                    self._oversize(bytes(skipping), bytes(tail))
                    skipping, tail = None, bytearray()
                else:
                    buf += piece
                    if len(buf) > cap:
                        skipping, tail = bytearray(buf[:4096]), bytearray(buf[-256:])
                        buf = bytearray()
                        if nl < 0:
                            break
                        self._oversize(bytes(skipping), bytes(tail))
                        skipping, tail = None, bytearray()
                    elif nl < 0:
                        break
                    else:
                        line = bytes(buf)
                        buf = bytearray()
                        if line.strip():
                            self._line(line)
                start = nl + 1

    def _line(self, line: bytes) -> None:
        try:
            obj = self.client.parse_message(line)
        except UpstreamProtocolError as exc:
            log.warning("MCP upstream %s wrote a line to stdout that is not JSON (stdout is for MCP messages only): "
                        "%s", self.name, exc.message)
            return
        for m in obj if isinstance(obj, list) else [obj]:
            self.client._on_message(m, None)

    def _oversize(self, head: bytes, tail: bytes) -> None:
        m = _ID_HEAD.search(head) or _ID_TAIL.search(tail)
        cap = self.client.max_result_bytes
        log.warning("MCP upstream %s sent a message over max_result_bytes (%d); dropped", self.name, cap)
        if m is not None:
            self.client._fail_call(int(m.group(1)), ResultTooLarge(
                f"the server's answer is larger than max_result_bytes ({cap})", upstream=self.name, applied=None))

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        pending = b""
        while True:
            chunk = await proc.stderr.read(READ_CHUNK)
            if not chunk:
                if pending.strip():
                    self._stderr_line(pending)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for ln in lines:
                self._stderr_line(ln)
            if len(pending) > STDERR_LINE_MAX:
                self._stderr_line(pending)
                pending = b""

    def _stderr_line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if text:
            if len(text) > STDERR_LINE_MAX:
                text = text[:STDERR_LINE_MAX] + " [clipped]"
            stderr_log.info("[%s] %s", self.name, text)

    # ------------------------------------------------------------------ sending

    async def send_request(self, message: bytes, call: "PendingCall") -> None:
        try:
            await self._write(message)
        except UpstreamUnavailable as exc:
            call.fail(exc)

    async def send(self, message: bytes) -> None:
        await self._write(message)

    async def _write(self, message: bytes) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or not self._up.is_set():
            raise UpstreamUnavailable("the MCP server process is not running", upstream=self.name, applied=False)
        async with self._write_lock:
            try:
                proc.stdin.write(message + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
                raise UpstreamUnavailable(f"cannot write to the MCP server process: {exc}", upstream=self.name,
                                          applied=False) from None

    # ------------------------------------------------------------------ stopping

    async def close(self) -> None:
        self._closing = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except Exception:  # noqa: BLE001
                pass
            if not await self._exited(proc, self.stop_timeout):
                self._signal(proc, signal.SIGTERM)
                if not await self._exited(proc, self.stop_timeout):
                    self._signal(proc, signal.SIGKILL)
                    await self._exited(proc, self.stop_timeout)
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(self._supervisor, self.stop_timeout + 2)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._supervisor.cancel()
        if proc is not None:
            self._signal(proc, signal.SIGKILL, quiet=True)  # what the server left running in its group

    @staticmethod
    async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
        try:
            await asyncio.wait_for(proc.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _signal(self, proc: asyncio.subprocess.Process, sig: int, quiet: bool = False) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the server's pid
        except (ProcessLookupError, PermissionError):
            pass
        else:
            if not quiet:
                log.warning("MCP upstream %s: the server did not stop in %.1fs; sent %s", self.name,
                            self.stop_timeout, signal.Signals(sig).name)


def env_from_config(values: Mapping[str, Any], inherit: Sequence[str], where: str) -> Callable[[], dict[str, str]]:
    """A function building the server's environment when it starts: plain values as written, secrets
    (``{env|file|value}``) read then — a rotated secret reaches the next restart."""
    from ..config import SecretRef
    from ..secret import Secret

    plain = {k: v for k, v in values.items() if isinstance(v, str)}
    secrets = {k: Secret(v, f"{where}.env.{k}") for k, v in values.items() if isinstance(v, SecretRef)}

    def build() -> dict[str, str]:
        return child_environment({**plain, **{k: s.get() for k, s in secrets.items()}}, inherit)

    return build


__all__ = ["StdioTransport", "child_environment", "env_from_config", "INHERITED"]
