"""Small helpers to build Tether's own JSON responses (errors, control endpoints)."""

from __future__ import annotations

from typing import Any, Mapping

import orjson
from aiohttp import web

from ..errors import TetherError
from ..headers import REQUEST_ID


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status,
                        content_type="application/json", headers=headers)


def error_response(err: TetherError, request_id: str | None) -> web.Response:
    headers = dict(err.headers)
    if request_id:
        headers[REQUEST_ID] = request_id
    return json_response(err.body(request_id), err.status, headers)
