"""Where graphs come from: the in-memory LRU first, then the disk cache, then a fresh build.

``cache_info()`` and ``clear()`` act on the process-wide cache that every cuDNN launcher shares.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

import torch

from .builder import BuiltGraph, build_plan, load_plan, serialize
from .cache import CacheInfo, GraphCache
from .cuda_env import current_stream, device_props, handle_for, load_cudnn
from .disk_cache import DiskCache, PlanMeta, disk_cache_enabled
from .key import GraphKey

__all__ = ["cache_info", "clear", "default_graph_cache", "load_or_build"]

log = logging.getLogger("kvdecode.cudnn_graphs")


def load_or_build(
    key: GraphKey,
    *,
    disk: DiskCache | None,
    meta: PlanMeta,
    build: Callable[[], BuiltGraph],
    load: Callable[[bytes, int], BuiltGraph],
    serialize_fn: Callable[[BuiltGraph], bytes],
) -> BuiltGraph:
    """A plan from ``disk`` when one matching ``meta`` is there, else ``build()`` it and save it.

    The disk never fails the call: a file that cannot be used (refused by :meth:`DiskCache.load`, which
    verifies its length and checksum before the blob is handed to ``load``), a blob cuDNN rejects, or a
    disk cache that raises, warns or logs and rebuilds; a failed save is logged (:meth:`DiskCache.save`).
    """
    if disk is not None:
        try:
            found = disk.load(key, meta)
        except Exception as exc:  # whatever the disk does, the call goes on with a build
            warnings.warn(
                f"the cuDNN plan disk cache failed for {key.name} ({type(exc).__name__}: {exc}); rebuilding",
                RuntimeWarning,
                stacklevel=2,
            )
            found = None
        if found is not None:
            blob, record = found
            try:
                return load(blob, record["workspace_size"])
            except Exception as exc:  # a blob the library rejects: rebuild, never fail the call
                log.warning("cached cuDNN plan for %s did not load (%s); rebuilding", key.name, exc)
    built = build()
    if disk is not None:
        try:
            blob = serialize_fn(built)
        except Exception as exc:
            log.info("cuDNN plan for %s cannot be serialized (%s); not cached on disk", key.name, exc)
            return built
        disk.save(key, meta, blob, built.workspace_size)
    return built


def _build_on_gpu(key: GraphKey) -> BuiltGraph:
    cudnn, version, reason = load_cudnn()
    if reason is not None:
        raise ImportError(reason)
    props = device_props(key.device_index)
    with torch.cuda.device(key.device_index):
        handle = handle_for(key.device_index, current_stream(key.device_index))
        meta = PlanMeta(
            gpu_name=props.name,
            cudnn_version=int(version),
            frontend_version=str(getattr(cudnn, "__version__", "?")),
            key=key.canonical(),
        )
        built = load_or_build(
            key,
            disk=DiskCache() if disk_cache_enabled() else None,
            meta=meta,
            build=lambda: build_plan(key, handle),
            load=lambda blob, ws: load_plan(key, blob, handle, ws),
            serialize_fn=serialize,
        )
    log.debug("cuDNN graph %s from %s in %.1f ms", key.name, built.source, 1e3 * built.seconds)
    return built


_default: GraphCache | None = None
_default_lock = threading.Lock()


def default_graph_cache() -> GraphCache:
    """The process-wide graph cache (created on first use; size from ``KVDECODE_GRAPH_CACHE_SIZE``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = GraphCache(_build_on_gpu)
        return _default


def cache_info() -> CacheInfo:
    """Hits, misses, builds, disk loads, evictions and build/load seconds of the shared graph cache."""
    return default_graph_cache().cache_info()


def clear(*, disk: bool = False) -> None:
    """Empty the shared graph cache and reset its counters; ``disk=True`` also deletes saved plans."""
    default_graph_cache().clear()
    if disk:
        DiskCache().clear()
