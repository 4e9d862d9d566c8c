"""``tether rules ...`` (import-openapi, import-mcp, pin, check, schema, test) and ``tether catalogue``.

Each ``rules`` subcommand is one ``add_<name>(rsub)`` function that declares its parser and points it
at its ``cmd_<name>(args)``; :data:`RULES_SUBCOMMANDS` lists them, so a new subcommand is a new pair of
functions and one more entry in that tuple.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

# --------------------------------------------------------------------------- helpers shared by subcommands


def _config_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "config", None) or os.environ.get("TETHER_CONFIG")


def add_config_and_store(p: argparse.ArgumentParser, store_help: str) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="rules file (YAML); default: $TETHER_CONFIG")
    p.add_argument("--store", metavar="URL", help=store_help)


def _write_output(text: str, output: str | None) -> None:
    if output and output != "-":
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output).with_name(Path(output).name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, output)
    else:
        sys.stdout.write(text)


def _err(msg: str) -> None:
    print(f"tether: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- rules import-openapi


def add_import_openapi(rsub: Any) -> None:
    p = rsub.add_parser(
        "import-openapi", help="capabilities from an OpenAPI 3.x description (JSON or YAML)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn an OpenAPI 3.x description into capability definitions: one per operation, with\n"
                    "the body schema as field rules. Writes are dry-run. With --output FILE an existing file\n"
                    "is merged: your edits are kept, new operations added, vanished ones reported.",
        epilog="Examples:\n"
               "  tether rules import-openapi stripe.oas.json --upstream stripe --include '/v1/customers*' \\\n"
               "      --agent billing-bot --output rules/imported/stripe.yaml\n"
               "  tether rules import-openapi salesforce.oas.json --upstream salesforce --adapter salesforce \\\n"
               "      --path-prefix '/services/data/{version}' --param 'version=v[0-9]+\\.[0-9]+' \\\n"
               "      --include '/sobjects/Opportunity*'\n"
               "Patterns (--include/--exclude) are globs, or re:REGEX, matched against the path, 'METHOD /path',\n"
               "the operationId and the capability name.")
    p.add_argument("spec", metavar="SPEC", help="the OpenAPI description (.json, .yaml)")
    p.add_argument("--upstream", required=True, help="the upstream the capabilities belong to")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="only these operations (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="not these operations (repeatable)")
    p.add_argument("--output", "-o", metavar="FILE", help="rules file to write or merge into; default: stdout")
    p.add_argument("--path-prefix", default="", metavar="PREFIX",
                   help="put before every spec path, e.g. /services/data/{version} or /services/data/v59.0")
    p.add_argument("--param", action="append", default=[], metavar="NAME=REGEX",
                   help="pattern for a path parameter wherever it appears (repeatable)")
    p.add_argument("--agent", metavar="NAME", help="grant the capabilities to this agent (writes as mode: dry_run)")
    p.add_argument("--name-prefix", default=None, metavar="TEXT",
                   help="prefix of capability names; default '<upstream>.' ('' for none)")
    p.add_argument("--allow-fields", choices=("auto", "closed", "off"), default="auto",
                   help="derive body.allow_fields from the schema's top-level properties: auto (when the "
                        "schema lists properties and allows no others, or says nothing about others), closed "
                        "(only with additionalProperties: false), off")
    p.add_argument("--url", help="upstream URL when the upstream is new (default: the spec's first server)")
    p.add_argument("--adapter", default="generic", help="adapter when the upstream is new (default generic)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only warnings")
    p.set_defaults(func=cmd_import_openapi)


def cmd_import_openapi(args: argparse.Namespace) -> int:
    from . import openapi as oa

    params: dict[str, str] = {}
    for kv in args.param:
        name, sep, rx = kv.partition("=")
        if not sep or not name:
            _err(f"--param expects NAME=REGEX, got {kv!r}")
            return 2
        try:
            import re

            re.compile(rx)
        except re.error as exc:
            _err(f"--param {name}: invalid regular expression: {exc}")
            return 2
        params[name] = rx
    opts = oa.ImportOptions(upstream=args.upstream, path_prefix=args.path_prefix, include=args.include,
                            exclude=args.exclude, name_prefix=args.name_prefix, params=params,
                            allow_fields=args.allow_fields)
    try:
        spec = oa.Spec.load(args.spec)
        oa.validate_prefix(opts.path_prefix)
        output = Path(args.output) if args.output and args.output != "-" else None
        existing, comments = oa.load_existing(output) if output else (None, 0)
        state = oa.load_state(output) if output else None
    except (oa.SpecError, OSError) as exc:
        _err(str(exc))
        return 2
    except Exception as exc:  # a YAML error in the existing output file
        _err(f"{args.output}: cannot read: {exc}")
        return 2
    up_state = ((state or {}).get("upstreams") or {}).get(opts.upstream) or {}
    names_by_op = {k: v for k, v in (up_state.get("operations") or {}).items()}
    existing_caps = (existing or {}).get("capabilities") or {}
    taken = {n for n, c in existing_caps.items() if not (isinstance(c, dict) and c.get("upstream") == opts.upstream)}
    taken |= set(names_by_op.values())
    try:
        imported = oa.import_operations(spec, opts, taken=taken, names_by_op=names_by_op)
    except oa.SpecError as exc:
        _err(str(exc))
        return 2
    upstream = oa.default_upstream(spec, opts.upstream, args.url, args.adapter)
    doc, new_state, report = oa.merge(existing, state, imported, opts, upstream=upstream, agent=args.agent)
    text = oa.render(doc)
    _write_output(text, args.output)
    if output is not None:
        oa.state_path(output).write_text(oa.dump_state(new_state), encoding="utf-8")
    out = sys.stderr
    for w in imported.warnings:
        print(f"warning: {w}", file=out)
    for key, why in imported.skipped:
        print(f"warning: skipped {key}: {why}", file=out)
    for cname, key in report.vanished:
        print(f"warning: {cname} ({key}) is no longer in the spec; it was kept — delete it by hand if it is gone",
              file=out)
    for cname, key in report.removed_by_hand:
        print(f"note: {cname} ({key}) was deleted by hand after an earlier import: not added again", file=out)
    if comments:
        print(f"warning: {args.output}: {comments} comment line(s) were not kept (keep imports in their own file)",
              file=out)
    if not args.quiet:
        ncap = len(imported.capabilities)
        print(f"{args.spec}: {imported.operations} operation(s), {ncap} imported, {len(imported.skipped)} skipped, "
              f"{len(imported.filtered_out)} filtered out", file=out)
        if output is not None:
            print(f"{args.output}: {len(report.added)} added, {len(report.updated)} updated, "
                  f"{len(report.unchanged)} unchanged, {len(report.kept_edits)} with your edits kept, "
                  f"{len(report.vanished)} vanished from the spec", file=out)
        if report.grants_added:
            print(f"agent {args.agent}: {len(report.grants_added)} grant(s) added (writes as mode: dry_run)", file=out)
        for name in report.grants_not_restored:
            print(f"note: agent {args.agent} no longer holds {name} (removed by hand): not granted again", file=out)
        for name in imported.post_reads:
            print(f"note: {name}: a POST used as a query, imported with effect: read", file=out)
        for line in imported.no_body_rules:
            print(f"note: no body rules for {line}", file=out)
    return 0


# --------------------------------------------------------------------------- rules check


def add_check(rsub: Any) -> None:
    p = rsub.add_parser(
        "check", help="lint a rules file (every problem at once)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Lint a rules file: schema errors and unknown keys, grants of unknown capabilities,\n"
                    "overlapping or shadowed routes, live writes that cannot be undone, writes without field\n"
                    "rules, capabilities nobody holds, and (with a store) capabilities with no traffic.\n"
                    "One line per finding: LEVEL file: key.path: message [code].\n"
                    "Exit status: 1 when there are errors (or warnings with --strict), else 0.")
    add_config_and_store(p, "journal to read traffic from (SQLite path or postgresql:// URL); default: the rules "
                            "file's server.store when that SQLite file exists")
    p.add_argument("files", nargs="*", metavar="FILE", help="rules files (instead of --config)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--strict", action="store_true", help="warnings fail the check too")
    p.add_argument("--no-store", action="store_true", help="do not read the journal")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    import json

    from .lint import lint_file

    files = list(args.files) or ([_config_path(args)] if _config_path(args) else [])
    if not files:
        _err("no rules file: pass FILE, --config FILE or set TETHER_CONFIG")
        return 2
    findings = []
    for f in files:
        findings.extend(lint_file(f, store=None if args.no_store else args.store, use_default_store=not args.no_store))
    if args.format == "json":
        sys.stdout.write(json.dumps([x.to_dict() for x in findings], indent=1) + "\n")
    else:
        for x in findings:
            print(x.line())
        n_err = sum(1 for x in findings if x.level == "ERROR")
        n_warn = sum(1 for x in findings if x.level == "WARNING")
        print(f"{n_err} error(s), {n_warn} warning(s)", file=sys.stderr)
    failing = {"ERROR", "WARNING"} if args.strict else {"ERROR"}
    return 1 if any(x.level in failing for x in findings) else 0


# --------------------------------------------------------------------------- rules schema


def add_schema(rsub: Any) -> None:
    p = rsub.add_parser("schema", help="print the JSON Schema of the rules file (for editors)",
                        description="The JSON Schema (draft 2020-12) of rules files, for editors: e.g. VS Code's "
                                    "YAML extension with '# yaml-language-server: $schema=tether-rules.schema.json'.")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_schema)


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from .lint import rules_json_schema

    _write_output(json.dumps(rules_json_schema(), indent=2, ensure_ascii=False) + "\n", args.output)
    return 0


# --------------------------------------------------------------------------- catalogue (top level)


def add_catalogue(sub: Any) -> None:
    p = sub.add_parser(
        "catalogue", help="the capability catalogue: who holds what, traffic, readiness",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List every capability with its upstream, effect, holders and modes, rate limits,\n"
                    "compensation, traffic from the journal and readiness class; then a summary per upstream\n"
                    "with the share of each class and the maturity stage (see proxy/cli/catalogue.py).\n"
                    "With --openapi SPEC --upstream NAME, the spec's operations that are not registered are\n"
                    "listed too.")
    add_config_and_store(p, "journal to count traffic from; default: the rules file's server.store when that "
                            "SQLite file exists")
    p.add_argument("--format", choices=("table", "markdown", "json", "csv"), default="table")
    p.add_argument("--openapi", metavar="SPEC", help="an OpenAPI description of one upstream")
    p.add_argument("--upstream", help="the upstream --openapi describes")
    p.add_argument("--path-prefix", default=None, metavar="PREFIX",
                   help="prefix of the spec's paths in the rules (default: guessed from the registered paths)")
    p.add_argument("--no-store", action="store_true", help="do not read the journal")
    p.set_defaults(func=cmd_catalogue)


def cmd_catalogue(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_rules
    from . import catalogue as cat

    path = _config_path(args)
    if not path:
        _err("no rules file: pass --config FILE or set TETHER_CONFIG")
        return 2
    if args.openapi and not args.upstream:
        _err("--openapi needs --upstream NAME")
        return 2
    try:
        rules = load_rules(path)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    traffic = None
    if not args.no_store:
        url = cat.default_store(rules.server.store, args.store)
        if url is not None:
            try:
                traffic = cat.read_traffic_sync(url)
            except Exception as exc:  # StoreUnavailable and friends
                _err(f"cannot read the journal at {url}: {exc}")
                return 1
    spec_ops = None
    if args.openapi:
        from .openapi import SpecError

        if args.upstream not in rules.upstreams:
            _err(f"--upstream {args.upstream!r} is not an upstream of {path}")
            return 2
        try:
            spec_ops = cat.spec_operations(args.openapi, rules, args.upstream, args.path_prefix)
        except SpecError as exc:
            _err(str(exc))
            return 2
    catalogue = cat.build(rules, traffic=traffic, spec=spec_ops)
    sys.stdout.write(cat.render(catalogue, args.format))
    return 0


# --------------------------------------------------------------------------- rules import-mcp, rules pin


def add_import_mcp(rsub: Any) -> None:
    p = rsub.add_parser(
        "import-mcp", help="capabilities from an MCP server's tools (with their pins)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Connect to an MCP server (Streamable HTTP URL, or a stdio command Tether starts), list its\n"
                    "tools and write one capability per tool: effect guessed (never from annotations alone) and\n"
                    "marked needs_review, the tool's inputSchema as field rules, and its pin (definition digest).\n"
                    "With --output FILE an existing file is merged: your edits are kept, new tools added, vanished\n"
                    "ones reported; a pin is never changed by a re-import (see `tether rules pin --accept`).",
        epilog="Examples:\n"
               "  tether rules import-mcp https://mcp.example.com/mcp --upstream stripe-mcp --token-env STRIPE_KEY \\\n"
               "      --agent billing-bot --output rules/imported/stripe-mcp.yaml\n"
               "  tether rules import-mcp --upstream crm -o rules/crm.yaml --env CRM_TOKEN=... --command npx -y crm-mcp\n"
               "--command takes the rest of the line: put it last. When the output file already has the upstream,\n"
               "its configuration (credentials, env) is used to connect.")
    p.add_argument("url", nargs="?", metavar="URL", help="the server's Streamable HTTP endpoint")
    p.add_argument("--upstream", required=True, help="the upstream's name in the rules")
    p.add_argument("--token-env", metavar="VAR", help="URL: send Authorization: Bearer $VAR (written as credentials)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="--command: an environment "
                   "variable of the server (repeatable; written into the rules: use it for non-secrets)")
    p.add_argument("--cwd", metavar="DIR", help="--command: the server's working directory")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="only these tools (glob or re:)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="not these tools")
    p.add_argument("--output", "-o", metavar="FILE", help="rules file to write or merge into; default: stdout")
    p.add_argument("--agent", metavar="NAME", help="grant the capabilities to this agent (writes as mode: dry_run)")
    p.add_argument("--name-prefix", default=None, metavar="TEXT", help="prefix of capability names; default "
                   "'<upstream>.'")
    p.add_argument("--allow-fields", choices=("auto", "closed", "off"), default="auto",
                   help="body.allow_fields from the inputSchema's properties (as import-openapi)")
    p.add_argument("--accept-changes", action="store_true", help="record the new pin of tools whose definition "
                   "changed since the last import (after reading the report!)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="connect and list (default 30)")
    p.add_argument("--quiet", "-q", action="store_true", help="print only warnings")
    p.add_argument("--command", nargs=argparse.REMAINDER, metavar="CMD", help="a stdio server: the command and "
                   "its arguments (the rest of the line)")
    p.set_defaults(func=cmd_import_mcp)


def _load_rules_text(path: Path) -> tuple[str, dict[str, Any]]:
    import yaml

    from ..config import _yaml_loader

    text = path.read_text(encoding="utf-8")
    data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
    return text, data if isinstance(data, dict) else {}


async def _list_mcp_tools(name: str, cfg: Any, timeout: float) -> list[Any]:
    from ..mcp_upstream import build_mcp_upstream

    up = build_mcp_upstream(name, cfg, on_event=lambda e: None)
    try:
        async with asyncio_timeout(timeout):
            await up.connect()
            return await up.list_tools()
    finally:
        await up.close()


def asyncio_timeout(seconds: float) -> Any:
    import asyncio

    return asyncio.timeout(seconds)


def _mcp_upstream_config(raw: Any, base: Path, where: str) -> Any:
    from pydantic import ValidationError

    from ..config import McpUpstreamConfig, _resolve_relative_paths

    try:
        return McpUpstreamConfig.model_validate(_resolve_relative_paths(raw, base))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ValueError(f"{where}: {problems}") from None


def cmd_import_mcp(args: argparse.Namespace) -> int:
    import asyncio

    from . import mcp_import as mi
    from . import openapi as oa
    from ..mcp_upstream import McpUpstreamError

    if args.url and args.command:
        _err("give the server's URL or --command CMD [ARG...], not both")
        return 2
    env: dict[str, str] = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            _err(f"--env expects NAME=VALUE, got {kv!r}")
            return 2
        env[k] = v
    output = Path(args.output) if args.output and args.output != "-" else None
    try:
        existing = _load_rules_text(output)[1] if output is not None and output.exists() else None
    except Exception as exc:  # a YAML error in the existing output file
        _err(f"{args.output}: cannot read: {exc}")
        return 2
    state = oa.load_state(output) if output else None
    raw_up = ((existing or {}).get("upstreams") or {}).get(args.upstream)
    if raw_up is None and not args.url and not args.command:
        _err(f"upstream {args.upstream!r} is new: give the server's URL or --command CMD [ARG...]")
        return 2
    new_up = mi.upstream_entry(args.url, args.command, env, args.cwd, args.token_env)
    if raw_up is not None and (not isinstance(raw_up, dict) or raw_up.get("kind") != "mcp"):
        _err(f"{args.output}: upstream {args.upstream!r} exists and is not an MCP upstream (kind: mcp)")
        return 2
    base = output.resolve().parent if output is not None else Path.cwd()
    try:
        cfg = _mcp_upstream_config(raw_up if raw_up is not None else new_up, base, f"upstreams.{args.upstream}")
    except ValueError as exc:
        _err(str(exc))
        return 2
    if raw_up is not None and not args.quiet:
        print(f"note: connecting with upstream {args.upstream!r} as {args.output} configures it", file=sys.stderr)
    try:
        tools = asyncio.run(_list_mcp_tools(args.upstream, cfg, args.timeout))
    except (McpUpstreamError, TimeoutError) as exc:
        _err(f"cannot list the tools of {args.upstream!r}: {exc or 'timed out'}")
        return 1
    opts = mi.McpImportOptions(upstream=args.upstream, include=args.include, exclude=args.exclude,
                               name_prefix=args.name_prefix, allow_fields=args.allow_fields,
                               accept_changes=args.accept_changes)
    up_state = ((state or {}).get("upstreams") or {}).get(args.upstream) or {}
    names_by_tool = dict(up_state.get("tools") or {})
    existing_caps = (existing or {}).get("capabilities") or {}
    taken = {n for n, c in existing_caps.items() if not (isinstance(c, dict) and c.get("upstream") == args.upstream)}
    taken |= set(names_by_tool.values())
    imported = mi.import_tools(tools, opts, names_by_tool, taken)
    doc, new_state, report = mi.merge(existing, state, imported, opts, upstream=new_up, agent=args.agent)
    _write_output(oa.render(doc, header=mi.HEADER), args.output)
    if output is not None:
        oa.state_path(output).write_text(oa.dump_state(new_state), encoding="utf-8")
    out = sys.stderr
    for t in imported.duplicates:
        print(f"warning: the server lists tool {t!r} more than once: not imported (which would a call reach?)", file=out)
    for cname, tool in report.pin_changed:
        print(f"warning: {cname}: tool {tool!r} changed since it was pinned; the old pin is kept, so it stays refused. "
              f"Read the change with `tether rules pin --accept {tool}`", file=out)
    for cname, tool in report.pin_accepted:
        print(f"note: {cname}: tool {tool!r} changed; its new definition is pinned (--accept-changes)", file=out)
    for cname, tool in report.vanished:
        print(f"warning: {cname} (tool {tool!r}) is no longer listed; it was kept — delete it by hand if it is gone",
              file=out)
    for cname, tool in report.removed_by_hand:
        print(f"note: {cname} (tool {tool!r}) was deleted by hand after an earlier import: not added again", file=out)
    if not args.quiet:
        print(f"{args.upstream}: {imported.listed} tool(s) listed, {len(imported.capabilities)} imported, "
              f"{len(imported.filtered_out)} filtered out", file=out)
        if output is not None:
            print(f"{args.output}: {len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} "
                  f"unchanged, {len(report.kept_edits)} with your edits kept", file=out)
        if report.grants_added:
            print(f"agent {args.agent}: {len(report.grants_added)} grant(s) added (writes as mode: dry_run)", file=out)
        print("every imported tool is marked needs_review: confirm its effect, then delete the key", file=out)
    return 0


def add_pin(rsub: Any) -> None:
    p = rsub.add_parser(
        "pin", help="check MCP tools against their pins, or accept a changed tool",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Connect to the rules' MCP upstreams and compare each tool capability's pin with the tool's\n"
                    "definition as listed now: ok, changed (the server changed it since it was pinned: Tether\n"
                    "hides and refuses it) or missing. --accept TOOL shows what changed (a diff against the copy\n"
                    "kept by the import, when there is one), asks, and writes the new pin into the rules file\n"
                    "(only that value: comments and layout stay).\n"
                    "Exit status: --check 1 when a tool is not ok; --accept 0 when pinned.")
    p.add_argument("--config", "-c", metavar="FILE", help="rules file (YAML); default: $TETHER_CONFIG")
    p.add_argument("--upstream", metavar="NAME", help="only this upstream")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="report every pinned tool (the default)")
    g.add_argument("--accept", metavar="TOOL", help="record TOOL's current definition as its pin")
    p.add_argument("--yes", "-y", action="store_true", help="--accept without asking")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    p.set_defaults(func=cmd_pin)


def cmd_pin(args: argparse.Namespace) -> int:
    import asyncio
    from types import SimpleNamespace

    from . import mcp_import as mi
    from . import openapi as oa
    from ..mcp_upstream import McpUpstreamError
    from ..mcp_upstream.pins import check_pins, definition_diff, tool_definition

    path_s = _config_path(args)
    if not path_s:
        _err("no rules file: pass --config FILE or set TETHER_CONFIG")
        return 2
    path = Path(path_s)
    try:
        text, data = _load_rules_text(path)
    except Exception as exc:
        _err(f"{path}: cannot read: {exc}")
        return 2
    ups = data.get("upstreams") if isinstance(data.get("upstreams"), dict) else {}
    caps = data.get("capabilities") if isinstance(data.get("capabilities"), dict) else {}
    tool_caps = {n: SimpleNamespace(upstream=c.get("upstream"), tool=c.get("tool"), pin=c.get("pin"))
                 for n, c in caps.items() if isinstance(c, dict) and isinstance(c.get("tool"), str)
                 and isinstance(ups.get(c.get("upstream")), dict) and ups[c.get("upstream")].get("kind") == "mcp"
                 and (args.upstream is None or c.get("upstream") == args.upstream)}
    if args.accept:
        tool_caps = {n: c for n, c in tool_caps.items() if c.tool == args.accept}
        if not tool_caps:
            _err(f"no capability names tool {args.accept!r}" + (f" of {args.upstream!r}" if args.upstream else ""))
            return 2
        if len({c.upstream for c in tool_caps.values()}) > 1:
            _err(f"tool {args.accept!r} is a capability of several upstreams: say which with --upstream")
            return 2
    if not tool_caps:
        _err(f"{path}: no tool capabilities of MCP upstreams")
        return 2
    base = path.resolve().parent
    statuses: dict[str, dict[str, Any]] = {}
    listed: dict[str, list[Any]] = {}
    failed = False
    for up_name in sorted({c.upstream for c in tool_caps.values()}):
        try:
            cfg = _mcp_upstream_config(ups[up_name], base, f"upstreams.{up_name}")
            listed[up_name] = asyncio.run(_list_mcp_tools(up_name, cfg, args.timeout))
        except (ValueError, McpUpstreamError, TimeoutError) as exc:
            _err(f"{up_name}: cannot list its tools: {exc or 'timed out'}")
            failed = True
            continue
        statuses[up_name] = check_pins(tool_caps, listed[up_name], upstream=up_name)  # type: ignore[arg-type]
    if args.accept:
        if failed:
            return 1
        up_name = next(iter(statuses))
        st = statuses[up_name][args.accept]
        if st.state == "ok":
            print(f"{up_name} {args.accept}: already pinned ({st.expected})")
            return 0
        if st.tool is None:
            _err(f"{up_name} {args.accept}: {st.reason}: nothing to accept")
            return 1
        state_file = oa.state_path(path)
        state = oa.load_state(path) or {}
        defs = (((state.get("upstreams") or {}).get(up_name) or {}).get("definitions") or {})
        old = defs.get(args.accept)
        old_def = old.get("definition") if isinstance(old, dict) and old.get("pin") == st.expected else None
        new_def = tool_definition(st.tool)
        print(f"{up_name} {args.accept}: {st.reason}")
        print(f"  pinned: {st.expected or '(none)'}\n  listed: {st.actual}")
        print(definition_diff(old_def, new_def, name=args.accept) or "(no pinned copy to compare with)")
        if not args.yes:
            if not sys.stdin.isatty():
                _err("not a terminal: pass --yes to accept without asking")
                return 1
            if input(f"Pin this definition of {args.accept!r} for {', '.join(st.capabilities)}? [y/N] ").strip().lower() \
                    not in ("y", "yes"):
                print("not pinned")
                return 1
        new_text = text
        try:
            for cname in st.capabilities:
                new_text = mi.set_pin(new_text, cname, str(st.actual))
        except ValueError as exc:
            _err(str(exc))
            return 1
        _write_output(new_text, str(path))
        st_up = state.setdefault("upstreams", {}).setdefault(up_name, {"kind": "mcp"})
        st_up.setdefault("definitions", {})[args.accept] = {"pin": st.actual, "definition": new_def}
        for cname in st.capabilities:  # the import's memory of what it generated follows the accepted pin
            gen = (st_up.get("capabilities") or {}).get(cname)
            if isinstance(gen, dict):
                gen["pin"] = st.actual
        state_file.write_text(oa.dump_state(state), encoding="utf-8")
        print(f"pinned {up_name} {args.accept}: {st.actual} ({', '.join(st.capabilities)} in {path})")
        return 0
    bad = failed
    for up_name, sts in statuses.items():
        for tname, st in sorted(sts.items()):
            print(f"{st.state:8} {up_name} {tname} ({', '.join(st.capabilities)}): {st.reason}")
            bad = bad or not st.ok
    return 1 if bad else 0


# --------------------------------------------------------------------------- registration


def add_test(rsub: Any) -> None:
    p = rsub.add_parser(
        "test", help="run the *.cases.yaml beside rules files (like opa test)",
        description="Run each cases file (requests and the decisions they must get) through a real gateway built "
                    "from its rules file, with upstreams replaced by a local sink. Give rules files (their "
                    "<stem>.cases.yaml is used), cases files, or folders (every *.cases.yaml in them).")
    p.add_argument("paths", nargs="*", default=["rules"], help="rules files, cases files or folders (default: rules/)")
    p.add_argument("--verbose", "-v", action="store_true", help="print passing cases too")
    p.set_defaults(func=cmd_test)


def cmd_test(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import ConfigError
    from .casetest import run_cases_sync

    cases_files: list[Path] = []
    for raw in args.paths:
        p = Path(raw)
        if p.is_dir():
            cases_files += sorted(p.glob("*.cases.yaml"))
        elif p.name.endswith(".cases.yaml"):
            cases_files.append(p)
        elif p.suffix in (".yaml", ".yml"):
            c = p.with_name(p.name[: -len(p.suffix)] + ".cases.yaml")
            if not c.exists():
                _err(f"{p}: no cases file {c.name} beside it")
                return 2
            cases_files.append(c)
        else:
            _err(f"{p}: not a rules file, cases file or folder")
            return 2
    if not cases_files:
        _err("no *.cases.yaml found")
        return 2
    failed = total = 0
    for cf in cases_files:
        try:
            results = run_cases_sync(cf)
        except ConfigError as exc:
            print(f"ERROR {cf}: {exc}")
            failed += 1
            continue
        for r in results:
            total += 1
            if not r.ok:
                failed += 1
            if args.verbose or not r.ok:
                print(f"{cf.name}: {r.describe()}")
    print(f"{total - failed}/{total} cases passed" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


RULES_SUBCOMMANDS: list[Callable[[Any], None]] = [add_import_openapi, add_check, add_schema, add_test, add_import_mcp,
                                                   add_pin]


def register(subparsers: Any) -> None:
    rules = subparsers.add_parser("rules", help="rules files: import from OpenAPI or MCP, pins, lint, JSON Schema",
                                  description="Work with rules files.")
    rsub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")

    def group_help(args: argparse.Namespace) -> int:
        rules.print_help()
        return 2

    rules.set_defaults(func=group_help)
    for add in RULES_SUBCOMMANDS:
        add(rsub)
    add_catalogue(subparsers)
