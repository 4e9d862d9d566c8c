"""The MCP server ``tether demo`` puts behind Tether: a vendor's billing server, in-process.

It is the official ``mcp`` SDK's server (the low-level ``Server``: its tools are defined here explicitly, so
their definitions — and the pins ``rules/demo.yaml`` holds for them — do not move with the SDK's schema
generation) over Streamable HTTP on a free loopback port, served by uvicorn in the demo's own event loop.
It offers three tools: ``get_invoice`` (a read), ``issue_credit`` (a write), ``export_customers`` (which no
capability names: invisible to agents, refused if called by name). It keeps the list of calls it received,
so the demo can show what reached it and what did not.

The ``mcp`` SDK (which brings uvicorn) is a runtime dependency for this demo alone — Tether's own MCP
client and front door need only ``mcp-types`` — so the README's ``pip install -e . && tether demo`` shows
the step; an install without it (``--no-deps``, a trimmed image) gets a message and the step left out
(:func:`missing`). The tool definitions need ``mcp-types`` only, so pins can be checked anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
from typing import Any, Iterator

import orjson
from mcp_types import CallToolResult, TextContent, Tool, ToolAnnotations

NAME = "acme-billing"
INVOICES: dict[str, dict[str, Any]] = {
    "INV-1001": {"number": "INV-1001", "account": "acme", "amount": 120000, "currency": "USD", "status": "paid"},
    "INV-1002": {"number": "INV-1002", "account": "acme", "amount": 4800, "currency": "USD", "status": "open"},
}
CUSTOMERS = [{"account": "acme", "contact": "sam@acme.example", "card_last4": "4242"},
             {"account": "globex", "contact": "hank@globex.example", "card_last4": "1881"}]

TOOLS: list[Tool] = [
    Tool(name="get_invoice", title="Get an invoice",
         description="Read one invoice by its number.",
         input_schema={"type": "object", "properties": {"number": {"type": "string", "pattern": "^INV-[0-9]+$"}},
                       "required": ["number"], "additionalProperties": False},
         annotations=ToolAnnotations(read_only_hint=True)),
    Tool(name="issue_credit", title="Issue a credit note",
         description="Credit part of an invoice back to the customer's account.",
         input_schema={"type": "object", "properties": {
             "invoice": {"type": "string", "pattern": "^INV-[0-9]+$"},
             "amount": {"type": "number", "exclusiveMinimum": 0},
             "reason": {"type": "string", "maxLength": 200}},
             "required": ["invoice", "amount", "reason"], "additionalProperties": False},
         annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False)),
    Tool(name="export_customers", title="Export every customer",
         description="Every customer with their contacts and payment details.",
         input_schema={"type": "object", "properties": {}},
         annotations=ToolAnnotations(read_only_hint=True)),  # the server calls it harmless; no rule grants it
]


def missing() -> str | None:
    """Why the demo's MCP server cannot run here, or None."""
    absent = []
    for module in ("mcp.server.lowlevel", "uvicorn"):
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(module.partition(".")[0])
    if absent:
        return (f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed (the MCP step's server "
                "is the official mcp SDK's, served by uvicorn: pip install 'mcp>=2.3,<3' uvicorn)")
    return None


def _result(doc: dict[str, Any], error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(text=orjson.dumps(doc).decode())],
                          structured_content=None if error else doc, is_error=error)


class BillingServer:
    """The demo's MCP server (see the module doc). ``calls``: (tool, arguments) in the order received."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.credits: list[dict[str, Any]] = []
        self.url = ""
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def _list_tools(self, ctx: Any, params: Any) -> Any:
        from mcp_types import ListToolsResult

        return ListToolsResult(tools=TOOLS)

    async def _call_tool(self, ctx: Any, params: Any) -> CallToolResult:
        args = dict(params.arguments or {})
        self.calls.append((params.name, args))
        if params.name == "get_invoice":
            inv = INVOICES.get(str(args.get("number")))
            return _result(inv) if inv is not None else _result({"error": "no such invoice"}, error=True)
        if params.name == "issue_credit":
            credit = {"credit_id": f"CN-{len(self.credits) + 1:04d}", "invoice": args.get("invoice"),
                      "amount": args.get("amount"), "reason": args.get("reason")}
            self.credits.append(credit)
            return _result(credit)
        if params.name == "export_customers":
            return _result({"customers": CUSTOMERS})
        return _result({"error": f"unknown tool {params.name}"}, error=True)

    async def start(self) -> str:
        """Listen on a free loopback port; return the MCP endpoint's URL."""
        import uvicorn
        from mcp.server.lowlevel import Server

        server: Any = Server(NAME, version="1.0", on_list_tools=self._list_tools, on_call_tool=self._call_tool)
        app = server.streamable_http_app(host="127.0.0.1", json_response=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        class Quiet(uvicorn.Server):  # the demo's process owns its signals (Ctrl-C with --keep-running)
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self._server = Quiet(uvicorn.Config(app, log_level="error", lifespan="on"))
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not self._server.started:
            await self.stop()
            raise RuntimeError("the demo's MCP server did not start")
        self.url = f"http://127.0.0.1:{port}/mcp"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)


__all__ = ["BillingServer", "NAME", "TOOLS", "missing"]
