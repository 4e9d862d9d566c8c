"""The rules file: parsed once, validated completely, frozen.

A rules file (YAML) declares upstreams, agents with their grants, and capabilities. It is parsed into
frozen pydantic models with ``extra="forbid"`` so that a typo is an error, not a silently ignored key.
Validation collects *every* problem (schema errors and cross-references such as a grant naming an
unknown capability) and raises one :class:`ConfigError` whose lines each name the file, the key path
and the reason — the way a person fixes a file is by reading all of them at once.

The hot path never re-reads these objects' raw form: :mod:`proxy.policy.registry` compiles them into
matchers and lookup tables at startup (and on hot reload).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """'90s', '5m', '1h', '30d', or a number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '90s', '5m', '1h', '30d'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (use seconds or '90s', '5m', '1h', '30d')")


Duration = Annotated[float, BeforeValidator(parse_duration)]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(value: Any) -> int:
    """'10MB', '512k', or a number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower() if m.group(2) else None]
    raise ValueError(f"{value!r} is not a size (use bytes or '512k', '10MB')")


Size = Annotated[int, BeforeValidator(parse_size)]


class Model(BaseModel):
    """Base for every config object: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- secrets


class SecretRef(Model):
    """Where a secret comes from: an environment variable, a file (a Kubernetes secret mount,
    re-read when it changes), or an inline value (development only)."""

    env: str | None = None
    file: Path | None = None
    value: SecretStr | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        given = [k for k in ("env", "file", "value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file or value")
        return self


def _fold_secret_shorthands(data: Any, names: tuple[str, ...]) -> Any:
    """Accept ``token_env: X`` / ``token_file: /p`` as shorthands for ``token: {env: X}``."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name in names:
        for suffix in ("env", "file"):
            key = f"{name}_{suffix}"
            if key in data:
                if name in data:
                    raise ValueError(f"give either {name} or {key}, not both")
                data[name] = {suffix: data.pop(key)}
        if isinstance(data.get(name), str):
            data[name] = {"value": data[name]}
    return data


# --------------------------------------------------------------------------- upstreams


class RateLimit(Model):
    """A token bucket: ``per_minute`` refill rate, ``burst`` capacity (default: per_minute)."""

    per_minute: float = Field(gt=0)
    burst: int | None = Field(None, gt=0)


class NoCredentials(Model):
    type: Literal["none"]


class BearerCredentials(Model):
    type: Literal["bearer"]
    token: SecretRef

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("token",))


class BasicCredentials(Model):
    type: Literal["basic"]
    username: str
    password: SecretRef

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("password",))


class ApiKeyCredentials(Model):
    type: Literal["api_key"]
    header: str = "X-Api-Key"
    prefix: str = ""
    value: SecretRef

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("value",))


class OAuth2ClientCredentials(Model):
    type: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: str
    client_secret: SecretRef
    scope: str | None = None
    audience: str | None = None
    auth_method: Literal["basic", "post"] = "basic"
    refresh_before: Duration = 60.0

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("client_secret",))


Credentials = Annotated[
    Union[NoCredentials, BearerCredentials, BasicCredentials, ApiKeyCredentials, OAuth2ClientCredentials],
    Field(discriminator="type"),
]


class Timeouts(Model):
    """``connect``: to open a connection (past it: 502 upstream_unavailable). ``read``: the longest wait
    for the response headers and between body chunks (past it: 504 upstream_timeout). ``pool``: the
    longest wait for a connection when ``max_connections`` are busy (past it: 503 upstream_busy)."""

    connect: Duration = 5.0
    read: Duration = 60.0
    pool: Duration = 10.0


class TLSConfig(Model):
    """A certificate and key for a listener that must speak https (simple-salesforce insists)."""

    cert: Path
    key: Path


class ClientCertificate(Model):
    """The certificate Tether presents to the upstream (mutual TLS): PEM files; ``key`` may be left out
    when ``cert`` holds the key too; ``password`` decrypts an encrypted key."""

    cert: Path
    key: Path | None = None
    password: SecretRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("password",))


def _url_or_object(schema: dict[str, Any]) -> None:
    """The JSON Schema of ProxyConfig: a proxy URL string, or the object (editors accept both)."""
    obj = {k: v for k, v in schema.items() if k not in ("title", "description")}
    keep = {k: schema[k] for k in ("title", "description") if k in schema}
    schema.clear()
    schema.update(keep)
    schema["anyOf"] = [{"type": "string", "pattern": "^http://"}, obj]


class ProxyConfig(Model):
    """A forward proxy the upstream is reached through (a CONNECT tunnel, for http and https upstreams).
    Credentials in the URL (``http://user:pass@proxy:3128``) are taken out of it and kept as a secret."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, json_schema_extra=_url_or_object)

    url: str
    username: str | None = None
    password: SecretRef | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"url": data}
        data = _fold_secret_shorthands(data, ("password",))
        if isinstance(data, dict) and isinstance(data.get("url"), str) and "@" in data["url"]:
            from urllib.parse import unquote, urlsplit

            parts = urlsplit(data["url"])
            if parts.username is not None:
                if data.get("username") is not None or data.get("password") is not None:
                    raise ValueError("give the proxy's credentials in the URL or as username/password, not both")
                data = {**data, "url": parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl(),
                        "username": unquote(parts.username)}
                if parts.password is not None:
                    data["password"] = {"value": unquote(parts.password)}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^http://(\[[0-9A-Fa-f:.]+\]|[^/\s?#:@\[\]]+)(:\d{1,5})?/?$", v):
            raise ValueError("must be http://host[:port] (Tether speaks to the proxy in plain HTTP and asks it for "
                             "a CONNECT tunnel; https:// proxies are not supported)")
        return v.rstrip("/")


def _proxy_kind(v: Any) -> str:
    """``env`` and ``direct`` are words; anything else is a proxy (a URL or {url, username, password})."""
    return "proxy_word" if v in ("env", "direct") else "proxy_url"


ProxySetting = Annotated[
    Union[Annotated[Literal["env", "direct"], Tag("proxy_word")], Annotated[ProxyConfig, Tag("proxy_url")]],
    Discriminator(_proxy_kind),
]


class ProvenanceConfig(Model):
    """How provenance travels: as headers on every forwarded call, and (where the adapter can) as
    fields stamped into the written record, e.g. Salesforce custom fields or Stripe metadata."""

    headers: bool = True
    record_fields: dict[Literal["agent", "on_behalf_of", "intent", "authz_event"], str] = {}


def _reserve(v: Any) -> Any:
    """'20%' -> 0.2 (a share of the upstream's limit); a plain number is a count of calls."""
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            pct = float(v.strip()[:-1])
        except ValueError:
            raise ValueError(f"{v!r} is not a percentage") from None
        if not 0 <= pct < 100:
            raise ValueError("a reserve percentage is at least 0% and under 100%")
        return {"share": pct / 100.0}
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < 0:
            raise ValueError("a reserve is not negative")
        return {"calls": float(v)}
    return v


class QuotaReserve(Model):
    share: float | None = None
    calls: float | None = None


class QuotaConfig(Model):
    """The upstream's own quota, shared with the company's people and other integrations (proxy/safety/quota.py).
    ``reserve``: keep this much for them — ``20%`` of each quota window the upstream reports, or a number
    of calls; under it Tether answers agents ``429 upstream_quota`` itself. ``recheck``: how long such a
    block lasts when the upstream does not say when its window resets. ``honor_retry_after``: a 429/503
    with ``Retry-After`` (or a window reported empty) blocks agents until then."""

    reserve: Annotated[QuotaReserve | None, BeforeValidator(_reserve)] = None
    recheck: Duration = 60.0
    honor_retry_after: bool = True


class UpstreamConfig(Model):
    url: str
    adapter: str = "generic"
    adapter_options: dict[str, Any] = {}
    listen: str | None = Field(None, description="host:port of a dedicated agent listener for this upstream")
    tls: TLSConfig | None = None
    credentials: Credentials = NoCredentials(type="none")
    credential_headers: list[str] = Field(
        [], description="extra agent headers that carry credentials for this upstream (always stripped)")
    credential_params: list[str] = Field(
        [], description="query parameters that carry credentials (a request carrying one is refused)")
    timeouts: Timeouts = Timeouts()
    max_response_bytes: Size | None = None
    rate_limit: RateLimit | None = None
    quota: QuotaConfig = QuotaConfig()
    verify_tls: bool = True
    ca_file: Path | None = Field(None, description="CA bundle (PEM) that verifies this upstream, instead of the "
                                                   "system's")
    client_cert: ClientCertificate | None = Field(None, description="client certificate for mutual TLS")
    server_name: str | None = Field(None, description="TLS SNI name, and the name the upstream's certificate must "
                                                      "carry (default: the URL's host)")
    host_header: str | None = Field(None, description="Host header sent upstream (default: the URL's host[:port])")
    proxy: ProxySetting = Field(
        "env", description="env: HTTPS_PROXY/HTTP_PROXY/NO_PROXY (never for loopback upstreams); direct: no proxy; "
                           "or a proxy URL / {url, username, password}")
    max_connections: int | None = Field(100, ge=1, description="connections to this upstream at most (null: no "
                                                               "limit); more requests wait up to timeouts.pool")
    provenance: ProvenanceConfig = ProvenanceConfig()
    via: bool = Field(True, description="add 'Via: 1.1 tether' to forwarded requests (RFC 9110 §7.6.3)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", v):
            raise ValueError("must be an http:// or https:// URL without query or fragment")
        return v.rstrip("/")

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*"
                                              r"[A-Za-z0-9])?)*\.?", v):
            raise ValueError("must be a DNS name (no scheme, port or path)")
        return v

    @field_validator("host_header")
    @classmethod
    def _host_header(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:\d{1,5})?", v):
            raise ValueError("must be host or host:port")
        return v

    @model_validator(mode="after")
    def _tls_only(self) -> "UpstreamConfig":
        if not self.url.startswith("https://"):
            given = [k for k in ("client_cert", "server_name", "ca_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to https:// upstreams only")
        return self

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v)
        return v


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:8100', '[::1]:8100', ':8100' or '8100' -> (host, port)."""
    v = str(value).strip()
    if v.isdigit():
        host, port = "127.0.0.1", v
    elif v.startswith("["):
        host, _, port = v[1:].partition("]:")
    else:
        host, _, port = v.rpartition(":")
        host = host or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return host, int(port)


