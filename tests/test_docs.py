"""The documentation keeps its promises (issue 26 item 7).

* the generated sections (docs/cli.md, docs/errors.md, docs/benchmarks.md) are what ``python -m
  proxy.cli.readme`` writes now;
* every fenced block marked ``sh runnable`` runs as written, with ``bash -e -o pipefail``, in a fresh copy
  of the repository's files (no virtualenv, no secrets, no store), with ``tether`` on the PATH;
* the committed ``rules/tether-rules.schema.json`` is what ``tether rules schema`` prints;
* every key of the rules file is in docs/rules.md (every error code in docs/errors.md: test_reliability.py;
  the bypass count in docs/security.md: test_bypass.py);
* every relative link resolves, to a file and to a heading;
* the README's first screen holds the pitch and both set-up commands, and ``.ci/run`` runs its test
  command verbatim;
* the store path rule docs/running.md states holds: a relative ``server.store`` is beside the rules file,
  and ``tether journal verify --config F`` finds it from another folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import base_rules
from tests.procs import GatewayProcess, run_cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RUNNABLE = "sh runnable"  # the info string that marks a fenced block as runnable
_SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", "build", "dist", "test-artifacts"}
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(.*?)\s*$")


def markdown_files() -> list[Path]:
    """The project's Markdown files: the README, docs/ and the README.md of every folder."""
    out = []
    for p in sorted(ROOT.rglob("*.md")):
        rel = p.relative_to(ROOT)
        if set(rel.parts[:-1]) & _SKIP_DIRS or any(part.startswith(".venv") for part in rel.parts):
            continue
        if rel.parts[0] == "docs" or p.name == "README.md":
            out.append(p)
    return out


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, body) of each fenced code block; an indented fence (in a list item)
    has its indentation removed from the body."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.group(1), m.group(2), m.group(3)
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close.group(2)[0] == fence[0] and len(close.group(2)) >= len(fence) and not close.group(3):
                break
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        blocks.append((start, info, "\n".join(body)))
        i += 1
    return blocks


def runnable_blocks() -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for p in markdown_files():
        for line, info, body in fenced_blocks(p.read_text(encoding="utf-8")):
            if info == RUNNABLE:
                out.setdefault(str(p.relative_to(ROOT)), []).append((line, body))
    return out


def _repo_files() -> list[Path]:
    """What a fresh clone holds: tracked files plus new ones not ignored (so that uncommitted work counts)."""
    try:
        res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60)
        return [Path(n) for n in res.stdout.decode().split("\0") if n and (ROOT / n).is_file()]
    except (OSError, subprocess.SubprocessError):
        ignored = re.compile(r"(\.db(-wal|-shm|-signal)?$|\.pyc$|^rules/dev-secret$)")
        files = []
        for p in ROOT.rglob("*"):
            rel = p.relative_to(ROOT)
            if p.is_file() and not set(rel.parts) & _SKIP_DIRS and not any(x.startswith(".venv") for x in rel.parts) \
                    and not ignored.search(rel.as_posix()) and not rel.as_posix().endswith(".egg-info"):
                files.append(rel)
        return files


@pytest.fixture(scope="module")
def repo_files() -> list[Path]:
    return _repo_files()


def fresh_copy(dest: Path, files: list[Path]) -> Path:
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


# --------------------------------------------------------------------------- runnable examples

RUNNABLE_BLOCKS = runnable_blocks()


def test_runnable_examples_are_where_the_docs_promise_them():
    """A misspelt marker would silently stop a page's examples from running: the pages that show
    offline commands must have runnable blocks."""
    for page in ("docs/rules.md", "docs/auditing.md", "docs/running.md", "docs/identity.md", "docs/cli.md",
                 "docs/gateway.md", "docs/deploy.md", "docs/development.md", "rules/specs/README.md"):
        assert RUNNABLE_BLOCKS.get(page), f"{page} has no ```{RUNNABLE} block"
    for p in markdown_files():
        for line, info, _ in fenced_blocks(p.read_text(encoding="utf-8")):
            assert "runnable" not in info or info == RUNNABLE, f"{p.relative_to(ROOT)}:{line}: write ```{RUNNABLE}"


