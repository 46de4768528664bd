"""The Redis backend of the user-state store, on the `redis` client (the `redis` extra, imported lazily).

Layout (see base.py): the state is a string key `ps:1:state:<user>`, the log a stream `ps:1:log:<user>`
whose entry ids are `<seq>-0` with the event in field `v`, and `ps:1:seq:<user>` the counter that hands
out sequence numbers; one Lua script does the INCR and the XADD, so the two never disagree and two
writers never share a number. Internal logs (`ps:1:ilog:<name>`, counter `ps:1:iseq:<name>`) use the same
script; `trim_log` is one Lua script too (XTRIM MINID: Redis >= 6.2). Reads of many users are one MGET per 1,000 keys, inside one MULTI so they
see one moment; writes are MSETs inside one MULTI pipeline, so a batch lands whole or not at all.

Shared state (base.py): the compare-and-append, the time index, the versioned state write and the
new-user admission are Lua scripts, each one atomic step in the server; the time index is two sorted sets
(all members, flagged members) scored by time, counted with ZCOUNT; the refresh queue is a stream read by
the consumer group `refresh` (XREADGROUP, XAUTOCLAIM of entries idle for RECLAIM_S, XACK + XDEL).

Durability. `append_event` returns once the server has run the script and answered, so the event lives in
the server, another process, and survives a crash of the caller. Surviving a crash of the server is the
server's configuration (`appendonly yes`, `appendfsync everysec` or `always`), not this module's.

Threads. The client's connection pool gives each command in flight its own connection, so one client is
shared by all threads; pipelines are made per call and never shared. Keys of one user are not hash-tagged:
Redis Cluster is not supported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pantherseq.errors import ConfigError
from pantherseq.store.base import (
    QUEUE_GROUP,
    QUEUE_KEY,
    RECLAIM_S,
    Store,
    admit_key,
    as_bytes,
    flag_key,
    index_key,
    internal_log_key,
    internal_seq_key,
    log_key,
    meta_key,
    seq_key,
    state_key,
    version_key,
)

CHUNK = 1000  # keys per MGET / MSET

APPEND = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], string.format('%d-0', seq), 'v', ARGV[1])
return seq
"""

# a user's event: KEYS = counter, stream, refresh queue, time index; ARGV = event, expected last seq ('' =
# any), user, queue? ('1'), index time ('' = none), append wall time. -1 = another writer came first.
APPEND_EVENT = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[2] ~= '' and last ~= tonumber(ARGV[2]) then return -1 end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], string.format('%d-0', seq), 'v', ARGV[1])
if ARGV[4] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', '1000000', '*', 'u', ARGV[3], 't', ARGV[6])
end
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[4], ARGV[5], string.format('%d:', seq) .. ARGV[3]) end
return seq
"""

# KEYS = state, version; ARGV = value, version: write unless the stored version is newer
PUT_IF_NEWER = """
local have = tonumber(redis.call('GET', KEYS[2]) or '-1')
if have > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# KEYS = index, flags; ARGV = member, '1' | '0'
FLAG = """
local t = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not t then return 0 end
if ARGV[2] == '1' then redis.call('ZADD', KEYS[2], t, ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS = admissions; ARGV = now, window, cap, member
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
return 1
"""

# drop entries <= ARGV[1] but never the newest (KEYS[1] is the counter, KEYS[2] the stream); XTRIM MINID
# needs Redis >= 6.2
TRIM = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local upto = math.min(tonumber(ARGV[1]), last - 1)
if upto < 1 then return 0 end
return redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d-0', upto + 1))
"""


def redact(url: str) -> str:
    """The URL with any password replaced by `***`, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


