"""Front doors: how agents and people reach Tether (REST, MCP, the admin API and console)."""
