"""The ``tether`` command (also ``python -m proxy``).

Options of ``tether serve`` come from, in order of precedence: command-line flags, then ``TETHER_*``
environment variables, then the ``server:`` section of the rules file, then defaults. Each subcommand
group lives in its own module (``cli_journal``, ``cli_review``, ...) exposing ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
from typing import Any, Callable

from pydantic import ValidationError

from ..config import ConfigError, RulesFile, ServerConfig, load_rules, parse_duration

# flag dest -> (env var, ServerConfig key path, help)
SERVE_OPTIONS: list[tuple[str, str, str, str]] = [
    ("listen", "TETHER_LISTEN", "listen", "agent listener host:port (path prefixes /<upstream>/...)"),
    ("admin_listen", "TETHER_ADMIN_LISTEN", "admin_listen", "admin listener host:port (reviewers, metrics)"),
    ("store", "TETHER_STORE", "store", "SQLite file path, or postgresql://user[:pw]@host[:port]/db[?schema=NAME&...] "
                                       "(replicas sharing one database share everything)"),
    ("log_level", "TETHER_LOG_LEVEL", "log_level", "debug, info, warning or error"),
    ("workers", "TETHER_WORKERS", "workers", "worker processes sharing the listeners (SO_REUSEPORT)"),
    ("grace_period", "TETHER_GRACE_PERIOD", "grace_period", "seconds to drain in-flight requests on SIGTERM"),
    ("journal_mirror", "TETHER_JOURNAL_MIRROR", "journal.mirror_file", "JSON-lines copy of the journal, for log shippers"),
    ("journal_synchronous", "TETHER_JOURNAL_SYNCHRONOUS", "journal.synchronous",
     "SQLite durability: full (fsync every commit, default) or normal"),
    ("max_body_bytes", "TETHER_MAX_BODY_BYTES", "limits.max_body_bytes", "largest request body accepted (413 above)"),
    ("max_in_flight", "TETHER_MAX_IN_FLIGHT", "limits.max_in_flight", "requests in flight before 503 overloaded"),
]

COMMAND_MODULES = ("proxy.cli.demo", "proxy.cli.journal", "proxy.cli.review", "proxy.cli.tx", "proxy.cli.rules",
                   "proxy.cli.governance", "proxy.cli.store", "proxy.cli.misc")


def _set_path(d: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def effective_rules(args: argparse.Namespace, environ: dict[str, str] | None = None) -> RulesFile:
    """Load the rules file and apply env then flag overrides to its server section."""
    environ = dict(os.environ if environ is None else environ)
    config = getattr(args, "config", None) or environ.get("TETHER_CONFIG")
    if not config:
        raise SystemExit("tether: no rules file: pass --config FILE or set TETHER_CONFIG")
    rules = load_rules(config)
    server = rules.server.model_dump(mode="python", exclude_unset=False)
    sources: dict[str, str] = {}
    for dest, env, key, _ in SERVE_OPTIONS:
        if env in environ and environ[env] != "":
            _set_path(server, key, environ[env])
            sources[key] = f"environment variable {env}"
    for dest, env, key, _ in SERVE_OPTIONS:
        v = getattr(args, dest, None)
        if v is not None:
            _set_path(server, key, v)
            sources[key] = f"flag --{dest.replace('_', '-')}"
    try:
        new_server = ServerConfig.model_validate(server)
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            key = ".".join(str(p) for p in e["loc"])
            problems.append((f"server.{key} (from {sources.get(key, 'the file')})", e["msg"]))
        raise ConfigError(config, problems) from None
    return rules.model_copy(update={"server": new_server})


def _check_runtime() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser (it accepts far more than llhttp) or on an
    aiohttp older than 3.14.3."""
    import aiohttp
    import aiohttp.http_parser as hp

    ver = tuple(int(x) for x in aiohttp.__version__.split(".")[:3] if x.isdigit())
    if ver < (3, 14, 3):
        raise SystemExit(f"tether: aiohttp {aiohttp.__version__} is too old; 3.14.3 or newer is required")
    if hp.HttpRequestParser.__module__ != "aiohttp._http_parser" or os.environ.get("AIOHTTP_NO_EXTENSIONS"):
        raise SystemExit("tether: aiohttp is using its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS or a build "
                         "without C extensions); Tether refuses to run on it because it accepts ambiguous requests")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..logs import setup_logging

    _check_runtime()
    try:
        rules = effective_rules(args)
    except ConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    setup_logging(rules.server.log_level)
    config_path = args.config or os.environ.get("TETHER_CONFIG")
    workers = rules.server.workers
    if workers > 1:
        return _serve_workers(rules, config_path, workers)
    return _serve_one(rules, config_path)


