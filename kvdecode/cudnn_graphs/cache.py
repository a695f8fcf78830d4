"""A bounded LRU cache of built cuDNN graphs, keyed by :class:`GraphKey`.

The size defaults to :data:`DEFAULT_SIZE` and can be set with the ``KVDECODE_GRAPH_CACHE_SIZE``
environment variable. ``cache_info()`` reports hits, misses, builds, disk loads, evictions and the time
spent; when most recent lookups miss on a full cache (thrashing) a ``RuntimeWarning`` is issued once,
never an exception: a server keeps running, only slower.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_SIZE", "CacheInfo", "GraphCache", "cache_size_from_env"]

log = logging.getLogger("kvdecode.cudnn_graphs")

DEFAULT_SIZE = 64
ENV_SIZE = "KVDECODE_GRAPH_CACHE_SIZE"
THRASH_WINDOW = 32  # lookups looked at
THRASH_MISS_RATE = 0.5  # warn when at least this share of them missed while the cache evicts


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    builds: int
    disk_loads: int
    evictions: int
    currsize: int
    maxsize: int
    build_seconds: float  # total time spent building graphs
    load_seconds: float  # total time spent loading graphs from the disk cache


def cache_size_from_env(default: int = DEFAULT_SIZE) -> int:
    """``KVDECODE_GRAPH_CACHE_SIZE`` as a positive int, else ``default`` (a bad value warns)."""
    raw = os.environ.get(ENV_SIZE)
    if raw is None or raw.strip() == "":
        return default
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        warnings.warn(
            f"{ENV_SIZE} must be a positive integer, got {raw!r}; using the default {default}",
            RuntimeWarning,
            stacklevel=2,
        )
        return default
    return size


class GraphCache:
    """LRU map ``key -> built graph``; ``builder(key)`` makes a missing entry.

    The builder may return an object with ``source == "disk"`` to be counted as a disk load rather than
    a build. Thread-safe: lookups and builds hold one lock, so a key is never built twice at once.
    """

    def __init__(self, builder: Callable[[Any], Any], maxsize: int | None = None) -> None:
        self._builder = builder
        self.maxsize = cache_size_from_env() if maxsize is None else int(maxsize)
        if self.maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {self.maxsize}")
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.RLock()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._hits = self._misses = self._builds = self._disk_loads = self._evictions = 0
        self._build_seconds = self._load_seconds = 0.0
        self._window: deque[bool] = deque(maxlen=THRASH_WINDOW)  # True = miss
        self._warned = False

    def get(self, key: Hashable) -> Any:
        """The entry for ``key``, built (or loaded) on a miss; evicts the least recently used."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                self._window.append(False)
                return found
            self._misses += 1
            self._window.append(True)
            start = time.perf_counter()
            value = self._builder(key)
            elapsed = time.perf_counter() - start
            if getattr(value, "source", "build") == "disk":
                self._disk_loads += 1
                self._load_seconds += elapsed
            else:
                self._builds += 1
                self._build_seconds += elapsed
            log.debug("cuDNN graph %s: %s in %.1f ms", getattr(key, "name", key), "made", 1e3 * elapsed)
            self._entries[key] = value
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
                self._evictions += 1
            self._check_thrash()
            return value

    def peek(self, key: Hashable) -> Any:
        """The entry for ``key`` or None, without counting or building."""
        with self._lock:
            return self._entries.get(key)

    def _check_thrash(self) -> None:
        if self._warned or self._evictions == 0 or len(self._window) < THRASH_WINDOW:
            return
        rate = sum(self._window) / len(self._window)
        if rate >= THRASH_MISS_RATE:
            self._warned = True
            warnings.warn(
                f"kvdecode's cuDNN graph cache is thrashing: {rate:.0%} of the last {len(self._window)} "
                f"lookups missed with the cache full ({self.maxsize} graphs, {self._evictions} evictions); "
                f"raise {ENV_SIZE} or keep fewer distinct shapes (one graph per capacity is the design)",
                RuntimeWarning,
                stacklevel=4,
            )

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(
                hits=self._hits,
                misses=self._misses,
                builds=self._builds,
                disk_loads=self._disk_loads,
                evictions=self._evictions,
                currsize=len(self._entries),
                maxsize=self.maxsize,
                build_seconds=self._build_seconds,
                load_seconds=self._load_seconds,
            )

    def clear(self) -> None:
        """Drop every entry and reset the counters (graphs held by live plans stay alive)."""
        with self._lock:
            self._entries.clear()
            self._reset_counters()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
