"""The MCP front door's protocol layer: MCP Streamable HTTP on Tether's main listener.

Public surface::

    ToolBackend, Principal, ToolCall, McpSessionInfo, ProgressSink    the interface the core implements
    ResourceBackend, PromptBackend, ResourceRead, PromptGet, LogSink   ... and its optional parts
    McpAuthError, UnknownTool, UnknownResource, UnknownPrompt,         what the backend raises
    McpRefused
    McpEndpoint, McpSettings, mount_mcp, settings_from_config          the endpoint and its wiring
    error_result, error_result_from, json_result                       tool results from Tether's outcomes

Message shapes come from the official SDK's type package (``mcp-types``: pydantic models and per-version
validators, no transport stack); the transport itself is written for aiohttp in :mod:`.endpoint`
(see :mod:`.jsonrpc` for why). The layer holds no policy: see :mod:`.backend`.
"""

from __future__ import annotations

import logging
from typing import Any

from .backend import (
    REFUSED,
    JsonRpcId,
    LogSink,
    McpAuthError,
    McpRefused,
    McpSessionInfo,
    PromptBackend,
    PromptGet,
    Principal,
    ProgressSink,
    ResourceBackend,
    ResourceRead,
    ToolBackend,
    ToolCall,
    UnknownPrompt,
    UnknownResource,
    UnknownTool,
)
from .endpoint import McpEndpoint, McpSettings
from .results import error_result, error_result_from, json_result
from .wire import MCP_ERROR_CODES

__all__ = [
    "JsonRpcId", "McpAuthError", "McpSessionInfo", "Principal", "ProgressSink", "ToolBackend", "ToolCall",
    "UnknownTool", "REFUSED", "LogSink", "McpRefused", "PromptBackend", "PromptGet", "ResourceBackend", "ResourceRead",
    "UnknownPrompt", "UnknownResource", "MCP_ERROR_CODES", "McpEndpoint", "McpSettings", "mount_mcp", "settings_from_config",
    "error_result", "error_result_from", "json_result",
]


def settings_from_config(cfg: Any, limits: Any = None, *, server_version: str | None = None) -> McpSettings:
    """McpSettings from ``server.mcp`` (:class:`proxy.config.McpConfig`) and ``server.limits``."""
    from ... import __version__

    extra: dict[str, Any] = {}
    if limits is not None:
        extra = {"max_body_bytes": limits.max_body_bytes, "body_timeout": limits.client_timeout,
                 "max_json_depth": limits.max_json_depth}
    return McpSettings(path=cfg.path, allowed_origins=tuple(cfg.allowed_origins),
                       session_idle_timeout=cfg.session_idle_timeout, max_sessions_per_agent=cfg.max_sessions_per_agent,
                       max_sessions=cfg.max_sessions, page_size=cfg.page_size, keepalive=cfg.keepalive,
                       public_url=cfg.public_url, instructions=cfg.instructions, max_batch=cfg.max_batch,
                       server_version=server_version or __version__, **extra)


def mount_mcp(gateway: Any, backend: ToolBackend, config: Any = None) -> McpEndpoint:
    """Serve MCP on ``gateway``'s main listener with ``backend``: builds the endpoint from ``config``
    (default: the gateway's ``server.mcp``) and its limits, and sets ``gateway.mcp``, which
    ``Gateway.handle`` dispatches to for the endpoint's paths. Returns the endpoint (call its
    ``tools_changed()`` after a reload, promotion or quarantine)."""
    cfg = config if config is not None else gateway.server_cfg.mcp
    if cfg is None:
        raise ValueError("server.mcp is not configured: add a server.mcp section to the rules")
    if getattr(gateway.server_cfg, "workers", 1) > 1:
        logging.getLogger("tether.mcp").warning(
            "server.mcp with %d workers: MCP sessions (protocol 2025-11-25 and earlier) live in the worker that "
            "opened them, so such clients may be answered 404 by another worker and start over; 2026-07-28 "
            "clients have no sessions and are unaffected", gateway.server_cfg.workers)
    endpoint = McpEndpoint(backend, settings_from_config(cfg, gateway.limits))
    gateway.mcp = endpoint
    return endpoint
