"""Agent-controlled text made inert for operator views (terminal, console, Slack, alerts).

An agent controls its intent, its token's ``sub``/``act.sub``, its transaction names and every byte of
the bodies it sends. Shown as-is to an operator, such text can rewrite what the operator sees: a
carriage return or an ANSI escape (C0) repaints a terminal line, a C1 control is read as CSI by some
terminals, U+2028/U+2029 break lines where a viewer does not expect it, and the bidi embedding,
override and isolate controls (U+202A–U+202E, U+2066–U+2069) reorder text so that ``approve`` reads as
something else. Every operator view therefore shows these characters as visible escapes
(``\\n``, ``\\x1b``, ``\\u202e``), never as themselves; the stored records keep the exact bytes.

:func:`inert` is for plain text; :func:`field_value` is for ``key=value`` fields of human journal lines
(``a | b``), where a value that contains the separator or a quote is quoted (and its bars escaped), so
that no value can forge another field; :func:`json_text` escapes the same characters in JSON text (they are legal raw in
JSON strings, and a terminal would act on them).
"""

from __future__ import annotations

import re
from typing import Any

# C0, DEL, C1, the line/paragraph separators, the bidi embeddings/overrides/isolates, and the
# implicit bidi marks (LRM, RLM, ALM), which are invisible and reorder neighbouring text too.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

SEPARATOR = " | "


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    cp = ord(ch)
    return f"\\x{cp:02x}" if cp < 0x100 else f"\\u{cp:04x}"


def inert(value: Any) -> str:
    """``value`` as text with every control, separator and bidi character shown as an escape."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


def is_clean(text: str) -> bool:
    """True when ``text`` holds none of the characters :func:`inert` escapes."""
    return _UNSAFE.search(text) is None


def quoted(value: Any) -> str:
    """``"value"``: backslashes and quotes escaped first, then the value made inert (so a literal
    backslash-n the agent typed reads ``\\\\n`` and an escaped newline ``\\n``: never the same)."""
    return '"' + _requote(value) + '"'


def _requote(value: Any) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return inert(text)


def field_value(value: Any, *, always_quote: bool = False) -> str:
    """A value for ``key=value`` in a human line: quoted when it could be mistaken for more than one field
    (it holds the separator ``|``, a quote, leading/trailing blanks, or is empty) or when asked."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if always_quote or not text or "|" in text or '"' in text or text != text.strip() or _UNSAFE.search(text):
        # inside the quotes a bar is written \| as well: even a reader that splits on " | " without
        # minding quotes (cut, awk) finds no separator in a value
        return '"' + _requote(text).replace("|", "\\|") + '"'
    return text


# what JSON text from orjson can still hold raw: C0 controls inside strings are always escaped (JSON
# says so), so a raw newline or tab is layout (OPT_INDENT_2) and must stay; DEL, C1 and the line
# separators and bidi controls are legal raw inside strings and are escaped here
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def json_text(text: str) -> str:
    """JSON text (from orjson) with the unsafe characters written as ``\\uXXXX`` escapes. They can only
    occur inside JSON strings, where the escape means the same character, so the JSON is unchanged."""
    if not _UNSAFE_IN_JSON.search(text):
        return text
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def slack_text(value: Any) -> str:
    """Text for a Slack message: inert, and ``&``, ``<``, ``>`` escaped as Slack asks, so agent text can
    neither mention (``<!channel>``), link (``<https://…|approve>``) nor format as a control."""
    return inert(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
