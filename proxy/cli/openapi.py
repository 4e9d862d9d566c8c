"""Capabilities from an OpenAPI 3.x description: ``tether rules import-openapi``.

One capability per operation. What the importer decides, and why:

* **name** — the ``operationId`` in snake case when it is a plain identifier (Stripe's
  ``PostCustomersCustomer`` -> ``post_customers_customer``); otherwise (HubSpot's
  ``post-/crm/v3/objects/deals_create``, or no operationId at all as in Salesforce's spec) it is built
  from the path and the method: ``sobjects.account.by_id.patch``; a HubSpot-style id keeps its final
  verb (``crm.v3.objects.deals.create``). Every name gets the prefix ``<upstream>.`` (``--name-prefix``)
  and a ``_2``, ``_3`` suffix when it would repeat, so names are unique and plain YAML scalars.
* **effect** — from the method (GET/HEAD/OPTIONS read, the rest write), except a POST whose last path
  segment is ``search`` or ``query``, or whose path ends in ``/batch/read``: a query sent as a POST is
  a read. These are listed in the import report.
* **path** — the spec's template after ``--path-prefix`` (Salesforce's spec omits
  ``/services/data/v59.0``: give ``--path-prefix /services/data/{version}`` or the literal prefix).
  Parameter names Tether cannot use (``{object-type}``) are renamed (``{object_type}``); a template
  whose parameter is not a whole segment (``/files/{id}.json``), with a query, ``//``, ``.``/``..`` or
  ``%`` is skipped with a warning — Tether could not route it.
* **params** — a path parameter whose schema has an ``enum`` or an anchored ``pattern`` (``^...$``) gets
  that as its Tether pattern, so routes a literal would otherwise overlap stay apart; ``--param
  NAME=REGEX`` sets one for every template carrying ``{NAME}``.
* **body** — from ``requestBody``: JSON (``application/json``, ``*+json``, ``*/*``) first, then
  ``application/x-www-form-urlencoded`` (Stripe; the gateway reads form values leniently). The schema
  is resolved (``$ref`` to components and to relative files, memoised; a recursive schema keeps a
  ``$ref`` into a local ``$defs``), converted from OpenAPI 3.0 to JSON Schema 2020-12 (``nullable``,
  boolean ``exclusiveMinimum``) and stripped of annotations (descriptions, examples, titles) so the file
  stays readable; it goes into ``body.json_schema``. A ``multipart/form-data`` or other body cannot be
  inspected by the gateway, so it gets no body rules (the capability then "needs wrapping").
* **allow_fields** — the top-level properties of the body schema (``readOnly`` ones left out), when
  the schema lists properties and either declares ``additionalProperties: false`` or declares nothing
  about extra properties. The second case is a choice: in OpenAPI an unlisted property is merely not
  forbidden, but the list is the documented contract of the operation and Tether denies by default,
  so a field the spec does not document is refused (an upstream would reject or silently drop it
  anyway). A schema that declares a free-form map (``additionalProperties: true`` or a schema,
  ``patternProperties``) gets no ``allow_fields``. ``--allow-fields closed`` derives the list only
  from ``additionalProperties: false``; ``--allow-fields off`` never.
* **writes are dry-run** — with ``--agent NAME`` each read is granted plainly and each write as
  ``{capability: X, mode: dry_run}``, so the file says so; without a grant mode a write is dry-run
  anyway. Writes also carry ``compensation: auto`` explicitly, for a person to confirm or change.

Re-running into an existing ``--output`` file merges (see :func:`merge`): a state file beside it
(``<output>.import-state.json``) remembers what was generated last time, so a key the person changed,
added or deleted stays as the person left it, a key the person left alone follows the spec, new
operations are appended (never reordered: declaration order breaks routing ties), and operations that
vanished from the spec are reported, not deleted. A capability or a grant the person deleted is not
brought back. Without the state file (a file written by hand, or the state lost) every existing value
is taken as the person's: only keys and operations that are missing are added. Comments in an
existing file are not kept (the import says how many were dropped): keep imports in their own file.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import unquote

import orjson
import yaml

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHOLE_PARAM_RE = re.compile(r"\{([^{}/]+)\}")
_JSON_TYPES = ("application/json",)
_FORM_TYPE = "application/x-www-form-urlencoded"


class SpecError(Exception):
    """The description cannot be read or is not OpenAPI 3.x."""


# --------------------------------------------------------------------------- loading & refs


def load_document(path: str | Path) -> Any:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"{p}: cannot read: {exc.strerror or exc}") from None
    stripped = raw.lstrip()[:1]
    if stripped in (b"{", b"["):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise SpecError(f"{p}: not valid JSON: {exc}") from None
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return yaml.load(raw, Loader=loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid JSON or YAML: {exc}") from None


def _unescape(token: str) -> str:
    return unquote(token).replace("~1", "/").replace("~0", "~")


class Spec:
    """An OpenAPI document and the documents its ``$ref``s point into (relative files, cached)."""

    def __init__(self, doc: Any, path: str | Path | None = None) -> None:
        if not isinstance(doc, dict) or not str(doc.get("openapi", "")).startswith("3."):
            where = f"{path}: " if path else ""
            if isinstance(doc, dict) and "swagger" in doc:
                raise SpecError(f"{where}Swagger 2.0 is not supported; convert it to OpenAPI 3 first")
            raise SpecError(f"{where}not an OpenAPI 3.x description (no 'openapi: 3.x' key)")
        if not isinstance(doc.get("paths"), dict):
            raise SpecError(f"{path or 'spec'}: no 'paths'")
        self.doc = doc
        self.path = Path(path) if path else None
        self.version = str(doc["openapi"])
        self.is_30 = self.version.startswith("3.0")
        self.uri = str(self.path.resolve()) if self.path else "<spec>"
        self._docs: dict[str, Any] = {self.uri: doc}
        self.warnings: list[str] = []
        self.schemas = SchemaResolver(self)

    @classmethod
    def load(cls, path: str | Path) -> "Spec":
        return cls(load_document(path), path)

    def document(self, uri: str) -> Any:
        if uri not in self._docs:
            self._docs[uri] = load_document(uri)
        return self._docs[uri]

    def split_ref(self, ref: str, base: str) -> tuple[str, str]:
        """'#/a/b' or 'file.yaml#/a' relative to the document ``base`` -> (document uri, pointer)."""
        target, _, pointer = ref.partition("#")
        if not target:
            return base, pointer
        if re.match(r"^[a-z][a-z0-9+.-]*://", target):
            raise SpecError(f"remote $ref {ref!r} is not supported (no network): save it beside the spec")
        return str((Path(base).parent / target).resolve()) if base != "<spec>" else target, pointer

    def pointer(self, uri: str, pointer: str) -> Any:
        node = self.document(uri)
        for token in [t for t in pointer.split("/")[1:]] if pointer else []:
            token = _unescape(token)
            if isinstance(node, list):
                try:
                    node = node[int(token)]
                except (ValueError, IndexError):
                    raise SpecError(f"$ref {pointer!r}: no item {token!r}") from None
            elif isinstance(node, dict) and token in node:
                node = node[token]
            else:
                raise SpecError(f"$ref {pointer!r} does not resolve (no {token!r})")
        return node

    def deref(self, obj: Any, base: str | None = None) -> tuple[Any, str]:
        """Follow a chain of ``$ref`` (parameters, request bodies, path items) -> (object, its document)."""
        base = base or self.uri
        seen: set[tuple[str, str]] = set()
        while isinstance(obj, dict) and isinstance(obj.get("$ref"), str):
            uri, ptr = self.split_ref(obj["$ref"], base)
            if (uri, ptr) in seen:
                raise SpecError(f"$ref cycle at {obj['$ref']!r}")
            seen.add((uri, ptr))
            obj, base = self.pointer(uri, ptr), uri
        return obj, base


# JSON Schema keywords whose value is a schema, a map of schemas, or a list of schemas.
_SUB_SCHEMA = frozenset({"items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else",
                         "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema"})
_SUB_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SUB_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
# Annotations only: dropped so the generated file stays readable (validation is unchanged).
_DROP = frozenset({"description", "example", "examples", "externalDocs", "xml", "discriminator", "deprecated",
                   "title", "readOnly", "writeOnly", "default", "$comment", "nullable", "$schema", "$id"})
_MAX_DEPTH = 48


class SchemaResolver:
    """Resolves and converts schemas, memoised per ``$ref`` target.

    A referenced schema is converted once and shared (the YAML writer never emits aliases). When a
    schema refers back to one being expanded, the inner reference becomes ``{"$ref": "#/$defs/Name"}``
    and ``Name`` is added to the ``$defs`` of the top-level schema being built, so recursion is kept
    exactly instead of being cut or expanded forever."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._memo: dict[tuple[str, str], tuple[Any, frozenset[tuple[str, str]]]] = {}
        self._names: dict[tuple[str, str], str] = {}
        self._taken: set[str] = set()

    def def_name(self, key: tuple[str, str]) -> str:
        name = self._names.get(key)
        if name is None:
            base = re.sub(r"[^A-Za-z0-9_.-]", "_", _unescape(key[1].rsplit("/", 1)[-1]) or "root") or "schema"
            name, n = base, 1
            while name in self._taken:
                n += 1
                name = f"{base}_{n}"
            self._taken.add(name)
            self._names[key] = name
        return name

    def resolve(self, schema: Any, base: str | None = None) -> Any:
        """A self-contained JSON Schema 2020-12 for ``schema`` (refs inlined, recursion via $defs)."""
        needed: set[tuple[str, str]] = set()
        out = self._conv(schema, base or self.spec.uri, (), needed)
        if not needed:
            return out
        defs: dict[str, Any] = {}
        todo = list(needed)
        done: set[tuple[str, str]] = set()
        while todo:
            key = todo.pop()
            if key in done:
                continue
            done.add(key)
            more: set[tuple[str, str]] = set()
            defs[self.def_name(key)] = self._ref(key, (key,), more)
            todo.extend(more - done)
        _break_ref_loops(defs)
        if isinstance(out, dict):
            out = dict(out)
            out["$defs"] = {**out.get("$defs", {}), **dict(sorted(defs.items()))}
        return out

    def _ref(self, key: tuple[str, str], stack: tuple[tuple[str, str], ...], needed: set[tuple[str, str]]) -> Any:
        hit = self._memo.get(key)
        if hit is not None:
            needed |= hit[1]
            return hit[0]
        target = self.spec.pointer(*key)
        mine: set[tuple[str, str]] = set()
        out = self._conv(target, key[0], stack, mine)
        self._memo[key] = (out, frozenset(mine))
        needed |= mine
        return out

    def _conv(self, node: Any, base: str, stack: tuple[tuple[str, str], ...], needed: set[tuple[str, str]]) -> Any:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            return {}
        ref = node.get("$ref")
        if isinstance(ref, str):
            key = self.spec.split_ref(ref, base)
            if key in stack or len(stack) >= _MAX_DEPTH:
                needed.add(key)
                resolved: Any = {"$ref": f"#/$defs/{self.def_name(key)}"}
            else:
                resolved = self._ref(key, stack + (key,), needed)
            if self.spec.is_30:
                return resolved  # OpenAPI 3.0: siblings of $ref are ignored
            rest = {k: v for k, v in node.items() if k != "$ref"}
            rest_conv = self._conv(rest, base, stack, needed) if rest else {}
            return {"allOf": [resolved, rest_conv]} if rest_conv else resolved
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k in _DROP or (isinstance(k, str) and k.startswith("x-")):
                continue
            if k in _SUB_SCHEMA:
                if k == "items" and isinstance(v, list):
                    out["prefixItems"] = [self._conv(s, base, stack, needed) for s in v]
                else:
                    out[k] = self._conv(v, base, stack, needed)
            elif k in _SUB_MAP and isinstance(v, dict):
                out[k] = {name: self._conv(s, base, stack, needed) for name, s in v.items()}
            elif k in _SUB_LIST and isinstance(v, list):
                out[k] = [self._conv(s, base, stack, needed) for s in v]
            elif k in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(v, bool):
                bound = "minimum" if k == "exclusiveMinimum" else "maximum"
                if v and bound in node:
                    out[k] = node[bound]
            elif k in ("minimum", "maximum") and node.get("exclusive" + k[:1].upper() + k[1:]) is True:
                continue  # became exclusiveMinimum / exclusiveMaximum
            elif k == "required" and isinstance(v, list) and not v:
                continue  # an empty 'required' was invalid before 2019-09; it means nothing anyway
            else:
                out[k] = v
        if node.get("nullable") is True:
            t = out.get("type")
            if isinstance(t, str):
                out["type"] = [t, "null"]
                if isinstance(out.get("enum"), list) and None not in out["enum"]:
                    out["enum"] = [*out["enum"], None]
            elif isinstance(t, list):
                if "null" not in t:
                    out["type"] = [*t, "null"]
            elif out:
                out = {"anyOf": [out, {"type": "null"}]}
        return out