# a worker's exit code when it cannot listen (single-process serve exits 1): restarting it cannot help
WORKER_CANNOT_LISTEN = 3


def _serve_one(rules: RulesFile, config_path: str | None, errors: list[str] | None = None,
               worker: bool = False) -> int:
    from ..app.gateway import Gateway, ListenError, run_forever

    def fail(message: str, code: int) -> int:
        print(f"tether: {message}", file=sys.stderr)
        if errors is not None:
            errors.append(message)
        return code

    try:
        gw = Gateway(rules, rules_path=config_path)
    except ConfigError as exc:
        return fail(str(exc), 2)
    try:
        run_async(run_forever(gw))
    except ListenError as exc:
        return fail(f"cannot start: {exc}", WORKER_CANNOT_LISTEN if worker else 1)
    except OSError as exc:
        return fail(f"cannot start: {exc}", 1)
    except Exception as exc:  # StoreUnavailable and friends
        from ..store import StoreUnavailable

        if isinstance(exc, StoreUnavailable):
            return fail(f"store unavailable: {exc}", 1)
        raise
    return 0


def _serve_workers(rules: RulesFile, config_path: str | None, workers: int) -> int:
    """Fork ``workers`` processes that share the listeners (SO_REUSEPORT) and the store, and supervise
    them (:class:`_Supervisor`). The store is prepared first — created, switched to WAL, migrated — so
    that workers opening it at once never race over a fresh file."""
    code, why = _in_child(lambda: _prepare_store(rules))
    if code != 0:
        print(f"tether: store unavailable: {why or f'exit code {code}'}", file=sys.stderr)
        return 1
    return _Supervisor(rules, config_path, workers).run()


