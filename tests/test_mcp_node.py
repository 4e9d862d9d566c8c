"""The MCP endpoint against clients from another ecosystem: the official TypeScript SDK, and the official
conformance suite (``@modelcontextprotocol/conformance`` 0.1.13, server mode).

Both are npm packages that ``.ci/run`` installs into tests/node/node_modules; without Node or those
packages the tests skip and say so. The conformance suite runs every server scenario it has; the ones
that apply to a tools-only server must pass, the others are listed with the reason (docs/mcp.md)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.mcp_backend import READ, McpEnv, start_mcp_env

NODE_DIR = Path(__file__).resolve().parent / "node"
MODULES = NODE_DIR / "node_modules" / "@modelcontextprotocol"
CONFORMANCE = MODULES / "conformance" / "dist" / "index.js"


def node_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (Node 20+ runs the TypeScript SDK and the conformance suite)"
    for pkg in ("sdk", "conformance"):
        if not (MODULES / pkg / "package.json").exists():
            return (f"@modelcontextprotocol/{pkg} is not installed: run .ci/run, or "
                    f"(cd tests/node && npm ci)")
    return None


pytestmark = pytest.mark.skipif(node_missing() is not None, reason=str(node_missing()))

# Server scenarios of conformance 0.1.13 that apply to Tether's tools-only front door: all must pass.
APPLICABLE = {
    "server-initialize", "ping", "tools-list", "tools-call-simple-text", "tools-call-image", "tools-call-audio",
    "tools-call-embedded-resource", "tools-call-mixed-content", "tools-call-error", "tools-call-with-progress",
    "json-schema-2020-12", "server-sse-multiple-streams", "server-sse-polling", "dns-rebinding-protection",
}
# ... and those that do not, with the reason (docs/mcp.md repeats it).
NOT_APPLICABLE = {
    "logging-set-level": "MCP logging is not offered: Tether's record of a call is its journal",
    "tools-call-with-logging": "MCP logging is not offered",
    "completion-complete": "completions serve prompts and resources, which a tools-only server has none of",
    "tools-call-sampling": "server-to-client requests (sampling) are not sent by the front door",
    "tools-call-elicitation": "server-to-client requests (elicitation) are not sent by the front door",
    "elicitation-sep1034-defaults": "elicitation is not sent by the front door",
    "elicitation-sep1330-enums": "elicitation is not sent by the front door",
    "resources-list": "no resources", "resources-read-text": "no resources", "resources-read-binary": "no resources",
    "resources-templates-read": "no resources", "resources-subscribe": "no resources",
    "resources-unsubscribe": "no resources",
    "prompts-list": "no prompts", "prompts-get-simple": "no prompts", "prompts-get-with-args": "no prompts",
    "prompts-get-embedded-resource": "no prompts", "prompts-get-with-image": "no prompts",
}


async def test_typescript_sdk_client(make_gateway: Any, store_url: str) -> None:
    env: McpEnv = await start_mcp_env(make_gateway, store_url, page_size=2, keepalive=0.5)
    proc = await asyncio.create_subprocess_exec(
        "node", str(NODE_DIR / "mcp_client.mjs"), env.url, env.token("bot"), env.token("other-bot"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=str(NODE_DIR))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    steps: dict[str, Any] = {}
    try:
        async with asyncio.timeout(60):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                out = json.loads(line)
                steps[out["step"]] = out
                if out["step"] == "ready-for-change":
                    env.backend.set_tools("bot", [READ])  # e.g. a rules reload took grants away
                    env.endpoint.tools_changed()
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode()
    assert proc.returncode == 0, stderr
    c = steps["connected"]
    assert c["protocolVersion"] == "2025-11-25" and c["server"]["name"] == "tether"
    assert c["capabilities"] == {"tools": {"listChanged": True}}
    assert steps["tools"]["names"] == ["crm_read", "crm_update", "slow_export", "echo", "boom"]
    assert steps["read"]["result"]["structuredContent"] == {"id": "7", "name": "Ada Lovelace"}
    refused = steps["refused"]["result"]
    assert refused["isError"] is True and refused["structuredContent"]["error"]["code"] == "capability_not_granted"
    prog = steps["progress"]
    assert [p["progress"] for p in prog["progress"]] == [1, 2, 3]
    assert prog["result"]["structuredContent"]["exported"] == 3
    assert steps["unknown"]["error"]["code"] == -32602
    assert steps["other-tools"]["names"] == ["crm_read"]
    assert steps["thief"]["error"] is not None  # the bot's session id is unknown to another agent
    assert steps["changed"]["notifications"] >= 1 and steps["changed"]["names"] == ["crm_read"]
    assert steps["terminated"]["error"] is not None  # the session is gone after DELETE
    reasons = [e.get("reason") for e in env.backend.events]
    assert "mcp_session_not_found" in reasons and "deleted" in reasons


async def test_conformance_suite_server_scenarios(make_gateway: Any, store_url: str, tmp_path: Path) -> None:
    # The suite sends no token, so the conformance backend authenticates everyone as one anonymous principal,
    # which then stands for every client the suite opens: its session cap is raised accordingly. Its DNS
    # rebinding check sends Origin http://127.0.0.1:<port>, which a browser-facing deployment would allow.
    env = await start_mcp_env(make_gateway, store_url, backend="conformance", max_sessions_per_agent=500,
                              allowed_origins=["http://127.0.0.1:*"])
    out_dir = tmp_path / "conformance"
    proc = await asyncio.create_subprocess_exec(
        "node", str(CONFORMANCE), "server", "--url", env.url, "--suite", "all", "-o", str(out_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(NODE_DIR))
    async with asyncio.timeout(180):
        output, _ = await proc.communicate()
    results: dict[str, list[dict[str, Any]]] = {}
    for checks in out_dir.glob("server-*/checks.json"):
        m = re.fullmatch(r"server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z", checks.parent.name)
        assert m, checks.parent.name
        scenario = m.group(1)
        results[scenario] = json.loads(checks.read_text())
    text = output.decode(errors="replace")
    assert set(results) == APPLICABLE | set(NOT_APPLICABLE), text[-3000:]
    failed = {s: [f"{c['id']}: {c.get('errorMessage')}" for c in checks if c["status"] == "FAILURE"]
              for s, checks in results.items() if s in APPLICABLE}
    assert {s: f for s, f in failed.items() if f} == {}, text[-3000:]
    passed = {s for s in APPLICABLE if any(c["status"] == "SUCCESS" for c in results[s])}
    assert passed == APPLICABLE - {"server-sse-polling"}  # polling reports INFO only: Tether answers JSON,
    # offers no SSE resumability, and so has nothing for that scenario to exercise
