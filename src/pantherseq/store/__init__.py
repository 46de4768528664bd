"""The user-state store for real-time scoring: SQLite or Redis behind one batch-first interface."""

from pantherseq.store.base import SCHEMA_VERSION, Store
from pantherseq.store.registry import STORES, open_store

__all__ = ["SCHEMA_VERSION", "STORES", "Store", "open_store"]
