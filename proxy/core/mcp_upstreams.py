"""MCP upstreams, compiled: one :class:`McpUpstreamRuntime` per upstream of ``kind: mcp``.

A runtime owns Tether's client for the server (:mod:`proxy.mcp_upstream`: its own session, credential and
JSON-RPC ids) and what Tether knows of the server's tools: the last listing and, against the rules in
force, each pinned tool's state (:func:`~proxy.mcp_upstream.pins.check_pins`). Only a tool whose listed
definition carries its pin is shown to agents and called — by an agent, a replay, an undo or a pre-image
read alike; a ``changed`` or ``missing`` one is hidden and refused (``tool_definition_changed``), and a
listing that fails hides all of the upstream's tools (fail closed).

The listing is refreshed when the server says its tools changed (``notifications/tools/list_changed``),
when Tether's session is new (a reconnection: the server may have been replaced), every
``refresh_interval``, and — sooner, with backoff — after a failed listing. A call made in a session newer
than the last listing waits for a listing in that session first (:meth:`McpUpstreamRuntime.current`).
Each change of what agents may see moves :attr:`McpUpstreamRuntime.version` (part of the MCP door's
``tools_version``, so open sessions are told) and calls the gateway's hooks; a definition that differs
from its pin is reported once per new digest (journal and alert).

Resources, resource templates and prompts are listed at the same moments, when the rules grant any of
them on this upstream and the server declares them (a failure hides them; resources are read through a
granted template whether listed or not, prompts fetched by their granted name): they are not pinned, so
they only feed what agents are shown (``resources/list``, ``prompts/list``). Their versions
(:attr:`~McpUpstreamRuntime.resources_version`, :attr:`~McpUpstreamRuntime.prompts_version`) move with
them, and the same hook announces it.

A runtime outlives a rules reload when its upstream's configuration is unchanged (its session, its stdio
process and its listing are kept; the pins are checked again against the new capabilities,
:meth:`McpUpstreamRuntime.bind`); otherwise the gateway starts the new one and closes the old one once its
calls have ended (:meth:`McpUpstreamRuntime.close_when_idle`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mcp_types import CallToolResult, GetPromptResult, Prompt, ReadResourceResult, Resource, ResourceTemplate, Tool

from adapters.base import Adapter

from ..config import McpCapabilityConfig, McpUpstreamConfig
from ..errors import TetherError
from ..mcp_upstream import McpUpstream, PinStatus, build_mcp_upstream, check_pins

log = logging.getLogger("tether.mcp_upstreams")

RETRY_MIN = 1.0  # seconds before a failed listing is tried again (doubling up to refresh_interval)


@dataclass
class McpHooks:
    """What the process does about a runtime's news (all optional; none may block)."""

    on_event: Callable[[dict[str, Any]], Any] | None = None  # client events: journal without waiting
    on_pin_problem: Callable[[str, PinStatus], Any] | None = None  # a pinned tool changed/missing (once per digest)
    on_listing_failed: Callable[[str, str], Any] | None = None  # the upstream's tools are hidden: why
    on_tools_changed: Callable[[], Any] | None = None  # what agents may see moved (announce new tool lists)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # hooks' coroutines, kept until done


