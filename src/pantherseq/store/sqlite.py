"""The SQLite backend of the user-state store: one file, WAL journal, the standard library's sqlite3.

Durability. The file runs with `journal_mode=WAL` and `synchronous=NORMAL`. A commit writes its pages into
the WAL file with write() before it returns, so they sit in the operating system's page cache, which is the
kernel's and outlives the process: an event whose `append_event` returned survives a `kill -9` of the
caller, and the next open reads it from the WAL. NORMAL only skips the fsync at each commit, so what it
risks is the last commits on a power cut or a kernel crash (the file itself stays consistent); protecting
those would cost an fsync per event (`synchronous=FULL`).

Threads. One connection, opened with `check_same_thread=False` and used only while holding a lock, so the
service's request threads and its refresh thread take turns. A connection per thread (threading.local) was
not chosen: a web server's worker pool would open one per worker that `close()` could not reach from its own
thread, and under WAL + NORMAL a commit does not fsync, so the lock is held for microseconds. Other processes
may open the same file: WAL lets readers run beside the one writer, and the busy timeout queues writers.

Shared state (base.py): tables `version(user, seq)` (the stored state's log_seq), `tindex(name, member,
time, flag)` (the time index), `admit(name, member, at)` (the new-user window) and `queue(id, user, at,
claimed)` (the refresh queue, polled: a claim marks rows, an ack deletes them; rows claimed RECLAIM_S ago
and never acknowledged are claimed again). Every check-then-write is one IMMEDIATE transaction, which
SQLite serialises across processes.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from pantherseq.errors import ConfigError
from pantherseq.store.base import RECLAIM_S, SCHEMA_VERSION, Store, as_bytes, index_member

log = logging.getLogger(__name__)

CHUNK = 500  # keys per `IN (...)` query, under SQLite's default limit of bound parameters

SCHEMA = """
CREATE TABLE IF NOT EXISTS state (user TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (user TEXT, seq INTEGER, value BLOB NOT NULL, PRIMARY KEY (user, seq));
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ilog (name TEXT, seq INTEGER, value BLOB NOT NULL, PRIMARY KEY (name, seq));
CREATE TABLE IF NOT EXISTS version (user TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tindex (name TEXT, member TEXT, time INTEGER NOT NULL, flag INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (name, member));
CREATE INDEX IF NOT EXISTS tindex_time ON tindex (name, time);
CREATE TABLE IF NOT EXISTS admit (name TEXT, member TEXT, at REAL NOT NULL, PRIMARY KEY (name, member));
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY, user TEXT NOT NULL, at REAL NOT NULL, claimed REAL);
"""
TABLES = {"state", "log", "meta", "ilog", "version", "tindex", "admit", "queue"}
POLL_S = 0.05  # how often an idle refresh worker looks at the queue
APPLICATION_ID = 0x50534551  # "PSEQ" in PRAGMA application_id: this file is a pantherseq store


class SQLiteStore(Store):
    """A store in one SQLite file (created with its parent folders when missing)."""

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """`sqlite:///rel/path.db` (relative to the working directory) or `sqlite:////abs/path.db`."""
        path = url.removeprefix("sqlite:///")
        if path == url or not path.strip() or path == ":memory:":
            raise ValueError(url)
        return cls(path)

    def __init__(self, path: str | Path, *, timeout: float = 30.0):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open SQLite store {self.path}: {e}") from e
        try:
            self._init_file()
        except BaseException as e:
            self._db.close()
            if isinstance(e, sqlite3.Error):  # e.g. "file is not a database"
                raise ConfigError(f"cannot open SQLite store {self.path}: {e}") from e
            raise

    def _init_file(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION):
            raise ConfigError(
                f"SQLite store {self.path} has schema version {version}; "
                f"this pantherseq reads version {SCHEMA_VERSION}"
            )
        (app_id,) = self._db.execute("PRAGMA application_id").fetchone()
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        foreign = sorted(tables - TABLES)
        if app_id not in (0, APPLICATION_ID) or foreign or (version == 0 and tables):
            # a database of something else (stores written before APPLICATION_ID have user_version 1)
            what = f"tables {', '.join(foreign[:5])}" if foreign else f"application id {app_id}"
            raise ConfigError(f"SQLite file {self.path} is not a pantherseq store ({what}): give a new file")
        (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal":  # e.g. a network file system; commits are still written before they return
            log.warning("SQLite store %s runs in journal mode %s, not WAL", self.path, mode)
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction("IMMEDIATE") as db:
            for statement in SCHEMA.strip().splitlines():
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    @contextmanager
    def _transaction(self, mode: str = "DEFERRED") -> Iterator[sqlite3.Connection]:
        """Hold the lock and one transaction (IMMEDIATE for writes: take the write lock up front)."""
        with self._lock:
            self._db.execute(f"BEGIN {mode}")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back by itself on some errors
                    self._db.execute("ROLLBACK")
                raise

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(keys))
        with self._transaction() as db:  # one snapshot across the chunks
            for i in range(0, len(unique), CHUNK):
                chunk = unique[i : i + CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(db.execute(f"SELECT user, value FROM state WHERE user IN ({marks})", chunk))
        return [found.get(key) for key in keys]

    def put_many(self, items: Mapping[str, bytes], versions: Mapping[str, int] | None = None) -> None:
        rows = [(user, as_bytes(value)) for user, value in items.items()]
        upsert = ("INSERT INTO state (user, value) VALUES (?, ?) "
                  "ON CONFLICT (user) DO UPDATE SET value = excluded.value")
        with self._transaction("IMMEDIATE") as db:
            if versions is None:
                db.executemany(upsert, rows)
                db.executemany("DELETE FROM version WHERE user = ?", [(u,) for u, _ in rows])
                return
            for user, value in rows:
                have = db.execute("SELECT seq FROM version WHERE user = ?", (user,)).fetchone()
                if have is not None and have[0] > int(versions[user]):
                    continue  # a newer state is stored: a slower refresh must not overwrite it
                db.execute(upsert, (user, value))
                db.execute("INSERT INTO version (user, seq) VALUES (?, ?) "
                           "ON CONFLICT (user) DO UPDATE SET seq = excluded.seq", (user, int(versions[user])))

    def append_event(self, user: str, event: bytes, *, expect_seq: int | None = None,
                     index: tuple[str, int] | None = None, queue: bool = False) -> int | None:
        value = as_bytes(event)
        with self._transaction("IMMEDIATE") as db:
            (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM log WHERE user = ?", (user,)).fetchone()
            if expect_seq is not None and last != int(expect_seq):
                return None
            seq = last + 1
            db.execute("INSERT INTO log (user, seq, value) VALUES (?, ?, ?)", (user, seq, value))
            if index is not None:
                db.execute("INSERT OR IGNORE INTO tindex (name, member, time) VALUES (?, ?, ?)",
                           (index[0], index_member(user, seq), int(index[1])))
            if queue:
                db.execute("INSERT INTO queue (user, at) VALUES (?, ?)", (user, time.time()))
        return seq

    def index_add(self, name: str, items: Sequence[tuple[str, int]]) -> None:
        with self._transaction("IMMEDIATE") as db:
            db.executemany("INSERT OR IGNORE INTO tindex (name, member, time) VALUES (?, ?, ?)",
                           [(name, m, int(t)) for m, t in items])

    def index_remove(self, name: str, members: Sequence[str]) -> None:
        with self._transaction("IMMEDIATE") as db:
            db.executemany("DELETE FROM tindex WHERE name = ? AND member = ?", [(name, m) for m in members])

    def index_flag(self, name: str, member: str, flag: bool) -> bool:
        with self._transaction("IMMEDIATE") as db:
            cur = db.execute("UPDATE tindex SET flag = ? WHERE name = ? AND member = ?", (int(flag), name, member))
        return cur.rowcount > 0

    def index_counts(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        query = "SELECT COUNT(*), COALESCE(SUM(flag), 0) FROM tindex WHERE name = ? AND time > ? AND time <= ?"
        with self._transaction() as db:
            return [tuple(db.execute(query, (name, int(lo), int(hi))).fetchone()) for lo, hi in ranges]

    def admit(self, name: str, member: str, now: float, window_s: float, cap: int) -> bool:
        with self._transaction("IMMEDIATE") as db:
            db.execute("DELETE FROM admit WHERE name = ? AND at <= ?", (name, now - window_s))
            seen = db.execute("SELECT 1 FROM admit WHERE name = ? AND member = ?", (name, member)).fetchone()
            (n,) = db.execute("SELECT COUNT(*) FROM admit WHERE name = ?", (name,)).fetchone()
            if seen is None and n >= cap:
                return False
            db.execute("INSERT INTO admit (name, member, at) VALUES (?, ?, ?) "
                       "ON CONFLICT (name, member) DO UPDATE SET at = excluded.at", (name, member, now))
        return True

    def claim_refresh(self, consumer: str, count: int, block_s: float) -> list[tuple[str, str, float]]:
        deadline = time.monotonic() + block_s
        while True:
            now = time.time()
            with self._transaction("IMMEDIATE") as db:
                rows = db.execute(
                    "UPDATE queue SET claimed = ? WHERE id IN (SELECT id FROM queue WHERE claimed IS NULL "
                    "OR claimed < ? ORDER BY id LIMIT ?) RETURNING id, user, at",
                    (now, now - RECLAIM_S, int(count))).fetchall()
            if rows or time.monotonic() >= deadline:
                return [(str(i), u, float(at)) for i, u, at in sorted(rows)]
            time.sleep(POLL_S)

    def ack_refresh(self, ids: Sequence[str]) -> None:
        with self._transaction("IMMEDIATE") as db:
            db.executemany("DELETE FROM queue WHERE id = ?", [(int(i),) for i in ids])

    def events_since(self, user: str, seq: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, value FROM log WHERE user = ? AND seq > ? ORDER BY seq", (user, seq)
            ).fetchall()
        return [(s, v) for s, v in rows]

    def trim_log(self, user: str, upto_seq: int) -> int:
        with self._transaction("IMMEDIATE") as db:
            cur = db.execute(
                "DELETE FROM log WHERE user = ? AND seq <= ? AND seq < (SELECT MAX(seq) FROM log WHERE user = ?)",
                (user, upto_seq, user),
            )
        return cur.rowcount

    def append_internal(self, name: str, value: bytes) -> int:
        data = as_bytes(value)
        with self._transaction("IMMEDIATE") as db:
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM ilog WHERE name = ?", (name,)).fetchone()
            db.execute("INSERT INTO ilog (name, seq, value) VALUES (?, ?, ?)", (name, seq, data))
        return seq

    def internal_since(self, name: str, seq: int) -> list[tuple[int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, value FROM ilog WHERE name = ? AND seq > ? ORDER BY seq", (name, seq)
            ).fetchall()
        return [(s, v) for s, v in rows]

    def users_with_log(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT user FROM log ORDER BY user").fetchall()
        return [user for (user,) in rows]

    def get_meta(self, name: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def put_meta(self, name: str, value: bytes) -> None:
        with self._transaction("IMMEDIATE") as db:
            db.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, as_bytes(value)),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"