def _break_ref_loops(defs: dict[str, Any]) -> None:
    """A definition that is only a $ref, in a chain leading back to itself (``A: {$ref: A}``, A -> B ->
    A), describes nothing and would send a validator round forever: such definitions become ``{}``."""

    def target(name: str) -> str | None:
        d = defs.get(name)
        if isinstance(d, dict) and set(d) == {"$ref"} and str(d["$ref"]).startswith("#/$defs/"):
            return str(d["$ref"])[len("#/$defs/"):]
        return None

    for name in list(defs):
        chain, cur = [name], target(name)
        while cur is not None and cur not in chain:
            chain.append(cur)
            cur = target(cur)
        if cur is not None:  # looped
            for n in chain[chain.index(cur):]:
                defs[n] = {}


# --------------------------------------------------------------------------- operations


@dataclass
class SpecOperation:
    """One operation of the description, mapped (or not) onto a Tether route."""

    method: str  # upper case
    spec_path: str
    operation_id: str | None
    summary: str
    raw: dict[str, Any]
    path_item: dict[str, Any]
    base: str
    template: str | None = None  # the Tether template (with prefix), None when it cannot be routed
    skip_reason: str | None = None
    renamed_params: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.method} {self.spec_path}"


def _param_name(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not clean or not re.match(r"[A-Za-z_]", clean):
        clean = "p_" + clean
    return clean


def to_template(spec_path: str, prefix: str = "") -> tuple[str | None, str | None, dict[str, str]]:
    """Spec path -> (Tether template, why not, renamed params {spec name: template name})."""
    if "?" in spec_path or "#" in spec_path:
        return None, "the path carries a query or fragment", {}
    full = prefix.rstrip("/") + "/" + spec_path.lstrip("/") if prefix else spec_path
    if not full.startswith("/"):
        full = "/" + full
    if full != "/":
        full = full.rstrip("/") or "/"
    renamed: dict[str, str] = {}
    used: set[str] = set()
    out: list[str] = []
    for seg in full.strip("/").split("/") if full != "/" else []:
        if not seg:
            return None, "empty path segment ('//')", {}
        if "{" in seg or "}" in seg:
            m = _WHOLE_PARAM_RE.fullmatch(seg)
            if m is None:
                return None, f"segment {seg!r}: a parameter that is not a whole segment cannot be routed", {}
            orig = m.group(1)
            name = _param_name(orig)
            base_name, n = name, 1
            while name in used:
                n += 1
                name = f"{base_name}_{n}"
            used.add(name)
            if name != orig:
                renamed[orig] = name
            out.append("{" + name + "}")
        elif seg in (".", "..") or "%" in seg:
            return None, f"segment {seg!r} is not allowed in a Tether template", {}
        else:
            out.append(seg)
    return "/" + "/".join(out), None, renamed


def validate_prefix(prefix: str) -> str:
    """Check a --path-prefix: literal segments and whole {param} segments."""
    if not prefix:
        return ""
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    t, why, renamed = to_template("/", prefix)
    if t is None or renamed:
        raise SpecError(f"--path-prefix {prefix!r}: {why or 'parameter names are letters, digits and _'}")
    return t if t != "/" else ""


def iter_operations(spec: Spec, prefix: str = "") -> Iterator[SpecOperation]:
    """Every operation, in document order, with its Tether template (or why it has none)."""
    for spec_path, item in spec.doc["paths"].items():
        if not isinstance(item, dict):
            continue
        try:
            item, base = spec.deref(item)
        except SpecError as exc:
            spec.warnings.append(f"{spec_path}: {exc}")
            continue
        template, why, renamed = to_template(str(spec_path), prefix)
        for m in HTTP_METHODS:
            op = item.get(m)
            if not isinstance(op, dict):
                continue
            summary = str(op.get("summary") or op.get("description") or item.get("summary") or "").strip()
            opid = op.get("operationId")
            yield SpecOperation(method=m.upper(), spec_path=str(spec_path),
                                operation_id=str(opid) if opid is not None else None,
                                summary=summary, raw=op, path_item=item, base=base, template=template,
                                skip_reason=why, renamed_params=renamed)


def shape(template: str) -> tuple[str, ...]:
    """Segments with every parameter as '{}': two templates route alike when their shapes are equal."""
    return tuple("{}" if s.startswith("{") else s for s in template.strip("/").split("/") if s)


# --------------------------------------------------------------------------- naming


def snake(text: str) -> str:
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    s = re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()
    return re.sub(r"_+", "_", s)


_CLEAN_OPID = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")


def base_name(op: SpecOperation) -> str:
    """The capability name before the prefix and de-duplication (see the module docstring)."""
    opid = op.operation_id or ""
    if opid and _CLEAN_OPID.fullmatch(opid):
        parts = [snake(p) for p in opid.split(".") if snake(p)]
        if parts:
            return ".".join(parts)
    words = []
    for seg in op.spec_path.strip("/").split("/"):
        if not seg:
            continue
        m = _WHOLE_PARAM_RE.fullmatch(seg)
        w = "by_" + snake(m.group(1)) if m else snake(seg)
        if w and w != "by_":
            words.append(w)
    verb = op.method.lower()
    if opid:
        tail = opid.rsplit("_", 1)[-1] if "_" in opid else ""
        if tail and _CLEAN_OPID.fullmatch(tail):
            verb = snake(tail)
    if words and verb == words[-1]:
        verb = ""  # batch/read + read -> batch.read
    elif words and verb.endswith("_" + words[-1]):
        words.pop()  # search + do_search -> do_search
    name = ".".join([w for w in words + [verb] if w]) or op.method.lower()
    if not re.match(r"[a-z]", name):
        name = "op_" + name
    return name


def unique_name(name: str, taken: set[str]) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}_{n}"
    return out


