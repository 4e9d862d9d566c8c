"""Agent-facing listeners and the Host policy every listener enforces.

A listener serves one upstream (its own port: the SDK's base URL is just ``http(s)://127.0.0.1:<port>``)
or all of them by path prefix (the main listener). Its Host check refuses names that do not belong to it
(DNS rebinding: a web page must not script Tether through a name it re-points at 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..config import parse_hostport
from .rules import UpstreamRuntime


class Listener:
    """An agent-facing listener: which upstream it serves (None: path prefixes) and its Host policy."""

    def __init__(self, name: str, address: str, upstream: str | None, credential_aliases: frozenset[str],
                 tls: Any = None) -> None:
        self.name = name
        self.address = address
        self.host, self.port = parse_hostport(address)
        self.upstream_name = upstream
        self.upstream: UpstreamRuntime | None = None
        self.credential_aliases = credential_aliases
        self.tls = tls
        self.bound_port: int | None = None
        try:
            ip = ipaddress.ip_address(self.host)
            self._loopback = ip.is_loopback
            self._wildcard = ip.is_unspecified
        except ValueError:
            self._loopback = self.host == "localhost"
            self._wildcard = False
        self._hosts_ok: dict[str, bool] = {}

    def host_allowed(self, host: str) -> bool:
        """The Host header must name this listener: any name on a wildcard bind, a loopback name on a
        loopback bind, the bound name otherwise (see :func:`host_allowed`)."""
        ok = self._hosts_ok.get(host)
        if ok is None:
            ok = host_allowed(host, self.host, loopback=self._loopback, wildcard=self._wildcard)
            if len(self._hosts_ok) < 1024:
                self._hosts_ok[host] = ok
        return ok


def host_allowed(host: str, bound: str, *, loopback: bool, wildcard: bool) -> bool:
    """Does a Host header (``name[:port]``, ``[v6]:port``) name a listener bound to ``bound``?

    On a loopback bind only ``localhost`` and loopback IP *literals* are loopback names: a DNS name that
    merely starts with ``127.`` (``127.attacker.example``, which an attacker can point at 127.0.0.1 to
    rebind a browser onto Tether) is not. A port, when given, must be digits."""
    name, port = host, ""
    if name.startswith("["):
        name, _, rest = name[1:].partition("]")
        if rest and not rest.startswith(":"):
            return False
        port = rest[1:]
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
    if port and not port.isdigit():
        return False
    name = name.lower()
    if wildcard:
        return True
    if loopback:
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False
    return name == bound.lower()


def admin_host_policy(address: str) -> Any:
    """The admin listener's Host check (None: any Host): enforced on a loopback bind only (see
    :func:`proxy.doors.admin.api.check_host`)."""
    host = parse_hostport(address)[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return None
    return lambda h: host_allowed(h, host, loopback=True, wildcard=False)
