"""Which resource a ``resource:`` capability grants: RFC 6570 level-1 URI templates, matched strictly.

A capability ``{upstream: crm, resource: "crm://customers/{id}"}`` grants ``resources/read`` of the URIs the
template expands to. Matching is exact text for the literal parts and, for each ``{name}``, one non-empty
value without ``/``, ``?``, ``#`` or ``\\``, that is not ``.`` or ``..``, has no control character and no
percent-encoded ``/``, ``\\``, ``.`` (``%2F``, ``%5C``, ``%2E``): an agent must not reach
``crm://customers/../admin`` or ``crm://customers/%2e%2e/admin`` through a template meant for one
customer. Nothing is decoded or normalised — the URI that matched is the URI sent.
"""

from __future__ import annotations

import re
from functools import lru_cache

_EXPR = re.compile(r"\{([A-Za-z0-9_]+)\}")
_VALUE = r"(?!\.{1,2}(?:$|[/?#]))[^/?#\\\x00-\x20\x7f]+"
_BAD_ESCAPE = re.compile(r"%(?:2[fF]|5[cC]|2[eE])")
MAX_URI = 2048


@lru_cache(maxsize=1024)
def compile_template(template: str) -> re.Pattern[str]:
    out, pos, names = [], 0, []
    for m in _EXPR.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        name = m.group(1)
        group = f"(?P<{name}>{_VALUE})" if name not in names else f"(?P={name})"
        names.append(name)
        out.append(group)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


def match_resource(template: str, uri: str) -> dict[str, str] | None:
    """The template's variables if ``uri`` is one of the URIs ``template`` grants, else None."""
    if len(uri) > MAX_URI:
        return None
    m = compile_template(template).fullmatch(uri)
    if m is None:
        return None
    values = m.groupdict()
    if any(v in (".", "..") or _BAD_ESCAPE.search(v) for v in values.values()):
        return None
    return values


__all__ = ["match_resource", "compile_template"]
