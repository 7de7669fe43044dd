"""One least-recently-used cache for the places where ``functools.lru_cache`` does not fit: a cache per object
(a model's time embeddings, a text encoder's prompts, a store's open shard files), one that must be emptied when
something else changes, or one whose values a caller inspects.

``LRUCache(maxsize)`` holds at most ``maxsize`` items. ``get`` and ``put`` make a key the most recently used;
``put`` then drops the least recently used items while more than ``maxsize`` are held (``maxsize = 0`` holds
nothing). ``in``, ``len``, ``keys`` and ``values`` look without changing the order (least recently used first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A mapping of at most ``maxsize`` items that forgets the least recently used first."""

    def __init__(self, maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an integer >= 0, got {maxsize!r}")
        self.maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default: V | None = None) -> V | None:
        """The value of ``key`` (now the most recently used), else ``default``."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key`` as the most recently used, then evict down to ``maxsize``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> Iterator[K]:
        """The keys, least recently used first."""
        return iter(list(self._items))

    def values(self) -> Iterator[V]:
        """The values, least recently used first."""
        return iter(list(self._items.values()))

    def __repr__(self) -> str:
        return f"LRUCache(maxsize={self.maxsize}, items={len(self)})"
