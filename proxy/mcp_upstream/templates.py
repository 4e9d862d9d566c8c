"""Compensation templates for tools: the arguments of an undo or pre-image call, filled in.

A tool capability may declare how Tether undoes a call of it::

    undo: {tool: delete_customer, arguments: {id: "{result.structuredContent.id}"}}
    pre_image: {tool: get_customer, arguments: {id: "{arguments.id}"}}
    undo: {tool: update_customer, arguments: {id: "{arguments.id}", email: "{pre_image.structuredContent.email}"}}

Placeholders name a value by a dotted path from one of three roots: ``result`` (the call's
``CallToolResult`` as JSON: ``structuredContent``, ``content``, ``isError``), ``arguments`` (the call's
arguments, as Tether validated them) and ``pre_image`` (the pre-image call's result). A string that is
exactly one placeholder becomes the value itself, with its JSON type (an integer id stays an
integer); placeholders inside longer text are written into it (strings and numbers only). Path
segments name object members, or list positions (``content.0.text``).

Values from ``result`` and ``pre_image`` come from the upstream, which Tether does not trust. As for
REST undo targets (issue 20 item 11), what they may be is checked before any undo is armed:

* from ``result`` (an id the server minted): a string of at most :data:`MAX_ID_CHARS` characters with
  no control, whitespace or non-ASCII character, or an integer within ±(2**53-1) — never an object,
  a list, a boolean or a float, which no id is;
* from ``pre_image`` (state to restore): any JSON value, at most :data:`MAX_VALUE_BYTES` serialised;
  strings without control characters other than tab/newline;
* written into text: strings and numbers only, the whole string at most :data:`MAX_TEXT_CHARS`.

A missing path, a value of the wrong kind or size raises :class:`TemplateError`: the undo cannot be
planned, so the write must not run live inside a transaction (the core's rule, as for REST). With the
undo tool's ``inputSchema`` (pinned, from ``tools/list``) the filled-in arguments are also validated
against it (:func:`check_arguments`).

Everything here is pure: no I/O, plain data in and out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from ..config import TEMPLATE_PLACEHOLDER_RE, template_placeholders

MAX_ID_CHARS = 256
MAX_VALUE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 4096
_MAX_SAFE_INT = 2**53 - 1
_ID_OK = re.compile(r"[\x21-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class TemplateError(ValueError):
    """A template cannot be filled in safely; ``path`` is the argument (dotted) it failed at."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.message = message
        self.path = path


def result_json(result: Any) -> Any:
    """A ``CallToolResult`` (or any pydantic model) as the JSON a template reads (camelCase keys)."""
    if hasattr(result, "model_dump"):
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)
    return result


def lookup(root: Any, path: tuple[str, ...], where: str) -> Any:
    """The value at ``path`` under ``root``; TemplateError when any step is missing."""
    cur = root
    for i, seg in enumerate(path):
        if isinstance(cur, Mapping) and seg in cur:
            cur = cur[seg]
        elif isinstance(cur, list) and seg.isdigit() and int(seg) < len(cur):
            cur = cur[int(seg)]
        else:
            raise TemplateError(f"no {'.'.join(path[: i + 1])!r} in the {where}")
    return cur


def _check_id(value: Any, ref: str, path: str) -> Any:
    if type(value) is int:
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return value
        raise TemplateError(f"{ref} is an integer beyond ±(2**53-1)", path)
    if type(value) is str:
        if not value:
            raise TemplateError(f"{ref} is empty", path)
        if len(value) > MAX_ID_CHARS:
            raise TemplateError(f"{ref} is longer than {MAX_ID_CHARS} characters: not an id", path)
        if not _ID_OK.fullmatch(value):
            raise TemplateError(f"{ref} holds whitespace, control or non-ASCII characters: not an id", path)
        return value
    raise TemplateError(f"{ref} is a {_kind(value)}, not an id (a string or an integer)", path)


