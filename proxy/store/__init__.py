"""Stores behind one narrow interface: SQLite (embedded default) and PostgreSQL (shared gateways).

``open_store(url)`` picks the implementation from the URL: ``postgresql://...`` -> PostgreSQL,
anything else is a SQLite file path (``sqlite:///path`` or a plain path).
"""

from __future__ import annotations

from .base import Store, StoreUnavailable


def open_store(url: str, *, synchronous: str = "full") -> Store:
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    from .sqlite import SQLiteStore

    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
    if url.startswith("sqlite:////"):
        path = url[len("sqlite:///"):]
    return SQLiteStore(path, synchronous=synchronous)


def shared_by_processes(store: Store, workers: int) -> bool:
    """Do other gateway processes share this store's state? Workers of one gateway always do; a
    PostgreSQL store is meant for replicas, so Tether assumes others may be there."""
    return workers > 1 or store.kind == "postgresql"


__all__ = ["Store", "StoreUnavailable", "open_store", "shared_by_processes"]
