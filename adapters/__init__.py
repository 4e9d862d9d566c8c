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
           "UndoPlan", "adapter_names", "get_adapter"]