# --------------------------------------------------------------------------- capabilities


class Constraint(Model):
    """Value constraints on one field (dotted path; ``a.b`` also matches form key ``a[b]``)."""

    enum: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    type: Literal["string", "number", "integer", "boolean", "object", "array", "null"] | None = None
    max_increase_pct: float | None = Field(
        None, description="the new value may not exceed the pre-image value by more than this percent")
    max_increase: float | None = Field(
        None, description="the new value may not exceed the pre-image value by more than this amount")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @property
    def needs_pre_image(self) -> bool:
        return self.max_increase_pct is not None or self.max_increase is not None


class BodyRules(Model):
    allow_fields: list[str] | None = None
    forbid_fields: list[str] = []
    require_fields: list[str] = []
    constraints: dict[str, Constraint] = {}
    json_schema: dict[str, Any] | None = None
    max_bytes: Size | None = None


class AgentRateLimits(Model):
    requests_per_minute: float | None = Field(None, gt=0)
    writes_per_minute: float | None = Field(None, gt=0)
    burst: int | None = Field(None, gt=0)


class PromotionGate(Model):
    min_reviewed: int = Field(50, ge=0)
    min_approval_rate: float = Field(0.95, ge=0, le=1)
    max_edit_share: float = Field(0.1, ge=0, le=1)
    window: Duration = 30 * 86400.0
    canary_percent: float = Field(10.0, gt=0, le=100)


Effect = Literal["read", "write"]
Operation = Literal["read", "create", "update", "delete", "upsert", "action"]


class DisplayConfig(Model):
    """How a reviewer reads this capability's records in headlines (``wants to change Ticket 'Printer on
    fire'``): what one record is called, and which fields name it (the first found, in the record as
    read, then in the request body; a list of fields is joined by spaces)."""

    object: str | None = Field(None, description="what one record is called, e.g. Ticket")
    name: list[str | list[str]] = Field([], description="fields naming a record: [title] or [[first, last], email]")


class CapabilityConfig(Model):
    upstream: str
    method: str
    path: str
    effect: Effect | None = None
    operation: Operation | None = None
    title: str = Field("", description="a short human title (the MCP tool's title; default: the capability id)")
    description: str = Field("", description="what the capability does, for people and models (the MCP tool's "
                                             "description; the OpenAPI importer fills it from the summary)")
    params: dict[str, str] = Field({}, description="regular expression each path parameter must fully match")
    body: BodyRules | None = None
    audit_fields: list[str] = []
    sensitive_fields: list[str] = []
    rate_limit: RateLimit | None = None
    compensation: Literal["auto", "non_compensable", "none"] = "auto"
    allow_live_without_compensation: bool = False
    on_failure: Literal["rollback", "keep"] = "rollback"
    promotion: PromotionGate | None = None
    allow_accounts: list[str] = Field([], description="Stripe-Account / tenant values the agent may select")
    stream_request: bool = Field(False, description="stream the request body (digest journaled with the outcome)")
    journal: Literal["while_forwarding", "before_forward"] = Field(
        "while_forwarding", description="reads: forward while the intent record commits (the answer is released "
                                        "only once it is durable), or before_forward to commit first (a read whose "
                                        "upstream is not free of side effects); writes always commit first")
    display: DisplayConfig | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in HTTP_METHODS:
            raise ValueError(f"must be one of {', '.join(HTTP_METHODS)} (upper case)")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        for seg in v.strip("/").split("/") if v != "/" else []:
            if not seg:
                raise ValueError("empty segment ('//')")
            if "{" in seg or "}" in seg:
                if not re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", seg):
                    raise ValueError(f"segment {seg!r}: a parameter must be a whole segment like {{id}}")
            elif seg in (".", "..") or "%" in seg:
                raise ValueError(f"segment {seg!r} is not allowed in a template")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{name}: invalid regular expression: {exc}") from None
        return v

    @property
    def resolved_effect(self) -> Effect:
        if self.effect is not None:
            return self.effect
        return "read" if self.method in READ_METHODS else "write"


