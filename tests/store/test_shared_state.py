"""The store's shared-state operations (issue 14, horizontal scale), on every backend: compare-and-append,
the time index with flags, versioned state writes, the new-user admission window and the refresh queue."""

from __future__ import annotations

import time

from pantherseq.store import Store, open_store
from pantherseq.store.base import index_member


def test_append_with_an_expected_seq_refuses_a_stale_writer(store: Store):
    assert store.append_event("u", b"a", expect_seq=0) == 1
    assert store.append_event("u", b"b", expect_seq=0) is None  # another writer came first
    assert store.append_event("u", b"b", expect_seq=1) == 2
    assert store.append_event("u", b"c") == 3  # no expectation: always appended
    assert [v for _, v in store.events_since("u", 0)] == [b"a", b"b", b"c"]
    store.trim_log("u", 3)
    assert store.append_event("u", b"d", expect_seq=2) is None and store.append_event("u", b"d", expect_seq=3) == 4


def test_the_time_index_counts_members_and_flags_over_ranges(store: Store):
    assert store.append_event("u", b"a", index=("m1", 100)) == 1
    assert store.append_event("v", b"b", index=("m1", 200)) == 1
    store.append_event("v", b"c", index=("m2", 150))
    store.index_add("m1", [(index_member("w", 7), 300), (index_member("u", 1), 100)])  # idempotent
    assert store.index_counts("m1", [(0, 1000), (100, 300), (99, 100), (300, 400)]) == [(3, 0), (2, 0), (1, 0),
                                                                                         (0, 0)]
    assert store.index_flag("m1", index_member("v", 1), True)
    assert not store.index_flag("m1", index_member("v", 9), True)  # no such member
    assert not store.index_flag("m2", index_member("v", 1), True)  # v's event 1 is at m1
    assert store.index_counts("m1", [(0, 1000), (0, 150)]) == [(3, 1), (1, 0)]
    store.index_flag("m1", index_member("v", 1), False)
    assert store.index_counts("m1", [(0, 1000)]) == [(3, 0)]
    store.index_flag("m1", index_member("w", 7), True)
    store.index_remove("m1", [index_member("w", 7), index_member("u", 1)])
    assert store.index_counts("m1", [(0, 1000)]) == [(1, 0)]
    assert store.index_counts("nowhere", [(0, 1000)]) == [(0, 0)]


def test_a_versioned_write_never_replaces_a_newer_state(store: Store):
    store.put_many({"u": b"v5", "w": b"w1"}, versions={"u": 5, "w": 1})
    store.put_many({"u": b"v4", "w": b"w2"}, versions={"u": 4, "w": 2})
    assert store.get_many(["u", "w"]) == [b"v5", b"w2"]
    store.put_many({"u": b"v5b"}, versions={"u": 5})  # the same version: written
    assert store.get_many(["u"]) == [b"v5b"]
    store.put_many({"u": b"embed"})  # an unversioned write forgets the version
    store.put_many({"u": b"v1"}, versions={"u": 1})
    assert store.get_many(["u"]) == [b"v1"]


def test_admission_is_a_sliding_window_shared_by_every_client(store_url: str):
    with open_store(store_url) as a, open_store(store_url) as b:
        assert a.admit("new", "x", 1000.0, 60, 2) and b.admit("new", "y", 1001.0, 60, 2)
        assert not a.admit("new", "z", 1002.0, 60, 2)
        assert b.admit("new", "x", 1003.0, 60, 2)  # admitted again: counts once
        assert b.admit("new", "z", 1061.5, 60, 2)  # y dropped out of the window
        assert not a.admit("new", "q", 1061.5, 60, 2)


def test_the_refresh_queue_hands_each_entry_to_one_consumer_until_acknowledged(store_url: str):
    with open_store(store_url) as a, open_store(store_url) as b:
        t0 = time.time()
        for user in ("u", "v", "u"):
            a.append_event(user, b"e", queue=True)
        a.append_event("w", b"e")  # not queued
        first = a.claim_refresh("c1", 2, 0.1)
        assert [u for _, u, _ in first] == ["u", "v"] and all(t0 - 1 <= t <= time.time() for _, _, t in first)
        second = b.claim_refresh("c2", 10, 0.1)
        assert [u for _, u, _ in second] == ["u"]
        assert b.claim_refresh("c2", 10, 0.1) == []  # claimed, not yet acknowledged: nobody else gets them
        a.ack_refresh([i for i, _, _ in first])
        b.ack_refresh([i for i, _, _ in second])
        assert a.claim_refresh("c1", 10, 0.05) == []


def test_a_sqlite_store_of_the_previous_layout_gains_the_new_tables(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # what the stores of the previous version hold
        for table in ("state (user TEXT PRIMARY KEY, value BLOB NOT NULL)",
                      "log (user TEXT, seq INTEGER, value BLOB NOT NULL, PRIMARY KEY (user, seq))",
                      "meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
                      "ilog (name TEXT, seq INTEGER, value BLOB NOT NULL, PRIMARY KEY (name, seq))"):
            db.execute(f"CREATE TABLE {table}")
        db.execute("INSERT INTO log VALUES ('u', 1, x'00')")
        db.execute("PRAGMA user_version = 1")
        db.execute("PRAGMA application_id = 1347634513")
    with open_store(f"sqlite:///{path}") as store:
        assert store.append_event("u", b"e", expect_seq=1, index=("t", 5), queue=True) == 2
        assert store.index_counts("t", [(0, 5)]) == [(1, 0)]
