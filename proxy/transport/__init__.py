"""Transport: Tether's pooled HTTP/1.1 client to upstreams, forwarding helpers, egress (TLS, proxies)."""
