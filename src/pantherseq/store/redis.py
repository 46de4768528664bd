"""The Redis backend of the user-state store, on the `redis` client (the `redis` extra, imported lazily).

Layout (see base.py): the state is a string key `ps:1:state:<user>`, the log a stream `ps:1:log:<user>`
whose entry ids are `<seq>-0` with the event in field `v`, and `ps:1:seq:<user>` the counter that hands
out sequence numbers; one Lua script does the INCR and the XADD, so the two never disagree and two
writers never share a number. Internal logs (`ps:1:ilog:<name>`, counter `ps:1:iseq:<name>`) use the same
script; `trim_log` is one Lua script too (XTRIM MINID: Redis >= 6.2). Reads of many users are one MGET per 1,000 keys, inside one MULTI so they
see one moment; writes are MSETs inside one MULTI pipeline, so a batch lands whole or not at all.

Durability. `append_event` returns once the server has run the script and answered, so the event lives in
the server, another process, and survives a crash of the caller. Surviving a crash of the server is the
server's configuration (`appendonly yes`, `appendfsync everysec` or `always`), not this module's.

Threads. The client's connection pool gives each command in flight its own connection, so one client is
shared by all threads; pipelines are made per call and never shared. Keys of one user are not hash-tagged:
Redis Cluster is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pantherseq.errors import ConfigError
from pantherseq.store.base import (
    Store,
    as_bytes,
    internal_log_key,
    internal_seq_key,
    log_key,
    meta_key,
    seq_key,
    state_key,
)

CHUNK = 1000  # keys per MGET / MSET

APPEND = """
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], string.format('%d-0', seq), 'v', ARGV[1])
return seq
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

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=True)
        for i in range(0, len(keys), CHUNK):
            pipe.mget([state_key(user) for user in keys[i : i + CHUNK]])
        return [value for chunk in pipe.execute() for value in chunk]

    def put_many(self, items: Mapping[str, bytes]) -> None:
        pairs = [(state_key(user), as_bytes(value)) for user, value in items.items()]
        if not pairs:
            return
        pipe = self._client.pipeline(transaction=True)
        for i in range(0, len(pairs), CHUNK):
            pipe.mset(dict(pairs[i : i + CHUNK]))
        pipe.execute()

    def append_event(self, user: str, event: bytes) -> int:
        return int(self._append(keys=[seq_key(user), log_key(user)], args=[as_bytes(event)]))

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
