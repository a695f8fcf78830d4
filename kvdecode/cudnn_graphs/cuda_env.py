"""The CUDA side of the cuDNN backend, through cuda-python: device facts, handles, workspace.

* :func:`device_props` asks the CUDA runtime (``cuda.bindings.runtime``) for the device's name, SM version
  and SM count, once per device; every status is checked.
* :func:`handle_for` keeps one cuDNN handle per (device, thread) and binds the caller's stream to it,
  re-binding only when the stream changes (``cudnnSetStream`` is not free).
* :class:`Workspace` is a device buffer that grows as needed; buffers it outgrows stay alive so a CUDA
  graph captured with an older pointer stays valid.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CudaError", "DeviceProps", "Workspace", "check", "device_props", "handle_for", "load_cudnn"]


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error status."""


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(status, *values)`` tuple, raising :class:`CudaError` on a bad status."""
    from cuda.bindings import runtime as rt

    status, *values = result if isinstance(result, tuple) else (result,)
    if status != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(status)
        _, text = rt.cudaGetErrorString(status)
        raise CudaError(f"{what} failed with {name.decode()}: {text.decode()}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceProps:
    """What the planner and the graph builder need to know about one GPU."""

    index: int
    name: str
    sm_version: int  # e.g. 90 for Hopper
    sm_count: int


@functools.cache
def device_props(index: int) -> DeviceProps:
    """Name, SM version and SM count of CUDA device ``index`` (queried once, statuses checked)."""
    from cuda.bindings import runtime as rt

    attr = rt.cudaDeviceAttr
    major = check(
        rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, index), "cudaDeviceGetAttribute"
    )
    minor = check(
        rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, index), "cudaDeviceGetAttribute"
    )
    sms = check(
        rt.cudaDeviceGetAttribute(attr.cudaDevAttrMultiProcessorCount, index), "cudaDeviceGetAttribute"
    )
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode()
    return DeviceProps(
        index=index, name=str(name), sm_version=10 * int(major) + int(minor), sm_count=int(sms)
    )


@functools.lru_cache(maxsize=1)
def load_cudnn() -> tuple[Any, int | None, str | None]:
    """``(cudnn module, backend version, None)`` or ``(module or None, None, reason it is unusable)``."""
    try:
        import cudnn
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, None, f"the cuDNN frontend (nvidia-cudnn-frontend) is not importable: {exc}"
    try:
        version = int(cudnn.backend_version())
    except Exception as exc:
        return cudnn, None, f"the cuDNN library (libcudnn) cannot be loaded: {exc}"
    return cudnn, version, None


class _HandleState:
    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.stream: int | None = None


_local = threading.local()


def handle_for(device_index: int, stream: int) -> Any:
    """The calling thread's cuDNN handle for ``device_index``, bound to ``stream`` (a ``cudaStream_t``).

    The handle is created on first use and kept for the thread's lifetime; the stream is re-bound only
    when it differs from the last one bound.
    """
    cudnn, _, reason = load_cudnn()
    if reason is not None:
        raise CudaError(reason)
    states: dict[int, _HandleState] = getattr(_local, "states", None) or {}
    _local.states = states
    state = states.get(device_index)
    if state is None:
        with torch.cuda.device(device_index):
            state = states[device_index] = _HandleState(cudnn.create_handle())
    if state.stream != stream:
        cudnn.set_stream(state.handle, stream)
        state.stream = stream
    return state.handle


def current_stream(device_index: int) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on ``device_index``."""
    return int(torch.cuda.current_stream(device_index).cuda_stream)


class Workspace:
    """A byte buffer on one device that grows to the largest size asked for.

    ``ensure(n)`` returns a tensor of at least ``n`` bytes. When it has to grow, the previous buffer is
    kept alive (not freed) because a CUDA graph may have captured its address.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.tensor: torch.Tensor | None = None
        self._retired: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel()

    def ensure(self, nbytes: int) -> torch.Tensor | None:
        if nbytes <= 0 and self.tensor is None:
            return None
        if self.tensor is None or self.tensor.numel() < nbytes:
            if self.tensor is not None:
                self._retired.append(self.tensor)
            self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        return self.tensor
