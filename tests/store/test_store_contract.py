"""One contract for every store backend (SQLite file, real Redis server): a store returns what was put,
numbers each user's events 1, 2, 3..., keeps them across a reopen and a kill -9 of the writer, and refuses
bad URLs with a ConfigError."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pantherseq.errors import ConfigError
from pantherseq.store import SCHEMA_VERSION, Store, open_store
from pantherseq.store.base import KEY_PREFIX

from .conftest import free_port

# ------------------------------------------------------------------------------------------------ state


def test_get_many_misses_are_none_and_aligned(store: Store) -> None:
    store.put_many({"a": b"A", "c": b"C"})
    assert store.get_many(["x", "a", "b", "c", "a"]) == [None, b"A", None, b"C", b"A"]
    assert store.get_many([]) == []


def test_put_many_overwrites(store: Store) -> None:
    store.put_many({"a": b"old", "b": b"B"})
    store.put_many({"a": b"new"})
    store.put_many({})
    assert store.get_many(["a", "b"]) == [b"new", b"B"]


def test_large_batches(store: Store) -> None:
    items = {f"user-{i}": f"value-{i}".encode() * (1 + i % 3) for i in range(1200)}
    store.put_many(items)
    keys = list(items) + ["missing"]
    assert store.get_many(keys) == list(items.values()) + [None]


def test_binary_values_round_trip(store: Store) -> None:
    blob = bytes(range(256)) + b"\x00\x00" + "ü".encode()
    store.put_many({"nul": blob, "empty": b"", "ü-user": bytearray(b"\x00x")})
    assert store.get_many(["nul", "empty", "ü-user"]) == [blob, b"", b"\x00x"]
    assert store.append_event("nul", blob) == 1
    assert store.append_event("nul", b"") == 2
    assert store.events_since("nul", 0) == [(1, blob), (2, b"")]
    store.put_meta("blob", blob)
    assert store.get_meta("blob") == blob


def test_values_must_be_bytes(store: Store) -> None:
    with pytest.raises(TypeError, match="bytes"):
        store.put_many({"a": "text"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="bytes"):
        store.append_event("a", 1.5)  # type: ignore[arg-type]
    assert store.get_many(["a"]) == [None]


# ------------------------------------------------------------------------------------------------ event log


def test_append_event_numbers_each_user_from_one(store: Store) -> None:
    assert [store.append_event("u1", b"e%d" % i) for i in range(3)] == [1, 2, 3]
    assert store.append_event("u2", b"other") == 1
    assert store.append_event("u1", b"e3") == 4
    assert store.events_since("u1", 0) == [(1, b"e0"), (2, b"e1"), (3, b"e2"), (4, b"e3")]
    assert store.events_since("u1", 2) == [(3, b"e2"), (4, b"e3")]
    assert store.events_since("u1", 4) == []
    assert store.events_since("u2", 0) == [(1, b"other")]
    assert store.events_since("nobody", 0) == []


def test_users_with_log(store: Store) -> None:
    assert store.users_with_log() == []
    store.put_many({"state-only": b"s"})
    for user in ["b", "a:with:colons", "b", "ü"]:
        store.append_event(user, b"e")
    store.put_meta("m", b"v")
    assert store.users_with_log() == ["a:with:colons", "b", "ü"]


def test_meta(store: Store) -> None:
    assert store.get_meta("model") is None
    store.put_meta("model", b"v1")
    store.put_meta("model", b"v2")
    store.put_many({"model": b"a user's state"})  # a user named like a meta record: another namespace
    assert store.get_meta("model") == b"v2"
    assert store.get_many(["model"]) == [b"a user's state"]


# ------------------------------------------------------------------------------------------------ persistence


def test_reopen_keeps_everything(store_url: str) -> None:
    with open_store(store_url) as first:
        first.put_many({"a": b"\x00A"})
        first.append_event("a", b"e1")
        first.put_meta("model", b"m")
    with open_store(store_url) as second:
        assert second.get_many(["a"]) == [b"\x00A"]
        assert second.events_since("a", 0) == [(1, b"e1")]
        assert second.append_event("a", b"e2") == 2
        assert second.get_meta("model") == b"m"
        assert second.users_with_log() == ["a"]


WRITER = """
import sys
from pantherseq.store import open_store

store = open_store(sys.argv[1])
for i in range(int(sys.argv[2])):
    print(store.append_event("victim", b"event-%d" % i), flush=True)
