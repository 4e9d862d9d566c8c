"""An upstream that answers every request after a fixed delay (default 20 ms): a realistic SaaS call.

    python bench/slow_upstream.py --port 9000 --delay-ms 20 --body-file body.json

Issue 27 measures Tether's added latency at one connection against an upstream that takes 20 ms, so the
durable commit of a read's intent record can overlap the upstream's own latency. Why not nginx: the
nginx-light package has no delay directive (``echo_sleep`` is the echo module's, not built in;
``limit_rate`` delays bytes and ``limit_req`` delays by rate, neither a fixed 20 ms per answer). Why not
an event loop (asyncio, uvloop/libuv, aiohttp): their timers have whole-millisecond resolution —
asyncio rounds the ``epoll`` timeout up to the next millisecond, libuv keeps its clock in milliseconds —
so each answer would come 20–21 ms after its request, a jitter larger than the 0.3 ms being measured.
Here each connection has a thread that blocks in ``recv`` and then sleeps to an absolute deadline with
``clock_nanosleep`` (Python's ``time.sleep``), timer slack set to 1 µs: the answer leaves within tens of
microseconds of ``arrival + delay``. At one connection that is one thread; its own cost (parsing a
request head, one ``sendall``) is the same for every configuration measured against it.

Every request is read completely (``Content-Length`` bodies; chunked bodies are not supported — wrk,
the bare forwarder and Tether all send a length) and answered ``200`` with the same JSON body and
keep-alive. It prints one JSON ``ready`` line when listening.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import socket
import sys
import threading
import time
from pathlib import Path

PR_SET_TIMERSLACK = 29


def _tight_timers() -> None:
    """This thread's timer slack to 1 ns (the default 50 µs would blur the deadline); best effort."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve_connection(conn: socket.socket, delay: float, response: bytes) -> None:
    _tight_timers()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            arrived = time.monotonic()
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(buf) < length:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            buf = buf[length:]
            wait = arrived + delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            conn.sendall(response)
    except OSError:
        return
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--body-file", help="the JSON body to answer (default: a small JSON object)")
    args = ap.parse_args()
    body = Path(args.body_file).read_bytes() if args.body_file else b'{"ok":true}'
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)) + body
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(1024)
    print(json.dumps({"event": "ready", "port": args.port, "delay_ms": args.delay_ms}), flush=True)
    delay = args.delay_ms / 1000
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve_connection, args=(conn, delay, response), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