def set_process_name(name: str) -> None:
    """Name this process as ``ps``/``top`` show it (Linux: /proc/<pid>/comm; elsewhere nothing)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - a name is a nicety
        pass


def die_with_parent(parent: int) -> None:
    """In a forked child: be sent SIGTERM when the supervising parent dies (Linux PR_SET_PDEATHSIG).

    Why: a supervisor killed with SIGKILL (an OOM kill, ``kill -9``) cannot pass SIGTERM on, and its
    workers would go on serving — and holding the port and the store — as orphans nobody supervises or
    restarts. With the parent-death signal they drain and stop like on any SIGTERM. If the parent died
    between the fork and this call, the child is already an orphan: it stops itself at once."""
    import signal

    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - elsewhere than Linux the supervisor's own signals are all there is
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _become_child(name: str, parent: int) -> None:
    """First steps of a process forked by the supervisor (a worker, a store helper): its name, the
    default handlers for the stop signals (not the supervisor's, which would forward them again), and
    SIGTERM when the supervisor dies (:func:`die_with_parent`)."""
    import signal

    set_process_name(name)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)
    die_with_parent(parent)


def _in_child(make_coro: Any, *, wait: bool = True) -> tuple[int, str]:
    """Run a coroutine in a short-lived child process: (exit code, its error message).

    The supervising parent forks workers for as long as it lives, so it never runs an event loop or a
    store itself: uvloop's and aiosqlite's threads (and SQLite's own mutexes) could be held at the moment
    of a fork, and a worker would then wait forever on a lock nobody will release — a gateway that never
    becomes ready. Store work (preparing it, journaling a worker's death) runs in a child that exits."""
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _become_child("tether-helper", parent)
        code = 0
        try:
            run_async(make_coro())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            code = 1
            try:
                os.write(w, f"{exc}".encode("utf-8", "replace")[:2000])
            except OSError:
                pass
        os._exit(code)
    os.close(w)
    if not wait:
        os.close(r)
        return 0, ""
    _, status = os.waitpid(pid, 0)
    try:
        why = os.read(r, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(r)
    return os.waitstatus_to_exitcode(status), why


async def _prepare_store(rules: RulesFile) -> None:
    from ..store import open_store

    store = open_store(rules.server.store, synchronous=rules.server.journal.synchronous)
    await store.open()
    await store.close()


async def _journal_event(rules: RulesFile, event: str, **fields: Any) -> None:
    """One system record written by the supervising parent (it holds no store between events)."""
    from ..journal.writer import JournalWriter, base_record
    from ..store import open_store

    store = open_store(rules.server.store, synchronous=rules.server.journal.synchronous)
    await store.open()
    writer = JournalWriter(store)
    writer.start()
    try:
        await writer.write(base_record("system", event=event, instance=f"{os.uname().nodename}:{os.getpid()}:parent",
                                       **fields))
    finally:
        await writer.close()
        await store.close()


class _Supervisor:
    """The parent of ``--workers N``: restarts a worker that dies, with backoff, journaling each death
    and restart; when one worker keeps dying (``GIVE_UP`` deaths in a row, each within ``QUICK`` seconds
    of its start) it stops the others and exits 1 with the reason. A worker whose *first* start fails
    because it cannot listen or its configuration is refused stops the gateway at once, as a single
    process would (exit 1 or 2): the port another program holds, or the secret that cannot be read, does
    not come right by restarting, and ten seconds of backoff would only hide the reason. SIGTERM/SIGINT/
    SIGHUP are passed on; after SIGTERM/SIGINT nothing is restarted and the parent exits with the worst
    worker status."""

    BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
    GIVE_UP = 5
    QUICK = 30.0
    POLL = 0.05
    STOP_MARGIN = 5.0  # seconds past the grace period a stopping worker gets before SIGKILL

    def __init__(self, rules: RulesFile, config_path: str | None, workers: int) -> None:
        self.rules = rules
        self.config_path = config_path
        self.slots: list[dict[str, Any]] = [{"slot": i, "pid": None, "started": 0.0, "deaths": 0, "due": 0.0,
                                             "pipe": None, "spawns": 0} for i in range(workers)]
        self.stopping = False
        self.kill_at: float | None = None  # when workers still draining are killed (see stop())
        self.gave_up: str | None = None
        self.worst = 0

    def spawn(self, slot: dict[str, Any]) -> None:
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            _become_child("tether-worker", parent)
            errors: list[str] = []
            code = 1
            try:
                code = _serve_one(self.rules, self.config_path, errors, worker=True)
            except BaseException as exc:  # noqa: BLE001 - report why, whatever it was
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                if errors:
                    try:
                        os.write(w, errors[-1].encode("utf-8", "replace")[:2000])
                    except OSError:
                        pass
                os._exit(code)
        os.close(w)
        slot.update(pid=pid, started=time.monotonic(), pipe=r, due=0.0, spawns=slot["spawns"] + 1)

    def forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot["pid"] is not None:
                try:
                    os.kill(slot["pid"], signum)
                except ProcessLookupError:
                    pass

    def stop(self, signum: int) -> None:
        """Pass a stop signal on and start the clock: a worker still running ``STOP_MARGIN`` seconds after
        the grace period is killed. Why: a worker that cannot finish its drain (wedged in a C library,
        stopped by a debugger) would otherwise keep the gateway from ever exiting — its port bound,
        the rollout waiting — and only the parent, another process, can still act on it."""
        self.stopping = True
        if self.kill_at is None:
            self.kill_at = time.monotonic() + float(self.rules.server.grace_period) + self.STOP_MARGIN
        self.forward(signum)

    def kill_stragglers(self) -> None:
        import signal

        for slot in self.slots:
            if slot["pid"] is not None:
                print(f"tether: worker {slot['slot']} (pid {slot['pid']}) did not stop within the grace period "
                      f"+ {self.STOP_MARGIN:g}s; killing it", file=sys.stderr)
                try:
                    os.kill(slot["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.worst = max(self.worst, 1)
        self.kill_at = float("inf")  # once

    def journal(self, event: str, **fields: Any) -> None:
        """Journal a supervisor event from a child process (see :func:`_in_child`)."""
        code, why = _in_child(lambda: _journal_event(self.rules, event, **fields))
        if code != 0:  # the workers journal their own start either way
            print(f"tether: could not journal {event}: {why or f'exit code {code}'}", file=sys.stderr)

    def run(self) -> int:
        import signal

        def on_stop(signum: int, _frame: Any) -> None:
            self.stop(signum)

        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_stop)
        signal.signal(signal.SIGHUP, lambda signum, _f: self.forward(signum))
        for slot in self.slots:
            self.spawn(slot)
        while True:
            live = [s for s in self.slots if s["pid"] is not None]
            if self.stopping and not live:
                break
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if pid == 0:
                now = time.monotonic()
                if self.kill_at is not None and now >= self.kill_at:
                    self.kill_stragglers()
                for slot in self.slots:
                    if slot["pid"] is None and slot["due"] and now >= slot["due"] and not self.stopping:
                        self.spawn(slot)
                        self.journal("worker_restarted", worker=slot["slot"], pid=slot["pid"],
                                     deaths_in_a_row=slot["deaths"])
                time.sleep(self.POLL)
                continue
            slot = next((s for s in self.slots if s["pid"] == pid), None)
            if slot is None:
                continue
            self.reaped(slot, os.waitstatus_to_exitcode(status))
        if self.gave_up:
            print(f"tether: {self.gave_up}", file=sys.stderr)
            return max(self.worst, 1)
        return self.worst

    def give_up(self, slot: dict[str, Any], pid: int | None, why: str) -> None:
        """Stop the gateway because of one worker: journaled, said on exit, the others drain and stop."""
        import signal

        self.gave_up = f"worker {slot['slot']} {why}; stopping the gateway"
        self.journal("workers_stopped", worker=slot["slot"], pid=pid, reason=self.gave_up)
        self.stop(int(signal.SIGTERM))

    def reaped(self, slot: dict[str, Any], code: int) -> None:
        pid, slot["pid"] = slot["pid"], None
        why = ""
        if slot["pipe"] is not None:
            try:
                os.set_blocking(slot["pipe"], False)
                why = os.read(slot["pipe"], 4096).decode("utf-8", "replace").strip()
            except OSError:
                pass
            os.close(slot["pipe"])
            slot["pipe"] = None
        # the gateway's exit code for this worker's (WORKER_CANNOT_LISTEN is the workers' word for 1)
        gateway_code = 1 if code == WORKER_CANNOT_LISTEN else code
        if self.stopping:
            self.worst = max(self.worst, gateway_code)
            return
        lived = time.monotonic() - slot["started"]
        slot["deaths"] = slot["deaths"] + 1 if lived < self.QUICK else 1
        status = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        reason = f"{status}" + (f": {why}" if why else "")
        if slot["spawns"] == 1 and code in (2, WORKER_CANNOT_LISTEN):
            self.worst = max(self.worst, gateway_code)
            self.give_up(slot, pid, f"could not start ({why or status})")
            return
        if slot["deaths"] >= self.GIVE_UP:
            self.give_up(slot, pid, f"keeps dying ({slot['deaths']} times in a row, each within {self.QUICK:g}s "
                                    f"of starting; last: {reason})")
            return
        delay = self.BACKOFF[min(slot["deaths"], len(self.BACKOFF)) - 1]
        slot["due"] = time.monotonic() + delay
        print(f"tether: worker {slot['slot']} (pid {pid}) died ({reason}); restarting in {delay:g}s", file=sys.stderr)
        self.journal("worker_died", worker=slot["slot"], pid=pid, status=status, reason=why or None,
                     lived_seconds=round(lived, 3), restart_in=delay)


def run_async(coro: Any) -> Any:
    """Run a coroutine on uvloop (the gateway's event loop)."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; kept for odd platforms
        return asyncio.run(coro)


def cmd_token_mint(args: argparse.Namespace) -> int:
    from ..policy.identity import MintError

    try:
        return _token_mint(args)
    except MintError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2


def _token_mint(args: argparse.Namespace) -> int:
    from ..policy.identity import mint_token

    try:
        rules = load_rules(args.config or os.environ.get("TETHER_CONFIG") or "")
    except ConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    extra: dict[str, Any] = {}
    for kv in args.claim or []:
        k, sep, v = kv.partition("=")
        if not sep:
            print(f"tether: --claim expects key=value, got {kv!r}", file=sys.stderr)
            return 2
        extra[k] = v
    if args.reviewer:
        if args.agent:
            print("tether: give --agent or --reviewer, not both", file=sys.stderr)
            return 2
        token = mint_token(rules.identity, args.reviewer, roles=[rules.identity.reviewer_role],
                           ttl=parse_duration(args.ttl), extra=extra, kid=args.kid)
    else:
        if not args.agent:
            print("tether: --agent (or --reviewer) is required", file=sys.stderr)
            return 2
        if args.agent not in rules.agents and not args.allow_unknown:
            print(f"tether: agent {args.agent!r} is not declared in {args.config}; known: "
                  f"{', '.join(rules.agents) or '(none)'} (--allow-unknown to mint anyway)", file=sys.stderr)
            return 2
        if args.on_behalf_of:
            token = mint_token(rules.identity, args.on_behalf_of, actor=args.agent, ttl=parse_duration(args.ttl),
                               extra=extra, kid=args.kid)
        else:
            token = mint_token(rules.identity, args.agent, ttl=parse_duration(args.ttl), extra=extra, kid=args.kid)
    print(token)
    return 0


def add_config_arg(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", metavar="FILE", required=False,
                   help="rules file (YAML); default: $TETHER_CONFIG")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line naming the verb, the problem and where the help is (subcommand
    parsers are made of this class too)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tether",
        description="Tether: the gateway through which AI agents act on systems of record — "
                    "identified, default-deny, journaled, dry-run first, reversible.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'tether COMMAND --help' for a command's options. Docs: README.md.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the gateway",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the gateway with a rules file.\n\n"
                    "Precedence: flags, then TETHER_* environment variables, then the rules file's\n"
                    "'server:' section, then defaults. Signals: SIGTERM/SIGINT drain and stop;\n"
                    "SIGHUP (or a change to the rules file) reloads the rules atomically.",
        epilog="Environment variables:\n  TETHER_CONFIG  the rules file (instead of --config)\n" + "\n".join(
            f"  {env:<27} --{dest.replace('_', '-')}" for dest, env, _, _ in SERVE_OPTIONS),
    )
    add_config_arg(serve)
    for dest, env, key, help_text in SERVE_OPTIONS:
        serve.add_argument(f"--{dest.replace('_', '-')}", dest=dest, default=None,
                           help=f"{help_text} [env {env}; file server.{key}]")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="development tokens")
    tsub = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND")
    mint = tsub.add_parser(
        "mint", help="mint a development JWT from the rules file's identity key",
        description="Mint a token signed with the configured HS secret (or private_key_file for RS/ES).\n"
                    "--agent A alone: the agent acting for itself (sub=A).\n"
                    "--agent A --on-behalf-of U: RFC 8693 delegation (sub=U, act.sub=A).\n"
                    "--reviewer R: a reviewer token for the admin API.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(mint)
    mint.add_argument("--agent", help="the agent the token identifies")
    mint.add_argument("--on-behalf-of", dest="on_behalf_of", help="the human the agent acts for")
    mint.add_argument("--reviewer", help="mint a reviewer token for this person instead")
    mint.add_argument("--ttl", default="1h", help="lifetime (e.g. 15m, 1h, 7d); default 1h")
    mint.add_argument("--kid", help="key id header (JWKS setups)")
    mint.add_argument("--claim", action="append", metavar="K=V", help="extra claim (repeatable)")
    mint.add_argument("--allow-unknown", action="store_true", help="mint for an agent not in the rules")
    mint.set_defaults(func=cmd_token_mint)

    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        # a group without its subcommand: show that group's help
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - every verb's failure is one line; TETHER_DEBUG=1 shows more
        return _one_line_failure(exc)


def _one_line_failure(exc: BaseException) -> int:
    """An unexpected failure as one line on stderr (the traceback only with TETHER_DEBUG=1)."""
    from ..inert import inert
    from ..store import StoreUnavailable

    if os.environ.get("TETHER_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    if isinstance(exc, StoreUnavailable):
        print(f"tether: store unavailable: {inert(exc)}", file=sys.stderr)
        return 1
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"tether: {inert(exc.strerror or exc)}{inert(where)}", file=sys.stderr)
        return 1
    text = str(exc).splitlines()[0] if str(exc) else ""
    print(f"tether: {type(exc).__name__}: {inert(text)} (set TETHER_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