# --------------------------------------------------------------------------- filters


def matches(op: SpecOperation, patterns: Iterable[str], name: str | None = None) -> bool:
    """Does a glob (or ``re:REGEX``) match the operationId, the path, 'METHOD /path' or the name?"""
    subjects = [op.spec_path, op.key, op.method.lower() + " " + op.spec_path]
    if op.template:
        subjects.append(op.template)
    if op.operation_id:
        subjects.append(op.operation_id)
    if name:
        subjects.append(name)
    for pat in patterns:
        if pat.startswith("re:"):
            rx = re.compile(pat[3:])
            if any(rx.search(s) for s in subjects):
                return True
        elif any(fnmatch.fnmatchcase(s, pat) for s in subjects):
            return True
    return False


# --------------------------------------------------------------------------- capabilities


@dataclass
class ImportOptions:
    upstream: str
    path_prefix: str = ""
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    name_prefix: str | None = None  # default "<upstream>."
    params: dict[str, str] = field(default_factory=dict)
    allow_fields: str = "auto"  # auto | closed | off

    @property
    def prefix(self) -> str:
        return f"{self.upstream}." if self.name_prefix is None else self.name_prefix


@dataclass
class Imported:
    """What one import produced: capability dicts keyed by name, and what the report must say."""

    capabilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    op_of: dict[str, str] = field(default_factory=dict)  # capability name -> operation key
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (operation key, reason)
    filtered_out: set[str] = field(default_factory=set)  # operation keys excluded by filters
    post_reads: list[str] = field(default_factory=list)
    no_body_rules: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    operations: int = 0


