"""Keep the README's generated sections in step with the code: ``python -m proxy.cli.readme``.

Sections between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers are rewritten:
``errors`` (the error-code table from :data:`proxy.errors.ERROR_CODES`) and ``cli`` (every command's
``--help``). A test fails when the committed README differs from what this produces, so they cannot drift.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

from ..errors import error_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def _help_of(parser: argparse.ArgumentParser) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        parser.print_help()
    return buf.getvalue().rstrip()


def cli_reference() -> str:
    import os

    from .main import build_parser

    os.environ["COLUMNS"] = "100"
    parser = build_parser()
    out = ["```text", "$ tether --help", _help_of(parser), "```"]

    def walk(p: argparse.ArgumentParser, prefix: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.extend(["", f"<details><summary><code>{prefix} {name}</code></summary>", "", "```text",
                                f"$ {prefix} {name} --help", _help_of(sub), "```", "", "</details>"])
                    walk(sub, f"{prefix} {name}")

    walk(parser, "tether")
    text = "\n".join(out)
    return re.sub(r"usage: [^\n]*\n", lambda m: m.group(0).replace("__main__.py", "tether"), text)


ROOT = README.parent


def deploy_section() -> str:
    """deploy/README.md, as the README's deployment section."""
    return (ROOT / "deploy" / "README.md").read_text(encoding="utf-8").strip()


def bench_section() -> str:
    """The latest benchmark figures (bench/results/latest.json) and how to reproduce them."""
    import json

    path = ROOT / "bench" / "results" / "latest.json"
    lines = ["`python bench/run.py` measures Tether against a direct call, nginx, a bare aiohttp forwarder and",
             "mitmproxy on loopback, interleaved (`bench/README.md` explains every configuration and target).", ""]
    if not path.exists():
        return "\n".join(lines + ["No figures recorded yet."])
    d = json.loads(path.read_text())
    m = d.get("machine", {})
    lines.append(f"Latest run: {d.get('date', '?')}, {d.get('mode', '?')} mode, {m.get('nproc', '?')} × "
                 f"{m.get('cpu_model', '?')}, Tether {m.get('versions', {}).get('tether_commit', '?')}.")
    lines += ["", "| configuration | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    configs = d.get("configs") or {}
    for name, c in (configs.items() if isinstance(configs, dict) else ((c.get("name"), c) for c in configs)):
        rps, p50, p99 = c.get("rps"), c.get("p50_ms"), c.get("p99_ms")
        if c.get("skipped") or rps is None:
            lines.append(f"| {name} | skipped: {c.get('skipped') or c.get('reason') or 'not measured'} | | |")
            continue
        lines.append(f"| {name} | {rps:,.0f} | {p50:.3f} | {p99:.3f} |")
    targets = d.get("targets") or []
    if targets:
        lines += ["", "| target | value | bound | |", "|---|---:|---|---|"]
        for t in targets:
            v = t.get("value")
            lines.append(f"| {t['target']} | {v if v is not None else '-'} | {t.get('bound', '')} | {t.get('status')} |")
    return "\n".join(lines)


def render(text: str) -> str:
    sections = {"errors": error_table_markdown(), "cli": cli_reference(), "deploy": deploy_section(),
                "bench": bench_section()}
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main() -> int:
    current = README.read_text(encoding="utf-8")
    new = render(current)
    if "--check" in sys.argv:
        if new != current:
            print("README.md is out of date: run python -m proxy.cli.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
