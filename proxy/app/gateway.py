"""The gateway runtime: shared state, listeners, lifecycle.

:class:`Gateway` owns everything long-lived — the store, the journal writer, the one client session,
the compiled rules (:class:`RulesState`, swapped atomically on hot reload) — and the listeners:

* the **main agent listener** (``server.listen``): Tether's own ``/_tether/*`` endpoints and path-prefix
  routing ``/<upstream>/<path>`` to every upstream;
* one **dedicated listener per upstream** that sets ``listen`` (the SDK's base URL is then just
  ``http(s)://127.0.0.1:<port>``, which every SDK accepts unchanged), optionally with TLS;
* the **admin listener** (``server.admin_listen``): reviewers, metrics; agents are refused there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from ..config import ConfigError, RulesFile, load_rules, parse_hostport
from ..core.exchange import Exchange
from ..core.listeners import Listener, admin_host_policy
from ..core.mcp_upstreams import McpHooks, McpUpstreamRuntime
from ..core.rules import RulesState, UpstreamRuntime, build_state
from ..doors.responses import error_response, json_response
from ..doors.rest.door import REST_DOOR
from ..doors.rest.intake import REST_INTAKE
from ..doors.rest.protocol import GuardedServer
from ..errors import TetherError
from ..journal.writer import JournalWriter, base_record
from ..pipeline.runner import Pipeline
from ..pipeline.stages import SHARED_STAGES
from ..policy.credentials import CredentialError
from ..policy.jwks import KeySets
from ..safety.quota import QuotaGuard
from ..safety.ratelimit import make_rate_limiter
from ..safety.review import ReviewService
from ..safety.transactions import TransactionManager
from ..store import Store, StoreUnavailable, open_store
from ..transport.forward import make_session
from ..transport.upstream_http import OriginPool, UpstreamClient

log = logging.getLogger("tether.gateway")



class Gateway:
    def __init__(self, rules: RulesFile, *, rules_path: str | None = None, store: Store | None = None) -> None:
        self.rules_path = rules_path
        self.server_cfg = rules.server
        self.limits = rules.server.limits
        self.admin_host_policy = admin_host_policy(rules.server.admin_listen)
        self.session: aiohttp.ClientSession | None = None  # auxiliary calls (OAuth, alert webhooks)
        self.upstream_client = UpstreamClient()  # agent traffic, replays, undo steps
        self.keysets = KeySets()  # identity providers' keys, kept across rules reloads
        self.mcp_hooks = McpHooks(on_event=self._mcp_event, on_pin_problem=self._mcp_pin_problem,
                                  on_listing_failed=self._mcp_listing_failed, on_tools_changed=self._tools_changed)
        self.state: RulesState = build_state(rules, self._get_session, rules_path or "<rules>", self.keysets,
                                             mcp_hooks=self.mcp_hooks)
        self.store: Store = store or open_store(rules.server.store, synchronous=rules.server.journal.synchronous)
        from ..journal.checkpoint import signer_from_config

        jc = rules.server.journal
        self.journal = JournalWriter(self.store, max_batch=jc.max_batch,
                                     mirror_file=jc.mirror_file,
                                     on_commit=self._on_journal_commit,
                                     quiet=lambda: self._in_flight <= 1,
                                     signer=signer_from_config(jc, rules_path or "<rules>"),
                                     checkpoint_interval=jc.checkpoint_interval, checkpoint_file=jc.checkpoint_file)
        from ..safety.governance import Governance

        self.governance = Governance(self)
        self.quota = QuotaGuard(self)
        self.review = ReviewService(self)
        self.transactions = TransactionManager(self)
        self.rate_limiter = make_rate_limiter(rules.server, self.store)
        self.pipeline = Pipeline(self, REST_INTAKE + SHARED_STAGES)  # the REST door's operations
        self.mcp: Any = None  # the MCP endpoint on the main listener (server.mcp), see _mount_mcp
        if rules.server.mcp is not None:
            self._mount_mcp()
        self.listeners: list[Listener] = []
        self._runners: list[web.BaseRunner] = []
        self._sites: list[web.BaseSite] = []
        self.ready = False
        self.draining = False
        self.started_at = time.time()
        # hostname:pid alone can repeat (containers with a fixed hostname run as PID 1): add randomness
        self.instance_id = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(3).hex()}"
        self._in_flight = 0
        self._background: list[asyncio.Future[Any]] = []
        self._retiring: set[McpUpstreamRuntime] = set()  # MCP clients a reload replaced, closing once idle
        self.counters: dict[tuple[str, str, str], int] = {}

    def _mount_mcp(self) -> None:
        """The MCP door: the registry served as tools, every call through the same shared stages as the
        REST door (its own intake first), announcing new tool lists on reloads, promotions, quarantines."""
        from ..doors.mcp import mount_mcp
        from ..doors.mcp.tools import MCP_INTAKE, PipelineBackend, tool_changes_hook

        backend = PipelineBackend(self, Pipeline(self, MCP_INTAKE + SHARED_STAGES),
                                  self.server_cfg.mcp.max_result_bytes)  # type: ignore[union-attr]
        endpoint = mount_mcp(self, backend)
        self.governance.on_change.append(tool_changes_hook(endpoint))

    # -- lifecycle ------------------------------------------------------------------------------

    def origin(self, up: UpstreamRuntime) -> OriginPool:
        """The keep-alive pool forwarding to ``up`` (shared by every rules version with its URL)."""
        pool = up.pool
        if pool is None:
            pool = up.pool = self.upstream_client.pool(up.base_url, up.ssl, up.tls_key, up.egress.options)
        return pool

    def _get_session(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the client session is opened at start()"
        return self.session

    async def start(self) -> None:
        """Open the store, start the journal and bind every listener. If anything fails (a port already
        in use), what was started is stopped again before the error propagates: a half-started gateway
        would keep the store's thread and the bound listeners alive, and the process could not exit."""
        await self.store.open()
        try:
            self.journal.start()
            self.session = make_session()
            # fetch the issuers' keys now (briefly): a gateway that starts ready can verify its first token
            await self.keysets.start(self.state.verifier.keysets_in_use, wait=min(5.0, self.limits.client_timeout))
            await self.governance.start()
            await self.journal.write(base_record("system", event="started", instance=self.instance_id,
                                                 rules_version=self.state.registry.version, pid=os.getpid()))
            await self._start_mcp_upstreams(self.state.mcp_upstreams.values())
            await self._start_listeners()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._background.append(asyncio.ensure_future(self.review.sweep_loop(self.server_cfg.review.sweep_interval)))
        self._background.append(asyncio.ensure_future(self.transactions.sweep_loop()))
        jc = self.server_cfg.journal
        if jc.retention_age is not None or jc.retention_records is not None:
            self._background.append(asyncio.ensure_future(self._retention_loop()))
        self.ready = True
        log.info("tether ready", extra={"fields": {"listeners": [f"{l.name}={l.host}:{l.bound_port}"
                                                                 for l in self.listeners]}})

    async def _start_listeners(self) -> None:
        srv = self.server_cfg
        all_cred = frozenset().union(*(u.credential_headers for u in self.state.upstreams.values()))
        main = Listener("main", srv.listen, None, all_cred, srv.tls)
        self.listeners.append(main)
        for name, up in self.state.upstreams.items():
            if up.cfg.listen:
                self.listeners.append(Listener(f"upstream:{name}", up.cfg.listen, name, up.credential_headers,
                                               up.cfg.tls))
        for lst in self.listeners:
            if lst.upstream_name:
                lst.upstream = self.state.upstreams[lst.upstream_name]
            await self._serve(lst)
        from ..doors.admin.api import build_admin_app

        admin_app = build_admin_app(self)
        runner = web.AppRunner(admin_app, handle_signals=False, access_log=None)
        await runner.setup()
        ah, ap = parse_hostport(srv.admin_listen)
        site = web.TCPSite(runner, ah, ap, reuse_port=srv.workers > 1)
        self._runners.append(runner)
        await _bind(site, ah, ap, "server.admin_listen")
        self._sites.append(site)
        self.admin_port = _bound_port(site)

    async def _serve(self, lst: Listener) -> None:
        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return await self.handle(request, lst)

        server = GuardedServer(handler, header_timeout=self.limits.client_timeout, on_parse_error=self._on_parse_error,
                               max_line_size=max(self.limits.max_url_length + 64, 8190),
                               max_field_size=self.limits.max_header_bytes, max_headers=self.limits.max_headers + 32,
                               access_log=None, auto_decompress=False, keepalive_timeout=75.0)
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        ctx = None
        if lst.tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(lst.tls.cert), str(lst.tls.key))
        site = web.TCPSite(runner, lst.host, lst.port, ssl_context=ctx, reuse_port=self.server_cfg.workers > 1)
        self._runners.append(runner)
        await _bind(site, lst.host, lst.port,
                    f"upstreams.{lst.upstream_name}.listen" if lst.upstream_name else "server.listen")
        lst.bound_port = _bound_port(site)
        self._sites.append(site)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace``), flush the journal."""
        self.ready = False
        self.draining = True
        for ev in list(self.journal._listeners):  # wake event streams so they notice the drain
            ev.set()
        grace = self.server_cfg.grace_period if grace is None else grace
        if self.mcp is not None:
            self.mcp.close()  # ends the MCP sessions' GET streams
        for site in self._sites:
            try:
                await site.stop()
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + grace
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001
                pass
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(rt.close() for rt in [*self.state.mcp_upstreams.values(), *self._retiring]),
                             return_exceptions=True)
        await self.governance.stop()
        try:
            await self.journal.write(base_record("system", event="stopped", instance=self.instance_id))
        except Exception:  # noqa: BLE001
            pass
        await self.journal.close()
        await self.keysets.close()
        if self.session is not None:
            await self.session.close()
        await self.upstream_client.close()
        await self.quota.close()
        await self.rate_limiter.close()
        await self.store.close()

    async def _retention_loop(self) -> None:
        """Archive old journal records periodically (one replica at a time, by lease)."""
        from ..journal.writer import archive

        jc = self.server_cfg.journal
        while True:
            try:
                if await self.store.try_lease("journal-retention", self.instance_id, jc.retention_interval * 2):
                    path = await archive(self.store, str(jc.archive_dir), older_than=jc.retention_age,
                                         keep_records=jc.retention_records)
                    if path is not None:
                        await self.journal_system("journal_archived", file=str(path))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retry next round
                log.error("journal retention failed: %s", exc)
            await asyncio.sleep(jc.retention_interval)

    # -- reload ---------------------------------------------------------------------------------

    async def reload(self, source: str | None = None) -> tuple[bool, str]:
        """Atomically swap in the rules from ``rules_path``; a bad file leaves the old rules in force."""
        path = self.rules_path
        if path is None:
            return False, "no rules file to reload"
        try:
            rules = load_rules(path)
            new_state = build_state(rules, self._get_session, path, self.keysets, previous=self.state,
                                    mcp_hooks=self.mcp_hooks)
        except ConfigError as exc:
            log.error("rules reload rejected; the previous rules stay in force: %s", exc)
            await self.journal_system("rules_reload_failed", error=str(exc), source=source)
            await self.governance.alert("rules_reload_failed", {"file": path, "error": str(exc)})
            return False, str(exc)
        old_mcp = self.state.mcp_upstreams
        self.state = new_state
        await self._swap_mcp_upstreams(old_mcp, new_state.mcp_upstreams)
        for lst in self.listeners:
            if lst.upstream_name:
                lst.upstream = new_state.upstreams.get(lst.upstream_name)
        # keep-alive connections to an origin the new rules no longer name are closed, not left to idle
        self.upstream_client.retire_except({(u.base_url, u.tls_key) for u in new_state.upstreams.values()})
        if self.mcp is not None:
            self.mcp.tools_changed()  # open MCP sessions are told their tool lists may have changed
        await self.journal_system("rules_reloaded", rules_version=new_state.registry.version, source=source)
        log.info("rules reloaded (version %s)", new_state.registry.version)
        import gc

        if gc.get_freeze_count():  # a serving process (run_forever): freeze the new rules, free the old
            settle_heap()
        return True, new_state.registry.version

    # -- MCP upstreams ------------------------------------------------------------------------------

    async def _start_mcp_upstreams(self, runtimes: Any) -> None:
        """Start MCP upstreams' clients and list their tools, waiting briefly (a server that is down
        leaves its tools hidden until it answers: Tether starts anyway)."""
        await asyncio.gather(*(rt.start(wait=min(rt.cfg.timeouts.connect, 10.0)) for rt in runtimes))

    async def _swap_mcp_upstreams(self, old: dict[str, McpUpstreamRuntime], new: dict[str, McpUpstreamRuntime]) -> None:
        """After a reload: new clients started, replaced ones closed once their calls end (kept ones,
        whose configuration did not change, keep their session and their stdio process)."""
        kept = {id(rt) for rt in new.values()}
        await self._start_mcp_upstreams([rt for rt in new.values() if not rt.started])
        for rt in old.values():
            if id(rt) not in kept:
                self._retiring.add(rt)
                task = asyncio.ensure_future(rt.close_when_idle(rt.cfg.timeouts.call))
                task.add_done_callback(lambda _t, rt=rt: self._retiring.discard(rt) if rt.closed else None)
                self._background.append(task)

    def _mcp_event(self, event: dict[str, Any]) -> None:
        """An MCP upstream client's event (sessions, server→client requests, stray messages): journaled."""
        ev = dict(event)
        name = str(ev.pop("event", "mcp_upstream"))
        try:
            self.journal.submit(base_record("mcp", event=name, **ev))
        except Exception:  # noqa: BLE001 - the journal reports its own failures
            log.debug("could not journal %s", name)

    async def _mcp_pin_problem(self, upstream: str, st: Any) -> None:
        """A pinned tool the server lists differently (or not at all): hidden and refused; journaled and
        alerted once per new definition."""
        await self.governance.alert("tool_definition_changed", {
            "upstream": upstream, "tool": st.tool_name, "state": st.state, "expected": st.expected,
            "actual": st.actual, "capabilities": list(st.capabilities), "reason": st.reason})

    async def _mcp_listing_failed(self, upstream: str, why: str) -> None:
        await self.journal_system("mcp_tools_unlisted", upstream=upstream, error=why)

    def _tools_changed(self) -> None:
        if self.mcp is not None:
            self.mcp.tools_changed()

    async def journal_system(self, event: str, **fields: Any) -> None:
        try:
            await self.journal.write(base_record("system", event=event, instance=self.instance_id, **fields))
        except Exception as exc:  # noqa: BLE001
            log.error("could not journal %s: %s", event, exc)

    # -- requests -------------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest, lst: Listener) -> web.StreamResponse:
        raw = request.raw_path
        if raw.startswith("/_tether/"):
            from ..doors.rest.control import handle_control

            return await handle_control(self, request, lst)
        if self._in_flight >= self.limits.max_in_flight or self.draining:
            return self._overloaded(request, lst)
        if self.mcp is not None and lst.upstream_name is None and self.mcp.owns(raw):
            self._in_flight += 1
            try:
                return await self.mcp.handle(request, lst.host_allowed)
            finally:
                self._in_flight -= 1
        state = self.state
        ex = Exchange(REST_DOOR, state.registry, lst.upstream, request.method, request.raw_path, request.headers,
                      request)
        ex.state = state
        ex.listener = lst
        self._in_flight += 1
        try:
            await self.pipeline.run(ex)
        finally:
            self._in_flight -= 1
        return ex.response

    def _overloaded(self, request: web.BaseRequest, lst: Listener) -> web.StreamResponse:
        """Fast refusal beyond max_in_flight (bounded work, bounded memory); recorded without waiting."""
        from ..core.exchange import new_request_id

        rid = new_request_id()
        code = "not_ready" if self.draining else "overloaded"
        err = TetherError(code, "the gateway is draining" if self.draining else
                          f"more than {self.limits.max_in_flight} requests in flight", headers={"Retry-After": "1"})
        self.journal.submit(base_record("request", request_id=rid, method=request.method,
                                        path=request.raw_path.partition("?")[0][:2048], decision="denied",
                                        reason=code, upstream=lst.upstream_name) | {"status": err.status})
        self.governance.on_overload()
        return error_response(err, rid)

    async def _on_parse_error(self, request: web.BaseRequest, err: TetherError) -> web.StreamResponse:
        """A request llhttp refused: answer Tether's JSON error and journal the denial."""
        from ..core.exchange import new_request_id

        rid = new_request_id()
        try:
            await self.journal.write(base_record(
                "request", request_id=rid, method=request.method if request.method else None,
                path=None, decision="denied", reason=err.code) | {"status": err.status, "stage": "http_parser",
                                                                    "message": err.message})
        except Exception:  # noqa: BLE001 - the refusal stands either way
            log.error("could not journal a parser refusal")
        return error_response(err, rid)

    def observe(self, ex: Exchange) -> None:
        """Count a finished request (metrics and the governance SLIs read these)."""
        self.governance.observe(ex)

    def _on_journal_commit(self, seconds: float, records: int) -> None:
        self.governance.on_journal_commit(seconds, records)

    # -- readiness ------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        ok = self.ready and not self.draining
        checks["listening"] = self.ready
        try:
            await self.store.ping()
            checks["store"] = "ok"
        except StoreUnavailable as exc:
            checks["store"] = f"unavailable: {exc}"
            ok = False
        checks["journal"] = "ok" if self.journal.healthy else f"failing: {self.journal.last_error}"
        ok = ok and self.journal.healthy
        creds: dict[str, str] = {}
        for name, up in self.state.upstreams.items():
            try:
                up.injector.check()
                creds[name] = "ok"
            except CredentialError as exc:
                creds[name] = f"unavailable: {exc}"
                ok = False
        checks["credentials"] = creds
        if self.state.mcp_upstreams:  # reported, not a readiness condition (as a REST upstream that is down)
            checks["mcp_upstreams"] = {
                n: f"ok ({sum(1 for s in rt.pins.values() if s.state == 'ok')} of {len(rt.pins)} pinned tools)"
                if rt.tools is not None else f"tools hidden: {rt.listing_error}"
                for n, rt in self.state.mcp_upstreams.items()}
        id_ok, checks["identity"] = self.state.verifier.readiness()
        return ok and id_ok, checks


