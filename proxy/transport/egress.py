"""How Tether reaches an upstream: TLS, a forward proxy, the connection limit.

Built once per rules version (at startup and on reload) from an upstream's config into what the forwarding
client (:mod:`proxy.transport.upstream_http`) needs: an ``ssl.SSLContext``, its :class:`ConnectOptions`, and a key
naming all of it, so that a reload which changes any of them (or renews a certificate file) gets a fresh
pool while an unchanged upstream keeps its warm connections.

TLS (https upstreams): ``ca_file`` verifies the upstream instead of the system's CAs; ``client_cert``
is presented for mutual TLS; ``server_name`` is sent as SNI and is the name the certificate must carry
(the URL may then name an IP address or an internal load balancer); ``verify_tls: false`` is for
development only. ``host_header`` sets the Host header, for http and https alike.

Proxy: ``proxy: env`` (the default) follows the environment the way curl and urllib do —
``HTTPS_PROXY`` for https upstreams, ``HTTP_PROXY`` for http ones (lower-case spellings win, ``ALL_PROXY``
is the fallback), ``NO_PROXY`` matched by urllib's rules — except that a loopback upstream (``localhost``,
``127.0.0.0/8``, ``::1``) never goes through the environment's proxy (as in Go's net/http: a sidecar's
loopback is not egress). ``proxy: direct`` ignores the environment; a URL (or ``{url, username,
password}``) always applies. Tether asks the proxy for a ``CONNECT`` tunnel for https *and* http
upstreams: one code path, the request line stays origin-form, keep-alive behaves as without a proxy, and
the proxy sees only the tunnel's endpoint (a proxy that allows CONNECT only to port 443 must allow the
http upstream's port too). The proxy's credentials go in ``Proxy-Authorization`` on the CONNECT and
nowhere else: messages name the proxy as ``http://host:port``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from ..config import UpstreamConfig
from ..secret import Secret
from .upstream_http import ConnectOptions, ProxyTunnel


class EgressError(ValueError):
    """A setting that cannot be used; ``path`` is its key path in the rules file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path


@dataclass(frozen=True)
class Egress:
    ssl: ssl.SSLContext | None  # None for http upstreams
    options: ConnectOptions
    key: tuple[Any, ...]  # what the pool is keyed by, with the URL


def build_egress(name: str, cfg: UpstreamConfig) -> Egress:
    """The connection settings of upstream ``name``; EgressError names the key that cannot be used."""
    where = f"upstreams.{name}"
    ctx = _ssl_context(where, cfg) if cfg.url.startswith("https://") else None
    proxy, proxy_key = proxy_for(where, cfg)
    options = ConnectOptions(server_name=cfg.server_name, host_header=cfg.host_header, proxy=proxy,
                             max_connections=cfg.max_connections, pool_timeout=cfg.timeouts.pool)
    cert = cfg.client_cert
    key = (cfg.verify_tls, _stamp(cfg.ca_file), _stamp(cert.cert if cert else None),
           _stamp(cert.key if cert else None), _secret_source(cert.password if cert else None), cfg.server_name,
           cfg.host_header, proxy_key, cfg.max_connections, cfg.timeouts.pool)
    return Egress(ctx, options, key)


# --------------------------------------------------------------------------- TLS


