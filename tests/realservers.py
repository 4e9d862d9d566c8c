"""Real HTTP servers nobody here wrote, run as processes on 127.0.0.1: nginx, Node's http module,
gunicorn, uvicorn (h11 and httptools) and hypercorn. Tests and ``bench/fidelity.py`` check Tether's
forwarding against what these servers really send (the scripted raw servers of test_upstream_http.py
check the client's edge cases byte by byte).

Each ``start_*`` returns a :class:`ServerProcess` (``url``, ``stop()``) or raises :class:`Unavailable`
with the reason when the tool is not installed, which tests turn into a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "fidelity"
BIN = Path(sys.executable).parent


class Unavailable(Exception):
    """The server's program is not installed here."""


class ServerProcess:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log: Path, tls: bool = False) -> None:
        self.name = name
        self.proc = proc
        self.port = port
        self.log = log
        self.tls = tls

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def __repr__(self) -> str:
        return f"<{self.name} {self.url}>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(name: str, argv: list[str], workdir: Path, port: int | None, *, tls: bool = False,
           cwd: Path | None = None, timeout: float = 20.0) -> ServerProcess:
    """Start ``argv`` in its own process group; ready when ``port`` accepts (or, with ``port`` None,
    when the process prints ``{"port": N}``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    out = open(log, "wb")
    proc = subprocess.Popen(argv, cwd=str(cwd or workdir), stdout=subprocess.PIPE if port is None else out,
                            stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        if port is None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited {proc.wait()}: {log.read_text(errors='replace')[-2000:]}")
            port = int(json.loads(line)["port"])
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return ServerProcess(name, proc, port, log, tls)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name} not listening on {port} after {timeout:g}s: "
                           f"{log.read_text(errors='replace')[-2000:]}")
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        raise


def start_node(workdir: Path, *, tls: tuple[Path, Path] | None = None, keepalive_ms: int = 5000) -> ServerProcess:
    node = shutil.which("node")
    if node is None:
        raise Unavailable("node is not installed (apt-get install nodejs)")
    argv = [node, str(DATA / "node_upstream.js"), "--keepalive-ms", str(keepalive_ms)]
    if tls is not None:
        argv += ["--tls", str(tls[0]), str(tls[1])]
    return _spawn("node-https" if tls else "node", argv, workdir, None, tls=tls is not None)


NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_max_body_size 100m;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ text/plain txt; application/octet-stream bin; application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location = /files/latin1.txt {{
            add_header Content-Disposition 'attachment; filename="caf\xe9.txt"';
        }}
        location /files/ {{ }}
        location = /upload {{
            if ($http_transfer_encoding) {{ return 411; }}
            return 200 "length=$content_length\\n";
        }}
    }}
}}
"""

SMALL_FILE = b"small resource\n" * 20  # 300 bytes
LARGE_FILE_SIZE = 3 * 1024 * 1024


def start_nginx(workdir: Path) -> ServerProcess:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        raise Unavailable("nginx is not installed (apt-get install nginx-light)")
    d = workdir / "nginx"
    (d / "www" / "files").mkdir(parents=True, exist_ok=True)
    (d / "www" / "files" / "small.txt").write_bytes(SMALL_FILE)
    (d / "www" / "files" / "large.bin").write_bytes(bytes(range(256)) * (LARGE_FILE_SIZE // 256))
    (d / "www" / "files" / "latin1.txt").write_bytes(b"x")
    port = free_port()
    conf = d / "nginx.conf"
    # the latin-1 byte is written as a raw byte: nginx copies the config's bytes into the header
    user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would be "nobody" and not read tmp dirs
    conf.write_bytes(NGINX_CONF.format(dir=d, port=port, user=user).encode("latin-1"))
    return _spawn("nginx", [nginx, "-p", str(d), "-c", str(conf)], d, port)


def _python_tool(module: str, hint: str) -> list[str]:
    try:
        __import__(module)
    except ImportError:
        raise Unavailable(f"{module} is not installed ({hint})") from None
    return [sys.executable, "-m", module]


def start_gunicorn(workdir: Path) -> ServerProcess:
    argv = _python_tool("gunicorn", "pip install -e '.[test]'")
    port = free_port()
    return _spawn("gunicorn", argv + ["-w", "1", "--threads", "8", "-b", f"127.0.0.1:{port}", "--chdir", str(DATA),
                                      "--keep-alive", "30", "wsgi_upstream:app"], workdir, port)


def start_uvicorn(workdir: Path, http: str = "h11") -> ServerProcess:
    argv = _python_tool("uvicorn", "pip install -e '.[test]'")
    if http == "httptools":
        _python_tool("httptools", "pip install httptools")
    port = free_port()
    return _spawn(f"uvicorn-{http}", argv + ["--http", http, "--host", "127.0.0.1", "--port", str(port),
                                             "--app-dir", str(DATA), "--log-level", "warning", "asgi_upstream:app"],
                  workdir, port)


def start_hypercorn(workdir: Path) -> ServerProcess:
    argv = _python_tool("hypercorn", "pip install -e '.[test]'")
    port = free_port()
    return _spawn("hypercorn", argv + ["-b", f"127.0.0.1:{port}", "asgi_upstream:app"], workdir, port, cwd=DATA)
