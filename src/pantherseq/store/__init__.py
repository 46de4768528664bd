"""The user-state store for real-time scoring: SQLite or Redis behind one batch-first interface."""

from pantherseq.store.base import SCHEMA_VERSION, Store, open_store

__all__ = ["SCHEMA_VERSION", "Store", "open_store"]