# --------------------------------------------------------------------------- MCP upstreams and tool capabilities
#
# An upstream of ``kind: mcp`` is an MCP server Tether is the only client of (docs/mcp-upstreams.md):
# a Streamable HTTP ``url`` or a stdio ``command`` Tether starts and supervises. A capability names one
# of its tools (``tool:``), resources (``resource:`` URI template) or prompts (``prompt:``) instead of a
# method and path; grants, modes, rate limits and ``body`` (applied to the tool's ``arguments``) work
# as for REST capabilities. The client lives in :mod:`proxy.mcp_upstream`.

MCP_CLIENT_CAPABILITIES = ("sampling", "elicitation", "roots")
PIN_RE = re.compile(r"sha256:[0-9a-f]{64}")
# MCP tool names (2025-11-25 "Tool names"): 1-128 characters, ASCII letters, digits, '_', '-', '.'. Some
# servers use others ('/', ':'); any printable non-space ASCII is accepted, never whitespace or controls.
_TOOL_NAME_RE = re.compile(r"[!-~]{1,128}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# {root.path.to.value}: root is result, arguments or pre_image; segments are names or list indexes
TEMPLATE_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z0-9_$@-]+)*)\}")
TEMPLATE_ROOTS = ("result", "arguments", "pre_image")