class RedisStore(Store):
    """A store in a Redis server; `url` is `redis://host:port/db`, checked by a PING when opened."""

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """`redis://host[:port][/db]`; ValueError for anything else."""
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when not a number in 0..65535
        db = parts.path.removeprefix("/")
        if parts.scheme != "redis" or not parts.hostname or port == 0 or not (db == "" or db.isdigit()):
            raise ValueError(url)
        return cls(url)

    def __init__(self, url: str, *, timeout: float = 5.0):
        try:
            import redis
        except ImportError as e:
            raise ConfigError(
                f"store URL {redact(url)} needs the redis client: pip install 'pantherseq[redis]'"
            ) from e
        self.url = url
        self._client: Any = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            self._client.ping()
        except redis.RedisError as e:
            self._client.close()
            raise ConfigError(f"cannot reach the Redis store at {redact(url)}: {e}") from e
        self._append = self._client.register_script(APPEND)
        self._trim = self._client.register_script(TRIM)
        self._append_event = self._client.register_script(APPEND_EVENT)
        self._put_if_newer = self._client.register_script(PUT_IF_NEWER)
        self._flag = self._client.register_script(FLAG)
        self._admit = self._client.register_script(ADMIT)
        self._group_ready = False

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=True)
        for i in range(0, len(keys), CHUNK):
            pipe.mget([state_key(user) for user in keys[i : i + CHUNK]])
        return [value for chunk in pipe.execute() for value in chunk]

    def put_many(self, items: Mapping[str, bytes], versions: Mapping[str, int] | None = None) -> None:
        pairs = [(state_key(user), as_bytes(value)) for user, value in items.items()]
        if not pairs:
            return
        pipe = self._client.pipeline(transaction=True)
        if versions is None:
            for i in range(0, len(pairs), CHUNK):
                pipe.mset(dict(pairs[i : i + CHUNK]))
            users = list(items)
            for i in range(0, len(users), CHUNK):
                pipe.delete(*[version_key(u) for u in users[i : i + CHUNK]])
        else:
            for user, value in items.items():
                self._put_if_newer(keys=[state_key(user), version_key(user)],
                                   args=[as_bytes(value), int(versions[user])], client=pipe)
        pipe.execute()

    def append_event(self, user: str, event: bytes, *, expect_seq: int | None = None,
                     index: tuple[str, int] | None = None, queue: bool = False) -> int | None:
        keys = [seq_key(user), log_key(user), QUEUE_KEY, index_key(index[0] if index else "")]
        args = [as_bytes(event), "" if expect_seq is None else int(expect_seq), user, "1" if queue else "0",
                "" if index is None else int(index[1]), repr(time.time())]
        seq = int(self._append_event(keys=keys, args=args))
        return None if seq < 0 else seq

    def index_add(self, name: str, items: Sequence[tuple[str, int]]) -> None:
        for i in range(0, len(items), CHUNK):
            self._client.zadd(index_key(name), {m: int(t) for m, t in items[i : i + CHUNK]})

    def index_remove(self, name: str, members: Sequence[str]) -> None:
        for i in range(0, len(members), CHUNK):
            chunk = list(members[i : i + CHUNK])
            pipe = self._client.pipeline(transaction=True)
            pipe.zrem(index_key(name), *chunk)
            pipe.zrem(flag_key(name), *chunk)
            pipe.execute()

    def index_flag(self, name: str, member: str, flag: bool) -> bool:
        return bool(self._flag(keys=[index_key(name), flag_key(name)], args=[member, "1" if flag else "0"]))

    def index_counts(self, name: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        pipe = self._client.pipeline(transaction=True)
        for lo, hi in ranges:
            pipe.zcount(index_key(name), f"({int(lo)}", int(hi))
            pipe.zcount(flag_key(name), f"({int(lo)}", int(hi))
        got = pipe.execute()
        return [(int(got[2 * i]), int(got[2 * i + 1])) for i in range(len(ranges))]

    def admit(self, name: str, member: str, now: float, window_s: float, cap: int) -> bool:
        return bool(self._admit(keys=[admit_key(name)], args=[repr(float(now)), repr(float(window_s)), int(cap),
                                                               member]))

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        import redis

        try:
            self._client.xgroup_create(QUEUE_KEY, QUEUE_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    def claim_refresh(self, consumer: str, count: int, block_s: float) -> list[tuple[str, str, float]]:
        self._ensure_group()
        got = self._client.xautoclaim(QUEUE_KEY, QUEUE_GROUP, consumer, int(RECLAIM_S * 1000), "0-0",
                                      count=count)
        entries = got[1]
        if not entries:
            read = self._client.xreadgroup(QUEUE_GROUP, consumer, {QUEUE_KEY: ">"}, count=count,
                                           block=max(1, int(block_s * 1000)))
            entries = read[0][1] if read else []
        return [(eid.decode(), f[b"u"].decode(), float(f[b"t"])) for eid, f in entries if f]

    def ack_refresh(self, ids: Sequence[str]) -> None:
        if ids:
            pipe = self._client.pipeline(transaction=True)
            pipe.xack(QUEUE_KEY, QUEUE_GROUP, *ids)
            pipe.xdel(QUEUE_KEY, *ids)
            pipe.execute()

    def events_since(self, user: str, seq: int) -> list[tuple[int, bytes]]:
        entries = self._client.xrange(log_key(user), min=f"{max(seq, 0) + 1}-0", max="+")
        return [(int(entry_id.split(b"-")[0]), fields[b"v"]) for entry_id, fields in entries]

    def trim_log(self, user: str, upto_seq: int) -> int:
        return int(self._trim(keys=[seq_key(user), log_key(user)], args=[int(upto_seq)]))

    def append_internal(self, name: str, value: bytes) -> int:
        return int(self._append(keys=[internal_seq_key(name), internal_log_key(name)], args=[as_bytes(value)]))

    def internal_since(self, name: str, seq: int) -> list[tuple[int, bytes]]:
        entries = self._client.xrange(internal_log_key(name), min=f"{max(seq, 0) + 1}-0", max="+")
        return [(int(entry_id.split(b"-")[0]), fields[b"v"]) for entry_id, fields in entries]

    def users_with_log(self) -> list[str]:
        prefix = log_key("")
        keys = self._client.scan_iter(match=f"{prefix}*", count=1000, _type="stream")
        return sorted({key.decode()[len(prefix) :] for key in keys})

    def get_meta(self, name: str) -> bytes | None:
        return self._client.get(meta_key(name))

    def put_meta(self, name: str, value: bytes) -> None:
        self._client.set(meta_key(name), as_bytes(value))

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({redact(self.url)!r})"