def _check_state(value: Any, ref: str, path: str) -> Any:
    size = len(orjson.dumps(value))
    if size > MAX_VALUE_BYTES:
        raise TemplateError(f"{ref} is {size} bytes, over {MAX_VALUE_BYTES}", path)
    for s in _strings(value):
        if _CONTROL.search(s):
            raise TemplateError(f"{ref} holds control or bidi characters", path)
    return value


def _strings(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        return [s for k, x in v.items() for s in (*_strings(k), *_strings(x))]
    if isinstance(v, list):
        return [s for x in v for s in _strings(x)]
    return []


def _kind(v: Any) -> str:
    return {dict: "object", list: "list", bool: "boolean", float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def resolve_arguments(template: Mapping[str, Any], *, arguments: Mapping[str, Any] | None = None,
                      result: Any = None, pre_image: Any = None) -> dict[str, Any]:
    """Fill in a template's ``arguments`` from the call (``arguments``, ``result``: a CallToolResult or
    its JSON) and the pre-image (``pre_image``: the pre-image call's result, or None). Raises
    :class:`TemplateError`."""
    roots = {"arguments": dict(arguments or {}), "result": result_json(result), "pre_image": result_json(pre_image)}
    out = _fill(template, roots, "")
    if not isinstance(out, dict):
        raise TemplateError("the template's arguments must be an object")
    return out


def _value(root: str, path: tuple[str, ...], roots: dict[str, Any], where: str) -> Any:
    if root not in roots:
        raise TemplateError(f"unknown placeholder root {root!r}", where)
    if roots[root] is None:
        raise TemplateError(f"{{{root}...}} is used but there is no {root.replace('_', '-')}", where)
    what = {"result": "call's result", "arguments": "call's arguments", "pre_image": "pre-image's result"}[root]
    try:
        value = lookup(roots[root], path, what)
    except TemplateError as exc:
        raise TemplateError(exc.message, where) from None
    ref = "{" + ".".join((root, *path)) + "}"
    if root == "result":
        return _check_id(value, ref, where)
    if root == "pre_image":
        return _check_state(value, ref, where)
    return value


def _fill(node: Any, roots: dict[str, Any], where: str) -> Any:
    if isinstance(node, dict):
        return {k: _fill(v, roots, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, roots, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    whole = TEMPLATE_PLACEHOLDER_RE.fullmatch(node)
    if whole is not None:
        path = tuple(p for p in whole.group(2).split(".") if p)
        return _value(whole.group(1), path, roots, where)
    try:
        template_placeholders(node)
    except ValueError as exc:  # a malformed placeholder (config validation refuses these first)
        raise TemplateError(str(exc), where) from None

    def one(m: re.Match[str]) -> str:
        v = _value(m.group(1), tuple(p for p in m.group(2).split(".") if p), roots, where)
        if type(v) is str:
            return v
        if type(v) in (int, float):
            return orjson.dumps(v).decode()
        raise TemplateError(f"{m.group(0)} is a {_kind(v)}: only strings and numbers are written into text", where)

    text = TEMPLATE_PLACEHOLDER_RE.sub(one, node)
    if len(text) > MAX_TEXT_CHARS:
        raise TemplateError(f"the filled-in text is longer than {MAX_TEXT_CHARS} characters", where)
    return text


def check_arguments(arguments: Mapping[str, Any], input_schema: Mapping[str, Any] | None) -> None:
    """Validate filled-in arguments against the (pinned) tool's ``inputSchema`` (JSON Schema 2020-12, or
    the draft the schema names); TemplateError names the first problem."""
    if not input_schema:
        return
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(input_schema, default=jsonschema.Draft202012Validator)
        err = jsonschema.exceptions.best_match(cls(input_schema).iter_errors(dict(arguments)))
    except jsonschema.exceptions.SchemaError as exc:
        raise TemplateError(f"the tool's inputSchema is not a valid JSON Schema: {exc.message}") from None
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path)
        raise TemplateError(f"does not match the tool's inputSchema: {err.message[:300]}", where)


__all__ = ["MAX_ID_CHARS", "MAX_TEXT_CHARS", "MAX_VALUE_BYTES", "TemplateError", "check_arguments", "lookup",
           "resolve_arguments", "result_json"]