def template_placeholders(value: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Every ``{root.a.b}`` placeholder in a compensation template's ``arguments`` (strings at any depth),
    as (root, path). A '{' that does not open a well-formed placeholder is an error: a typo must not
    become a literal value sent to an upstream."""
    out: list[tuple[str, tuple[str, ...]]] = []
    if isinstance(value, dict):
        for v in value.values():
            out += template_placeholders(v)
    elif isinstance(value, list):
        for v in value:
            out += template_placeholders(v)
    elif isinstance(value, str):
        rest = TEMPLATE_PLACEHOLDER_RE.sub("", value)
        if "{" in rest or "}" in rest:
            raise ValueError(f"{value!r}: a placeholder is written {{result.structuredContent.id}}, "
                             "{arguments.name} or {pre_image.structuredContent.field}")
        for m in TEMPLATE_PLACEHOLDER_RE.finditer(value):
            out.append((m.group(1), tuple(p for p in m.group(2).split(".") if p)))
    return out


class McpTimeouts(Model):
    """``connect``: to open a connection or start the command's process and finish ``initialize``.
    ``call``: the longest a ``tools/call`` may take (past it Tether cancels it upstream and answers
    ``upstream_timeout``; a call may ask for less). ``request``: other requests (``tools/list``,
    ``resources/read``, ...). ``stop``: how long a stdio server gets to exit after its stdin is closed,
    then SIGTERM, then (as long again) SIGKILL."""

    connect: Duration = 10.0
    call: Duration = 60.0
    request: Duration = 30.0
    stop: Duration = 5.0


class McpRestart(Model):
    """How a stdio server that exited is started again: after ``initial_backoff``, doubling up to
    ``max_backoff``; a process that ran ``reset_after`` without exiting starts the backoff over."""

    initial_backoff: Duration = 0.5
    max_backoff: Duration = 30.0
    reset_after: Duration = 60.0


class McpUpstreamConfig(Model):
    """An MCP server behind Tether (``kind: mcp``): ``url`` (Streamable HTTP) or ``command`` (stdio)."""

    kind: Literal["mcp"]
    description: str = ""
    url: str | None = Field(None, description="the server's Streamable HTTP endpoint, e.g. https://mcp.stripe.com")
    command: list[str] | None = Field(
        None, description="stdio: the server's command and arguments, started and supervised by Tether")
    env: dict[str, Union[str, SecretRef]] = Field(
        {}, description="stdio: environment variables of the server (a value or a secret {env|file|value}); "
                        "only PATH, HOME, LANG, TERM, USER, LOGNAME, SHELL, TMPDIR and inherit_env are inherited")
    inherit_env: list[str] = Field([], description="stdio: more variable names passed through from Tether's environment")
    cwd: Path | None = Field(None, description="stdio: working directory (relative to the rules file)")
    credentials: Credentials = Field(
        NoCredentials(type="none"), description="url: Tether's credential for the server (the agent's token "
                                                "is never forwarded); api_key is a static header")
    timeouts: McpTimeouts = McpTimeouts()
    max_result_bytes: Size = Field(4 * 1024 * 1024, ge=1024, description="the largest answer accepted from the "
                                                                         "server (one JSON-RPC message)")
    client_capabilities: list[Literal["sampling", "elicitation", "roots"]] = Field(
        [], description="what Tether declares it supports to the server; a server→client request for anything "
                        "not declared is refused without asking anyone")
    listen: bool = Field(True, description="url: open the server's GET stream for notifications "
                                           "(tools/list_changed)")
    restart: McpRestart = McpRestart()
    refresh_interval: Duration = Field(300.0, gt=0, description="list the server's tools again this often (also on "
                                                                "tools/list_changed and after a reconnection) and check "
                                                                "them against their pins")
    tool_names: Literal["capability", "bare"] = Field(
        "capability", description="the name an agent sees for a tool: from the capability id (`crm.create_customer` "
                                  "-> crm_create_customer, the default), or `bare`: the server's own tool name "
                                  "(a transparent proxy, e.g. for conformance runs; a collision gets a hash suffix)")
    rate_limit: RateLimit | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    client_cert: ClientCertificate | None = None
    server_name: str | None = Field(None, description="TLS: the name the server's certificate must carry")
    proxy: ProxySetting = Field("env", description="url: env, direct, or a proxy URL (as for REST upstreams)")
    max_connections: int | None = Field(100, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s?#]+(/[^\s#]*)?$", v):
            raise ValueError("must be an http:// or https:// URL without a fragment")
        return v

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0].strip() or any("\x00" in a for a in v)):
            raise ValueError("a non-empty list: the program, then its arguments (no shell is involved)")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return v

    @field_validator("inherit_env")
    @classmethod
    def _inherit(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _transport(self) -> "McpUpstreamConfig":
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of url (Streamable HTTP) or command (stdio)")
        if self.command is not None:
            http_only = [k for k in ("ca_file", "client_cert", "server_name") if getattr(self, k) is not None]
            if not isinstance(self.credentials, NoCredentials):
                http_only.append("credentials")
            if http_only:
                raise ValueError(f"{', '.join(http_only)} apply to url upstreams; a stdio server gets its "
                                 "credential through env")
        else:
            stdio_only = [k for k in ("env", "inherit_env") if getattr(self, k)] + (["cwd"] if self.cwd else [])
            if stdio_only:
                raise ValueError(f"{', '.join(stdio_only)} apply to command (stdio) upstreams")
            if not str(self.url).startswith("https://"):
                given = [k for k in ("client_cert", "server_name", "ca_file") if getattr(self, k) is not None]
                if given:
                    raise ValueError(f"{', '.join(given)} apply to https:// upstreams only")
        return self

    @property
    def transport(self) -> Literal["http", "stdio"]:
        return "http" if self.url is not None else "stdio"


class ToolCallTemplate(Model):
    """A tool call Tether makes itself (an undo, a pre-image read): the tool and its arguments, whose
    strings may hold placeholders — ``{result.structuredContent.id}`` (the original call's result),
    ``{arguments.x}`` (its arguments), ``{pre_image.structuredContent.field}`` (the pre-image's result).
    A string that is one placeholder takes the value's JSON type; inside text a value is written in."""

    tool: str
    arguments: dict[str, Any] = {}

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        if not _TOOL_NAME_RE.fullmatch(v):
            raise ValueError("a tool name: 1-128 printable ASCII characters, no spaces")
        return v

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, v: dict[str, Any]) -> dict[str, Any]:
        for root, _ in template_placeholders(v):
            if root not in TEMPLATE_ROOTS:
                raise ValueError(f"unknown placeholder root {root!r}: use result, arguments or pre_image")
        return v


def _resource_template(v: str) -> str:
    """An RFC 6570 level-1 template: literal text and ``{name}`` expressions (each matches one value
    without '/', '?' or '#'). Operators (``{+x}``, ``{/x}``, ...) are refused: what they match is too broad."""
    if not v or len(v) > 2048 or any(c.isspace() or ord(c) < 0x20 for c in v):
        raise ValueError("a resource URI template without whitespace, at most 2048 characters")
    rest = re.sub(r"\{[A-Za-z0-9_]+\}", "", v)
    if "{" in rest or "}" in rest:
        raise ValueError("expressions are {name} only (RFC 6570 level 1); operators such as {+x} are refused")
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", v):
        raise ValueError("must start with a URI scheme, e.g. file:///docs/{name} or demo://resource/{id}")
    return v


class McpCapabilityConfig(Model):
    """A capability on an MCP upstream: exactly one of ``tool``, ``resource`` (a URI template) or
    ``prompt``. Tool calls are writes unless ``effect: read`` says otherwise (a server's annotations are
    hints and are never trusted); resources and prompts are reads. ``pin`` is the tool's definition
    digest (:func:`proxy.mcp_upstream.pins.definition_digest`): a tool whose listed definition no longer
    has it is hidden and refused until re-approved (``tether rules pin --accept``)."""

    upstream: str
    tool: str | None = None
    resource: str | None = None
    prompt: str | None = None
    effect: Effect | None = None
    description: str = ""
    pin: str | None = Field(None, description="sha256:<hex> of the tool's definition, as imported or accepted")
    needs_review: str | None = Field(
        None, description="written by `tether rules import-mcp`: why a person must confirm this capability "
                          "(e.g. its effect was guessed); delete the key once confirmed")
    body: BodyRules | None = Field(None, description="field rules on the tool's (or prompt's) arguments")
    audit_fields: list[str] = []
    sensitive_fields: list[str] = []
    rate_limit: RateLimit | None = None
    undo: ToolCallTemplate | None = Field(None, description="the tool call that undoes a call of this tool")
    pre_image: ToolCallTemplate | None = Field(
        None, description="the tool call that reads the state the undo needs, made before the call")
    allow_live_without_compensation: bool = False
    on_failure: Literal["rollback", "keep"] = "rollback"
    promotion: PromotionGate | None = None
    display: DisplayConfig | None = None

    @field_validator("tool", "prompt")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _TOOL_NAME_RE.fullmatch(v):
            raise ValueError("1-128 printable ASCII characters, no spaces")
        return v

    @field_validator("resource")
    @classmethod
    def _resource(cls, v: str | None) -> str | None:
        return None if v is None else _resource_template(v)

    @field_validator("pin")
    @classmethod
    def _pin(cls, v: str | None) -> str | None:
        if v is not None and not PIN_RE.fullmatch(v):
            raise ValueError("sha256: followed by 64 lower-case hex digits")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "McpCapabilityConfig":
        kinds = [k for k in ("tool", "resource", "prompt") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of tool, resource or prompt")
        if self.tool is None:
            extra = [k for k in ("undo", "pre_image", "pin") if getattr(self, k) is not None]
            if self.effect == "write":
                extra.append("effect: write")
            if self.resource is not None and self.body is not None:
                extra.append("body")
            if extra:
                raise ValueError(f"{', '.join(extra)} apply to tools only ({kinds[0]}s are reads)")
            return self
        if self.pin is None:
            raise ValueError("a tool capability carries its pin (the tool's definition digest): `tether rules "
                             "import-mcp` writes it, `tether rules pin --accept TOOL` records it")
        if self.resolved_effect == "read" and (self.undo is not None or self.pre_image is not None):
            raise ValueError("undo and pre_image apply to write tools")
        if self.pre_image is not None:
            if self.undo is None:
                raise ValueError("pre_image is read for an undo: give undo too")
            for root, _ in template_placeholders(self.pre_image.arguments):
                if root != "arguments":
                    raise ValueError(f"pre_image.arguments: {{{root}...}} is not known before the call; only "
                                     "{arguments.x} is")
        if self.undo is not None and self.pre_image is None:
            for root, _ in template_placeholders(self.undo.arguments):
                if root == "pre_image":
                    raise ValueError("undo.arguments uses {pre_image...}: declare pre_image")
        return self

    @property
    def kind(self) -> Literal["tool", "resource", "prompt"]:
        return "tool" if self.tool is not None else "resource" if self.resource is not None else "prompt"

    @property
    def target(self) -> str:
        """The tool name, resource template or prompt name."""
        return self.tool or self.resource or self.prompt or ""

    @property
    def resolved_effect(self) -> Effect:
        """A tool without ``effect`` is a write (fail closed: reviewed in dry-run); resources and prompts read."""
        if self.tool is None:
            return "read"
        return self.effect or "write"

    @property
    def compensation(self) -> Literal["auto", "none"]:
        """``auto`` when an ``undo`` template plans the compensation, else ``none`` (the REST word
        the linter, the catalogue and transactions read)."""
        return "auto" if self.undo is not None else "none"

    @property
    def stream_request(self) -> bool:
        return False

    @property
    def journal(self) -> Literal["before_forward"]:
        """Every tool call's intent record is committed before the call goes: a server's "read" tool is
        its word, not Tether's (the REST reads' ``while_forwarding`` does not apply)."""
        return "before_forward"

    @property
    def title(self) -> str:
        return ""


def _capability_kind(v: Any) -> str:
    """A capability naming a tool, resource or prompt is an MCP capability; anything else is REST."""
    if isinstance(v, McpCapabilityConfig) or (isinstance(v, dict) and any(k in v for k in ("tool", "resource",
                                                                                          "prompt"))):
        return "mcp_capability"
    return "rest_capability"


def _upstream_kind(v: Any) -> str:
    if isinstance(v, McpUpstreamConfig) or (isinstance(v, dict) and v.get("kind") == "mcp"):
        return "mcp_upstream"
    return "rest_upstream"


AnyUpstreamConfig = Annotated[
    Union[Annotated[UpstreamConfig, Tag("rest_upstream")], Annotated[McpUpstreamConfig, Tag("mcp_upstream")]],
    Discriminator(_upstream_kind),
]
AnyCapabilityConfig = Annotated[
    Union[Annotated[CapabilityConfig, Tag("rest_capability")], Annotated[McpCapabilityConfig, Tag("mcp_capability")]],
    Discriminator(_capability_kind),
]


def mcp_cross_reference_errors(upstreams: dict[str, Any], capabilities: dict[str, Any]) -> list[tuple[str, str]]:
    """A REST capability must name a REST upstream and an MCP one an MCP upstream; one tool is one
    capability per upstream; an undo or pre-image tool is itself a capability of the same upstream (so
    its definition is pinned too)."""
    errs: list[tuple[str, str]] = []
    tools: dict[tuple[str, str], str] = {}
    for name, cap in capabilities.items():
        up = upstreams.get(cap.upstream)
        if up is None:
            continue
        is_mcp_up = isinstance(up, McpUpstreamConfig)
        if isinstance(cap, McpCapabilityConfig):
            if not is_mcp_up:
                errs.append((f"capabilities.{name}.upstream", f"{cap.kind} capabilities name an MCP upstream (kind: "
                                                              f"mcp); {cap.upstream!r} is a REST upstream"))
                continue
            if cap.tool is not None:
                key = (cap.upstream, cap.tool)
                if key in tools:
                    errs.append((f"capabilities.{name}.tool", f"tool {cap.tool!r} of {cap.upstream!r} is already "
                                                              f"capability {tools[key]!r}"))
                tools.setdefault(key, name)
        elif is_mcp_up:
            errs.append((f"capabilities.{name}.upstream", f"{cap.upstream!r} is an MCP upstream: name a tool, "
                                                          "resource or prompt instead of method and path"))
    for name, cap in capabilities.items():
        if not isinstance(cap, McpCapabilityConfig) or cap.upstream not in upstreams:
            continue
        for key in ("undo", "pre_image"):
            t = getattr(cap, key)
            if t is not None and (cap.upstream, t.tool) not in tools:
                errs.append((f"capabilities.{name}.{key}.tool",
                             f"tool {t.tool!r} is not a capability of {cap.upstream!r}: Tether calls only pinned "
                             "tools (declare it, unheld if no agent should call it)"))
    return errs


# --------------------------------------------------------------------------- agents


Mode = Literal["dry_run", "canary", "live"]


class GrantConfig(Model):
    capability: str
    mode: Mode | None = None
    rate_limit: RateLimit | None = None
    canary_percent: float | None = Field(None, gt=0, le=100)
    require_verified_user: bool = Field(
        False, description="refuse unless the human is verified by the IdP (X-Tether-User-Token, /_tether/token)")


def _grant_from_short(v: Any) -> Any:
    return {"capability": v} if isinstance(v, str) else v


class ErrorBudget(Model):
    """At most ``max_bad_ratio`` bad outcomes over ``window``, judged once ``min_requests`` were seen."""

    window: Duration = 3600.0
    max_bad_ratio: float = Field(0.05, ge=0, le=1)
    min_requests: int = Field(20, ge=1)


class AgentConfig(Model):
    description: str = ""
    grants: list[Annotated[GrantConfig, BeforeValidator(_grant_from_short)]] = []
    rate_limit: AgentRateLimits | None = None
    error_budget: ErrorBudget | None = None
    quarantine_action: Literal["dry_run", "refuse"] | None = None


# --------------------------------------------------------------------------- identity & server


_SIGNING_ALGS = Literal["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]
_HTTP_URL = re.compile(r"https?://[^\s/?#]+(/[^\s?#]*)?")
_SA_KEY = re.compile(r"system:serviceaccount:[a-z0-9]([-a-z0-9]*[a-z0-9])?:[a-z0-9]([-.a-z0-9]*[a-z0-9])?")


class KeyCacheConfig(Model):
    """How an issuer's keys are cached: the JWKS response's ``Cache-Control: max-age`` clamped to
    [min_ttl, max_ttl]; a token naming an unknown ``kid`` triggers at most one fetch per
    ``unknown_kid_interval`` (random kids cannot make Tether hammer the identity provider)."""

    min_ttl: Duration = 300.0
    max_ttl: Duration = 86400.0
    unknown_kid_interval: Duration = 30.0
    timeout: Duration = 5.0
    retry_interval: Duration = 10.0

    @model_validator(mode="after")
    def _order(self) -> "KeyCacheConfig":
        if self.min_ttl > self.max_ttl:
            raise ValueError("min_ttl is larger than max_ttl")
        return self


class IssuerConfig(Model):
    """One identity provider whose tokens Tether accepts, for one use: ``agent`` tokens identify an
    agent (``Authorization: Bearer``), ``user`` tokens prove the human an agent acts for
    (``X-Tether-User-Token`` or the ``subject_token`` of ``/_tether/token``). An IdP that serves both is
    listed twice, each entry with its own audience. Keys come from ``jwks_file``, ``jwks_url`` or the
    issuer's ``/.well-known/openid-configuration``; algorithms are pinned per entry."""

    issuer: str = Field(description="the exact `iss` of its tokens (and the discovery base URL)")
    use: Literal["agent", "user"] = "agent"
    kind: Literal["oidc", "kubernetes"] = Field(
        "oidc", description="kubernetes: projected service-account tokens; agents are mapped from "
                            "'system:serviceaccount:<namespace>:<name>' through `agents`")
    audience: str | list[str] = Field(description="accepted `aud` values (one must match)")
    algorithms: list[_SIGNING_ALGS] = ["RS256"]
    jwks_url: str | None = Field(None, description="default: jwks_uri from the discovery document")
    jwks_file: Path | None = Field(None, description="a mounted JWKS (re-read when it changes); no HTTP")
    ca_file: Path | None = Field(None, description="CA bundle for the issuer's HTTPS endpoints")
    agent_claim: str = Field("sub", description="use agent: the claim naming the agent (sub, azp, client_id, ...)")
    agents: dict[str, str] = Field(
        {}, description="use agent: claim value -> agent name; when given, unlisted values are refused")
    user_claim: str = Field("sub", description="use user: the claim naming the person (sub, email, ...)")
    leeway: Duration = 5.0
    keys: KeyCacheConfig = KeyCacheConfig()

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not _HTTP_URL.fullmatch(v):
            raise ValueError(f"{v!r} is not an http(s) URL without query or fragment")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "IssuerConfig":
        if not self.jwks_url and not self.jwks_file and not _HTTP_URL.fullmatch(self.issuer):
            raise ValueError(f"issuer {self.issuer!r} is not an http(s) URL, so its keys cannot be discovered: "
                             "give jwks_url or jwks_file")
        if not self.audience:
            raise ValueError("audience is required: tokens meant for another service must not be accepted")
        if self.jwks_url and self.jwks_file:
            raise ValueError("give jwks_url or jwks_file, not both")
        if self.kind == "kubernetes":
            if self.use != "agent":
                raise ValueError("kind kubernetes identifies agents (use: agent)")
            if self.agent_claim != "sub":
                raise ValueError("kind kubernetes maps the token's sub (system:serviceaccount:<ns>:<name>)")
            if not self.agents:
                raise ValueError("kind kubernetes needs `agents`: which service accounts are which agents")
            bad = [k for k in self.agents if not _SA_KEY.fullmatch(k)]
            if bad:
                raise ValueError(f"agents keys must be 'system:serviceaccount:<namespace>:<name>', not {bad[0]!r}")
        if self.use == "user" and self.agents:
            raise ValueError("`agents` maps agent tokens; a use: user entry names people by user_claim")
        return self

    @property
    def audiences(self) -> tuple[str, ...]:
        return (self.audience,) if isinstance(self.audience, str) else tuple(self.audience)


class TokenExchangeConfig(Model):
    """``POST /_tether/token`` (RFC 8693): a user's token (verified against a ``use: user`` issuer) and
    the agent's token become a short-lived delegation token signed by Tether, whose human counts as
    verified. Replicas share ``signing_secret``."""

    signing_secret: SecretRef
    issuer: str = Field("tether:delegation", description="the `iss` of delegation tokens (distinct from others)")
    ttl: Duration = Field(900.0, description="lifetime; never beyond the user token's own exp")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("signing_secret",))


class ConsoleSignInConfig(Model):
    """Reviewers sign in to the console with the company IdP (OIDC authorization code + PKCE)."""

    issuer: str = Field(description="the IdP's issuer URL (discovery at /.well-known/openid-configuration)")
    client_id: str
    client_secret: SecretRef | None = Field(None, description="omit for a public client (PKCE only)")
    scopes: list[str] = ["openid", "profile", "email"]
    redirect_url: str | None = Field(
        None, description="default: http(s)://<admin host>/auth/callback as the browser reached it")
    reviewer_claim: str = Field("groups", description="claim holding the reviewer's roles or groups")
    reviewer_role: str = Field("reviewer", description="value that makes a person a reviewer")
    name_claim: str = Field("email", description="claim naming the reviewer (falls back to sub)")
    algorithms: list[_SIGNING_ALGS] = ["RS256"]
    ca_file: Path | None = None
    session_ttl: Duration = 8 * 3600.0
    session_secret: SecretRef | None = Field(
        None, description="signs session cookies; needed when several processes serve the console")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("client_secret", "session_secret"))

    @field_validator("issuer", "redirect_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not _HTTP_URL.fullmatch(v):
            raise ValueError(f"{v!r} is not an http(s) URL without query or fragment")
        return v

    @model_validator(mode="after")
    def _openid(self) -> "ConsoleSignInConfig":
        if "openid" not in self.scopes:
            raise ValueError("scopes must include openid")
        return self


class IdentityConfig(Model):
    """How agent and reviewer tokens are verified.

    The local key (``hs_secret``, ``public_key_file`` or ``jwks_file``; tokens with ``iss: issuer``) is
    for development and `tether token mint`; ``issuers`` are the company's identity providers and
    Kubernetes clusters. Algorithms are pinned per key type: an HS256 secret is never used to verify
    RS/ES tokens and a public key never verifies HS tokens."""

    issuer: str | None = "tether"
    audience: str | None = "tether"
    algorithms: list[Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]] = ["HS256"]
    hs_secret: SecretRef | None = None
    public_key_file: Path | None = None
    jwks_file: Path | None = None
    private_key_file: Path | None = Field(None, description="used only by `tether token mint` for RS/ES keys")
    leeway: Duration = 5.0
    require_exp: bool = True
    reviewer_claim: str = "roles"
    reviewer_role: str = "reviewer"
    issuers: list[IssuerConfig] = Field([], description="identity providers and clusters (OIDC discovery, JWKS)")
    token_exchange: TokenExchangeConfig | None = None
    console: ConsoleSignInConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("hs_secret",))

    @property
    def has_local_key(self) -> bool:
        return self.hs_secret is not None or self.public_key_file is not None or self.jwks_file is not None

    @model_validator(mode="after")
    def _keys(self) -> "IdentityConfig":
        hs = any(a.startswith("HS") for a in self.algorithms)
        pk = any(not a.startswith("HS") for a in self.algorithms)
        if self.issuers and not self.has_local_key:
            pass  # identity providers only: no development key
        elif hs and self.hs_secret is None:
            raise ValueError("an HS* algorithm is allowed but no hs_secret is configured")
        elif pk and self.public_key_file is None and self.jwks_file is None:
            raise ValueError("an RS/ES/PS algorithm is allowed but neither public_key_file nor jwks_file is set")
        if hs and pk:
            raise ValueError("pin either HMAC (HS*) or public-key algorithms, not both: mixing them "
                             "invites algorithm-confusion attacks")
        seen: dict[tuple[str, str], int] = {}
        for i, iss in enumerate(self.issuers):
            key = (iss.issuer, iss.use)
            if key in seen:
                raise ValueError(f"issuers[{i}]: issuer {iss.issuer!r} is already listed for use {iss.use!r} "
                                 f"(issuers[{seen[key]}])")
            seen[key] = i
            if self.has_local_key and iss.issuer == self.issuer:
                raise ValueError(f"issuers[{i}]: {iss.issuer!r} is also the local key's issuer")
        by_iss: dict[str, list[IssuerConfig]] = {}
        for iss in self.issuers:
            by_iss.setdefault(iss.issuer, []).append(iss)
        for name, entries in by_iss.items():
            if len(entries) > 1 and set(entries[0].audiences) & set(entries[1].audiences):
                raise ValueError(f"issuer {name!r}: its agent and user entries share an audience, so a person's "
                                 "token could pass as an agent's (or the reverse); give each its own")
        tx = self.token_exchange
        if tx is not None:
            if tx.issuer == self.issuer or tx.issuer in by_iss:
                raise ValueError(f"token_exchange.issuer {tx.issuer!r} is used by another key; delegation tokens "
                                 "must be told apart")
            if not any(i.use == "user" for i in self.issuers):
                raise ValueError("token_exchange needs an issuers entry with use: user (who proves the person)")
        return self


class JournalConfig(Model):
    synchronous: Literal["full", "normal"] = "full"
    mirror_file: Path | None = Field(None, description="JSON-lines copy of every record, for log shippers")
    max_batch: int = Field(256, ge=1)
    retention_age: Duration | None = None
    retention_records: int | None = Field(None, ge=1)
    archive_dir: Path | None = None
    retention_interval: Duration = 300.0
    checkpoint_key: SecretRef | None = Field(
        None, description="Ed25519 private key (PEM, or 32-byte seed as hex/base64) that signs checkpoints of the "
                          "chain head; keep it out of the store (a file or an environment secret)")
    checkpoint_interval: Duration = Field(60.0, gt=0, description="sign a checkpoint at most this often (and at stop)")
    checkpoint_file: Path | None = Field(
        None, description="also append each checkpoint here (besides the mirror), fsynced")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("checkpoint_key",))

    @model_validator(mode="after")
    def _retention(self) -> "JournalConfig":
        if (self.retention_age is not None or self.retention_records is not None) and self.archive_dir is None:
            raise ValueError("retention needs archive_dir: old records are moved to files there, never dropped")
        return self


