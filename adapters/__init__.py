"""Per-SaaS adapters behind one small interface (see :mod:`adapters.base`).

``get_adapter(name, options)`` builds the adapter an upstream names in the rules file.
"""

from __future__ import annotations

from typing import Any

from .base import Adapter, AdapterOptionsError, NotCompensable, Operation, PlannedRequest, SyntheticResponse, UndoPlan

_REGISTRY: dict[str, str] = {
    "generic": "adapters.generic:GenericRestAdapter",
    "salesforce": "adapters.salesforce:SalesforceAdapter",
    "hubspot": "adapters.hubspot:HubSpotAdapter",
    "stripe": "adapters.stripe:StripeAdapter",
    "slack": "adapters.slack:SlackAdapter",
}


def adapter_names() -> list[str]:
    return sorted(_REGISTRY)


def vendor_headers() -> frozenset[str]:
    """Every known vendor's credential and tenant-switch headers (lower case): each upstream strips the
    ones its own adapter does not handle, so a Salesforce session header or a Stripe account switch never
    reaches another vendor's upstream (or a generic one) unread."""
    import importlib

    out: set[str] = set()
    for target in _REGISTRY.values():
        module_name, _, cls_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ModuleNotFoundError:
            continue
        out |= cls.credential_headers | cls.tenant_headers
    return frozenset(out)


def get_adapter(name: str, options: dict[str, Any] | None = None) -> Adapter:
    """Instantiate the adapter called ``name``; AdapterOptionsError names what is wrong."""
    target = _REGISTRY.get(name)
    if target is None:
        raise AdapterOptionsError(f"unknown adapter {name!r} (known: {', '.join(adapter_names())})")
    module_name, _, cls_name = target.partition(":")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise AdapterOptionsError(f"adapter {name!r} is not installed") from None
        raise
    cls = getattr(module, cls_name)
    return cls(options or {})


__all__ = ["Adapter", "AdapterOptionsError", "NotCompensable", "Operation", "PlannedRequest", "SyntheticResponse",
           "UndoPlan", "adapter_names", "get_adapter", "vendor_headers"]
