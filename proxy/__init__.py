"""Tether: the gateway through which AI agents act on systems of record."""

__version__ = "0.1.0"