class LimitsConfig(Model):
    """Bounds on what one request may be. ``client_timeout`` bounds how long a client may take to send
    a request's headers, and then its body (slow-loris); ``max_in_flight`` bounds concurrent requests
    (beyond it: fast 503 ``overloaded``)."""

    max_body_bytes: Size = 10 * 1024 * 1024
    max_url_length: int = 8192
    max_headers: int = 100
    max_header_bytes: int = 16384
    max_json_depth: int = 64
    max_in_flight: int = 1024
    client_timeout: Duration = 30.0
    max_response_bytes: Size | None = None


class SlackReviewConfig(Model):
    """Review items posted to a Slack channel as interactive messages (headline, changes, Approve /
    Reject, a link to the console); Slack's interaction callbacks reach the admin listener at
    ``/slack/interactions`` and are verified with the app's signing secret."""

    channel: str = Field(description="channel id (C0123...) or name the items are posted to")
    bot_token: SecretRef = Field(description="the Slack app's bot token (chat:write)")
    signing_secret: SecretRef = Field(description="the Slack app's signing secret (verifies interaction callbacks)")
    reviewers: dict[str, str] = Field(
        {}, description="Slack user id -> reviewer identity; an unmapped Slack user cannot decide")
    api_url: str = Field("https://slack.com/api", description="Slack Web API base URL")
    console_url: str | None = Field(None, description="the console as reviewers reach it, for the message's link")
    max_posts_per_pass: int = Field(20, ge=1, description="items posted per pass; more are summarised in one message")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("bot_token", "signing_secret"))

    @field_validator("reviewers")
    @classmethod
    def _user_ids(cls, v: dict[str, str]) -> dict[str, str]:
        for uid, who in v.items():
            if not re.fullmatch(r"[UW][A-Z0-9]{2,20}", uid):
                raise ValueError(f"{uid!r} is not a Slack user id (U0123ABCD)")
            if not who.strip():
                raise ValueError(f"{uid}: empty reviewer identity")
        return v


