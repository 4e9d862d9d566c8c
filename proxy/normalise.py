"""One canonical reading of the request target, or a refusal.

Gateways have been bypassed whenever the component that *matches* a path read it differently from the
component that *executes* it (Envoy CVE-2019-9901 with ``%2F`` and dot segments, Spring's ``;`` path
parameters and ``/..;/``, proxies that re-join ``//host`` onto a base URL). Tether avoids the whole
class by refusing, rather than repairing, every target that has more than one plausible reading:

* only origin-form targets (``/path?query``): absolute-form, authority-form and ``*`` are refused;
* no fragment, no backslash, no ``;``, no empty segment (``//``), no ``.``/``..`` segment;
* percent-escapes are allowed only where decoding them cannot change the path's structure: an escape
  that decodes to ``/``, ``\\``, ``.``, ``;``, ``%`` or a control character is refused, and the decoded
  bytes must be strict UTF-8 (no overlong forms);
* only printable ASCII on the wire.

Because nothing is rewritten, the path Tether matches is byte for byte the path it forwards: the
upstream URL is always the configured base plus this validated path, never a join of the client's
target onto the base.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from .errors import TetherError

# RFC 3986 pchar minus ';' (path parameters, read differently by different servers) plus '/'.
_PATH_OK = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@/%]*")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
# Escapes that change structure or meaning when decoded: / \ . ; % and C0 controls, DEL.
_FORBIDDEN_ESCAPES = frozenset(
    {0x2F, 0x5C, 0x2E, 0x3B, 0x25, 0x7F} | set(range(0x00, 0x20))
)
_QUERY_OK = re.compile(r"[\x21-\x7E]*")


def ambiguous(message: str) -> TetherError:
    return TetherError("ambiguous_request", message)


def split_target(raw_target: str, max_length: int) -> tuple[str, str]:
    """Split an origin-form target into (path, raw query without '?'). Refuse other forms."""
    if len(raw_target) > max_length:
        raise TetherError("uri_too_long", f"the request target is longer than {max_length} characters")
    if not raw_target.startswith("/"):
        raise ambiguous("only origin-form request targets (/path?query) are accepted")
    if "#" in raw_target:
        raise ambiguous("a request target may not carry a fragment ('#')")
    path, sep, query = raw_target.partition("?")
    if query and not _QUERY_OK.fullmatch(query):
        raise ambiguous("the query string holds characters that are not printable ASCII")
    return path, query


def decode_segments(path: str) -> tuple[str, ...]:
    """Validate a raw path and return its decoded segments ('/' -> ())."""
    if not _PATH_OK.fullmatch(path):
        bad = next((c for c in path if not _PATH_OK.fullmatch(c)), "?")
        raise ambiguous(f"the path holds a character that is refused here: {bad!r}")
    if path == "/":
        return ()
    body = path[1:]
    trailing = body.endswith("/")
    if trailing:
        body = body[:-1]
    raw_segments = body.split("/")
    out: list[str] = []
    for seg in raw_segments:
        if seg == "":
            raise ambiguous("the path has an empty segment ('//')")
        if seg in (".", ".."):
            raise ambiguous("the path has a dot segment ('.' or '..')")
        if "%" in seg:
            seg = _decode_segment(seg)
        out.append(seg)
    return tuple(out)


def _decode_segment(seg: str) -> str:
    # every '%' must start a valid escape
    if seg.count("%") != len(_PCT.findall(seg)):
        raise ambiguous("the path has a malformed percent-escape")
    for m in _PCT.finditer(seg):
        if int(m.group(1), 16) in _FORBIDDEN_ESCAPES:
            raise ambiguous(f"the path has an encoded {chr(int(m.group(1), 16))!r} (%{m.group(1)}), which "
                            "servers decode differently")
    raw = unquote_to_bytes(seg)
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ambiguous("the path's percent-escapes are not valid UTF-8 (overlong or truncated)") from None
    if text in (".", ".."):
        raise ambiguous("the path has an encoded dot segment")
    return text


def parse_query(query: str) -> list[tuple[str, str]]:
    """Decode a query string into (name, value) pairs, keeping repeats and order.

    Used only to *read* parameters that policy cares about; the forwarded query stays byte-exact."""
    if not query:
        return []
    from urllib.parse import parse_qsl

    try:
        return parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except UnicodeDecodeError:
        raise ambiguous("the query string's percent-escapes are not valid UTF-8") from None
