"""A real upstream served by gunicorn (a plain WSGI app; gunicorn does the HTTP), for the transport tests.

    gunicorn -w 1 --threads 8 -b 127.0.0.1:PORT --chdir tests/data/fidelity wsgi_upstream:app
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

_ids = itertools.count(1)
_log: list[str] = []
_items: dict[str, dict[str, Any]] = {}
_release = threading.Event()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    length = int(environ.get("CONTENT_LENGTH") or 0)
    data = environ["wsgi.input"].read(length) if length else b""
    _log.append(f"{method} {path}")
    if path == "/api/items" and method == "POST":
        rid = f"item-{next(_ids)}"
        _items[rid] = {**json.loads(data or b"{}"), "id": rid}
        pad = int(query.get("pad", ["0"])[0])
        name = str(_items[rid].get("name", "")).encode()
        body = b'{"id": "%s", "name": "%s", "pad": "%s"}' % (rid.encode(), name, b"x" * pad)
        start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                       ("Location", f"/api/items/{rid}")])
        return [body]
    if path.startswith("/api/items/") and method == "GET" and path[11:] in _items:
        body = json.dumps(_items[path[11:]]).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if path.startswith("/api/items/") and method == "DELETE":
        _items.pop(path[11:], None)
        start_response("204 No Content", [])
        return [b""]
    if path == "/api/log":
        body = json.dumps(_log).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/latin1":
        # PEP 3333: header values are latin-1 strings; gunicorn writes them as latin-1 bytes
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "1"),
                                  ("Content-Disposition", 'attachment; filename="caf\u00e9.txt"')])
        return [b"x"]
    if path == "/release":
        _release.set()
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]
    if path == "/export" and method == "POST":
        _release.clear()

        def rows() -> Iterable[bytes]:  # a chunked generator: the first row now, the rest when released
            yield b'{"row": 1}\n'
            _release.wait(20)
            for n in range(2, 5):
                yield b'{"row": %d}\n' % n

        start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        return rows()
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]