def is_post_read(method: str, spec_path: str) -> bool:
    if method != "POST":
        return False
    segs = [s for s in spec_path.strip("/").split("/") if s]
    return bool(segs) and (segs[-1].lower() in ("search", "query") or
                           [s.lower() for s in segs[-2:]] == ["batch", "read"])


def _parameters(spec: Spec, op: SpecOperation) -> list[dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for src in (op.path_item.get("parameters") or [], op.raw.get("parameters") or []):
        for p in src:
            try:
                p, _ = spec.deref(p, op.base)
            except SpecError:
                continue
            if isinstance(p, dict) and "name" in p:
                out[(str(p.get("in")), str(p["name"]))] = p
    return list(out.values())


def _param_pattern(spec: Spec, param: dict[str, Any], base: str) -> str | None:
    try:
        schema, _ = spec.deref(param.get("schema") or {}, base)
    except SpecError:
        return None
    if not isinstance(schema, dict):
        return None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in enum):
        return "|".join(re.escape(str(e)) for e in enum)
    pat = schema.get("pattern")
    if isinstance(pat, str) and pat.startswith("^") and pat.endswith("$") and not pat.endswith("\\$"):
        inner = pat[1:-1]
        if inner in (".+", ".*", "[^/]+", "(.+)", "(.*)"):
            return None
        try:
            re.compile(inner)
        except re.error:
            return None
        return inner
    return None