class McpUpstreamRuntime:
    """One MCP upstream, ready to use (see the module doc). Shares the attributes the shared pipeline
    stages read of a REST :class:`~proxy.core.rules.UpstreamRuntime` (``name``, ``cfg``, ``adapter``: the
    generic one, which checks no header and plans no REST undo); ``is_mcp`` tells the two apart."""

    is_mcp = True
    credential_headers: frozenset[str] = frozenset()  # the agent sends no headers upstream: a tool call has none
    credential_params: tuple[str, ...] = ()
    record_fields: dict[str, str] = {}  # no provenance stamping into a tool's arguments
    provenance_headers = False

    def __init__(self, name: str, cfg: McpUpstreamConfig, hooks: McpHooks | None = None) -> None:
        self.name = name
        self.cfg = cfg
        self.hooks = hooks or McpHooks()
        self.adapter = Adapter()
        self.client: McpUpstream = build_mcp_upstream(name, cfg, on_event=self._on_event,
                                                      on_notification=self._on_notification)
        self.tools: list[Tool] | None = None  # the last listing; None: none (yet, or it failed)
        self.listing_error: str | None = "not listed yet"
        self.listed_gen = -1  # the client's session generation the listing was made in
        self.capabilities: dict[str, McpCapabilityConfig] = {}
        self.pins: dict[str, PinStatus] = {}
        self.version = 0
        # resources, templates and prompts: the last listing of each (None: not listed — not wanted by the
        # rules, not declared by the server, or the listing failed), and versions that move with them
        self.resources: list[Resource] | None = None
        self.templates: list[ResourceTemplate] | None = None
        self.prompts: list[Prompt] | None = None
        self.resources_version = 0
        self.prompts_version = 0
        self._extras_sig: dict[str, Any] = {}
        self._extras_for: tuple[bool, bool] = (False, False)  # (resources, prompts) wanted at the last listing
        self._signature: Any = None
        self._reported: set[tuple[str, str, str | None]] = set()  # (tool, state, actual digest) already told
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task[None] | None = None
        self._loop: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self.in_flight = 0
        self.started = False
        self.closed = False

    def __repr__(self) -> str:
        return f"<McpUpstreamRuntime {self.name} v{self.version} {len(self.tools or [])} tools>"

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, wait: float | None = None) -> None:
        """Start the client (a stdio server's process), list the tools (waiting at most ``wait``
        seconds: a server that is down does not hold Tether's start), and refresh from then on."""
        if self.started:
            return
        self.started = True
        await self.client.start()
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop().create_task(self._refresh_loop(), name=f"mcp-refresh:{self.name}")
        if wait:
            try:
                await asyncio.wait_for(asyncio.shield(self.refresh("start")), wait)
            except (asyncio.TimeoutError, TimeoutError):
                log.warning("MCP upstream %s: tools not listed within %gs; hidden until they are", self.name, wait)
            except Exception:  # noqa: BLE001 - the listing failed (logged, reported): hidden, the loop retries
                pass

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for t in (self._loop, self._pending):
            if t is not None:
                t.cancel()
        await self.client.close()

    async def close_when_idle(self, timeout: float) -> None:
        """Close once the calls in flight have ended (at most ``timeout`` seconds): a reload that replaced
        this upstream's configuration lets its calls finish."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.close()

    # -- the rules in force -----------------------------------------------------------------------

    def bind(self, capabilities: Mapping[str, Any]) -> None:
        """Check the pins of this upstream's capabilities (of the rules in force) against the listing."""
        self.capabilities = {n: c for n, c in capabilities.items()
                             if isinstance(c, McpCapabilityConfig) and c.upstream == self.name}
        self._apply()
        if self._extras_wanted() != self._extras_for:  # resources or prompts newly granted (or no more)
            self.schedule_refresh("rules changed")

    def _extras_wanted(self) -> tuple[bool, bool]:
        kinds = {c.kind for c in self.capabilities.values()}
        return "resource" in kinds, "prompt" in kinds

    # -- listing ----------------------------------------------------------------------------------

    async def refresh(self, why: str) -> None:
        """List the tools now and check the pins (one listing at a time; a failure hides every tool)."""
        async with self._lock:
            try:
                tools = await self.client.list_tools()
            except Exception as exc:  # noqa: BLE001 - McpUpstreamError; anything else fails closed too
                msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                first = self.tools is not None or self.listing_error != msg
                self.tools, self.listing_error, self.listed_gen = None, msg, -1
                if first:
                    log.warning("MCP upstream %s: listing its tools failed (%s): its tools are hidden", self.name, msg)
                    self._call(self.hooks.on_listing_failed, self.name, msg)
                self._apply()
                self._set_extras(None, None, None)
                raise
            self.tools, self.listing_error, self.listed_gen = tools, None, self.client.session_gen
            log.debug("MCP upstream %s: %d tools listed (%s)", self.name, len(tools), why)
            self._apply()
            await self._list_extras()

    async def _list_extras(self) -> None:
        """List resources, templates and prompts — only those the rules grant on this upstream and the
        server declares; one that fails is hidden (logged), never the tools."""
        wanted = self._extras_wanted()
        self._extras_for = wanted
        caps = self.client.server_capabilities
        resources = templates = prompts = None
        if wanted[0] and caps is not None and caps.resources is not None:
            try:
                resources = await self.client.list_resources()
                templates = await self.client.list_resource_templates()
            except Exception as exc:  # noqa: BLE001 - McpUpstreamError: hidden
                log.warning("MCP upstream %s: listing its resources failed (%s): hidden", self.name,
                            getattr(exc, "message", None) or exc)
                resources = templates = None
        if wanted[1] and caps is not None and caps.prompts is not None:
            try:
                prompts = await self.client.list_prompts()
            except Exception as exc:  # noqa: BLE001
                log.warning("MCP upstream %s: listing its prompts failed (%s): hidden", self.name,
                            getattr(exc, "message", None) or exc)
        self._set_extras(resources, templates, prompts)

    def _set_extras(self, resources: list[Resource] | None, templates: list[ResourceTemplate] | None,
                    prompts: list[Prompt] | None) -> None:
        """Keep the listings; move a version (and announce it) when what they say changed."""
        def sig(items: list[Any] | None) -> Any:
            return None if items is None else tuple(i.model_dump_json(by_alias=True, exclude_none=True) for i in items)

        moved = False
        new_res = (sig(resources), sig(templates))
        if new_res != self._extras_sig.get("resources", (None, None)):
            self._extras_sig["resources"] = new_res
            self.resources_version += 1
            moved = True
        new_prompts = sig(prompts)
        if new_prompts != self._extras_sig.get("prompts"):
            self._extras_sig["prompts"] = new_prompts
            self.prompts_version += 1
            moved = True
        self.resources, self.templates, self.prompts = resources, templates, prompts
        if moved:
            self._call(self.hooks.on_tools_changed)

    def schedule_refresh(self, why: str) -> None:
        """Refresh soon, in the background (a notification or a new session asked for it)."""
        if self.closed or not self.started:
            return
        if self._pending is not None and not self._pending.done():
            return

        async def run() -> None:
            try:
                await self.refresh(why)
            except Exception:  # noqa: BLE001 - hidden and logged; the loop tries again
                if self._wake is not None:
                    self._wake.set()

        self._pending = asyncio.get_running_loop().create_task(run(), name=f"mcp-relist:{self.name}")

    async def _refresh_loop(self) -> None:
        delay = RETRY_MIN
        while not self.closed:
            wait = self.cfg.refresh_interval if self.tools is not None else min(delay, self.cfg.refresh_interval)
            assert self._wake is not None
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            self._wake.clear()
            try:
                await self.refresh("periodic")
                delay = RETRY_MIN
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - logged by refresh
                delay = min(delay * 2, self.cfg.refresh_interval)

    async def current(self, timeout: float | None = None) -> None:
        """Make sure the listing was made in the session calls will use now: a session opened since (the
        server restarted, perhaps as another version) is listed and checked again before a call goes."""
        client = self.client
        if client.ready and client.session_gen == self.listed_gen:
            return
        try:
            await asyncio.wait_for(self.refresh("session changed"), timeout or self.cfg.timeouts.request)
        except (asyncio.TimeoutError, TimeoutError):
            raise TetherError("upstream_unavailable", f"MCP upstream {self.name!r}: its tools could not be listed "
                                                      "in time, so none is called") from None
        except TetherError:
            raise
        except Exception:  # noqa: BLE001 - the listing failed: hidden, refused below
            pass

    # -- what may be called -----------------------------------------------------------------------

    def status(self, tool: str) -> PinStatus | None:
        return self.pins.get(tool)

    def usable(self, tool: str) -> Tool | None:
        """The listed definition of ``tool`` when it carries its pin, else None (hidden)."""
        st = self.pins.get(tool)
        return st.tool if st is not None and st.state == "ok" else None

    def pinned(self, tool: str) -> Tool:
        """The listed, pinned definition of ``tool``, or the refusal Tether gives for it."""
        st = self.pins.get(tool)
        if st is not None and st.state == "ok" and st.tool is not None:
            return st.tool
        if self.tools is None:
            raise TetherError("upstream_unavailable",
                              f"MCP upstream {self.name!r}: its tools could not be listed ({self.listing_error}); "
                              "none is called until they are")
        why = st.reason if st is not None else "no capability pins it"
        raise TetherError("tool_definition_changed",
                          f"tool {tool!r} of MCP upstream {self.name!r} is refused: {why} (a person re-approves "
                          "it with `tether rules pin --accept`)",
                          details={"upstream": self.name, "tool": tool,
                                   "state": st.state if st is not None else "unpinned",
                                   "expected": st.expected if st is not None else None,
                                   "actual": st.actual if st is not None else None})

    async def call(self, tool: str, arguments: Mapping[str, Any] | None, **kw: Any) -> CallToolResult:
        """``client.call_tool``, counted (a replaced runtime is closed only once its calls have ended)."""
        self.in_flight += 1
        try:
            return await self.client.call_tool(tool, arguments, **kw)
        finally:
            self.in_flight -= 1

    async def read(self, uri: str, **kw: Any) -> ReadResourceResult:
        """``client.read_resource``, counted. Which URIs may be read is decided before (the grants)."""
        self.in_flight += 1
        try:
            return await self.client.read_resource(uri, **kw)
        finally:
            self.in_flight -= 1

    async def prompt(self, name: str, arguments: Mapping[str, str] | None, **kw: Any) -> GetPromptResult:
        """``client.get_prompt``, counted."""
        self.in_flight += 1
        try:
            return await self.client.get_prompt(name, arguments, **kw)
        finally:
            self.in_flight -= 1

    # -- internals --------------------------------------------------------------------------------

    def _apply(self) -> None:
        """Recompute the pins; report new problems once; move ``version`` when what agents see moves."""
        if self.tools is None:
            self.pins = {}
        else:
            self.pins = check_pins(self.capabilities, self.tools, upstream=self.name)
            for name, st in self.pins.items():
                if st.state == "ok":
                    continue
                key = (name, st.state, st.actual)
                if key not in self._reported:
                    self._reported.add(key)
                    log.warning("MCP upstream %s: tool %s is %s (%s); hidden and refused", self.name, name,
                                st.state, st.reason)
                    self._call(self.hooks.on_pin_problem, self.name, st)
        sig = (self.tools is not None, tuple(sorted((n, s.state, s.actual) for n, s in self.pins.items())))
        if sig != self._signature:
            first = self._signature is None
            self._signature = sig
            self.version += 1
            if not first:
                self._call(self.hooks.on_tools_changed)

    def _on_notification(self, method: str, params: dict[str, Any]) -> None:
        if method in ("notifications/tools/list_changed", "notifications/resources/list_changed",
                      "notifications/prompts/list_changed"):
            self.schedule_refresh(method[len("notifications/"):])

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "mcp_upstream_session" and event.get("state") in ("opened", "reinitialized") \
                and self.listed_gen != -1:
            self.schedule_refresh("new session")  # a reconnection: the server may have changed
        self._call(self.hooks.on_event, event)

    def _call(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            out = fn(*args)
            if asyncio.iscoroutine(out):
                task = asyncio.get_running_loop().create_task(out)
                self.hooks.tasks.add(task)
                task.add_done_callback(self.hooks.tasks.discard)
        except Exception:  # noqa: BLE001 - a hook's failure never stops the runtime
            log.exception("MCP upstream %s: a hook failed", self.name)


def build_mcp_runtimes(rules: Any, hooks: McpHooks | None, previous: Mapping[str, McpUpstreamRuntime] | None,
                       problems: list[tuple[str, str]]) -> dict[str, McpUpstreamRuntime]:
    """One runtime per MCP upstream of ``rules``: the previous one kept when its configuration is unchanged
    (and not closed), a new (unstarted) one otherwise. Settings that cannot be used go to ``problems``."""
    out: dict[str, McpUpstreamRuntime] = {}
    for name, cfg in rules.mcp_upstreams.items():
        old = (previous or {}).get(name)
        if old is not None and old.cfg == cfg and not old.closed:
            out[name] = old
            continue
        try:
            out[name] = McpUpstreamRuntime(name, cfg, hooks)
        except (ValueError, TetherError) as exc:  # EgressError (a CA file, a proxy), credentials
            problems.append((getattr(exc, "path", None) or f"upstreams.{name}", getattr(exc, "message", None) or str(exc)))
    return out


__all__ = ["McpHooks", "McpUpstreamRuntime", "build_mcp_runtimes"]