@pytest.mark.parametrize("page", sorted(RUNNABLE_BLOCKS))
def test_runnable_examples_run_as_written(page, tmp_path, repo_files):
    """Each page's runnable blocks, in order, in one fresh copy of the repository (as a reader would
    type them after cloning)."""
    bindir = Path(sys.executable).parent
    assert (bindir / "tether").exists() or shutil.which("tether"), "tether is not installed: pip install -e ."
    copy = fresh_copy(tmp_path / "clone", repo_files)
    assert not (copy / "rules" / "dev-secret").exists() and not list(copy.rglob("*.db"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy)  # the copy's code, not the checkout's
    env["HOME"] = str(tmp_path / "home")
    for line, body in RUNNABLE_BLOCKS[page]:
        for tool in ("openssl",):
            if re.search(rf"(^|[\s;&|(]){tool}\s", body, re.M) and not shutil.which(tool):
                pytest.skip(f"{page}:{line} needs {tool}, which is not installed (.ci/run installs it)")
        try:
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=copy, env=env, capture_output=True,
                               text=True, timeout=180)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{page}:{line}: the example did not finish in {exc.timeout} s:\n{body}")
        assert r.returncode == 0, (f"{page}:{line}: the example failed (exit {r.returncode}):\n{body}\n"
                                   f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")


def test_fenced_blocks_are_parsed_as_markdown_does():
    text = "a\n```sh runnable\necho 1\n```\n* item\n\n  ```sh runnable\n  echo 2\n    echo 3\n  ```\n~~~\n```\n~~~\n"
    blocks = fenced_blocks(text)
    assert [(info, body) for _, info, body in blocks] == [
        ("sh runnable", "echo 1"), ("sh runnable", "echo 2\n  echo 3"), ("", "```")]


# --------------------------------------------------------------------------- generated and committed files


def test_generated_sections_are_current():
    """The CLI reference, the error table and the benchmark figures come from the code (python -m proxy.cli.readme)."""
    from proxy.cli.readme import stale

    changed = stale()
    assert not changed, f"out of date: {sorted(str(p.relative_to(ROOT)) for p in changed)}: run python -m proxy.cli.readme"


def test_the_committed_schema_is_what_rules_schema_prints(tmp_path):
    out = tmp_path / "schema.json"
    r = run_cli("rules", "schema", "-o", str(out))
    assert r.returncode == 0, r.stderr
    committed = (ROOT / "rules" / "tether-rules.schema.json").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, \
        "rules/tether-rules.schema.json is stale: run tether rules schema -o rules/tether-rules.schema.json"
    printed = run_cli("rules", "schema")
    assert json.loads(printed.stdout) == json.loads(committed)


def _schema_keys(schema: dict) -> dict[str, set[str]]:
    """key name -> the definitions that have it, for every property anywhere in the schema."""
    keys: dict[str, set[str]] = {}

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for k in node.get("properties") or {}:
                keys.setdefault(k, set()).add(where)
            for k, v in node.items():
                walk(v, "$defs" if k == "$defs" else k if where == "$defs" else where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    walk(schema, "RulesFile")
    return keys


def test_every_rules_key_is_in_the_rules_reference():
    schema = json.loads((ROOT / "rules" / "tether-rules.schema.json").read_text())
    page = (DOCS / "rules.md").read_text(encoding="utf-8")
    keys = _schema_keys(schema)
    assert len(keys) > 150
    missing = sorted(k for k in keys if not re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", page))
    assert not missing, f"docs/rules.md does not mention: {[(k, sorted(keys[k])) for k in missing]}"


# --------------------------------------------------------------------------- links


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN").replace(" ", "-")


def anchors(text: str) -> set[str]:
    out: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not in_fence:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_github_slugs():
    assert github_slug("3. The Dry-Run Rule: review before it is real") == "3-the-dry-run-rule-review-before-it-is-real"
    assert github_slug("The store: SQLite or PostgreSQL") == "the-store-sqlite-or-postgresql"
    assert github_slug("Capabilities: default deny") == "capabilities-default-deny"
    assert github_slug("`tether journal` and you") == "tether-journal-and-you"


def prose_of(text: str) -> str:
    """The text without its fenced code blocks (where `](` is code, not a link)."""
    out, in_fence = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            out.append(line)
    return "\n".join(out)


def test_every_relative_link_resolves():
    problems = []
    for page in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", prose_of(page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the README


def _commands(text: str) -> list[str]:
    return [body for _, info, body in fenced_blocks(text) if info.startswith("sh")]


def test_the_readme_first_screen_holds_the_pitch_and_both_commands():
    text = README.read_text(encoding="utf-8")
    first_screen = "\n".join(text.split("\n")[:45])
    assert "sidecar gateway" in first_screen and "safely, auditably and reversibly" in first_screen
    assert "Python 3.11" in first_screen and "python3 -m venv .venv" in first_screen
    assert "pip install -e . && tether demo" in first_screen
    assert "pip install -e '.[test]' && python -m pytest -q" in first_screen
    assert 'requires-python = ">=3.11"' in (ROOT / "pyproject.toml").read_text()
    assert len(text.split("\n")) < 150, "the README is a front door; the reference lives in docs/"


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in _commands(README.read_text(encoding="utf-8")) if "pytest" in c)
    assert test_command == "pip install -e '.[test]' && python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text().rstrip("\n").split("\n")
    assert ci[-1] == test_command


# --------------------------------------------------------------------------- the store path rule


async def test_the_store_is_beside_the_rules_file_and_found_from_any_folder(tmp_path, upstream):
    """docs/running.md: a relative server.store is relative to the rules file; `tether journal verify
    --config F` run from another folder finds what `tether serve --config F` wrote."""
    (tmp_path / "conf").mkdir()
    doc = base_rules(upstream.url, "journal.db")
    proc = GatewayProcess(doc, tmp_path, name="conf/rules.yaml").start()  # run from tmp_path, not conf/
    try:
        from proxy.config import parse_rules
        from proxy.policy.identity import mint_token

        token = mint_token(parse_rules(doc).identity, "bot")
        upstream.put_record("contacts", {"id": "1", "name": "A"})
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proc.url}/crm/api/contacts/1", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
    finally:
        assert proc.stop() == 0
    assert (tmp_path / "conf" / "journal.db").exists()
    assert not (tmp_path / "journal.db").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"TETHER_STORE": "", "TETHER_CONFIG": ""}
    r = run_cli("journal", "verify", "--config", "../conf/rules.yaml", cwd=elsewhere, env=env)
    assert r.returncode == 0 and "records verified" in r.stdout, r.stdout + r.stderr
    r = run_cli("journal", "tail", "--json", "--config", "../conf/rules.yaml", "--capability", "contact.read",
                cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["agent"] for x in r.stdout.splitlines() if x.strip()][:1] == ["bot"]
    assert not (elsewhere / "journal.db").exists() and not (elsewhere / "tether.db").exists()