class ReviewConfig(Model):
    ttl: Duration = 7 * 86400.0
    sweep_interval: Duration = 30.0
    alert_queue_depth: int | None = None
    max_pending_per_agent: int = Field(
        1000, ge=1, description="an agent with this many items pending review gets 429 review_queue_full")
    max_pending_bytes_per_agent: Size = Field(
        256 * 1024 * 1024, ge=1, description="nor may its pending items hold more than this (stored size)")
    read_current: bool = Field(
        False, description="read each new item's record once, as it is captured, so that its headline (and its "
                           "Slack message) names the record and the values it changes; one upstream read per item")
    slack: SlackReviewConfig | None = None


class TransactionsConfig(Model):
    default_deadline: Duration = 900.0
    sweep_interval: Duration = 5.0
    retry_attempts: int = Field(5, ge=1)
    retry_backoff: Duration = 0.5
    rollback_lease: Duration = Field(
        15.0, description="a rollback holds a lease this long (renewed as it goes); a crashed one is resumed after")
    retry_interval: Duration = Field(
        60.0, description="how often a rollback stopped by an upstream outage is retried by itself")


class AlertTarget(Model):
    url: str
    format: Literal["json", "slack"] = "json"
    events: list[Literal["quarantine", "needs_attention", "review_queue_depth", "rules_reload_failed",
                         "journal_unavailable", "review_pending", "quota_low",
                         "tool_definition_changed"]] | None = Field(
        None, description="events to send (default: all but review_pending, which is sent only when listed)")


