"""A per-user LRU bounded in bytes, for what a process keeps in memory beside the store: the scorer's
predictions (serve/scorer.py) and the refresh's model windows (serve/windows.py). A value has `nbytes`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class LruCache:
    """Per user, a value and the key it was made for (a lookup with another key is a miss); least recently
    used users are dropped past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self._items: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, user: str, key: Any) -> Any | None:
        with self._lock:
            hit = self._items.get(user)
            if hit is None or hit[0] != key:
                return None
            self._items.move_to_end(user)
            return hit[1]

    def put(self, user: str, key: Any, value: Any) -> None:
        with self._lock:
            old = self._items.pop(user, None)
            if old is not None:
                self.bytes -= old[1].nbytes
            self._items[user] = (key, value)
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped.nbytes

    def pop(self, user: str) -> None:
        with self._lock:
            old = self._items.pop(user, None)
            if old is not None:
                self.bytes -= old[1].nbytes

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["LruCache"]
