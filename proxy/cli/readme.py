"""Keep the documentation's generated sections in step with the code: ``python -m proxy.cli.readme``.

Sections between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers are rewritten, each in the one
file that holds it (:data:`GENERATED`): ``cli`` in docs/cli.md (every command's ``--help``), ``errors``
in docs/errors.md (the error-code table from :data:`proxy.errors.ERROR_CODES`) and ``bench`` in
docs/benchmarks.md (the latest figures, bench/results/latest.json). ``--check`` changes nothing and
exits 1 naming the files that are out of date; a test does the same, so they cannot drift.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

from ..errors import error_table_markdown

ROOT = Path(__file__).resolve().parents[2]


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


def _num(v: object) -> str:
    """A target's value as the table shows it: large figures with thousands separators."""
    if isinstance(v, float) and abs(v) >= 100:
        return f"{v:,.0f}"
    return "-" if v is None else str(v)


def bench_section() -> str:
    """The latest benchmark figures (bench/results/latest.json) and how to reproduce them: every
    configuration, the fsync the run measured, the store's bytes per request and the targets table.
    Sections a results file does not have (an older run) are left out."""
    import json

    path = ROOT / "bench" / "results" / "latest.json"
    lines = ["`python bench/run.py` measures Tether against a direct call, nginx, a bare aiohttp forwarder and",
             "mitmproxy on loopback, interleaved, on its REST and MCP doors, with an instant upstream and one that",
             "answers after 20 ms (`bench/README.md` explains every configuration and target).", ""]
    if not path.exists():
        return "\n".join(lines + ["No figures recorded yet."])
    d = json.loads(path.read_text())
    m = d.get("machine", {})
    lines.append(f"Latest run: {d.get('date', '?')}, {d.get('mode', '?')} mode, {m.get('nproc', '?')} × "
                 f"{m.get('cpu_model', '?')}, Tether {m.get('versions', {}).get('tether_commit', '?')}.")
    lines += ["", "| configuration | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    configs = d.get("configs") or {}
    items = list(configs.items() if isinstance(configs, dict) else ((c.get("name"), c) for c in configs))
    for name, c in items:
        rps, p50, p99 = c.get("rps"), c.get("p50_ms"), c.get("p99_ms")
        if c.get("skipped") or rps is None:
            lines.append(f"| {name} | skipped: {c.get('skipped') or c.get('reason') or 'not measured'} | | |")
            continue
        lines.append(f"| {name} | {rps:,.0f} | {p50:.3f} | {p99:.3f} |")
    fs = d.get("fsync") or {}
    if fs.get("median_ms") is not None:
        lines += ["", f"One fsync on the store's filesystem ({fs.get('filesystem', '?')}), measured in the same run: "
                      f"median {fs['median_ms']:.3f} ms (p90 {fs.get('p90_ms') or 0:.3f} ms, {fs.get('n', '?')} "
                      "fsyncs of a 4 KiB append)."]
    stores = [(name, c["store"]) for name, c in items if c.get("store")]
    if stores:
        lines += ["", "| store per request (SQLite) | journal rows | journal bytes | of which records | other tables "
                      "| store growth | files growth |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, st in stores:
            lines.append(f"| {name} | {st['journal_rows_per_request']:.2f} | {st['journal_bytes_per_request']:,.0f} | "
                         f"{st['record_bytes_per_request']:,.0f} | {st['other_bytes_per_request']:,.0f} | "
                         f"{st['store_growth_per_request']:,.0f} | {st['file_growth_per_request']:,.0f} |")
    targets = d.get("targets") or []
    if targets:
        lines += ["", "| target | value | bound | | note |", "|---|---:|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {_num(t.get('value'))} | {t.get('bound', '')} | {t.get('status')} | "
                         f"{t.get('note') or ''} |")
    return "\n".join(lines)


def bench_summary() -> str:
    """The README's short form of the latest run: when, on what, and each target's verdict (the figures
    behind them are in docs/benchmarks.md)."""
    import json

    path = ROOT / "bench" / "results" / "latest.json"
    if not path.exists():
        return "No benchmark run recorded yet: `python bench/run.py`."
    d = json.loads(path.read_text())
    m = d.get("machine", {})
    lines = [f"Latest full run of `python bench/run.py`: {d.get('date', '?')[:10]}, {m.get('nproc', '?')} × "
             f"{m.get('cpu_model', '?')}, Tether {m.get('versions', {}).get('tether_commit', '?')}",
             "(every figure, and why a target fails: [benchmarks](docs/benchmarks.md)).", "",
             "| target | value | bound | |", "|---|---:|---|---|"]
    for t in d.get("targets") or []:
        if t.get("status") in ("PASS", "FAIL"):
            lines.append(f"| {t['target']} | {_num(t.get('value'))} | {t.get('bound', '')} | {t.get('status')} |")
    return "\n".join(lines)


# file -> {section name -> what writes it}
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "docs/cli.md": {"cli": cli_reference},
    "docs/errors.md": {"errors": error_table_markdown},
    "docs/benchmarks.md": {"bench": bench_section},
    "README.md": {"bench-summary": bench_summary},
}


def render(text: str, sections: dict[str, Callable[[], str]], name: str = "the file") -> str:
    """``text`` with each named section's body replaced by what its writer produces now."""
    for section, write in sections.items():
        pattern = re.compile(rf"(<!-- BEGIN {section} -->\n)(?:.*?\n)?(<!-- END {section} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{name} has no <!-- BEGIN {section} --> ... <!-- END {section} --> markers")
        body = write()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale() -> dict[Path, str]:
    """Each generated file whose committed text differs from a fresh rendering -> that rendering."""
    out: dict[Path, str] = {}
    for rel, sections in GENERATED.items():
        path = ROOT / rel
        current = path.read_text(encoding="utf-8")
        new = render(current, sections, rel)
        if new != current:
            out[path] = new
    return out


def main() -> int:
    changed = stale()
    if "--check" in sys.argv:
        for path in changed:
            print(f"{path.relative_to(ROOT)} is out of date: run python -m proxy.cli.readme", file=sys.stderr)
        return 1 if changed else 0
    for path, text in changed.items():
        path.write_text(text, encoding="utf-8")
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
