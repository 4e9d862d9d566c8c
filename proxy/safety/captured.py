"""The stored form of a captured request (a review item's ``request``), readable without the review service.

A captured body is kept once, as ``body_text`` (UTF-8) or ``body_b64`` (anything else, or text whose JSON
escaping would bloat it); :func:`request_body` gives the bytes back. The headline of an item and the review
service both read it, so it lives below both.
"""

from __future__ import annotations

import base64
from typing import Any


def request_body(req: dict[str, Any]) -> bytes:
    """The captured body's bytes, as the agent sent them."""
    if "body_b64" in req:
        return base64.b64decode(req["body_b64"])
    return (req.get("body_text") or "").encode("utf-8")
