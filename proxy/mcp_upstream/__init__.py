"""MCP servers *behind* Tether: the client side (the front door, ``proxy.mcp``, is the server side).

Public surface::

    build_mcp_upstream(name, cfg, ...) -> McpUpstream     one client per upstream of kind: mcp
    McpUpstream                                            start, connect, list_tools, call_tool,
                                                           list_resources, list_resource_templates,
                                                           read_resource, list_prompts, get_prompt, close
    ServerRequest, ServerRequestRefused, refuse_server_request   server→client requests and their handler
    McpUpstreamError and subclasses                        what requests raise (:mod:`.errors`)
    definition_digest, check_pins, PinStatus               pinned tool definitions (:mod:`.pins`)
    resolve_arguments, check_arguments, TemplateError      undo / pre-image templates (:mod:`.templates`)
    match_resource                                         what a ``resource:`` template grants (:mod:`.resources`)

See docs/mcp-upstreams.md for the configuration and what the core wires.
"""

from __future__ import annotations

from typing import Any

from .client import (
    EventCallback,
    LogCallback,
    McpUpstream,
    NotificationCallback,
    ProgressCallback,
    ServerRequest,
    ServerRequestHandler,
    refuse_server_request,
)
from .errors import (
    CallCancelled,
    McpUpstreamError,
    ResultTooLarge,
    ServerRequestRefused,
    UpstreamAuthFailed,
    UpstreamProtocolError,
    UpstreamRpcError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .pins import PinStatus, check_pins, definition_diff, definition_digest, tool_definition
from .resources import match_resource
from .templates import TemplateError, check_arguments, resolve_arguments

__all__ = [
    "build_mcp_upstream", "McpUpstream", "ServerRequest", "ServerRequestHandler", "ServerRequestRefused",
    "refuse_server_request", "ProgressCallback", "LogCallback", "NotificationCallback", "EventCallback",
    "McpUpstreamError", "UpstreamUnavailable", "UpstreamTimeout", "CallCancelled", "ResultTooLarge",
    "UpstreamAuthFailed", "UpstreamProtocolError", "UpstreamRpcError",
    "PinStatus", "check_pins", "definition_digest", "definition_diff", "tool_definition",
    "TemplateError", "resolve_arguments", "check_arguments", "match_resource",
]


def build_mcp_upstream(name: str, cfg: Any, *, on_server_request: ServerRequestHandler | None = None,
                       on_notification: NotificationCallback | None = None, on_event: EventCallback | None = None,
                       client_name: str = "tether") -> McpUpstream:
    """The client for upstream ``name`` (a :class:`proxy.config.McpUpstreamConfig`). Built once per rules
    version; nothing is connected until :meth:`McpUpstream.start`. TLS and proxy settings are read as
    for REST upstreams (:mod:`proxy.egress`); :class:`proxy.egress.EgressError` names a setting that
    cannot be used (a CA file that does not load, ...)."""
    where = f"upstreams.{name}"
    if cfg.url is not None:
        from ..policy.credentials import build_injector
        from ..transport.egress import _ssl_context, proxy_for
        from .http import StreamableHttpTransport

        ssl_ctx = _ssl_context(where, cfg) if cfg.url.startswith("https://") else None
        tunnel, _key = proxy_for(where, cfg)
        proxy_url = f"http://{tunnel.host if ':' not in tunnel.host else '[' + tunnel.host + ']'}:{tunnel.port}" \
            if tunnel is not None else None
        proxy_headers = None
        if tunnel is not None and tunnel.authorization is not None:
            auth = tunnel.authorization

            def proxy_headers() -> dict[str, str]:
                value = auth()
                return {"Proxy-Authorization": value} if value else {}

        holder: dict[str, Any] = {}
        injector = build_injector(cfg.credentials, f"{where}.credentials", lambda: holder["t"].http_session())
        transport: Any = StreamableHttpTransport(name, cfg.url, injector, connect_timeout=cfg.timeouts.connect,
                                                 ssl_context=ssl_ctx, proxy=proxy_url, proxy_headers=proxy_headers,
                                                 max_connections=cfg.max_connections, listen=cfg.listen,
                                                 server_name=cfg.server_name)
        holder["t"] = transport
    else:
        from .stdio import StdioTransport, env_from_config

        transport = StdioTransport(name, cfg.command, env=env_from_config(cfg.env, cfg.inherit_env, where),
                                   cwd=cfg.cwd, initial_backoff=cfg.restart.initial_backoff,
                                   max_backoff=cfg.restart.max_backoff, reset_after=cfg.restart.reset_after,
                                   stop_timeout=cfg.timeouts.stop)
    return McpUpstream(name, transport, max_result_bytes=cfg.max_result_bytes, call_timeout=cfg.timeouts.call,
                       request_timeout=cfg.timeouts.request, connect_timeout=cfg.timeouts.connect,
                       client_capabilities=cfg.client_capabilities, on_server_request=on_server_request,
                       on_notification=on_notification, on_event=on_event, client_name=client_name)