class GovernanceConfig(Model):
    error_budget: ErrorBudget = ErrorBudget()
    quarantine_action: Literal["dry_run", "refuse"] = "dry_run"
    alerts: list[AlertTarget] = []


class McpConfig(Model):
    """The MCP front door: MCP Streamable HTTP on the main listener (docs/mcp.md). Absent: no MCP endpoint."""

    path: str = Field("/mcp", description="the MCP endpoint's path on the main listener (exact match)")
    allowed_origins: list[str] = Field(
        [], description="browser origins allowed to call the endpoint: scheme://host[:port], or scheme://host:* "
                        "for any port; requests without an Origin header (non-browser clients) are always allowed")
    session_idle_timeout: Duration = Field(1800.0, description="a session unused this long is dropped")
    max_sessions_per_agent: int = Field(
        16, ge=1, description="beyond this, opening a session drops the agent's least recently used idle one")
    max_sessions: int = Field(10000, ge=1, description="MCP sessions open at once, all agents together")
    page_size: int = Field(100, ge=1, le=1000, description="tools per tools/list page")
    keepalive: Duration = Field(15.0, gt=0, description="SSE keep-alive interval on GET streams")
    max_batch: int = Field(32, ge=1, description="messages in one JSON-RPC batch (MCP 2025-03-26 sessions only)")
    public_url: str | None = Field(
        None, description="the endpoint's absolute URL as agents reach it (behind a proxy); default: from the "
                          "request's Host; used in the RFC 9728 metadata and WWW-Authenticate")
    instructions: str | None = Field(None, description="the instructions sent in the initialize result")
    max_result_bytes: Size = Field(4 * 1024 * 1024, ge=1024, description="an upstream answer larger than this is "
                                   "refused as a tool result (upstream_response_too_large; a write says it was applied)")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", v) or v.startswith(("/_tether/", "/.well-known/")):
            raise ValueError("an absolute path of plain segments (letters, digits, '.', '_', '~', '-'), "
                             "no trailing slash, not under /_tether/ or /.well-known/")
        return v

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for o in v:
            if not re.fullmatch(r"https?://[^/\s?#]+", o):
                raise ValueError(f"{o!r} is not an origin: scheme://host[:port] or scheme://host:*")
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^/\s?#]+/[^\s?#]*", v):
            raise ValueError("an absolute http(s) URL with a path, e.g. https://tether.example.com/mcp")
        return v


class ServerConfig(Model):
    """Runtime options; each can also be set by a flag or a TETHER_* environment variable."""

    listen: str = "127.0.0.1:8100"
    admin_listen: str = "127.0.0.1:8199"
    tls: TLSConfig | None = None
    store: str = "tether.db"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    grace_period: Duration = 20.0
    workers: int = Field(1, ge=1)
    ratelimit: str = Field("auto", description="where rate-limit buckets live: auto, local, store, or a "
                                               "redis:// / rediss:// / unix:// URL (see proxy/safety/ratelimit.py)")
    journal: JournalConfig = JournalConfig()
    limits: LimitsConfig = LimitsConfig()
    review: ReviewConfig = ReviewConfig()
    transactions: TransactionsConfig = TransactionsConfig()
    mcp: McpConfig | None = None

    @field_validator("listen", "admin_listen")
    @classmethod
    def _hp(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("ratelimit")
    @classmethod
    def _ratelimit(cls, v: str) -> str:
        if v not in ("auto", "local", "store") and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use auto, local, store, or a redis://, rediss:// or unix:// URL")
        return v


class RulesFile(Model):
    version: Literal[1] = 1
    server: ServerConfig = ServerConfig()
    identity: IdentityConfig
    governance: GovernanceConfig = GovernanceConfig()
    upstreams: dict[str, AnyUpstreamConfig]
    agents: dict[str, AgentConfig] = {}
    capabilities: dict[str, AnyCapabilityConfig] = {}

    @property
    def rest_upstreams(self) -> dict[str, UpstreamConfig]:
        """The REST upstreams (what adapters, listeners and the forward path serve)."""
        return {n: u for n, u in self.upstreams.items() if not isinstance(u, McpUpstreamConfig)}

    @property
    def mcp_upstreams(self) -> dict[str, McpUpstreamConfig]:
        return {n: u for n, u in self.upstreams.items() if isinstance(u, McpUpstreamConfig)}

    @property
    def rest_capabilities(self) -> dict[str, CapabilityConfig]:
        return {n: c for n, c in self.capabilities.items() if not isinstance(c, McpCapabilityConfig)}

    @property
    def mcp_capabilities(self) -> dict[str, McpCapabilityConfig]:
        return {n: c for n, c in self.capabilities.items() if isinstance(c, McpCapabilityConfig)}

    def cross_reference_errors(self) -> list[tuple[str, str]]:
        """Problems no single model can see: names that must refer to each other."""
        errs: list[tuple[str, str]] = []
        for name, cap in self.capabilities.items():
            if cap.upstream not in self.upstreams:
                errs.append((f"capabilities.{name}.upstream", f"unknown upstream {cap.upstream!r}"))
            if isinstance(cap, McpCapabilityConfig):
                continue
            template_params = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", cap.path))
            for p in cap.params:
                if p not in template_params:
                    errs.append((f"capabilities.{name}.params.{p}", f"the path {cap.path!r} has no {{{p}}}"))
        errs += mcp_cross_reference_errors(self.upstreams, self.capabilities)
        errs += stream_request_errors(self.capabilities, self.agents)
        for agent, a in self.agents.items():
            seen: set[str] = set()
            for i, g in enumerate(a.grants):
                if g.capability not in self.capabilities:
                    errs.append((f"agents.{agent}.grants[{i}]", f"unknown capability {g.capability!r}"))
                elif g.capability in seen:
                    errs.append((f"agents.{agent}.grants[{i}]", f"capability {g.capability!r} granted twice"))
                seen.add(g.capability)
        listens: dict[str, str] = {}
        for where, hp in [("server.listen", self.server.listen), ("server.admin_listen", self.server.admin_listen)] + [
            (f"upstreams.{n}.listen", u.listen) for n, u in self.rest_upstreams.items() if u.listen
        ]:
            key = "%s:%d" % parse_hostport(hp)
            if key in listens and not key.endswith(":0"):
                errs.append((where, f"address {hp} is already used by {listens[key]}"))
            listens[key] = where
        for n in self.upstreams:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n) or n.startswith("_"):
                errs.append((f"upstreams.{n}", "upstream names are letters, digits, '_', '.', '-'"))
        if self.server.mcp is not None:
            first = self.server.mcp.path.split("/")[1]
            if first in self.upstreams:
                errs.append(("server.mcp.path", f"{self.server.mcp.path!r} is inside upstream {first!r}'s path prefix"))
        return errs


