"""The rules file: parsed once, validated completely, frozen.

A rules file (YAML) declares upstreams, agents with their grants, and capabilities. It is parsed into
frozen pydantic models with ``extra="forbid"`` so that a typo is an error, not a silently ignored key.
Validation collects *every* problem (schema errors and cross-references such as a grant naming an
unknown capability) and raises one :class:`ConfigError` whose lines each name the file, the key path
and the reason — the way a person fixes a file is by reading all of them at once.

The hot path never re-reads these objects' raw form: :mod:`proxy.registry` compiles them into
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
    Field,
    SecretStr,
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
    for the response headers and between body chunks (past it: 504 upstream_timeout)."""

    connect: Duration = 5.0
    read: Duration = 60.0


class TLSConfig(Model):
    """A certificate and key for a listener that must speak https (simple-salesforce insists)."""

    cert: Path
    key: Path


class ProvenanceConfig(Model):
    """How provenance travels: as headers on every forwarded call, and (where the adapter can) as
    fields stamped into the written record, e.g. Salesforce custom fields or Stripe metadata."""

    headers: bool = True
    record_fields: dict[Literal["agent", "on_behalf_of", "intent", "authz_event"], str] = {}


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
    verify_tls: bool = True
    ca_file: Path | None = None
    provenance: ProvenanceConfig = ProvenanceConfig()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", v):
            raise ValueError("must be an http:// or https:// URL without query or fragment")
        return v.rstrip("/")

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


class CapabilityConfig(Model):
    upstream: str
    method: str
    path: str
    effect: Effect | None = None
    operation: Operation | None = None
    description: str = ""
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


# --------------------------------------------------------------------------- agents


Mode = Literal["dry_run", "canary", "live"]


class GrantConfig(Model):
    capability: str
    mode: Mode | None = None
    rate_limit: RateLimit | None = None
    canary_percent: float | None = Field(None, gt=0, le=100)


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


class IdentityConfig(Model):
    """How agent and reviewer tokens are verified. Algorithms are pinned per key type: an HS256
    secret is never used to verify RS/ES tokens and a public key never verifies HS tokens."""

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

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _fold_secret_shorthands(data, ("hs_secret",))

    @model_validator(mode="after")
    def _keys(self) -> "IdentityConfig":
        hs = any(a.startswith("HS") for a in self.algorithms)
        pk = any(not a.startswith("HS") for a in self.algorithms)
        if hs and self.hs_secret is None:
            raise ValueError("an HS* algorithm is allowed but no hs_secret is configured")
        if pk and self.public_key_file is None and self.jwks_file is None:
            raise ValueError("an RS/ES/PS algorithm is allowed but neither public_key_file nor jwks_file is set")
        if hs and pk:
            raise ValueError("pin either HMAC (HS*) or public-key algorithms, not both: mixing them "
                             "invites algorithm-confusion attacks")
        return self


class JournalConfig(Model):
    synchronous: Literal["full", "normal"] = "full"
    mirror_file: Path | None = Field(None, description="JSON-lines copy of every record, for log shippers")
    max_batch: int = Field(256, ge=1)
    retention_age: Duration | None = None
    retention_records: int | None = Field(None, ge=1)
    archive_dir: Path | None = None
    retention_interval: Duration = 300.0

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


class ReviewConfig(Model):
    ttl: Duration = 7 * 86400.0
    sweep_interval: Duration = 30.0
    alert_queue_depth: int | None = None


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
                         "journal_unavailable"]] | None = None


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


class RulesFile(Model):
    version: Literal[1] = 1
    server: ServerConfig = ServerConfig()
    identity: IdentityConfig
    governance: GovernanceConfig = GovernanceConfig()
    upstreams: dict[str, UpstreamConfig]
    agents: dict[str, AgentConfig] = {}
    capabilities: dict[str, CapabilityConfig] = {}

    def cross_reference_errors(self) -> list[tuple[str, str]]:
        """Problems no single model can see: names that must refer to each other."""
        errs: list[tuple[str, str]] = []
        for name, cap in self.capabilities.items():
            if cap.upstream not in self.upstreams:
                errs.append((f"capabilities.{name}.upstream", f"unknown upstream {cap.upstream!r}"))
            template_params = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", cap.path))
            for p in cap.params:
                if p not in template_params:
                    errs.append((f"capabilities.{name}.params.{p}", f"the path {cap.path!r} has no {{{p}}}"))
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
            (f"upstreams.{n}.listen", u.listen) for n, u in self.upstreams.items() if u.listen
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
            "function-before[_grant_from_short(), GrantConfig]",
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
                        "mirror_file", "archive_dir", "ca_file"})


_OPAQUE_KEYS = frozenset({"params", "adapter_options", "body", "constraints", "json_schema", "audit_fields",
                          "sensitive_fields", "record_fields"})


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


def load_rules(path: str | os.PathLike[str]) -> RulesFile:
    """Read and validate a rules file. Relative file paths inside it (keys, certificates, secret files,
    the journal mirror) are resolved against the rules file's folder; the store path is not."""
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
    return parse_rules(_resolve_relative_paths(data, p.resolve().parent), str(p))