"""


def test_appended_events_survive_kill_9_of_the_writer(store_url: str) -> None:
    """Every seq the child printed (so append_event had returned) is in the store after SIGKILL."""
    printed_before_kill = 200
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, store_url, "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        seqs = []
        for line in child.stdout:
            seqs.append(int(line))
            if len(seqs) >= printed_before_kill:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    rest = child.stdout.read().split("\n")[:-1]  # whole lines printed before the kill; not a torn last one
    seqs += [int(line) for line in rest]
    assert len(seqs) >= printed_before_kill, child.stderr.read()
    assert child.returncode == -signal.SIGKILL
    with open_store(store_url) as store:
        logged = dict(store.events_since("victim", 0))
    assert seqs == list(range(1, len(seqs) + 1))
    assert set(seqs) <= set(logged)
    assert list(logged) == list(range(1, len(logged) + 1))  # no gap, at most the ones not yet printed
    assert all(logged[s] == b"event-%d" % (s - 1) for s in seqs)


# ------------------------------------------------------------------------------------------------ threads


def test_appends_from_two_threads_get_unique_complete_seqs(store: Store) -> None:
    per_thread = 150
    start = threading.Barrier(2)

    def work(name: str) -> list[tuple[int, bytes]]:
        start.wait()
        mine = []
        for i in range(per_thread):
            event = f"{name}-{i}".encode()
            mine.append((store.append_event("shared", event), event))
            store.put_many({name: event})
            assert store.get_many([name]) == [event]
        return mine

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(work, ["t1", "t2"]))  # re-raises a thread's exception here
    pairs = got[0] + got[1]
    assert sorted(seq for seq, _ in pairs) == list(range(1, 2 * per_thread + 1))
    for mine in got:  # each thread's own appends were numbered in its order
        assert [seq for seq, _ in mine] == sorted(seq for seq, _ in mine)
    assert store.events_since("shared", 0) == sorted(pairs)


# ------------------------------------------------------------------------------------------------ opening


@pytest.mark.parametrize(
    "url",
    [
        "",
        "store.db",
        "postgres://localhost/db",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///:memory:",
        "redis://",
        "redis:///0",
        "redis://localhost:notaport/0",
        "redis://localhost:6379/zero",
        "redis://localhost:0/0",
    ],
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(url)
    message = str(info.value)
    assert "\n" not in message and repr(url) in message
    assert "sqlite:///" in message and "redis://host:port/db" in message


def test_stores_are_chosen_by_scheme_and_imported_only_when_opened() -> None:
    code = ("import sys; from pantherseq.store import STORES, open_store; "
            "print(sorted(STORES), [m for m in ('pantherseq.store.sqlite', 'pantherseq.store.redis', 'redis') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['redis', 'sqlite'] []"  # no backend (nor the redis client) until a URL is opened


def test_unreachable_redis_raises_config_error() -> None:
    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{free_port()}/0"  # free: nothing listens there
    with pytest.raises(ConfigError, match=f"Redis store at {url}"):
        open_store(url)


def test_redis_error_hides_the_password() -> None:
    pytest.importorskip("redis")
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as info:
        open_store(url)
    assert "s3cret" not in str(info.value) and "user:***@" in str(info.value)


def test_sqlite_relative_url_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///sub/dir/store.db") as store:
        store.put_meta("m", b"v")
    assert (tmp_path / "sub" / "dir" / "store.db").is_file()


def test_sqlite_file_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="schema version"):
        open_store(f"sqlite:///{path}")


def test_sqlite_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"not a database at all, just some text long enough to fill a header" * 4)
    with pytest.raises(ConfigError, match=str(path)):
        open_store(f"sqlite:///{path}")


def test_redis_keys_follow_the_documented_layout(redis_url: str) -> None:
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
        with open_store(redis_url) as store:
            store.put_many({"u": b"s"})
            store.append_event("u", b"e")
            store.put_meta("m", b"v")
            store.put_many({"v": b"s"}, versions={"v": 0})
            store.append_event("v", b"e", index=("t", 100), queue=True)
            store.index_flag("t", "1:v", True)
            store.admit("new-users", "v", 1000.0, 60, 10)
        keys = {key.decode(): client.type(key).decode() for key in client.keys("*")}
    assert keys == {
        f"{KEY_PREFIX}state:u": "string",
        f"{KEY_PREFIX}log:u": "stream",
        f"{KEY_PREFIX}seq:u": "string",
        f"{KEY_PREFIX}meta:m": "string",
        f"{KEY_PREFIX}state:v": "string",
        f"{KEY_PREFIX}ver:v": "string",
        f"{KEY_PREFIX}log:v": "stream",
        f"{KEY_PREFIX}seq:v": "string",
        f"{KEY_PREFIX}tidx:t": "zset",
        f"{KEY_PREFIX}tflag:t": "zset",
        f"{KEY_PREFIX}admit:new-users": "zset",
        f"{KEY_PREFIX}queue:refresh": "stream",
    }


# ------------------------------------------------------------------------------------------------ issue 14


def test_trim_log_keeps_the_newest_entry_and_numbering_continues(store: Store) -> None:
    for i in range(5):
        store.append_event("u", b"e%d" % i)
    assert store.trim_log("u", 3) == 3
    assert [s for s, _ in store.events_since("u", 0)] == [4, 5]
    assert store.trim_log("u", 99) == 1  # everything but the newest
    assert store.events_since("u", 0) == [(5, b"e4")]
    assert store.append_event("u", b"e5") == 6 and store.users_with_log() == ["u"]
    assert store.trim_log("nobody", 10) == 0


def test_internal_logs_are_out_of_every_user_id_s_reach(store: Store) -> None:
    assert store.append_internal("feedback", b"label") == 1
    for user in ("feedback", "\x00feedback", "ilog:feedback"):
        store.append_event(user, b"event")
    assert store.internal_since("feedback", 0) == [(1, b"label")]
    assert store.append_internal("feedback", b"label2") == 2
    assert store.internal_since("feedback", 1) == [(2, b"label2")]
    assert store.users_with_log() == sorted(["feedback", "\x00feedback", "ilog:feedback"])
    assert all(len(store.events_since(u, 0)) == 1 for u in store.users_with_log())


def test_sqlite_database_of_something_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    with pytest.raises(ConfigError, match="not a pantherseq store"):
        open_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["customers"]  # untouched
    with open_store(f"sqlite:///{tmp_path / 'ours.db'}") as store:
        store.put_meta("m", b"v")
    with open_store(f"sqlite:///{tmp_path / 'ours.db'}") as store:  # ours opens again
        assert store.get_meta("m") == b"v"