def _media(content: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The request media type the gateway can inspect: JSON first, then a form; None if neither."""
    types = {str(k).split(";")[0].strip().lower(): v for k, v in content.items() if isinstance(v, dict)}
    for mt, media in types.items():
        if mt in _JSON_TYPES or (mt.startswith("application/") and mt.endswith("+json")):
            return "json", media
    if _FORM_TYPE in types:
        return "form", types[_FORM_TYPE]
    if "*/*" in types or "application/*" in types:
        return "json", types.get("*/*") or types["application/*"]
    return None


def _top_properties(spec: Spec, schema: Any, base: str, depth: int = 0) -> tuple[list[str], bool | None]:
    """(property names, closed?) of a body schema's top level. closed: True when additionalProperties is
    false, None when nothing is said, False when extra properties are declared allowed."""
    if depth > 16:
        return [], False
    try:
        schema, base = spec.deref(schema, base)
    except SpecError:
        return [], False
    if not isinstance(schema, dict):
        return [], False
    names: list[str] = []
    closed: bool | None = None
    props = schema.get("properties")
    if isinstance(props, dict):
        for name, sub in props.items():
            try:
                sub_d, _ = spec.deref(sub, base)
            except SpecError:
                sub_d = sub
            if isinstance(sub_d, dict) and sub_d.get("readOnly") is True:
                continue
            names.append(str(name))
    ap = schema.get("additionalProperties")
    if ap is False:
        closed = True
    elif ap is not None or schema.get("patternProperties"):
        closed = False
    for member in schema.get("allOf") or []:
        sub_names, sub_closed = _top_properties(spec, member, base, depth + 1)
        names.extend(n for n in sub_names if n not in names)
        if sub_closed is False:
            closed = False
    branches = (schema.get("oneOf") or []) + (schema.get("anyOf") or [])
    if branches:
        states = []
        for member in branches:
            sub_names, sub_closed = _top_properties(spec, member, base, depth + 1)
            names.extend(n for n in sub_names if n not in names)
            states.append(sub_closed)
        if any(s is False for s in states):
            closed = False
        elif closed is None and states and all(s is True for s in states):
            closed = True
    if not names and closed is None and not props:
        closed = False  # says nothing about fields at all: free-form
    return names, closed


def body_rules(spec: Spec, op: SpecOperation, mode: str) -> tuple[dict[str, Any] | None, str | None]:
    """(body rules for the capability, why there are none)."""
    rb = op.raw.get("requestBody")
    if rb is None:
        return None, None
    try:
        rb, base = spec.deref(rb, op.base)
    except SpecError as exc:
        return None, str(exc)
    content = rb.get("content") if isinstance(rb, dict) else None
    if not isinstance(content, dict) or not content:
        return None, "the request body declares no content"
    picked = _media(content)
    if picked is None:
        return None, f"request body {', '.join(map(str, content))} cannot be inspected by the gateway"
    kind, media = picked
    schema = media.get("schema")
    if schema is None:
        return None, "the request body has no schema"
    body: dict[str, Any] = {}
    names, closed = _top_properties(spec, schema, base)
    if mode != "off" and (closed is True or (mode == "auto" and closed is None and names)):
        body["allow_fields"] = names
    try:
        body["json_schema"] = spec.schemas.resolve(schema, base)
    except SpecError as exc:
        return (body or None), f"schema not resolved: {exc}"
    return body, None


def _description(op: SpecOperation) -> str:
    import html

    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", op.summary)).split())
    if len(text) > 160:
        text = text[:157].rstrip() + "..."
    return text


def build_capability(spec: Spec, op: SpecOperation, opts: ImportOptions) -> tuple[dict[str, Any], str | None]:
    assert op.template is not None
    effect = "read" if op.method in READ_METHODS or is_post_read(op.method, op.spec_path) else "write"
    cap: dict[str, Any] = {"upstream": opts.upstream, "method": op.method, "path": op.template, "effect": effect}
    desc = _description(op)
    if desc:
        cap["description"] = desc
    params: dict[str, str] = {}
    template_names = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", op.template))
    for p in _parameters(spec, op):
        if p.get("in") != "path":
            continue
        name = op.renamed_params.get(str(p["name"]), str(p["name"]))
        pat = _param_pattern(spec, p, op.base)
        if pat and name in template_names:
            params[name] = pat
    for name, pat in opts.params.items():
        if name in template_names:
            params[name] = pat
    if params:
        cap["params"] = dict(sorted(params.items()))
    why = None
    if op.raw.get("requestBody") is not None:
        body, why = body_rules(spec, op, opts.allow_fields)
        if body and op.method in ("GET", "HEAD", "OPTIONS", "DELETE") and not body.get("allow_fields"):
            body, why = None, None  # e.g. Stripe declares an empty form body on every GET and DELETE
        if body:
            cap["body"] = body
    if effect == "write":
        cap["compensation"] = "auto"
    return cap, why


def import_operations(spec: Spec, opts: ImportOptions, taken: set[str] | None = None,
                      names_by_op: dict[str, str] | None = None) -> Imported:
    """Capabilities for every operation that passes the filters. ``names_by_op`` keeps the names an
    earlier import gave (so a re-run after a rename in the spec's operationId keeps the old name);
    ``taken`` are names used by other capabilities of the file."""
    prefix = validate_prefix(opts.path_prefix)
    taken = set(taken or ())
    names_by_op = names_by_op or {}
    res = Imported()
    for op in iter_operations(spec, prefix):
        res.operations += 1
        name = names_by_op.get(op.key) or unique_name(opts.prefix + base_name(op), taken)
        if (opts.include and not matches(op, opts.include, name)) or (opts.exclude and matches(op, opts.exclude, name)):
            res.filtered_out.add(op.key)
            continue
        if op.template is None:
            res.skipped.append((op.key, op.skip_reason or "cannot be routed"))
            continue
        taken.add(name)
        try:
            cap, why = build_capability(spec, op, opts)
        except SpecError as exc:
            res.skipped.append((op.key, str(exc)))
            continue
        res.capabilities[name] = cap
        res.op_of[name] = op.key
        if cap.get("effect") == "read" and op.method not in READ_METHODS:
            res.post_reads.append(name)
        if why:
            res.no_body_rules.append(f"{name}: {why}")
    res.warnings.extend(spec.warnings)
    return res


# --------------------------------------------------------------------------- merge


_MISSING = object()


def merge_values(base: Any, mine: Any, theirs: Any) -> Any:
    """Three-way merge of one value. ``base`` is what the last import generated (``_MISSING`` when
    unknown), ``mine`` what the file holds now, ``theirs`` what this import generates. Returns
    ``_MISSING`` to drop the key."""
    if mine is _MISSING:
        if base is _MISSING:
            return theirs  # new in the spec (or never generated): add
        return _MISSING  # the person deleted it: keep it deleted
    if base is not _MISSING and mine == base:
        return theirs  # untouched by the person: follow the spec (theirs may be _MISSING: dropped)
    if isinstance(mine, dict) and isinstance(theirs, dict):
        b = base if isinstance(base, dict) else {}
        out: dict[str, Any] = {}
        for k in list(mine) + [k for k in theirs if k not in mine]:
            v = merge_values(b.get(k, _MISSING) if base is not _MISSING else _MISSING,
                             mine.get(k, _MISSING), theirs.get(k, _MISSING))
            if v is not _MISSING:
                out[k] = v
        return out
    return mine  # the person changed or added it: theirs loses


@dataclass
class MergeReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept_edits: list[str] = field(default_factory=list)
    vanished: list[tuple[str, str]] = field(default_factory=list)  # (capability, operation key)
    grants_added: list[str] = field(default_factory=list)
    grants_not_restored: list[str] = field(default_factory=list)
    removed_by_hand: list[tuple[str, str]] = field(default_factory=list)  # (capability, operation key)
    comments_dropped: int = 0


def default_upstream(spec: Spec, name: str, url: str | None, adapter: str) -> dict[str, Any]:
    if not url:
        for server in spec.doc.get("servers") or []:
            u = str(server.get("url", "")) if isinstance(server, dict) else ""
            for var, spec_var in ((server.get("variables") or {}).items() if isinstance(server, dict) else []):
                if isinstance(spec_var, dict) and "default" in spec_var:
                    u = u.replace("{" + var + "}", str(spec_var["default"]))
            if re.match(r"^https?://[^/\s?#{}]+(/[^\s?#{}]*)?$", u):
                url = u.rstrip("/")
                break
    env = re.sub(r"[^A-Za-z0-9]+", "_", name).upper().strip("_") + "_TOKEN"
    return {"url": url or f"https://{re.sub(r'[^a-z0-9-]+', '-', name.lower())}.invalid",
            "adapter": adapter, "credentials": {"type": "bearer", "token_env": env}}


def merge(existing: dict[str, Any] | None, state: dict[str, Any] | None, imported: Imported, opts: ImportOptions,
          *, upstream: dict[str, Any], agent: str | None) -> tuple[dict[str, Any], dict[str, Any], MergeReport]:
    """The new rules document and import state. ``existing`` is the current file (None: new file)."""
    report = MergeReport()
    doc: dict[str, Any] = copy.deepcopy(existing) if existing else {
        "version": 1,
        "identity": {"hs_secret": {"env": "TETHER_DEV_JWT_SECRET"}},
    }
    doc.setdefault("version", 1)
    ups = doc.setdefault("upstreams", {}) or {}
    doc["upstreams"] = ups
    if opts.upstream not in ups:
        ups[opts.upstream] = upstream
    caps: dict[str, Any] = doc.get("capabilities") or {}
    up_state = ((state or {}).get("upstreams") or {}).get(opts.upstream) or {}
    generated_before: dict[str, Any] = up_state.get("capabilities") or {}
    ops_before: dict[str, str] = up_state.get("operations") or {}  # op key -> capability name

    # which existing capability stands for each imported operation
    by_route: dict[tuple[str, str, tuple[str, ...]], str] = {}
    for cname, c in caps.items():
        if isinstance(c, dict) and c.get("upstream") == opts.upstream and isinstance(c.get("path"), str):
            by_route.setdefault((opts.upstream, str(c.get("method")), shape(c["path"])), cname)

    new_caps: dict[str, Any] = dict(caps)
    new_state_caps: dict[str, Any] = {}
    new_ops: dict[str, str] = {}
    for name, gen in imported.capabilities.items():
        key = imported.op_of[name]
        target = ops_before.get(key)
        if target is not None and target not in caps and existing is not None and \
                by_route.get((opts.upstream, gen["method"], shape(gen["path"]))) is None:
            # imported before, then deleted by a person: not brought back
            report.removed_by_hand.append((target, key))
            new_state_caps[target] = gen
            new_ops[key] = target
            continue
        if target not in caps:
            target = by_route.get((opts.upstream, gen["method"], shape(gen["path"])))
        if target is None and name in caps:
            target = name
        if target is None or target not in caps:
            new_caps[name] = gen
            report.added.append(name)
            new_state_caps[name] = gen
            new_ops[key] = name
            continue
        mine = caps[target]
        base = generated_before.get(target, _MISSING)
        merged = merge_values(base, mine, gen)
        if merged is _MISSING:
            merged = mine
        new_caps[target] = merged
        new_state_caps[target] = gen
        new_ops[key] = target
        if merged == mine:
            report.unchanged.append(target)
        else:
            report.updated.append(target)
        if merged != gen:
            report.kept_edits.append(target)
    doc["capabilities"] = new_caps

    # operations that were imported before (or capabilities of this upstream) and are gone now
    seen_targets = {v for v in new_ops.values() if v in new_caps}
    filtered = imported.filtered_out
    for key, cname in ops_before.items():
        if key not in new_ops and key not in filtered and cname in new_caps and cname not in seen_targets:
            report.vanished.append((cname, key))
    if not ops_before and existing:
        for cname, c in caps.items():
            if (isinstance(c, dict) and c.get("upstream") == opts.upstream and cname not in seen_targets
                    and not _filtered_capability(c, opts)):
                report.vanished.append((cname, f"{c.get('method')} {c.get('path')}"))

    grants_state: dict[str, list[str]] = dict(up_state.get("grants") or {})
    granted_before = set(grants_state.get(agent, [])) if agent else set()
    if agent:
        agents = doc.setdefault("agents", {}) or {}
        doc["agents"] = agents
        a = agents.setdefault(agent, {}) or {}
        agents[agent] = a
        grants = a.setdefault("grants", []) or []
        a["grants"] = grants
        held = {g if isinstance(g, str) else g.get("capability") for g in grants if isinstance(g, (str, dict))}
        for name in sorted(seen_targets, key=list(new_caps).index):
            if name in held:
                continue
            if name in granted_before:
                report.grants_not_restored.append(name)  # granted by an earlier import, removed by a person
                continue
            c = new_caps[name]
            effect = c.get("effect") or ("read" if c.get("method") in READ_METHODS else "write")
            grants.append(name if effect == "read" else {"capability": name, "mode": "dry_run"})
            report.grants_added.append(name)
        grants_state[agent] = sorted(granted_before | set(report.grants_added) | (held & seen_targets))

    # keep the conventional key order
    order = ["version", "server", "identity", "governance", "upstreams", "agents", "capabilities"]
    doc = {k: doc[k] for k in order if k in doc} | {k: v for k, v in doc.items() if k not in order}
    new_state = copy.deepcopy(state) if state else {}
    new_state.setdefault("upstreams", {})
    # remember operations of earlier runs that this run filtered out, so a later run still knows them
    keep_ops = {k: v for k, v in ops_before.items() if k in filtered and v in new_caps}
    keep_caps = {v: generated_before[v] for v in keep_ops.values() if v in generated_before}
    new_state["upstreams"][opts.upstream] = {
        "path_prefix": opts.path_prefix,
        "operations": {**keep_ops, **new_ops},
        "capabilities": {**keep_caps, **new_state_caps},
        **({"grants": grants_state} if grants_state else {}),
    }
    return doc, new_state, report


def _filtered_capability(cap: dict[str, Any], opts: ImportOptions) -> bool:
    """Is an existing capability outside this run's --include/--exclude (so not 'vanished')?"""
    if not opts.include and not opts.exclude:
        return False
    path = str(cap.get("path", ""))
    op = SpecOperation(method=str(cap.get("method")), spec_path=path, operation_id=None, summary="", raw={},
                       path_item={}, base="", template=path)
    return bool((opts.include and not matches(op, opts.include)) or (opts.exclude and matches(op, opts.exclude)))


# --------------------------------------------------------------------------- YAML output


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Never emits anchors/aliases (shared schemas are written out in full), keeps key order."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _Block(dict):  # type: ignore[type-arg]
    """A mapping always written in block style (the small leaf mappings inside stay in flow style)."""


_Dumper.add_representer(_Block, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data.items(),
                                                                     flow_style=False))


def _dump(value: Any) -> str:
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True,
                     width=120)


