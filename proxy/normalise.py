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

import functools
import re
import unicodedata
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


from .text import unsafe_char  # noqa: E402,F401 - re-exported for the stages


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
    if not text.isascii():
        for c in text:
            why = _lookalike(c) if ord(c) > 0x7F else None
            if why is not None:
                raise ambiguous(f"the path has an encoded U+{ord(c):04X} ({_char_name(c)}), {why}")
    return text


# Characters with no compatibility decomposition that servers, filters or "best fit" code-page mappings
# still read as '/', '\' or '.' (NFKC catches the rest: fullwidth solidus, one dot leader, ...).
_SLASHES = "\u2044\u2215\u29f8\u2571\u27cb\u0337\u0338\u2cc6\u3033"
_BACKSLASHES = "\u2216\u29f5\u29f9\u2572\u27cd\u20e5"
_DOTS = "\u3002\uff61\u0701\u0702\u06d4\ua4f8\u2e31\u2e33"
_STRUCTURAL = frozenset("/\\.;%?#")


@functools.lru_cache(maxsize=4096)
def _lookalike(c: str) -> str | None:
    """Why a decoded non-ASCII path character is refused, or None: a lookalike of '/', '\\' or '.', a
    control, format (bidi, zero-width) or separator character, or one that normalises (NFKC) to a
    character that structures a path."""
    if c in _SLASHES:
        return "which some servers read as '/'"
    if c in _BACKSLASHES:
        return "which some servers read as '\\'"
    if c in _DOTS:
        return "which some servers read as '.'"
    cat = unicodedata.category(c)
    if cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
        return "a control, format, separator or unassigned character"
    folded = unicodedata.normalize("NFKC", c)
    if any(x in _STRUCTURAL or ord(x) < 0x20 or ord(x) == 0x7F for x in folded):
        return f"which normalises to {folded!r}"
    return None


def _char_name(c: str) -> str:
    return unicodedata.name(c, "unnamed")


_QUERY_SEP = re.compile(r"[&;]")


def policy_params(query: str) -> list[tuple[str, str]]:
    """Query parameters as the most generous server reads them: split on ``&`` *and* ``;`` (Rack and
    older servlet containers take ``;`` as a separator too), so a credential or a method override
    hidden after a ``;`` is still seen. For policy checks only; the forwarded query stays byte-exact."""
    return parse_query(query.replace(";", "&")) if ";" in query else parse_query(query)


def redact_query(query: str, names: "frozenset[str] | tuple[str, ...]") -> str:
    """The query with the values of the parameters ``names`` (lower case, matched decoded and
    case-insensitively, ``&``- or ``;``-separated) replaced by ``[redacted]``: what the journal keeps of
    a request refused for carrying a credential."""
    from urllib.parse import unquote_plus

    out: list[str] = []
    pos = 0
    for piece in _QUERY_SEP.split(query):
        sep = query[pos + len(piece)] if pos + len(piece) < len(query) else ""
        pos += len(piece) + len(sep)
        key, eq, _ = piece.partition("=")
        try:
            name = unquote_plus(key, errors="strict").lower()
        except UnicodeDecodeError:
            name = key.lower()
        out.append(f"{key}=[redacted]" if eq and name in names else piece)
        out.append(sep)
    return "".join(out)


def _normalise_escape(m: "re.Match[str]") -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else "%" + m.group(1).upper()


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def canonical_path(path: str, segments: tuple[str, ...], trailing_slash: bool) -> str:
    """The one spelling of a matched path that Tether forwards (RFC 3986 §6.2.2 normalisation): an
    escaped unreserved character is sent as itself (``%31`` as ``1``, ``%4F`` as ``O``), other escapes
    with upper-case hex (``%c3%a9`` as ``%C3%A9``; an escaped reserved character such as ``%40`` stays
    escaped, since servers may read it differently from ``@``), and a trailing ``/`` exactly when the
    matched template has one. So the upstream receives the path Tether matched, however the agent spelt
    it. ``path`` (already validated) is returned as is when it already is that spelling (the usual case)."""
    if not segments:
        return "/"
    has_slash = path.endswith("/")
    if "%" not in path and has_slash == trailing_slash:
        return path
    body = path[1:-1] if has_slash else path[1:]
    if "%" in body:
        body = _PCT.sub(_normalise_escape, body)
    return "/" + body + ("/" if trailing_slash else "")


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