STREAMED = "streams its request body"


def stream_request_errors(capabilities: dict[str, Any], agents: dict[str, Any]) -> list[tuple[str, str]]:
    """A capability with ``stream_request: true`` sends its body upstream unread, so nothing that needs
    the body can hold for it: no body rules or audit fields (they would be skipped), and no dry-run —
    a grant in dry_run or canary (or without a mode, which means dry_run for a write) would capture a
    body Tether never read. Every such combination is an error (here and in ``tether rules check``)."""
    errs: list[tuple[str, str]] = []
    streamed = {n for n, c in capabilities.items() if getattr(c, "stream_request", False)}
    for name in sorted(streamed):
        cap = capabilities[name]
        for key, present in (("body", cap.body is not None), ("audit_fields", bool(cap.audit_fields)),
                             ("sensitive_fields", bool(cap.sensitive_fields)), ("promotion", cap.promotion is not None)):
            if present:
                errs.append((f"capabilities.{name}.{key}",
                             f"capability {name!r} {STREAMED} (stream_request: true), which Tether never reads: "
                             f"{key} cannot apply to it; drop {key} or stream_request"))
    for agent, a in agents.items():
        for i, g in enumerate(getattr(a, "grants", ())):
            cap = capabilities.get(g.capability)
            if g.capability in streamed and cap is not None and cap.resolved_effect == "write" and g.mode != "live":
                errs.append((f"agents.{agent}.grants[{i}]",
                             f"capability {g.capability!r} {STREAMED}, which cannot be captured for review: a "
                             f"{g.mode or 'dry_run (the default)'} grant is refused; grant it with mode: live or "
                             "drop stream_request"))
    return errs


# --------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """A rules file that cannot be used. ``problems`` are (key path, reason) pairs; str() lists them all."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        lines = [f"{file}: {path or '<root>'}: {reason}" for path, reason in problems]
        super().__init__("invalid rules file\n  " + "\n  ".join(lines))


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part in {
            "NoCredentials", "BearerCredentials", "BasicCredentials", "ApiKeyCredentials",
            "OAuth2ClientCredentials", "none", "bearer", "basic", "api_key", "oauth2_client_credentials",
            "function-before[_grant_from_short(), GrantConfig]", "proxy_word", "proxy_url",
            "rest_upstream", "mcp_upstream", "rest_capability", "mcp_capability",
        }:
            continue
        elif isinstance(part, str) and part.startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _yaml_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader that refuses duplicate keys: in a security policy a repeated key is a bug."""

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        loader.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def parse_rules(data: Any, file: str = "<rules>") -> RulesFile:
    """Validate an already-loaded document; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(file, [("", "the file must be a mapping with upstreams, agents, capabilities")])
    try:
        rules = RulesFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            elif e["type"] == "union_tag_invalid":
                msg = f"{msg}"
            problems.append((_loc_to_path(e["loc"]), msg))
        raise ConfigError(file, problems) from None
    problems = rules.cross_reference_errors()
    if problems:
        raise ConfigError(file, problems)
    return rules


_PATH_KEYS = frozenset({"file", "cert", "key", "public_key_file", "jwks_file", "private_key_file",
                        "mirror_file", "archive_dir", "ca_file", "checkpoint_file", "checkpoint_key_file", "cwd"})


_OPAQUE_KEYS = frozenset({"params", "adapter_options", "body", "constraints", "json_schema", "audit_fields",
                          "sensitive_fields", "record_fields", "arguments", "command"})


def _resolve_relative_paths(data: Any, base: Path) -> Any:
    """Make file paths written in a rules file relative to that file, not to the working directory,
    so that `tether serve --config deploy/rules.yaml` works from anywhere."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k in _OPAQUE_KEYS:
                out[k] = v  # user data (parameter names, adapter options, schemas): never paths of ours
            elif k in _PATH_KEYS and isinstance(v, str) and v and not os.path.isabs(v):
                out[k] = str(base / v)
            else:
                out[k] = _resolve_relative_paths(v, base)
        return out
    if isinstance(data, list):
        return [_resolve_relative_paths(v, base) for v in data]
    return data


def _resolve_store_path(data: Any, base: Path) -> Any:
    """``server.store`` as a SQLite path is relative to the rules file, like every other path in it, and
    so is the default (``tether.db`` beside the rules file): ``tether serve --config F`` and ``tether
    journal verify --config F`` then find one store whatever folder each is run from. URLs (PostgreSQL),
    absolute paths and ``:memory:`` are left alone; ``--store`` and ``$TETHER_STORE`` stay relative to
    the working directory, as command-line paths are."""
    if not isinstance(data, dict):
        return data
    server = data.get("server")
    if server is None:
        server = {}
    if not isinstance(server, dict):
        return data  # validation names the problem
    store = server.get("store", ServerConfig.model_fields["store"].default)
    if not isinstance(store, str) or not store or store.startswith(":") or (
            "://" in store and not store.startswith("sqlite:///")):
        return data
    scheme, path = ("sqlite:///", store[len("sqlite:///"):]) if store.startswith("sqlite:///") else ("", store)
    if not path or os.path.isabs(path):
        return data
    return {**data, "server": {**server, "store": scheme + str(base / path)}}


def load_rules(path: str | os.PathLike[str]) -> RulesFile:
    """Read and validate a rules file. Relative file paths inside it (keys, certificates, secret files,
    the journal mirror, the SQLite store) are resolved against the rules file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [("", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), [("", "not UTF-8 text")]) from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(p), [(where, f"YAML error: {reason}")]) from None
    base = p.resolve().parent
    return parse_rules(_resolve_store_path(_resolve_relative_paths(data, base), base), str(p))
