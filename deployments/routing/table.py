"""AffinityTable: the bounded memory of which replica served each routing key (least recently used go first)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["AffinityTable"]

V = TypeVar("V")


class AffinityTable(Generic[V]):
    """Routing key -> the replica that served it last, holding at most `max_size` keys.

    Lookups refresh a key; when a new key would exceed the bound, the least recently used key is forgotten.
    Keys are fixed-size hashes, so the table's memory is bounded whatever clients send.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._entries: OrderedDict[int, V] = OrderedDict()

    def get(self, key: int) -> V | None:
        """The value of `key` (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: int, value: V) -> None:
        """Remember `value` for `key` as the most recently used; forget the least recently used past the bound."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def discard(self, key: int) -> None:
        """Forget `key` if it is known."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries
