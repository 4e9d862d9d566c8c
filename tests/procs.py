"""Run the gateway as a real process (``python -m proxy serve``): for crash, memory and CLI tests."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    def __init__(self, rules: dict[str, Any], workdir: Path, *, env: dict[str, str] | None = None,
                 args: list[str] | None = None, name: str = "rules.yaml") -> None:
        self.rules = rules
        self.workdir = workdir
        self.rules_path = workdir / name
        self.rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONPATH", str(ROOT))
        self.args = args or []
        self.proc: subprocess.Popen[str] | None = None
        self.banner: dict[str, Any] = {}
        self._buf = b""
        self._pipe = 0
        self.stderr_path = workdir / f"gateway-{time.monotonic_ns()}.log"

    def launch(self) -> "GatewayProcess":
        """Start ``tether serve`` without waiting for it (:meth:`start` waits for the ready banner)."""
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--config", str(self.rules_path), *self.args],
            cwd=str(self.workdir), env=self.env, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        return self

    def start(self, timeout: float = 20.0) -> "GatewayProcess":
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        self._pipe = os.fstat(self.proc.stdout.fileno()).st_ino
        while time.monotonic() < deadline:
            line = self.read_line(deadline)
            if line is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.stderr_path.read_text()}")
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                if '"event"' in line:  # fail now, not after the timeout: two announcements mixed
                    self.stop(signal.SIGKILL, 5)
                    raise RuntimeError(f"gateway printed a garbled announcement: {line!r}") from None
                continue
            if doc.get("event") == "ready":
                self.banner = doc
                return self
        why = f"gateway not ready in {timeout}s ({self.pipe_state()}): {self.stderr_path.read_text()}"
        self.stop(signal.SIGKILL, 5)  # a gateway that never said it was ready is not left running
        raise RuntimeError(why)

    def pipe_state(self) -> str:
        """What the stdout pipe looks like when no banner came: for telling a gateway that never printed
        from a pipe this process lost track of (a diagnostic for a rare stall under heavy load)."""
        import fcntl
        import struct
        import termios

        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        try:
            ino = os.fstat(fd).st_ino
            pending = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0)))[0]
        except OSError as exc:
            return f"stdout fd {fd}: {exc}"
        return (f"stdout fd {fd}, pipe inode {ino} (at start {self._pipe}), {pending} bytes unread, "
                f"{len(self._buf)} bytes buffered: {self._buf[-300:]!r}")

    def read_line(self, deadline: float) -> str | None:
        """The next line the gateway printed, or None at the deadline or at its end. Reads the pipe itself
        (no hidden buffer for select to miss), so it never blocks past the deadline: a gateway that prints
        nothing fails its test instead of hanging the run."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace") + "\n"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return self.banner["listeners"]["main"]

    @property
    def admin_url(self) -> str:
        return self.banner["admin"]

    def listener(self, upstream: str) -> str:
        return self.banner["listeners"].get(f"upstream:{upstream}") or f"{self.url}/{upstream}"

    def peak_rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._stderr.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._stderr.close()
        return rc

    def log(self) -> str:
        return self.stderr_path.read_text()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 60.0, input: str | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(env or {})}
    e.setdefault("PYTHONPATH", str(ROOT))
    return subprocess.run([sys.executable, "-m", "proxy", *args], env=e, cwd=str(cwd or ROOT), capture_output=True,
                          text=True, timeout=timeout, input=input)
