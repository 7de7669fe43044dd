"""selfforcing.lru.LRUCache: the one shared least-recently-used cache (time embeddings, text states, store shards)."""

import pickle

import pytest

from selfforcing.lru import LRUCache


def test_evicts_least_recently_used_first():
    cache = LRUCache(3)
    for k in "abc":
        cache.put(k, k.upper())
    assert list(cache.keys()) == ["a", "b", "c"] and len(cache) == 3
    assert cache.get("a") == "A"  # a hit makes "a" the most recently used
    cache.put("d", "D")  # over maxsize: "b" is now the least recently used
    assert list(cache.keys()) == ["c", "a", "d"] and "b" not in cache
    cache.put("c", "C2")  # replacing a value also makes it the most recently used, and evicts nothing
    assert list(cache.keys()) == ["a", "d", "c"] and list(cache.values()) == ["A", "D", "C2"]
    cache.put("e", "E")
    assert list(cache.keys()) == ["d", "c", "e"]


def test_get_miss_and_looking_do_not_change_the_order():
    cache = LRUCache(2)
    cache.put(1, "x")
    cache.put(2, "y")
    assert cache.get(3) is None and cache.get(3, "default") == "default"
    assert 1 in cache and list(cache.values()) == ["x", "y"]  # `in` and `values` leave 1 least recently used
    cache.put(3, "z")
    assert list(cache.keys()) == [2, 3]


def test_maxsize_bounds_and_clear():
    cache = LRUCache(0)  # holds nothing
    cache.put("a", 1)
    assert len(cache) == 0 and cache.get("a") is None
    big = LRUCache(5)
    for i in range(20):
        big.put(i, i)
        assert len(big) == min(i + 1, 5)
    assert list(big.keys()) == [15, 16, 17, 18, 19]
    big.clear()
    assert len(big) == 0 and list(big.keys()) == []
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="maxsize"):
            LRUCache(bad)


def test_pickles_with_its_items_and_order():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.maxsize == 2 and list(copy.keys()) == ["b", "a"]
