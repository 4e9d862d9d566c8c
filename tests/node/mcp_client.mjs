// Drive Tether's MCP endpoint with the official TypeScript SDK (@modelcontextprotocol/sdk), the way a
// Node agent would. Usage: node mcp_client.mjs <url> <bot token> <other-bot token>
// Prints one JSON object per step on stdout ("step" names it); after "ready-for-change" it waits for a
// line on stdin (the test changes the bot's tools meanwhile) and reports the list_changed notification.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CallToolResultSchema, ToolListChangedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";
import { createInterface } from "node:readline";

const [url, botToken, otherToken] = process.argv.slice(2);
const emit = (step, data) => process.stdout.write(JSON.stringify({ step, ...data }) + "\n");
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function connect(token, sessionId) {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    sessionId,
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = new Client({ name: "ts-sdk-test", version: "1.0.0" }, { capabilities: {} });
  await client.connect(transport);
  return { client, transport };
}

async function allTools(client) {
  const names = [];
  let cursor;
  do {
    const page = await client.listTools(cursor ? { cursor } : undefined);
    names.push(...page.tools.map((t) => t.name));
    cursor = page.nextCursor;
  } while (cursor);
  return names;
}

async function errorOf(promise) {
  try {
    await promise;
    return null;
  } catch (e) {
    return { code: e.code ?? null, message: String(e.message ?? e) };
  }
}

const bot = await connect(botToken);
emit("connected", {
  protocolVersion: bot.transport.protocolVersion,
  sessionId: bot.transport.sessionId,
  server: bot.client.getServerVersion(),
  capabilities: bot.client.getServerCapabilities(),
});
emit("tools", { names: await allTools(bot.client) });
emit("read", { result: await bot.client.callTool({ name: "crm_read", arguments: { id: "7" } }) });
emit("refused", { result: await bot.client.callTool({ name: "crm_update", arguments: { id: "7", intent: "x" } }) });
const progress = [];
const slow = await bot.client.callTool({ name: "slow_export", arguments: { steps: 3 } }, CallToolResultSchema, {
  onprogress: (p) => progress.push(p),
});
emit("progress", { progress, result: slow });
emit("unknown", { error: await errorOf(bot.client.callTool({ name: "nope", arguments: {} })) });

const other = await connect(otherToken);
emit("other-tools", { names: await allTools(other.client) });
// another agent presenting the bot's session id
const thief = await connect(otherToken, bot.transport.sessionId);
emit("thief", { error: await errorOf(thief.client.listTools()) });

let changed = 0;
bot.client.setNotificationHandler(ToolListChangedNotificationSchema, () => { changed += 1; });
emit("ready-for-change", {});
await lines.next();
const deadline = Date.now() + 10000;
while (changed === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
emit("changed", { notifications: changed, names: await allTools(bot.client) });

await bot.transport.terminateSession();
emit("terminated", { error: await errorOf(bot.client.listTools()) });
await bot.client.close();
await other.client.close();
await thief.client.close();
process.exit(0);
