"""Argument checks of :class:`~kvdecode.StaticKVCache`: its constructor, row indices and lengths.

The rule: values that come from the host (Python numbers and sequences, CPU tensors) are checked on the
host and refused with a :class:`~kvdecode.KVDecodeError`; values already on a CUDA device are never read
back (that would sync the host and break CUDA-graph capture), so they are made safe on the device instead:
lengths are clamped, out-of-range row indices are ignored.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from .errors import KVDecodeError
from .problem import MAX_HEAD_DIM, SUPPORTED_DTYPES
from .quant import FP8_DTYPES

__all__ = [
    "INT32_MAX",
    "check_constructor",
    "check_in_range",
    "check_index_tensor",
    "device_row_mask",
    "host_ints",
    "host_row_mask",
    "is_host",
    "resolve_device",
]

INT32_MAX = 2**31 - 1  # lengths and starts are int32 on the device


def is_host(t: object) -> bool:
    """True for what the host can read without a sync: anything but a tensor on an accelerator."""
    return not isinstance(t, torch.Tensor) or t.device.type == "cpu"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_device(device: object) -> torch.device:
    """The cache's device: ``None`` = CUDA when available, else CPU; a CUDA device gets its index."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise KVDecodeError(f"device must be a torch.device or a string like 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KVDecodeError(
            f"device must be a device name such as 'cuda', 'cuda:1' or 'cpu', got {device!r}"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise KVDecodeError(f"device must be a CPU or CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise KVDecodeError(
            f"device must be available, got {device!r} but CUDA is not available here "
            "(torch.cuda.is_available() is False); pass device='cpu' (Triton then runs interpreted)"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise KVDecodeError(
            f"device must be one of cuda:0..cuda:{torch.cuda.device_count() - 1}, got {device!r}"
        )
    return torch.device("cuda", index)  # tensors report an index


def check_constructor(
    sizes: dict[str, object], dtype: object, layout: object, scale: object, flags: dict
) -> None:
    """Sizes (positive ints; capacity within int32), dtype, layout, scale and the bool flags."""
    for name, value in sizes.items():
        if not _is_int(value) or value < 1:
            raise KVDecodeError(f"{name} must be a positive int, got {value!r}")
    if sizes["capacity"] > INT32_MAX:
        raise KVDecodeError(
            f"capacity must be a positive int <= {INT32_MAX}, got {sizes['capacity']}; lengths are int32"
        )
    if sizes["head_dim"] > MAX_HEAD_DIM:
        raise KVDecodeError(f"head_dim must be <= {MAX_HEAD_DIM}, got {sizes['head_dim']}")
    if not isinstance(dtype, torch.dtype) or (dtype not in SUPPORTED_DTYPES and dtype not in FP8_DTYPES):
        raise KVDecodeError(
            f"dtype must be one of float16, bfloat16, float32, float8_e4m3fn, float8_e5m2, got {dtype!r}"
        )
    if not isinstance(layout, str) or layout not in ("bhsd", "bshd"):
        raise KVDecodeError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
    ok = scale is None or (
        isinstance(scale, numbers.Real) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
    )
    if not ok:
        raise KVDecodeError(
            f"scale must be None or a positive finite float, got {scale!r}; leave it None for 1/sqrt(D)"
        )
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise KVDecodeError(f"{name} must be a bool, got {value!r}")


def host_ints(name: str, values: object, batch: int, high: int) -> torch.Tensor:
    """``values`` (a CPU tensor or a sequence of ints) as an int32 CPU tensor ``[batch]`` in ``0..high``.

    Each element is checked before any conversion, so ``1.7`` (or ``True``) is refused, never truncated.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach()
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            first = t.flatten()[0].item() if t.numel() else t.dtype
            raise _not_ints(name, first)
    else:
        try:
            items = list(values)
        except TypeError:
            raise _not_ints(name, values) from None
        ints = [_index(v) for v in items]
        if None in ints:
            raise _not_ints(name, items[ints.index(None)])
        t = torch.tensor([min(max(v, -1), high + 1) for v in ints], dtype=torch.int64)  # no overflow
        if t.numel() and ((t < 0) | (t > high)).any():
            i = int(((t < 0) | (t > high)).nonzero()[0, 0])
            raise _out_of_range(name, i, ints[i], high)
    if tuple(t.shape) != (batch,):
        raise KVDecodeError(f"{name}.shape must be ({batch},) (one per row), got {tuple(t.shape)}")
    check_in_range(name, t, high)
    return t.to(torch.int32)


def _not_ints(name: str, got: object) -> KVDecodeError:
    return KVDecodeError(
        f"{name} must hold ints (an integer tensor or a sequence of ints, one per row), got {got!r}; "
        "pass whole token counts"
    )


def _out_of_range(name: str, i: int, value: int, high: int) -> KVDecodeError:
    return KVDecodeError(
        f"{name}[{i}] must be in 0..capacity ({high}), got {value}; lengths count tokens in a cache row"
    )


def check_in_range(name: str, t: torch.Tensor, high: int) -> None:
    """Every value of the host tensor ``t`` in ``0..high``, else KVDecodeError naming the first bad row."""
    bad = ((t < 0) | (t > high)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise _out_of_range(name, i, int(t[i]), high)


def host_row_mask(rows: object, batch: int) -> torch.Tensor:
    """Bool CPU mask ``[batch]`` of the rows named by a host bool mask, index tensor or sequence of ints.

    Every index must be in ``0..batch - 1`` (negative indices are refused, not wrapped).
    """
    if isinstance(rows, torch.Tensor):
        t = rows.detach()
        if t.dtype == torch.bool:
            if tuple(t.shape) != (batch,):
                raise KVDecodeError(f"rows.shape must be ({batch},) (one per row), got {tuple(t.shape)}")
            return t.clone()
        check_index_tensor(t)
        values = t.tolist()
    else:
        try:
            values = list(rows)
        except TypeError:
            raise KVDecodeError(
                f"rows must be None, a bool mask [B], an integer index tensor or a sequence of ints, "
                f"got {type(rows).__name__}"
            ) from None
    for r in values:
        index = _index(r)
        if index is None or not 0 <= index < batch:
            raise KVDecodeError(f"rows must hold row indices in 0..{batch - 1}, got {r!r}")
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[[operator.index(r) for r in values]] = True
    return mask


def _index(r: object) -> int | None:
    if isinstance(r, bool):
        return None
    try:
        return operator.index(r)
    except TypeError:
        return None


def check_index_tensor(t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise KVDecodeError(
            f"rows must be a bool mask [B] or a 1-D integer index tensor, got {t.dtype} "
            f"with shape {tuple(t.shape)}"
        )


def device_row_mask(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Bool mask ``[batch]`` on ``rows``' device of the valid indices in ``rows``; no host sync.

    Indices outside ``0..batch - 1`` (negative ones included) are sent to a spare slot past the end
    and dropped, so they select nothing: no device-side assert, no wrap-around to another row.
    """
    valid = (rows >= 0) & (rows < batch)
    slot = torch.where(valid, rows.long(), batch)
    hit = torch.zeros(batch + 1, dtype=torch.bool, device=rows.device)
    hit.index_fill_(0, slot, True)
    return hit[:batch]