def _ssl_context(where: str, cfg: UpstreamConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise EgressError(f"{where}.ca_file", f"cannot load the CA bundle {cfg.ca_file}: {_why(exc)}") from None
    if not cfg.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    cert = cfg.client_cert
    if cert is not None:
        password: str | Callable[[], str] = _no_password  # never OpenSSL's own prompt on the terminal
        if cert.password is not None:
            try:
                password = Secret(cert.password, f"{where}.client_cert.password").get()
            except Exception as exc:  # noqa: BLE001 - SecretUnavailable; never the value
                raise EgressError(f"{where}.client_cert.password", str(exc)) from None
        try:
            ctx.load_cert_chain(str(cert.cert), str(cert.key) if cert.key else None, password=password)
        except _KeyIsEncrypted:
            raise EgressError(f"{where}.client_cert.password", "the client certificate's key is encrypted: "
                                                               "give its password") from None
        except (OSError, ssl.SSLError) as exc:
            raise EgressError(f"{where}.client_cert", f"cannot load the client certificate {cert.cert}"
                                                      f"{' with key ' + str(cert.key) if cert.key else ''}: "
                                                      f"{_why(exc)}") from None
    return ctx


class _KeyIsEncrypted(Exception):
    pass


def _no_password() -> str:
    raise _KeyIsEncrypted


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _stamp(path: Path | None) -> tuple[str, int] | None:
    """A file and its modification time: a renewed certificate changes the pool key."""
    if path is None:
        return None
    try:
        return (str(path), os.stat(path).st_mtime_ns)
    except OSError:
        return (str(path), 0)


def _secret_source(ref: Any) -> str | None:
    if ref is None:
        return None
    return f"env:{ref.env}" if ref.env else f"file:{ref.file}" if ref.file else \
        "value:" + hashlib.sha256(ref.value.get_secret_value().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- proxy


def proxy_for(where: str, cfg: UpstreamConfig) -> tuple[ProxyTunnel | None, Any]:
    """The proxy to tunnel through (or None) and what identifies it in the pool key (never a secret)."""
    setting = cfg.proxy
    parts = urlsplit(cfg.url)
    if setting == "direct":
        return None, "direct"
    if setting == "env":
        raw = _env_proxy(parts.scheme, parts.hostname or "", parts.port)
        if raw is None:
            return None, "direct"
        tunnel, auth_id = _parse_proxy_url(raw, f"the environment's {parts.scheme} proxy setting", f"{where}.proxy")
        return tunnel, (tunnel.display, auth_id)
    url = setting.url
    p = urlsplit(url)
    host = p.hostname or ""
    display = f"http://{_bracket(host)}:{p.port or 80}"
    auth: Callable[[], str | None] | None = None
    if setting.username is not None or setting.password is not None:
        auth = _config_auth(setting.username or "", Secret(setting.password, f"{where}.proxy.password")
                            if setting.password is not None else None)
    key = (display, setting.username, _secret_source(setting.password))
    return ProxyTunnel(host=host, port=p.port or 80, display=display, authorization=auth), key


def _config_auth(user: str, secret: Secret | None) -> Callable[[], str | None]:
    """Proxy-Authorization from the rules file's credentials, read when a connection opens (so a rotated
    password file applies to the next tunnel)."""
    return lambda: _basic(user, secret.get() if secret is not None else "")


def _env_proxy(scheme: str, host: str, port: int | None) -> str | None:
    """The environment's proxy URL for this upstream, or None (unset, NO_PROXY, or a loopback upstream)."""
    if _is_loopback(host):
        return None
    proxies = urllib.request.getproxies_environment()  # lower-case wins; HTTP_PROXY ignored under CGI
    raw = proxies.get(scheme) or proxies.get("all")
    if not raw:
        return None
    netloc = f"{_bracket(host)}:{port}" if port else _bracket(host)
    if urllib.request.proxy_bypass_environment(netloc, proxies):
        return None
    return raw


def _parse_proxy_url(raw: str, what: str, path: str) -> tuple[ProxyTunnel, str | None]:
    if "://" not in raw:
        raw = "http://" + raw  # HTTPS_PROXY=proxy.corp:3128, as curl reads it
    try:
        p = urlsplit(raw)
        port = p.port or 80
    except ValueError as exc:
        raise EgressError(path, f"{what} is not a proxy URL: {exc}") from None
    if p.scheme != "http" or not p.hostname:
        raise EgressError(path, f"{what} must be an http://host[:port] URL (Tether asks the proxy for a "
                                   f"CONNECT tunnel in plain HTTP; https:// proxies are not supported)")
    display = f"http://{_bracket(p.hostname)}:{port}"
    header: str | None = None
    auth_id: str | None = None
    if p.username is not None:
        header = _basic(unquote(p.username), unquote(p.password or ""))
        auth_id = hashlib.sha256(header.encode()).hexdigest()[:16]
    fixed = header
    return ProxyTunnel(host=p.hostname, port=port, display=display,
                       authorization=(lambda: fixed) if fixed is not None else None), auth_id


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["Egress", "EgressError", "build_egress", "proxy_for"]
