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
    ps:1:tidx:<name>    a time index: member -> time (e.g. the served events at a terminal)  (Redis: sorted set)
    ps:1:tflag:<name>   the index's flagged members (e.g. labelled fraud)                    (Redis: sorted set)
    ps:1:ver:<user>     the log_seq of the stored state (a refresh never overwrites a newer one) (Redis: integer)
    ps:1:admit:<name>   admissions in a sliding window, member -> time (the new-user cap)    (Redis: sorted set)
    ps:1:queue:refresh  users waiting for a refresh worker (Redis: stream, consumer group `refresh`)

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

Shared state for several scorer processes (issue 14, horizontal scale). Everything a score reads that
changes while serving lives here, and every check-then-write is one atomic step in the store (a Lua script
on Redis, one IMMEDIATE transaction on SQLite), so N processes on one store act as one:

- `append_event(..., expect_seq=)` appends only if the user's last sequence number is still `expect_seq`
  (what the caller read), else returns None: the caller re-reads and re-checks (time order), so two
  processes never interleave one user's events;
- `append_event(..., index=(name, time))` adds the event, as member `index_member(user, seq)`, to a time
  index in the same step (the terminal history); `index_flag` marks a member (a fraud label) and
  `index_counts` counts members and flagged members over time ranges;
- `admit` is a sliding-window cap (new users per minute) shared by every process;
- `append_event(..., queue=True)` also queues the user for a refresh worker (`claim_refresh` /
  `ack_refresh`: at least once; an entry claimed but not acknowledged within `RECLAIM_S` is handed out
  again), and `put_many(..., versions=)` writes a state only when it is not older than the stored one.

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


def index_key(name: str) -> str:
    return f"{KEY_PREFIX}tidx:{name}"


def flag_key(name: str) -> str:
    return f"{KEY_PREFIX}tflag:{name}"


def version_key(user: str) -> str:
    return f"{KEY_PREFIX}ver:{user}"


def admit_key(name: str) -> str:
    return f"{KEY_PREFIX}admit:{name}"


QUEUE_KEY = f"{KEY_PREFIX}queue:refresh"
QUEUE_GROUP = "refresh"
RECLAIM_S = 30.0  # a claimed refresh not acknowledged for this long is handed to another worker


def index_member(user: str, seq: int) -> str:
    """The time-index member of a user's logged event (unique: a user's sequence numbers never repeat)."""
    return f"{seq}:{user}"


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
    def put_many(self, items: Mapping[str, bytes], versions: Mapping[str, int] | None = None) -> None:
        """Set the state of each user in `items` (overwriting), all in one transaction. With `versions`
        (user -> the log_seq the state holds), a user's state is written only if its version is not below
        the stored one; without, the stored versions are forgotten."""

    @abc.abstractmethod
    def append_event(self, user: str, event: bytes, *, expect_seq: int | None = None,
                     index: tuple[str, int] | None = None, queue: bool = False) -> int | None:
        """Append `event` to the user's log; return its sequence number once it is durable. With
        `expect_seq`, only if the user's last sequence number is `expect_seq` (else None, nothing written);
        `index` = (name, time) adds the event to that time index, `queue` queues the user for refresh,
        both in the same atomic step."""

    @abc.abstractmethod
    def index_add(self, name: str, items: Sequence[tuple[str, int]]) -> None:
        """Add (member, time) pairs to the time index `name` (idempotent: start-up re-indexes the logs)."""

    @abc.abstractmethod
    def index_remove(self, name: str, members: Sequence[str]) -> None:
        """Drop members from the time index `name` (log compaction)."""

    @abc.abstractmethod
    def index_flag(self, name: str, member: str, flag: bool) -> bool:
        """Flag (or unflag) a member of the time index `name`; False when it holds no such member."""

    @abc.abstractmethod
    def index_counts(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """For each (lo, hi): (members with lo < time <= hi, flagged ones among them), one snapshot."""

    @abc.abstractmethod
    def admit(self, name: str, member: str, now: float, window_s: float, cap: int) -> bool:
        """Admit `member` if fewer than `cap` members were admitted in (now − window_s, now] (a member
        admitted again counts once); atomic across processes."""

    @abc.abstractmethod
    def claim_refresh(self, consumer: str, count: int, block_s: float) -> list[tuple[str, str, float]]:
        """Up to `count` queued refreshes as (entry id, user, wall time of the append), waiting up to
        `block_s` for one; entries left unacknowledged for RECLAIM_S by any consumer are claimed again."""

    @abc.abstractmethod
    def ack_refresh(self, ids: Sequence[str]) -> None:
        """Acknowledge (and drop) claimed queue entries."""

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
