"""The reviewer web console: static files served by the admin listener at ``/console/``.

The console is plain HTML, CSS and JavaScript in ``proxy/doors/admin/console/`` (no build step, nothing fetched from
another host). The files themselves are public — they hold no data; everything they show comes from the
admin API, which the page calls with the reviewer token the user pastes into its sign-in form.

Only files that exist directly in the console folder are served (no sub-paths, no directory listing),
with a strict Content-Security-Policy: scripts, styles and connections to this origin only, no inline
script, no framing.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

CONSOLE_DIR = Path(__file__).resolve().parent / "console"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}")
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
          ".png": "image/png", ".ico": "image/x-icon", ".json": "application/json", ".txt": "text/plain"}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> Path | None:
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    path = CONSOLE_DIR / name
    if path.suffix not in _TYPES or not path.is_file():
        return None
    return path


def _serve(path: Path) -> web.Response:
    charset = "utf-8" if _TYPES[path.suffix].startswith(("text/", "application/json", "image/svg")) else None
    return web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix], charset=charset,
                        headers=SECURITY_HEADERS)


async def console_index(request: web.Request) -> web.Response:
    path = _file("index.html")
    if path is None:
        raise web.HTTPNotFound(reason="the console is not installed")
    return _serve(path)


async def console_file(request: web.Request) -> web.Response:
    path = _file(request.match_info["name"])
    if path is None:
        raise web.HTTPNotFound(reason="no such console file")
    return _serve(path)


async def to_console(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


def add_console_routes(app: web.Application) -> None:
    """Serve the console at ``/console/`` and send ``/`` and ``/console`` there."""
    app.router.add_get("/", to_console)
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", console_index)
    app.router.add_get("/console/{name}", console_file)
