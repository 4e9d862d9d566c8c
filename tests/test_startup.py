"""Starting up as a real process: ``tether serve`` and ``tether demo`` that cannot bind exit at once, non-zero,
with the reason; ``tether demo`` runs beside another Tether (``--port``/``--admin-port`` or free ports).

Before the fix a gateway that could not bind printed "cannot start" and then never exited: the store's
thread and the journal writer kept the process alive, and SIGTERM was ignored.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import SECRET
from tests.procs import ROOT, run_cli

pytestmark = pytest.mark.slow

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # no proxy settings, no TETHER_* from outside
EXIT_WITHIN = 45.0  # generous (a loaded 2-core machine); a gateway that hangs never exits at all


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by someone else (a listening socket, as another Tether would hold it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _rules(tmp_path: Path, listen: str, admin: str, upstream_listen: str | None) -> Path:
    up: dict[str, object] = {"url": "http://127.0.0.1:9"}
    if upstream_listen:
        up["listen"] = upstream_listen
    doc = {"version": 1, "server": {"listen": listen, "admin_listen": admin, "store": str(tmp_path / "t.db")},
           "identity": {"hs_secret": {"value": SECRET}}, "upstreams": {"crm": up}}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(args: list[str], timeout: float = EXIT_WITHIN) -> tuple[int, str, str]:
    """Run ``python -m proxy ARGS``; a process still alive after ``timeout`` fails the test (after SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-m", "proxy", *args], cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
            note = "it exited on SIGTERM"
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            note = "it ignored SIGTERM too"
        pytest.fail(f"still running {timeout:g}s after failing to bind ({note}); stderr: {err[-2000:]}")
    return proc.returncode, out, err


@pytest.mark.parametrize("busy, args", [
    ("server.listen", []),
    ("server.admin_listen", []),
    ("upstreams.crm.listen", []),
    ("server.listen", ["--workers", "2"]),
])
def test_serve_that_cannot_bind_exits_at_once_with_the_reason(tmp_path: Path, busy_port: int, busy: str,
                                                              args: list[str]) -> None:
    addr = f"127.0.0.1:{busy_port}"
    rules = _rules(tmp_path, addr if busy == "server.listen" else "127.0.0.1:0",
                   addr if busy == "server.admin_listen" else "127.0.0.1:0",
                   addr if busy == "upstreams.crm.listen" else "127.0.0.1:0")
    rc, out, err = _run(["serve", "--config", str(rules), *args])
    assert rc == 1, (rc, err)
    assert f"cannot listen on {addr} ({busy}): Address already in use" in err, err
    assert '"event": "ready"' not in out and "ready" not in out
    assert "Traceback" not in err
    if args:  # --workers: a worker that cannot listen at its first start stops the gateway, never restarted
        assert "restarting in" not in err and "keeps dying" not in err, err
        assert "could not start (cannot start: cannot listen on" in err, err


def test_demo_that_cannot_bind_exits_at_once_with_the_reason(tmp_path: Path, busy_port: int) -> None:
    rc, out, err = _run(["demo", "--no-color", "--workdir", str(tmp_path), "--port", str(busy_port)])
    assert rc == 1, (rc, out[-2000:], err)
    assert f"cannot listen on 127.0.0.1:{busy_port} (server.listen): Address already in use" in err, err
    assert "--port" in err  # says how to run it beside the other one
    rc, out, err = _run(["demo", "--no-color", "--workdir", str(tmp_path), "--admin-port", str(busy_port)])
    assert rc == 1 and f"127.0.0.1:{busy_port} (server.admin_listen)" in err, (rc, err)


def _hold(port: int) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
        return s
    except OSError:
        s.close()
        return None  # someone else holds it already: just as good


def test_demo_keep_running_beside_another_tether(tmp_path: Path) -> None:
    """8100/8199 taken (by "another Tether"): --keep-running picks free ports and says which; explicit ports
    are used as given; SIGTERM stops it."""
    held = [_hold(8100), _hold(8199)]
    try:
        for extra in ([], ["--port", "0", "--admin-port", "0"]):
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--no-color", "--keep-running",
                                     "--workdir", str(tmp_path / f"w{len(extra)}"), *extra], cwd=str(ROOT),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=ENV)
            assert proc.stdout is not None
            lines: list[str] = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
                if "Press Ctrl-C to stop" in line:
                    break
            text = "".join(lines)
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("the demo did not stop on SIGTERM")
            assert "Press Ctrl-C to stop" in text, text[-3000:] + proc.stderr.read()[-2000:]  # type: ignore[union-attr]
            m = re.search(r"Tether on http://127\.0\.0\.1:(\d+)/crm, admin on http://127\.0\.0\.1:(\d+)", text)
            assert m, text[:2000]
            assert int(m.group(1)) not in (0, 8100) and int(m.group(2)) not in (0, 8199)
            assert rc == 0, text[-2000:]
    finally:
        for s in held:
            if s is not None:
                s.close()


def test_demo_help_documents_the_ports() -> None:
    r = run_cli("demo", "--help")
    assert "--port PORT" in r.stdout and "--admin-port PORT" in r.stdout


_HEAP_CHECK = """
import gc, weakref
from proxy.app.gateway import GC_THRESHOLD, settle_heap

class Rules:  # stands for the compiled rules of a reload: objects in reference cycles
    pass

old = Rules()
old.me = old
gone = weakref.ref(old)
settle_heap()  # at start: the rules in force are frozen, never walked again
assert gc.get_freeze_count() > 1000 and gc.get_threshold() == GC_THRESHOLD
del old
gc.collect()
assert gone() is not None  # frozen: not collected
settle_heap()  # a reload: unfreezes, collects what it replaced, freezes the new
assert gone() is None and gc.get_freeze_count() > 1000
print("ok")
"""


def test_a_serving_process_freezes_its_heap_and_a_reload_frees_what_it_replaced():
    """`tether serve` freezes what is alive after start (a full collection no longer walks it: it
    stalled requests 60–125 ms); a reload unfreezes first, so the rules it replaced are not kept forever."""
    r = subprocess.run([sys.executable, "-c", _HEAP_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
