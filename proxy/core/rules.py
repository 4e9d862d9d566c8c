"""The compiled rules: everything one rules file becomes, swapped as a whole on reload.

:class:`RulesState` holds the registry (capabilities, grants, validators), one :class:`UpstreamRuntime`
per upstream (adapter, credential injector, header policy, egress) and the token verifier. It is built
once per rules version by :func:`build_state` and shared, read-only, by every request that arrives while
it is in force (an exchange keeps the snapshot it started with, so a reload never splits a request).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from adapters import AdapterOptionsError, get_adapter, vendor_headers
from adapters.base import Adapter

from .. import headers as H
from ..config import ConfigError, RulesFile, UpstreamConfig
from ..errors import TetherError
from ..policy.credentials import CredentialError, Injector, build_injector
from ..policy.identity import TokenVerifier
from ..policy.registry import Registry
from ..transport.egress import Egress, EgressError, build_egress
from ..transport.forward import NO_NEEDLES, Needles, credential_needles
from ..transport.upstream_http import OriginPool
from .mcp_upstreams import McpHooks, McpUpstreamRuntime, build_mcp_runtimes

log = logging.getLogger("tether.rules")

_VENDOR_HEADERS = vendor_headers()


class UpstreamRuntime:
    """One upstream, ready to use: adapter, credential injector, header policy, timeouts, TLS."""

    is_mcp = False  # an MCP upstream's runtime is proxy.core.mcp_upstreams.McpUpstreamRuntime

    def __init__(self, name: str, cfg: UpstreamConfig, adapter: Adapter, session_getter: Any,
                 egress: Egress | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.adapter = adapter
        self.base_url = cfg.url
        self.injector: Injector = build_injector(cfg.credentials, f"upstreams.{name}.credentials", session_getter)
        cred_headers = ({h.lower() for h in cfg.credential_headers} | set(self.injector.header_names)
                        | adapter.credential_headers)
        self.credential_headers = frozenset(cred_headers)
        # another vendor's session or tenant-switch header (Stripe-Account to Salesforce) is never forwarded
        foreign = _VENDOR_HEADERS - adapter.tenant_headers
        self.strip_headers = frozenset(H.STRIPPED_REQUEST | H.HOP_BY_HOP | cred_headers | foreign)
        self.credential_params = tuple(dict.fromkeys([p.lower() for p in cfg.credential_params]
                                                     + list(adapter.credential_params)))
        self.timeouts = cfg.timeouts
        self.pool: OriginPool | None = None  # bound on first use (Gateway.origin)
        self.egress = egress or build_egress(name, cfg)  # TLS, proxy, connection limit (proxy.transport.egress)
        self.tls_key = self.egress.key
        self.ssl: Any = self.egress.ssl
        self.provenance_headers = cfg.provenance.headers
        self.record_fields = dict(cfg.provenance.record_fields)
        self.max_response_bytes = cfg.max_response_bytes
        self.via = cfg.via
        self._reflection: tuple[Any, Needles] = (None, NO_NEEDLES)

    def reflection_needles(self) -> Needles:
        """What of the injected credential to look for in the upstream's answers (so that an upstream
        echoing it never hands it to the agent): recomputed only when the credential changes."""
        cred = self.credential_now()
        key, needles = self._reflection
        if cred != key:
            if cred is None:
                return needles  # an OAuth token being refreshed: the last one is still the one to hide
            prefix = getattr(self.cfg.credentials, "prefix", "") or ""
            needles = credential_needles(cred, prefix)
            self._reflection = (cred, needles)
        return needles

    def credential_now(self) -> tuple[tuple[str, str], ...] | None:
        """The credential header when it can be had without waiting (static secrets, a cached OAuth
        token); None means: await :meth:`apply_credentials`."""
        try:
            return self.injector.header_now()
        except CredentialError:
            return None  # apply_credentials reports it properly

    async def apply_credentials(self, headers: Any) -> None:
        try:
            await self.injector.apply(headers)
        except CredentialError as exc:
            log.error("credentials for upstream %s unavailable: %s", self.name, exc)
            raise TetherError("upstream_unavailable",
                              f"Tether cannot produce the credentials for upstream {self.name!r}") from None


@dataclass(frozen=True)
class RulesState:
    """Everything compiled from one rules file; replaced as a whole on reload."""

    rules: RulesFile
    registry: Registry
    upstreams: dict[str, UpstreamRuntime]  # REST upstreams (what the REST door routes to)
    verifier: TokenVerifier
    mcp_upstreams: dict[str, McpUpstreamRuntime] = field(default_factory=dict)  # kind: mcp (the MCP door's tools)

    def mcp_version(self) -> tuple[int, ...]:
        """Moves whenever an MCP upstream's listing or pin states do (part of the MCP door's tools_version)."""
        return tuple(rt.version for rt in self.mcp_upstreams.values())

    def mcp_resources_version(self) -> tuple[int, ...]:
        """Moves whenever an MCP upstream's resource or template listing does (the door's resources_version)."""
        return tuple(rt.resources_version for rt in self.mcp_upstreams.values())

    def mcp_prompts_version(self) -> tuple[int, ...]:
        """Moves whenever an MCP upstream's prompt listing does (the door's prompts_version)."""
        return tuple(rt.prompts_version for rt in self.mcp_upstreams.values())


def build_state(rules: RulesFile, session_getter: Any, file: str = "<rules>", keysets: Any = None, *,
                previous: RulesState | None = None, mcp_hooks: McpHooks | None = None) -> RulesState:
    """Compile a validated rules file; ConfigError names anything that still cannot be built. ``keysets``
    (proxy.policy.jwks.KeySets) keeps issuers' keys across reloads. MCP upstreams get one client each
    (unstarted: the gateway starts them), the ``previous`` state's kept when the upstream's configuration
    is unchanged; ``mcp_hooks`` is how their runtimes report (journal, alerts, new tool lists)."""
    problems: list[tuple[str, str]] = []
    adapters: dict[str, Adapter] = {}
    for name, up in rules.rest_upstreams.items():
        try:
            adapters[name] = get_adapter(up.adapter, up.adapter_options)
        except AdapterOptionsError as exc:
            problems.append((f"upstreams.{name}.adapter", str(exc)))
    try:
        verifier = TokenVerifier(rules.identity, keysets)
    except ValueError as exc:
        problems.append(("identity", str(exc)))
    if problems:
        raise ConfigError(file, problems)
    egress: dict[str, Egress] = {}
    for name, up in rules.rest_upstreams.items():
        try:
            egress[name] = build_egress(name, up)
        except EgressError as exc:
            problems.append((exc.path, str(exc)))
    if problems:
        raise ConfigError(file, problems)
    for name, up_cfg in rules.rest_upstreams.items():
        adapters[name].record_fields = tuple(up_cfg.provenance.record_fields.values())
    registry = Registry(rules, adapters)
    from ..policy.validation import BodyValidator

    for name, cap in registry.capabilities.items():
        if cap.config.body is not None:
            try:
                ad = adapters.get(cap.upstream)  # none for an MCP upstream: arguments are plain JSON
                registry.validators[name] = BodyValidator(name, cap.config.body,
                                                          fold_case=ad is not None and ad.case_insensitive_fields)
            except Exception as exc:  # jsonschema.SchemaError and friends
                problems.append((f"capabilities.{name}.body.json_schema", f"invalid JSON Schema: "
                                 f"{getattr(exc, 'message', exc)}"))
    if problems:
        raise ConfigError(file, problems)
    mcp = build_mcp_runtimes(rules, mcp_hooks, previous.mcp_upstreams if previous is not None else None, problems)
    if problems:
        raise ConfigError(file, problems)
    rest = rules.rest_upstreams
    upstreams = {n: UpstreamRuntime(n, rest[n], adapters[n], session_getter, egress[n]) for n in rest}
    mcp_caps = rules.mcp_capabilities
    for rt in mcp.values():  # last: a kept runtime is bound to these rules only once they compiled
        rt.bind(mcp_caps)
    return RulesState(rules=rules, registry=registry, upstreams=upstreams, verifier=verifier, mcp_upstreams=mcp)