def _blocks(value: Any, depth: int) -> Any:
    """Block style for the outer ``depth`` levels of mappings."""
    if depth <= 0 or not isinstance(value, dict):
        return value
    return _Block({k: _blocks(v, depth - 1) for k, v in value.items()})


HEADER = """\
# Generated by `tether rules import-openapi` and meant to be edited: re-running the import merges,
# keeping what you changed (see proxy/cli/openapi.py). Writes are dry-run: grants added with --agent say
# `mode: dry_run`, and a write granted without a mode is dry-run too, until promoted.
"""


def render(doc: dict[str, Any], header: str = HEADER) -> str:
    """The rules document as YAML, one blank line between capabilities."""
    parts = [header.rstrip("\n") + "\n"] if header else []
    for key, value in doc.items():
        if key == "capabilities" and isinstance(value, dict) and value:
            parts.append("capabilities:\n")
            chunks = []
            for name, cap in value.items():
                text = _dump(_blocks({name: cap}, 3))
                chunks.append("".join("  " + line if line.strip() else line for line in text.splitlines(True)))
            parts.append("\n".join(chunks))
        else:
            parts.append(_dump(_blocks({key: value}, 3)))
    return "".join(parts)


def load_existing(path: Path) -> tuple[dict[str, Any] | None, int]:
    """(document, number of comment lines that a rewrite will drop) of an existing output file."""
    if not path.exists():
        return None, 0
    from ..config import _yaml_loader

    text = path.read_text(encoding="utf-8")
    data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
    if data is None:
        return None, 0
    if not isinstance(data, dict):
        raise SpecError(f"{path}: not a rules file (not a mapping)")
    header = set(HEADER.splitlines())
    comments = sum(1 for line in text.splitlines() if line.lstrip().startswith("#") and line not in header)
    return data, comments


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".import-state.json")


def load_state(output: Path) -> dict[str, Any] | None:
    p = state_path(output)
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def dump_state(state: dict[str, Any]) -> str:
    return json.dumps(state, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
