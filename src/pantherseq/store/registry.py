"""STORES: the user-state store backends by URL scheme, and `open_store(url)`.

    open_store("sqlite:///runs/hb/states.db")      # SQLiteStore (sqlite.py)
    open_store("redis://127.0.0.1:6379/0")         # RedisStore (redis.py, the `redis` extra)

A backend's module is imported only when a URL of its scheme is opened, so base.py never imports a
backend and the core never imports the redis client.
"""

from __future__ import annotations

from importlib import import_module

from pantherseq.errors import ConfigError
from pantherseq.store.base import Store

# scheme -> (module, class, the URL forms it takes), in the order the forms are listed in error messages
STORES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sqlite": ("pantherseq.store.sqlite", "SQLiteStore",
               ("sqlite:///relative/path.db", "sqlite:////absolute/path.db")),
    "redis": ("pantherseq.store.redis", "RedisStore", ("redis://host:port/db",)),
}


def url_forms() -> str:
    """Every valid URL form, e.g. for an error message: `a, b or c`."""
    forms = [form for _, _, backend_forms in STORES.values() for form in backend_forms]
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def store_class(scheme: str) -> type[Store]:
    """The backend class of a URL scheme (its module imported now); KeyError for an unknown scheme."""
    module, name, _ = STORES[scheme]
    return getattr(import_module(module), name)


def open_store(url: str) -> Store:
    """Open the store at `url` (see the module docstring); a bad URL is one ConfigError listing the forms."""
    scheme = url.partition(":")[0]
    bad = ConfigError(f"bad store URL {url!r}: expected {url_forms()}")
    if scheme not in STORES:
        raise bad
    cls = store_class(scheme)
    try:
        return cls.from_url(url)
    except ValueError:
        raise bad from None
