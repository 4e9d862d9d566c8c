"""Keep the README's generated sections in step with the code: ``python -m proxy.readme``.

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

from .errors import error_table_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def _help_of(parser: argparse.ArgumentParser) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        parser.print_help()
    return buf.getvalue().rstrip()


def cli_reference() -> str:
    from .cli import build_parser

    import os

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


def render(text: str) -> str:
    sections = {"errors": error_table_markdown(), "cli": cli_reference()}
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
            print("README.md is out of date: run python -m proxy.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
