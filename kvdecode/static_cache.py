"""``StaticKVCache``: fixed-capacity K/V buffers for N layers with device-side lengths.

Shape legend (logical BHSD, as every kvdecode call sees it)::

    keys(layer), values(layer)  [B, H_kv, capacity, D]
    seq_lens                    int32 [B]   filled length of each row (the current step's tokens included)
    kv_start                    int32 [B]   first real token of each row (left padding); only when left_padded
    q                           [B, H_q, T_q, D]
    k_new, v_new                [B, H_kv, T_q, D]

One decode step, in this order (every call is capture-safe; capture the whole step in one CUDA graph)::

    cache.advance(T_q)                    # once per step: seq_lens += T_q
    for layer in range(num_layers):
        cache.append(layer, k_new, v_new) # writes token t at seq_lens[b] - T_q + t
        out = cache.attend(layer, q)      # query t at position seq_lens[b] - T_q + t, bottom-right causal

Run the step once eagerly before capturing it (Triton compiles its kernels and :meth:`attend` makes its
plan on the first call); replays then read and grow ``seq_lens`` on the device.

Advancing first makes ``seq_lens`` mean what :func:`kvdecode.decode_attention` wants (the filled length
with the new tokens) for the whole step, so ``attend`` needs no extra per-layer length arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ._cache_checks import (
    check_constructor,
    check_in_range,
    check_index_tensor,
    device_row_mask,
    host_ints,
    host_row_mask,
    is_host,
    resolve_device,
)
from .api import check_lengths, problem_for_tensors
from .errors import KVDecodeError
from .plan import DecodePlan, plan
from .planner import check_backend_name
from .problem import SUPPORTED_DTYPES, capturing, check_softcap, check_window
from .quant import cache_scales

__all__ = ["StaticKVCache"]

_PLANS_PER_CACHE = 16


class StaticKVCache:
    r"""Fixed-capacity K/V buffers for ``num_layers`` layers; lengths live on the device.

    Parameters
    ----------
    num_layers, batch, num_kv_heads, capacity, head_dim : int
        Buffer sizes; each layer holds K and V of ``[B, H_kv, capacity, D]`` (logical).
    dtype : torch.dtype
        float16, bfloat16 or float32; or float8_e4m3fn / float8_e5m2 (half the bytes): :meth:`append`
        then takes fp16/bf16/fp32 K/V and stores ``saturate(new / scale)`` in place, and :meth:`attend`
        (fp16/bf16 q) dequantizes in the kernel.
    device : torch.device or str, optional
        Defaults to ``"cuda"`` when available, else ``"cpu"`` (Triton then runs through its interpreter).
    layout : {"bhsd", "bshd"}
        Storage order of each layer: ``[B, H_kv, capacity, D]`` or ``[B, capacity, H_kv, D]``. Both are
        exposed as logical BHSD views (``bshd`` through ``transpose(1, 2)``).
    left_padded : bool
        Keep a device ``kv_start`` (int32 ``[B]``, zeros): keys before ``kv_start[b]`` are masked.
    scale : float, optional
        Score scale of :meth:`attend`; ``1 / sqrt(D)`` by default.
    window : int, optional
        Sliding window of :meth:`attend` (every query sees its last ``window`` keys, itself included);
        see :func:`kvdecode.decode_attention`.
    softcap : float, optional
        Logit softcap of :meth:`attend` (``softcap * tanh(s / softcap)`` on the scaled scores).
    backend : {"auto", "triton", "cudnn", "reference"}
        Backend of the plans :meth:`attend` makes (one per query shape, made on first use).
    deterministic : bool
        Passed to :func:`kvdecode.plan`.
    validate : bool
        Eager mode only: sync and check lengths in :meth:`advance`, :meth:`append` and :meth:`attend`,
        raising :class:`~kvdecode.KVDecodeError` naming the first bad row. Skipped while a CUDA graph is
        being captured (nothing can be read back then).
    k_scale, v_scale : float or float32 Tensor ``[H_kv]``, optional
        fp8 caches only: fixed dequantization scales (one value, or one per KV head; 1.0 by default).
        Pick them so that ``max |K| / k_scale`` stays within the fp8 range (448 for e4m3, 57344 for
        e5m2); larger values saturate.

    Notes
    -----
    **Overflow.** With validation on, an :meth:`advance` that would take a row past ``capacity`` raises
    before changing anything. Without it (and always under capture) ``seq_lens`` keeps counting past
    ``capacity``, tokens whose position is ``>= capacity`` are dropped by :meth:`append` (never written
    out of bounds, never written over the last slot), and attention reads at most ``capacity`` keys.
    :meth:`overflowed` gives a device bool ``[B]`` to check later.

    **Rows and lengths.** What comes from the host (ints, sequences, CPU tensors) is checked on the host:
    out of range, negative, non-integral or of the wrong type raises :class:`~kvdecode.KVDecodeError`
    before anything changes. What is already on the GPU is never read back (no sync, capture-safe): device
    lengths and counts are clamped to ``0..capacity`` and device row indices outside ``0..B - 1`` are
    ignored (see :mod:`kvdecode._cache_checks`).

    Examples
    --------
    >>> import torch, kvdecode
    >>> cache = kvdecode.StaticKVCache(2, batch=1, num_kv_heads=2, capacity=64, head_dim=16,
    ...                                dtype=torch.float32, device="cpu")
    >>> q = torch.randn(1, 4, 1, 16); k = torch.randn(1, 2, 1, 16); v = torch.randn(1, 2, 1, 16)
    >>> cache.advance(1)
    >>> cache.append(0, k, v)
    >>> cache.attend(0, q).shape
    torch.Size([1, 4, 1, 16])
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        layout: Literal["bhsd", "bshd"] = "bhsd",
        left_padded: bool = False,
        scale: float | None = None,
        backend: str = "auto",
        deterministic: bool = False,
        validate: bool = False,
        k_scale: float | torch.Tensor | None = None,
        v_scale: float | torch.Tensor | None = None,
        window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        sizes = {"num_layers": num_layers, "batch": batch, "num_kv_heads": num_kv_heads}
        sizes.update(capacity=capacity, head_dim=head_dim)
        flags = {"left_padded": left_padded, "deterministic": deterministic, "validate": validate}
        check_constructor(sizes, dtype, layout, scale, flags)
        self.backend = check_backend_name(backend)
        self.device = resolve_device(device)
        self.num_layers, self.batch, self.num_kv_heads = num_layers, batch, num_kv_heads
        self.capacity, self.head_dim, self.dtype, self.layout = capacity, head_dim, dtype, layout
        self.scale, self.deterministic, self.validate = scale, deterministic, validate
        check_window(window)
        self.window, self.softcap = window, check_softcap(softcap)
        per_layer = (batch, num_kv_heads, capacity) if layout == "bhsd" else (batch, capacity, num_kv_heads)
        shape = (num_layers, *per_layer, head_dim)
        # One storage per K and per V for all layers: a layer's view is buf[i] (transposed for bshd).
        self.k_buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        view = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
        self._keys = [view(self.k_buffer[i]) for i in range(num_layers)]
        self._values = [view(self.v_buffer[i]) for i in range(num_layers)]
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=self.device) if left_padded else None
        # fp8 caches: fixed scales (float32 on the device), used by append (quantize) and attend (dequantize)
        self.k_scale, self.v_scale = cache_scales(dtype, k_scale, v_scale, num_kv_heads, self.device)
        from ._append import append_kv  # imports Triton: deferred so `import kvdecode` stays light

        self._append_kv = append_kv

    # ---- views -------------------------------------------------------------------------------------

    def keys(self, layer: int) -> torch.Tensor:
        """Logical BHSD view ``[B, H_kv, capacity, D]`` of layer ``layer``'s K buffer."""
        return self._keys[self._check_layer(layer)]

    def values(self, layer: int) -> torch.Tensor:
        """Logical BHSD view ``[B, H_kv, capacity, D]`` of layer ``layer``'s V buffer."""
        return self._values[self._check_layer(layer)]

    def overflowed(self) -> torch.Tensor:
        """Device bool ``[B]``: rows whose length went past ``capacity`` (their extra tokens were dropped)."""
        return self.seq_lens > self.capacity

    # ---- lengths -----------------------------------------------------------------------------------

    def advance(self, n: int | torch.Tensor = 1) -> None:
        """``seq_lens += n`` on the device; ``n`` is an int or an int32 tensor ``[B]`` (per-row counts).

        Counts are in ``0..capacity``: an int or a CPU tensor outside raises (nothing changes); a device
        tensor is clamped to that range on the device (read back it would sync the host). To move rows
        back, use :meth:`set_lengths` or :meth:`reset`. With ``validate`` (eager) a row that would leave
        ``0..capacity`` raises and nothing changes.
        """
        if isinstance(n, torch.Tensor):
            self._check_row_tensor("n", n)
            if is_host(n):
                check_in_range("n", n, self.capacity)
            else:
                n = n.clamp(0, self.capacity)
        elif not isinstance(n, int) or isinstance(n, bool):
            raise KVDecodeError(f"n must be an int or an int32 tensor [B], got {type(n).__name__}")
        elif not 0 <= n <= self.capacity:
            raise KVDecodeError(
                f"n must be in 0..capacity ({self.capacity}), got {n}; advance by the tokens of one step "
                "(set_lengths or reset move rows back)"
            )
        if self._validating():
            new = (self.seq_lens.long() + (n.long() if isinstance(n, torch.Tensor) else n)).tolist()
            for b, length in enumerate(new):
                if not 0 <= length <= self.capacity:
                    raise KVDecodeError(
                        f"seq_lens[{b}] after advance must be in 0..capacity ({self.capacity}), "
                        f"got {length}; row {b} is full: reset it (cache.reset([{b}])) or make a larger cache"
                    )
        self.seq_lens.add_(n)

    def set_lengths(self, seq_lens: torch.Tensor | Sequence[int], kv_start=None) -> None:
        """Copy lengths (and ``kv_start`` for a left-padded cache) into the device buffers, in place.

        Each is a sequence of ints or an integer tensor ``[B]``. From the host (a sequence or a CPU
        tensor) every value must be an integer in ``0..capacity``, else :class:`~kvdecode.KVDecodeError`
        and nothing changes (``1.7`` is refused, never truncated). A tensor on a CUDA device is not read
        back: its values are clamped to ``0..capacity`` on the device.
        """
        lens = self._lengths_in("seq_lens", seq_lens)
        if kv_start is not None:
            if self.kv_start is None:
                raise KVDecodeError("kv_start must be None for a cache made with left_padded=False")
            starts = self._lengths_in("kv_start", kv_start)
        else:
            starts = self.kv_start
        if self._validating():  # before anything is copied: a rejected call changes nothing
            check_lengths(lens, starts, q_len=0, capacity=self.capacity)
        if kv_start is not None:
            self.kv_start.copy_(starts, non_blocking=True)
        self.seq_lens.copy_(lens, non_blocking=True)

    def reset(self, rows: torch.Tensor | Sequence[int] | None = None) -> None:
        """Zero ``seq_lens`` (and ``kv_start``) of ``rows``, on the device; ``None`` resets every row.

        ``rows`` is a bool tensor ``[B]`` (True = reset), a 1-D int32/int64 index tensor, or a sequence
        of ints. From the host (a sequence or a CPU tensor) every index must be in ``0..B - 1``, else
        :class:`~kvdecode.KVDecodeError` and nothing changes (negative indices are refused, not wrapped).
        An index tensor on the cache's CUDA device is not read back (no host sync, capture-safe): its
        indices outside ``0..B - 1`` select no row and are ignored (with ``validate``, eager, they raise).
        Under capture pass a device tensor (a host one is copied to the device at call time).
        """
        targets = [self.seq_lens] + ([self.kv_start] if self.kv_start is not None else [])
        if rows is None:
            for t in targets:
                t.zero_()
            return
        mask = self._rows_mask(rows)
        for t in targets:
            t.masked_fill_(mask, 0)

    # ---- the step ----------------------------------------------------------------------------------

    def append(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write ``k_new``/``v_new`` ``[B, H_kv, T_q, D]`` at positions ``seq_lens[b] - T_q + t``.

        Call :meth:`advance` first. One kernel launch for K and V, no host sync, no allocation.
        """
        k, v = self.keys(layer), self.values(layer)
        expected = (self.batch, self.num_kv_heads, None, self.head_dim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            self._check_new(name, t, expected)
        if k_new.shape != v_new.shape:
            raise KVDecodeError(
                f"v_new.shape must equal k_new.shape {tuple(k_new.shape)}, got {tuple(v_new.shape)}"
            )
        q_len = k_new.shape[2]
        if q_len > self.capacity:
            raise KVDecodeError(f"k_new.shape[2] (T_q) must be <= capacity ({self.capacity}), got {q_len}")
        if self._validating():
            check_lengths(self.seq_lens, None, q_len=q_len, capacity=self.capacity)
        scales = None if self.k_scale is None else (self.k_scale, self.v_scale)
        self._append_kv(k, v, k_new, v_new, self.seq_lens, scales)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of ``q`` ``[B, H_q, T_q, D]`` over layer ``layer`` with the device lengths.

        Runs a :class:`~kvdecode.DecodePlan` made on the first call for this query shape (and mask and
        ``out`` kind); later calls only check and launch. Arguments as in :func:`kvdecode.decode_attention`;
        ``sinks`` (``[H_q]``, float32, bfloat16 or float16) are the layer's attention sinks, passed per
        call since layers differ.
        """
        k, v = self.keys(layer), self.values(layer)
        the_plan = self.plan_for(q, mask=mask, sinks=sinks)
        if self._validating():
            check_lengths(self.seq_lens, self.kv_start, q_len=q.shape[2], capacity=self.capacity)
        # the problem was made from q, the mask, the sinks and this cache's own tensors (every layer's
        # views alike): only the output is left to check
        scales = None if self.k_scale is None else (self.k_scale, self.v_scale)
        return the_plan._launch_checking_outputs(
            q, k, v, self.seq_lens, self.kv_start, mask, out, None, return_lse, scales, sinks
        )

    def plan_for(
        self,
        q: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
    ) -> DecodePlan:
        """The plan :meth:`attend` runs for this query (and mask); from the shared plan cache.

        Every layer shares it (their views have the same strides). Made with ``max_seq_len=capacity``.
        ``out`` is not part of the plan (accepted as :meth:`attend` takes it; checked when it launches).
        """
        if not isinstance(q, torch.Tensor):
            raise KVDecodeError(f"q must be a torch.Tensor, got {type(q).__name__}; pass [B, H_q, T_q, D]")
        problem = problem_for_tensors(
            q, self._keys[0], self._values[0], self.seq_lens, self.scale, self.kv_start, mask,
            self.k_scale, self.v_scale, self.window, self.softcap, sinks,
        )  # fmt: skip
        backend, deterministic = self.backend, self.deterministic
        return plan(problem, backend=backend, deterministic=deterministic, max_seq_len=self.capacity)

    # ---- helpers -----------------------------------------------------------------------------------

    def _validating(self) -> bool:
        return self.validate and not capturing(self.device)  # nothing can be read back under capture

    def _check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise KVDecodeError(f"layer must be an int in 0..{self.num_layers - 1}, got {layer!r}")
        return layer

    def _lengths_in(self, name: str, values: object) -> torch.Tensor:
        """int32 ``[B]`` lengths to copy in: host values checked, device values clamped (no sync)."""
        if is_host(values):
            return host_ints(name, values, self.batch, self.capacity)
        if tuple(values.shape) != (self.batch,):
            raise KVDecodeError(
                f"{name}.shape must be ({self.batch},) (one per row), got {tuple(values.shape)}"
            )
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise KVDecodeError(
                f"{name} must hold ints (an integer tensor), got {values.dtype}; pass token counts"
            )
        return values.clamp(0, self.capacity).to(torch.int32)

    def _rows_mask(self, rows: object) -> torch.Tensor:
        """Bool ``[B]`` on the cache's device: the rows :meth:`reset` zeroes."""
        if is_host(rows):
            return host_row_mask(rows, self.batch).to(self.device, non_blocking=True)
        if rows.device != self.device:
            raise KVDecodeError(
                f"rows must be on the cache's device ({self.device}) or the CPU, got {rows.device}"
            )
        if rows.dtype == torch.bool:
            self._check_row_tensor("rows", rows)
            return rows
        check_index_tensor(rows)
        if self._validating():
            bad = [r for r in rows.tolist() if not 0 <= r < self.batch]
            if bad:
                raise KVDecodeError(f"rows must hold row indices in 0..{self.batch - 1}, got {bad[0]}")
        return device_row_mask(rows, self.batch)

    def _check_row_tensor(self, name: str, t: torch.Tensor, *, check_device: bool = True) -> None:
        if tuple(t.shape) != (self.batch,):
            raise KVDecodeError(f"{name}.shape must be ({self.batch},) (one per row), got {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.bool) or (name == "rows") != (t.dtype == torch.bool):
            raise KVDecodeError(
                f"{name}.dtype must be {'bool' if name == 'rows' else 'int32'}, got {t.dtype}"
            )
        if check_device and t.device != self.device:
            raise KVDecodeError(f"{name} must be on the cache's device ({self.device}), got {t.device}")

    def _check_new(self, name: str, t: torch.Tensor, expected: tuple) -> None:
        if not isinstance(t, torch.Tensor):
            raise KVDecodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or any(e is not None and s != e for s, e in zip(t.shape, expected)) or t.shape[2] < 1:
            want = f"[{self.batch}, {self.num_kv_heads}, T_q >= 1, {self.head_dim}]"
            raise KVDecodeError(f"{name}.shape must be {want}, got {tuple(t.shape)}; pass [B, H_kv, T_q, D]")
        if self.k_scale is None and t.dtype != self.dtype:
            raise KVDecodeError(f"{name}.dtype must be the cache's dtype ({self.dtype}), got {t.dtype}")
        if self.k_scale is not None and t.dtype not in SUPPORTED_DTYPES:
            raise KVDecodeError(
                f"{name}.dtype must be float16, bfloat16 or float32 for an fp8 cache (append quantizes), "
                f"got {t.dtype}"
            )
        if t.device != self.device:
            raise KVDecodeError(f"{name} must be on the cache's device ({self.device}), got {t.device}")