class ListenError(OSError):
    """A listener could not bind; the message names the address, the setting and the reason."""


async def _bind(site: web.TCPSite, host: str, port: int, setting: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's message repeats the address
        err = ListenError(f"cannot listen on {host}:{port} ({setting}): {reason}")
        err.errno = exc.errno
        raise err from None


def _bound_port(site: web.BaseSite) -> int:
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        return int(server.sockets[0].getsockname()[1])
    return 0


async def run_forever(gw: Gateway) -> None:
    """Start, serve until SIGTERM/SIGINT (graceful drain), reload on SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(gw.reload("SIGHUP")))
    await gw.start()
    settle_heap()
    watcher = asyncio.ensure_future(_watch_rules(gw, stop))
    announce(_ready_banner(gw))
    await stop.wait()
    log.info("draining (grace %ss)", gw.server_cfg.grace_period)
    watcher.cancel()
    await gw.stop()


def announce(line: str) -> None:
    """Write one line to stdout in a single ``write``: the workers of ``--workers N`` share that pipe, and
    ``print`` under ``PYTHONUNBUFFERED`` (the text layer writes through) issues the text and its newline
    as two writes — two workers starting together then produced ``{...}{...}\n\n``, a line no reader
    could parse (a supervisor watching for the ready banner waited forever). One write of up to
    PIPE_BUF bytes to a pipe is atomic, so lines from several workers never mix."""
    data = (line + "\n").encode()
    sys.stdout.flush()  # whatever was printed before goes first
    while data:
        n = os.write(sys.stdout.fileno(), data)
        data = data[n:]


GC_THRESHOLD = (2000, 10, 10)  # CPython's default is (700, 10, 10)


def settle_heap() -> None:
    """After start (and after each reload): collect, then freeze what is alive — modules, the compiled
    rules, the registry, the connection pools — so that no collection walks it again, and collect the
    youngest generation less often.

    Why: a gateway's heap is ~100,000 objects that live as long as it does, and CPython walked all of
    them in every full collection: a full collection every few seconds under load, 60–125 ms each on
    the benchmark machine (the loop stalled that long; Tether GET's p99 was 105 ms at 32 connections).
    Frozen, that walk is a few thousand objects (<1.5 ms). Requests free almost all they allocate by
    reference counting: collecting the youngest generation after 2,000 net allocations instead of 700
    takes it from ~50 collections a second under load to a few a minute, without letting cyclic
    garbage grow past that bound. A reload unfreezes first, so that rules it replaced are collected."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def _watch_rules(gw: Gateway, stop: asyncio.Event) -> None:
    """Reload when the rules file changes (a ConfigMap update), polling its mtime each second."""
    if not gw.rules_path:
        return
    def stamp() -> tuple[float, int] | None:
        try:
            st = os.stat(gw.rules_path)  # type: ignore[arg-type]
            return (st.st_mtime, st.st_size)
        except OSError:
            return None
    last = stamp()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        cur = stamp()
        if cur is not None and cur != last:
            last = cur
            await gw.reload("file changed")


def _ready_banner(gw: Gateway) -> str:
    import orjson

    return orjson.dumps({
        "event": "ready",
        "listeners": {l.name: f"{'https' if l.tls else 'http'}://{l.host}:{l.bound_port}" for l in gw.listeners},
        "admin": f"http://{parse_hostport(gw.server_cfg.admin_listen)[0]}:{gw.admin_port}",
        "store": gw.store.description,
        "rules_version": gw.state.registry.version,
    }).decode()


__all__ = ["Gateway", "ListenError", "run_forever", "error_response",
           "json_response"]
