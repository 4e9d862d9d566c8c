"""Request body parsing that refuses ambiguity: JSON and form encodings, read one way only.

* JSON: strict UTF-8, duplicate keys refused (parsers disagree on which one wins), nesting depth bounded,
  and the body must parse as its declared Content-Type (a body whose type lies is refused). Values that
  cannot be kept or passed on exactly are refused with the field named (400 ``unrepresentable_value``):
  a lone surrogate escape (``"\\ud800"``: not Unicode; parsers replace it, drop it or fail), an integer
  outside the 64-bit range (read as a float, or refused, depending on the reader) and a number too large
  for a double (``1e400`` reads as infinity). Such a value would be one thing to Tether's rules, another
  to the upstream, and could not be journaled or captured for review as it was sent.
* Forms (``application/x-www-form-urlencoded``, Stripe's encoding): ``a[b][c]=v`` keys become nested
  dicts, ``a[]=v`` / ``a[0]=v`` lists; a key given twice, or given both as a value and as a container,
  is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from adapters.base import FORM_CT

from ..chain import unrepresentable
from ..errors import TetherError

JSON_TYPES = ("application/json",)
FORM_TYPE = "application/x-www-form-urlencoded"


def media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_json_type(mt: str) -> bool:
    return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise TetherError("duplicate_json_key", f"the JSON body repeats the key {k!r}")
        out[k] = v
    return out


def _census(value: Any, limit: int) -> tuple[int, int]:
    """(object keys, ':' characters inside keys and strings) of a parsed document; enforces the depth."""
    keys = colons = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            if d > limit:
                raise TetherError("json_too_deep", f"the JSON body nests deeper than {limit} levels")
            keys += len(v)
            for k, x in v.items():
                colons += k.count(":")
                if isinstance(x, str):
                    colons += x.count(":")
                elif isinstance(x, (dict, list)):
                    stack.append((x, d + 1))
        elif isinstance(v, list):
            if d > limit:
                raise TetherError("json_too_deep", f"the JSON body nests deeper than {limit} levels")
            for x in v:
                if isinstance(x, str):
                    colons += x.count(":")
                elif isinstance(x, (dict, list)):
                    stack.append((x, d + 1))
    return keys, colons


def _parse_json_fast(body: bytes, max_depth: int) -> Any:
    """orjson, when it provably reads the body exactly as the strict parser would; else _MISSING.

    orjson keeps the last of two equal keys silently, so duplicates are ruled out by counting: outside
    strings, a ':' appears only after a key, so with no \\u escapes (which could spell a ':' or a key
    differently) ``raw ':' count - ':' inside the parsed strings`` is the number of keys written. If
    that equals the number of keys parsed, no key was repeated (a dropped duplicate also drops its
    value's colons, which only raises the first figure). Anything else goes the strict way.

    Most bodies take a shortcut first (compact JSON, as SDKs and MCP clients send it): when orjson writes
    back exactly the bytes it read, nothing was dropped or changed in reading them — a dropped duplicate
    key, an integer read as a float, an escape or a BOM would each make the bytes differ — and nothing
    nests deeper than the body has brackets. A serialisation instead of a walk and a regex scan: 1.7 us
    instead of 9.8 us for an MCP tools/call."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _MISSING  # the strict parser says what is wrong
    if orjson.dumps(value) == body and body.count(b"{") + body.count(b"[") <= max_depth:
        return value
    if b"\\u" in body or body.startswith(b"\xef\xbb\xbf") or _LONG_DIGITS.search(body):
        return _MISSING  # escapes, a BOM, or a number orjson might read as a float (ints past 64 bits)
    keys, colons = _census(value, max_depth)
    if body.count(b":") - colons != keys:
        return _MISSING
    return value


_MISSING = object()
_LONG_DIGITS = re.compile(rb"\d{16}")


def parse_json(body: bytes, max_depth: int = 64) -> Any:
    fast = _parse_json_fast(body, max_depth)
    if fast is not _MISSING:
        return fast
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise TetherError("malformed_json", "the JSON body is not valid UTF-8") from None
    if text.startswith("\ufeff"):
        raise TetherError("malformed_json", "the JSON body starts with a byte-order mark")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except TetherError:
        raise
    except RecursionError:
        raise TetherError("json_too_deep", f"the JSON body nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise TetherError("malformed_json", f"the body is not valid JSON: {exc}") from None
    _census(value, max_depth)  # the depth limit (the counts only matter on the fast path)
    _representable(value)  # the fast path (orjson) refuses all of these itself
    return value


def _representable(value: Any) -> None:
    bad = unrepresentable(value)
    if bad is not None:
        field, why = bad
        raise TetherError("unrepresentable_value", f"field {field or '(body)'!r} {why}; refused",
                          details={"field": field})


def _refuse_constant(name: str) -> Any:
    raise TetherError("malformed_json", f"the JSON body uses the non-standard constant {name}")


def parse_form(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise TetherError("body_content_type_mismatch", "a form body must be ASCII (percent-encoded)") from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise TetherError("body_content_type_mismatch", f"the body is not a valid form: {exc}") from None
    return nest_form(pairs)


def _split_key(key: str) -> list[str]:
    """'a[b][c]' -> ['a', 'b', 'c']; 'a[]' -> ['a', '']"""
    if "[" not in key:
        return [key]
    head, _, rest = key.partition("[")
    if not head or not rest.endswith("]"):
        raise TetherError("ambiguous_request", f"malformed form key {key!r}")
    parts = [head]
    for p in rest[:-1].split("]["):
        if "[" in p or "]" in p:
            raise TetherError("ambiguous_request", f"malformed form key {key!r}")
        parts.append(p)
    return parts


def nest_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in pairs:
        parts = _split_key(key)
        if key in seen and parts[-1] != "":
            raise TetherError("ambiguous_request", f"the form repeats the key {key!r}")
        seen.add(key)
        node: Any = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if part == "":
                    if last:
                        node.append(value)
                        break
                    raise TetherError("ambiguous_request", f"form key {key!r}: '[]' must be last")
                if not part.isdigit():
                    raise TetherError("ambiguous_request", f"form key {key!r} mixes list and object forms")
                idx = int(part)
                while len(node) <= idx:
                    node.append(None)
                if last:
                    if node[idx] is not None:
                        raise TetherError("ambiguous_request", f"the form repeats the key {key!r}")
                    node[idx] = value
                else:
                    if node[idx] is None:
                        node[idx] = [] if parts[i + 1] == "" or parts[i + 1].isdigit() else {}
                    node = node[idx]
                continue
            if last:
                if part in node:
                    raise TetherError("ambiguous_request", f"form key {key!r} is given twice or as both a value "
                                                           "and a container")
                node[part] = value
            else:
                nxt = parts[i + 1]
                child = node.get(part)
                if child is None:
                    child = [] if nxt == "" or nxt.isdigit() else {}
                    node[part] = child
                elif not isinstance(child, (dict, list)):
                    raise TetherError("ambiguous_request", f"form key {key!r} is given both as a value and a container")
                elif isinstance(child, list) and nxt != "" and not nxt.isdigit():
                    raise TetherError("ambiguous_request", f"form key {key!r} mixes list and object forms")
                node = child
    return root


def parse_body(body: bytes, content_type: str | None, max_depth: int) -> tuple[str, Any]:
    """('json'|'form'|'other'|'empty', parsed value)."""
    if not body:
        return "empty", None
    mt = media_type(content_type)
    if is_json_type(mt):
        return "json", parse_json(body, max_depth)
    if mt == FORM_TYPE:
        return "form", parse_form(body)
    if not mt:
        # no declared type: a JSON-looking body is read as JSON so rules cannot be skipped by omitting it
        stripped = body.lstrip()[:1]
        if stripped in (b"{", b"["):
            return "json", parse_json(body, max_depth)
    return "other", None


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'l': [{'x': 2}]} -> {'a.b': 1, 'l[0].x': 2}; leaves only."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = value
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list):
        if not value and prefix:
            out[prefix] = value
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


# --------------------------------------------------------------------------- smuggled fields

# Body fields some servers read as the request's real method (Rails/Rack and Laravel read ``_method`` from
# form and JSON bodies; Salesforce's ``_HttpMethod``): refused in bodies as in the query.
OVERRIDE_FIELDS = frozenset({"_method", "_httpmethod", "x-http-method-override", "x-method-override", "x-http-method"})

_DISPOSITION = re.compile(rb"(?im)^content-disposition:([^\r\n]*)")
_PART_NAME = re.compile(r"""(?i)(?:^|;)\s*name(\*?)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""")


def multipart_names(body: bytes) -> list[str]:
    """The field names a multipart body's parts declare (``Content-Disposition: form-data; name=...``,
    including RFC 2231 ``name*=utf-8''...``), read generously: every such header line anywhere in the
    body counts, so a name cannot hide from Tether where a server would find it."""
    from urllib.parse import unquote

    out: list[str] = []
    for m in _DISPOSITION.finditer(body):
        line = m.group(1).decode("latin-1")
        for star, quoted, bare in _PART_NAME.findall(line):
            name = quoted if quoted else bare
            if star:
                name = unquote(name.split("'", 2)[-1], errors="replace")
            out.append(name.replace('\\"', '"'))
    return out


def smuggled_field(names: Any, refused: frozenset[str]) -> str | None:
    """The first of ``names`` (body field names) that is, case-insensitively, in ``refused``."""
    for name in names:
        if isinstance(name, str) and name.lower() in refused:
            return name
    return None


def encode_body(body: Any, content_type: str | None) -> bytes | None:
    """Serialise a planned body the way its content type says (JSON, or a nested form)."""
    if body is None:
        return None
    if isinstance(body, bytes):
        return body
    if content_type and content_type.split(";")[0].strip().lower() == FORM_CT:
        return encode_form(body).encode("ascii")
    return orjson.dumps(body)


def encode_form(value: Any, prefix: str = "") -> str:
    """Nested dicts/lists -> ``a[b][0]=v`` form encoding (Stripe's)."""
    pairs: list[tuple[str, str]] = []

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            if not v and key:
                pairs.append((key, ""))
            for k, x in v.items():
                walk(x, f"{key}[{k}]" if key else str(k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{key}[{i}]")
        elif v is None:
            pairs.append((key, ""))
        elif isinstance(v, bool):
            pairs.append((key, "true" if v else "false"))
        else:
            pairs.append((key, str(v)))

    walk(value, prefix)
    return urlencode(pairs)
