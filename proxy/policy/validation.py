"""Body validation per capability: field rules, value constraints and an optional JSON Schema.

Rules are compiled once per capability (patterns compiled, the JSON Schema validator built) and cached
on the Registry, so a request pays only for the checks themselves.

Field paths are dotted (``address.city``); a form key ``metadata[plan]`` is the path
``metadata.plan`` and list items are ``items[0].price``. An entry in ``allow_fields`` or
``forbid_fields`` covers its whole subtree (``metadata`` allows ``metadata.anything``); ``*`` matches
one path segment (``lines[*].amount``). Violations are 422 with a stable code and the field named:

* ``field_not_allowed`` — a field outside ``allow_fields`` or inside ``forbid_fields``;
* ``field_required`` — a ``require_fields`` entry is absent;
* ``constraint_violated`` — enum, min/max, length, pattern, type, or a cap relative to the pre-image
  (``max_increase_pct``, ``max_increase``: the new value compared with the record as it is now);
* ``schema_violation`` — the capability's JSON Schema rejects the body.

Form bodies carry strings only (Stripe: ``amount=1000``); numeric, integer and boolean checks accept a
string that reads as such, both in constraints and in the JSON Schema.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from ..config import BodyRules, Constraint
from ..errors import TetherError
from .bodies import flatten

_INT_RE = re.compile(r"-?\d+")
_NUM_RE = re.compile(r"-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _path_matches(path: str, rule: str) -> bool:
    """Does a leaf path fall under a rule path (equal, or inside its subtree)?"""
    if "*" in rule:
        pattern = re.escape(rule).replace(r"\*", r"[^.\[\]]+")
        return re.match(pattern + r"($|\.|\[)", _index_to_star(path)) is not None or \
            re.match(pattern + r"($|\.|\[)", path) is not None
    return path == rule or path.startswith(rule + ".") or path.startswith(rule + "[")


def _index_to_star(path: str) -> str:
    return re.sub(r"\[\d+\]", "[*]", path)


_PART_RE = re.compile(r"[^.\[\]]+|\[\d+\]")


@functools.lru_cache(maxsize=4096)
def _parts(path: str) -> tuple[str | int, ...]:
    """'a.b[0].c' -> ('a', 'b', 0, 'c'); rule paths repeat on every request, so split once."""
    return tuple(int(p[1:-1]) if p.startswith("[") else p for p in _PART_RE.findall(path))


def _lookup(body: Any, path: str) -> tuple[bool, Any]:
    """Find a dotted path (with optional [i]) in a parsed body."""
    node = body
    for part in _parts(path):
        if isinstance(part, int):
            idx = part
            if isinstance(node, list) and idx < len(node):
                node = node[idx]
            elif isinstance(node, dict) and str(idx) in node:
                node = node[str(idx)]
            else:
                return False, None
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _as_number(value: Any, form: bool) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if form and isinstance(value, str) and _NUM_RE.fullmatch(value.strip()):
        return float(value)
    return None


@dataclass(slots=True)
class _CompiledConstraint:
    path: str
    c: Constraint
    pattern: re.Pattern[str] | None


class BodyValidator:
    """Compiled body rules of one capability."""

    def __init__(self, capability: str, rules: BodyRules, *, fold_case: bool = False) -> None:
        """``fold_case``: the upstream reads field names case-insensitively (Salesforce), so the rules
        must hold for every spelling: names are compared folded, and a body naming one field in two
        spellings is refused as ambiguous."""
        self.capability = capability
        self.rules = rules
        self.fold_case = fold_case
        f = (lambda p: p.lower()) if fold_case else (lambda p: p)
        self.allow = [f(a) for a in rules.allow_fields] if rules.allow_fields is not None else None
        self.forbid = [f(x) for x in rules.forbid_fields]
        self.require = [f(x) for x in rules.require_fields]
        self.constraints = [_CompiledConstraint(f(p), c, re.compile(c.pattern) if c.pattern else None)
                            for p, c in rules.constraints.items()]
        self.needs_pre_image = any(c.c.needs_pre_image for c in self.constraints)
        # field path -> None (fine) or the rule refusing it; bodies repeat their fields request after
        # request, so each path is judged against the allow/forbid lists once (bounded memo)
        self._verdicts: dict[str, tuple[str, str] | None] = {}
        self._schema: Any = None
        self._form_schema: Any = None
        if rules.json_schema is not None:
            self._schema, self._form_schema = _build_schema_validators(rules.json_schema)

    def needs_pre_image_for(self, body: Any) -> bool:
        """Only a body that carries a field capped relative to the pre-image needs the record read."""
        if not self.needs_pre_image or not isinstance(body, dict):
            return False
        b = _fold(body) if self.fold_case else body
        return any(c.c.needs_pre_image and _lookup(b, c.path)[0] for c in self.constraints)

    def validate(self, kind: str, body: Any, pre_image: Any = None, *, relative: bool = True) -> None:
        """Raise TetherError(422 ...) on the first violation (fields before constraints before schema).
        ``relative=False`` leaves out the caps relative to the pre-image (the gateway checks them later,
        with :meth:`validate_relative`, once the request's intent record is durable)."""
        form = kind == "form"
        if kind == "other":
            raise TetherError("body_content_type_mismatch",
                              f"capability {self.capability!r} checks JSON or form bodies; this body is neither")
        if body is None:
            body = {}
        original = body
        if self.fold_case:
            body = _fold(body)
            pre_image = _fold(pre_image) if pre_image is not None else None
        if not isinstance(body, dict):
            if self.allow is not None or self.forbid or self.require or self.constraints:
                raise TetherError("schema_violation", "the body must be a JSON object for this capability",
                                  details={"field": "", "rule": "type: object"})
        else:
            verdicts = self._verdicts
            for path in flatten(body):
                try:
                    verdict = verdicts[path]
                except KeyError:
                    verdict = self._judge_field(path)
                    if len(verdicts) < 8192:
                        verdicts[path] = verdict
                if verdict is not None:
                    rule, f = verdict
                    if rule == "allow_fields":
                        raise TetherError("field_not_allowed",
                                          f"field {path!r} is not allowed by capability {self.capability!r} "
                                          f"(allowed: {', '.join(self.allow or ()) or 'none'})",
                                          details={"field": path, "rule": "allow_fields"})
                    raise TetherError("field_not_allowed",
                                      f"field {path!r} is forbidden by capability {self.capability!r}",
                                      details={"field": path, "rule": f"forbid_fields: {f}"})
            for req in self.require:
                if not _lookup(body, req)[0]:
                    raise TetherError("field_required", f"field {req!r} is required by capability {self.capability!r}",
                                      details={"field": req, "rule": "require_fields"})
            for cc in self.constraints:
                if relative or not cc.c.needs_pre_image:
                    self._check_constraint(cc, body, form, pre_image)
        validator = self._form_schema if form else self._schema
        if validator is not None:
            err = next(iter(sorted(validator.iter_errors(original), key=lambda e: list(e.absolute_path))), None)
            if err is not None:
                field = _json_path(err.absolute_path)
                raise TetherError("schema_violation",
                                  f"field {field or '(body)'!r}: {err.message} (schema rule: {err.validator})",
                                  details={"field": field, "rule": f"json_schema: {err.validator}"})

    def validate_relative(self, kind: str, body: Any, pre_image: Any, *, reveal: bool = True) -> None:
        """Only the caps relative to the pre-image. ``reveal=False``: a violation does not say the
        record's current value (for an agent that may not read that record)."""
        if not isinstance(body, dict):
            return
        form = kind == "form"
        if self.fold_case:
            body = _fold(body)
            pre_image = _fold(pre_image) if pre_image is not None else None
        for cc in self.constraints:
            if cc.c.needs_pre_image:
                self._check_constraint(cc, body, form, pre_image, reveal=reveal)

    def _judge_field(self, path: str) -> tuple[str, str] | None:
        if self.allow is not None and not any(_path_matches(path, a) for a in self.allow):
            return ("allow_fields", "")
        for f in self.forbid:
            if _path_matches(path, f):
                return ("forbid_fields", f)
        return None

    def _check_constraint(self, cc: _CompiledConstraint, body: Any, form: bool, pre_image: Any,
                          reveal: bool = True) -> None:
        found, value = _lookup(body, cc.path)
        if not found:
            return
        c = cc.c

        def fail(rule: str, why: str) -> TetherError:
            return TetherError("constraint_violated", f"field {cc.path!r} {why} (rule: {rule})",
                               details={"field": cc.path, "rule": rule})

        if c.type is not None and not _type_ok(value, c.type, form):
            raise fail(f"type: {c.type}", f"must be of type {c.type}")
        if c.enum is not None:
            ok = value in c.enum or (form and isinstance(value, str) and value in [str(e) for e in c.enum])
            if not ok:
                raise fail(f"enum: {c.enum}", f"must be one of {c.enum}, got {value!r}")
        if c.min is not None or c.max is not None:
            num = _as_number(value, form)
            if num is None:
                raise fail("min/max", "must be a number")
            if c.min is not None and num < c.min:
                raise fail(f"min: {c.min:g}", f"must be at least {c.min:g}, got {num:g}")
            if c.max is not None and num > c.max:
                raise fail(f"max: {c.max:g}", f"must be at most {c.max:g}, got {num:g}")
        if c.min_length is not None or c.max_length is not None:
            if not isinstance(value, (str, list)):
                raise fail("length", "must be a string or a list")
            if c.min_length is not None and len(value) < c.min_length:
                raise fail(f"min_length: {c.min_length}", f"is shorter than {c.min_length}")
            if c.max_length is not None and len(value) > c.max_length:
                raise fail(f"max_length: {c.max_length}", f"is longer than {c.max_length}")
        if cc.pattern is not None:
            if not isinstance(value, str) or cc.pattern.fullmatch(value) is None:
                raise fail(f"pattern: {c.pattern}", "does not match the required pattern")
        if c.needs_pre_image:
            found_old, old = _lookup(pre_image, cc.path) if pre_image is not None else (False, None)
            old_num = _as_number(old, True) if found_old else None
            new_num = _as_number(value, form)
            if old_num is None or new_num is None:
                raise fail("relative cap", "cannot be compared with the current record's value")
            values = f" (from {old_num:g} to {new_num:g})" if reveal else " of the record's current value"
            if c.max_increase is not None and new_num - old_num > c.max_increase:
                raise fail(f"max_increase: {c.max_increase:g}", f"may rise by at most {c.max_increase:g}{values}")
            if c.max_increase_pct is not None and old_num >= 0 and \
                    new_num > old_num * (1 + c.max_increase_pct / 100.0) + 1e-9:
                raise fail(f"max_increase_pct: {c.max_increase_pct:g}",
                           f"may rise by at most {c.max_increase_pct:g}%{values}")


def _fold(value: Any) -> Any:
    """Lower-case every object key; two spellings of one key are ambiguous."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            lk = k.lower() if isinstance(k, str) else k
            if lk in out:
                raise TetherError("ambiguous_request", f"field {k!r} is given in two spellings; this upstream "
                                                       "reads field names case-insensitively")
            out[lk] = _fold(v)
        return out
    if isinstance(value, list):
        return [_fold(v) for v in value]
    return value


def _type_ok(value: Any, t: str, form: bool) -> bool:
    if t == "string":
        return isinstance(value, str)
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            form and isinstance(value, str) and _INT_RE.fullmatch(value) is not None)
    if t == "number":
        return _as_number(value, form) is not None
    if t == "boolean":
        return isinstance(value, bool) or (form and value in ("true", "false"))
    if t == "object":
        return isinstance(value, dict)
    if t == "array":
        return isinstance(value, list)
    if t == "null":
        return value is None or (form and value == "")
    return True


def _json_path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (("." if out else "") + str(p))
    return out


def _build_schema_validators(schema: dict[str, Any]) -> tuple[Any, Any]:
    """A validator for JSON bodies, and one for form bodies that first reads each string as the type the
    schema expects there (``"5"`` as 5 where an integer is expected, ``{"0": x}`` as a list)."""
    from jsonschema import Draft202012Validator, validators

    cls = validators.validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    strict = cls(schema)

    class FormValidator:
        def iter_errors(self, body: Any) -> Any:
            return strict.iter_errors(coerce_form(body, schema))

    return strict, FormValidator()


def _types(schema: dict[str, Any]) -> list[str]:
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    return list(t) if isinstance(t, list) else []


def coerce_form(value: Any, schema: Any) -> Any:
    """Read form strings as the JSON types a schema expects (form encoding has strings only)."""
    if not isinstance(schema, dict):
        return value
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or ():
            coerced = coerce_form(value, sub)
            if coerced is not value:
                return coerced
    types = _types(schema)
    if isinstance(value, str):
        if "integer" in types and _INT_RE.fullmatch(value):
            return int(value)
        if "number" in types and _NUM_RE.fullmatch(value):
            f = float(value)
            return int(f) if f.is_integer() and "." not in value and "e" not in value.lower() else f
        if "boolean" in types and value in ("true", "false"):
            return value == "true"
        if "null" in types and value == "":
            return None
        return value
    if isinstance(value, dict):
        if "array" in types and value and all(k.isdigit() for k in value):
            return [coerce_form(value[k], schema.get("items", {})) for k in sorted(value, key=int)]
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        return {k: coerce_form(v, props.get(k, addl if isinstance(addl, dict) else {})) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_form(v, schema.get("items", {})) for v in value]
    return value


def validator_for(registry: Any, cap: Any) -> BodyValidator | None:
    """The compiled validator of a capability, cached on its Registry (built on first use)."""
    rules = cap.config.body
    if rules is None:
        return None
    cache = registry.validators
    v = cache.get(cap.name)
    if v is None:
        ad = registry.adapters.get(cap.upstream)  # none for an MCP upstream's tool: plain JSON arguments
        fold = ad is not None and ad.case_insensitive_fields
        v = cache[cap.name] = BodyValidator(cap.name, rules, fold_case=fold)
    return v
