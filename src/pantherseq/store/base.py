"""The user-state store behind real-time scoring: the `Store` interface every backend implements.

Backends (sqlite.py, redis.py) subclass `Store` and are chosen by URL scheme in registry.py (`STORES`,
`open_store(url)`); this module imports none of them.

The scoring service keeps, per user, one state record and an append-only log of accepted events, plus a
few named metadata records (e.g. which model checkpoint the states belong to). The interface is
batch-first: one call reads or writes many users, one result per key, `None` for a miss.

Key layout. Every key is `KEY_PREFIX` + a namespace + a name, `KEY_PREFIX = "ps:1:"` carrying
`SCHEMA_VERSION`, so a store written by another schema version is never read by mistake:

    ps:1:state:<user>   the user's state record                         (Redis: string)
    ps:1:log:<user>     the user's accepted events, in order            (Redis: stream, entry id "<seq>-0")
    ps:1:seq:<user>     the last sequence number given in that log      (Redis: integer, INCR)
    ps:1:meta:<name>    a named metadata record                         (Redis: string)
    ps:1:ilog:<name>    an internal log of the service (e.g. `feedback`) (Redis: stream, like a user's log)
    ps:1:iseq:<name>    the last sequence number given in that log      (Redis: integer, INCR)

Internal logs live in their own namespace, so no user id, whatever its characters, names one: a user
called `feedback` has `ps:1:log:feedback`, the feedback labels are `ps:1:ilog:feedback`.

SQLite keeps the same namespaces as tables, `state(user, value)`, `log(user, seq, value)`,
`meta(name, value)` and `ilog(name, seq, value)`, with the raw user id or name as key; the file records
`SCHEMA_VERSION` in `PRAGMA user_version` and `APPLICATION_ID` in `PRAGMA application_id`; a file of
another version, or a SQLite database that is not a pantherseq store, is refused.

Byte format contract. Values are opaque bytes: the store never interprets, re-encodes or validates them
beyond checking that they are bytes, and returns exactly the bytes that were put (NUL bytes included).
What they hold is the service's codec's business (float32 little-endian arrays behind a header that
carries `SCHEMA_VERSION`); a change to that format bumps `SCHEMA_VERSION`, which moves the Redis keys
and makes SQLite refuse the older files.

Sequence numbers. `append_event` gives each of a user's events the next sequence number, 1, 2, 3...
strictly increasing per user, and returns only once the event is durable against a crash of the calling
process (see each backend for why). `trim_log` drops a user's oldest entries (the service compacts the
log into the user's state); it always keeps the newest entry, and sequence numbers never restart.

Threads. A store may be called from several threads at once (the service's request threads and its
background refresh thread); each backend documents how it guards itself.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

SCHEMA_VERSION = 1
KEY_PREFIX = f"ps:{SCHEMA_VERSION}:"


def state_key(user: str) -> str:
    return f"{KEY_PREFIX}state:{user}"


def log_key(user: str) -> str:
    return f"{KEY_PREFIX}log:{user}"


def seq_key(user: str) -> str:
    return f"{KEY_PREFIX}seq:{user}"


def meta_key(name: str) -> str:
    return f"{KEY_PREFIX}meta:{name}"


def internal_log_key(name: str) -> str:
    return f"{KEY_PREFIX}ilog:{name}"


def internal_seq_key(name: str) -> str:
    return f"{KEY_PREFIX}iseq:{name}"


def as_bytes(value: object) -> bytes:
    """The value as bytes; anything but bytes-like raises TypeError (the store holds bytes only)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"store values must be bytes, got {type(value).__name__}")


class Store(abc.ABC):
    """One state record and one append-only event log per user, plus named metadata; values are bytes.

    A backend is opened from a URL by `from_url` (its URL forms are listed in registry.STORES)."""

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Self:
        """Open the store named by `url`; ValueError when `url` is not one of the backend's URL forms."""

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The state of each user in `keys`, aligned with `keys`; None where a user has none."""

    @abc.abstractmethod
    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Set the state of each user in `items` (overwriting), all in one transaction."""

    @abc.abstractmethod
    def append_event(self, user: str, event: bytes) -> int:
        """Append `event` to the user's log; return its sequence number once it is durable."""

    @abc.abstractmethod
    def events_since(self, user: str, seq: int) -> list[tuple[int, bytes]]:
        """The user's logged events with sequence number > `seq`, as (seq, event), ascending."""

    @abc.abstractmethod
    def trim_log(self, user: str, upto_seq: int) -> int:
        """Drop the user's logged events with sequence number <= `upto_seq`, except the newest entry (so
        numbering continues); returns how many were dropped."""

    @abc.abstractmethod
    def append_internal(self, name: str, value: bytes) -> int:
        """Append to the internal log `name` (never a user's log); its sequence number once durable."""

    @abc.abstractmethod
    def internal_since(self, name: str, seq: int) -> list[tuple[int, bytes]]:
        """The internal log `name`'s entries with sequence number > `seq`, as (seq, value), ascending."""

    @abc.abstractmethod
    def users_with_log(self) -> list[str]:
        """Every user with at least one logged event, sorted (to replay logs after a restart)."""

    @abc.abstractmethod
    def get_meta(self, name: str) -> bytes | None:
        """The metadata record `name`, or None."""

    @abc.abstractmethod
    def put_meta(self, name: str, value: bytes) -> None:
        """Set the metadata record `name`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection(s); calling it twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
