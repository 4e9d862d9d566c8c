"""The admin listener: the reviewer API, the console, OIDC sign-in, Slack interactions, stats."""
