"""``FP8StaticCache``: a transformers ``StaticCache`` whose full-attention layers store K/V in fp8.

    from kvdecode.hf import FP8StaticCache
    cache = FP8StaticCache(model.config, max_cache_len=4096)           # e4m3, scales 1.0
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)   # attn "kvdecode"

Each layer keeps ``[B, H_kv, max_cache_len, D]`` keys and values in ``float8_e4m3fn`` (or
``float8_e5m2``): half the bytes of bf16, so a decode step reads half as much. New K/V are quantized as
they are written, ``saturate(k / k_scale)``, with fixed scales (one value, or one per KV head) chosen at
construction, by one kernel per layer and step for K and V together (``torch.ops.kvdecode.append_kv``);
the attention (``attn_implementation="kvdecode"``) reads the fp8 cache directly and folds the scales
into the kernel. Prefill and the other fallbacks attend a dequantized copy through torch SDPA.

The scales of a layer's cache are found from the cache tensors themselves (:func:`fp8_scales`), in
Python, at trace time under ``torch.compile``. Eager steps, CUDA-graph capture and compiled steps (one
graph, ``fullgraph=True``) are tested. Sliding-window layers keep transformers' own rolling buffers in
the model's dtype (kvdecode attends them on decode steps).
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from .. import ops  # noqa: F401  (registers torch.ops.kvdecode.append_kv)
from ..errors import KVDecodeError
from ..problem import capturing
from ..quant import FP8_DTYPES, FP8_Q_DTYPES, cache_scales

__all__ = ["FP8StaticCache", "FP8StaticLayer", "fp8_scales"]

# id(key cache tensor) -> (a weak reference to it, (k_scale, v_scale)); an entry goes with its tensor
_SCALES: dict[int, tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]]] = {}
_SCALES_LOCK = threading.Lock()


def _register(key: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor]) -> None:
    ident = id(key)

    def forget(ref, ident=ident):
        with _SCALES_LOCK:
            if ident in _SCALES and _SCALES[ident][0] is ref:
                del _SCALES[ident]

    with _SCALES_LOCK:
        _SCALES[ident] = (weakref.ref(key, forget), scales)


def fp8_scales(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_scale, v_scale)`` of the fp8 key cache ``key`` made by an :class:`FP8StaticLayer`."""
    found = _SCALES.get(id(key))
    if found is None or found[0]() is not key:
        raise KVDecodeError(
            f"an fp8 key cache ({key.dtype}) reached attn_implementation='kvdecode' without its scales; "
            "fp8 caches for transformers come from kvdecode.hf.FP8StaticCache"
        )
    return found[1]


class FP8StaticLayer(StaticLayer):
    """A ``StaticLayer`` holding fp8 keys and values, quantized on ``update`` with fixed scales.

    Parameters
    ----------
    max_cache_len : int
        Capacity (tokens).
    dtype : torch.dtype
        ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
    k_scale, v_scale : float or Tensor
        One value or one per KV head (``[H_kv]``), positive and finite: the stored values are
        ``saturate(k / k_scale)``, the real ones ``k8 * k_scale``.
    """

    def __init__(self, max_cache_len: int, *, dtype: torch.dtype, k_scale=1.0, v_scale=1.0, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.fp8_dtype = dtype
        self._scales_given = (k_scale, v_scale)
        # Tokens written by eager updates, counted on the host so that an update past the capacity is
        # refused without reading the device length (a sync). Not counted while compiling or capturing a
        # CUDA graph (a replay never runs Python): there the kernel drops such tokens instead, and the
        # count is marked stale, so the next eager update (or crop) reads the device length once.
        self._host_length = 0
        self._host_length_stale = False

    def reset(self) -> None:
        super().reset()
        self._host_length = 0
        self._host_length_stale = False

    def _synced_host_length(self) -> int:
        """The host count, read from the device (one sync) after compiled or captured steps; never
        while compiling or capturing (then the count stays stale for the next eager call)."""
        if self._host_length_stale and not torch.compiler.is_compiling() and not capturing(self.keys.device):
            self._host_length = int(self.cumulative_length.reshape(-1)[0].item())
            self._host_length_stale = False
        return self._host_length

    def crop(self, tokens_to_remove: int) -> None:
        self._synced_host_length()
        super().crop(tokens_to_remove)
        self._host_length = max(0, self._host_length - abs(tokens_to_remove))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype not in FP8_Q_DTYPES:
            raise KVDecodeError(
                f"FP8StaticCache needs float16 or bfloat16 key states (the model's dtype), got "
                f"{key_states.dtype}; load the model in torch.bfloat16"
            )
        if key_states.dim() != 4 or value_states.shape[-1] != key_states.shape[-1]:
            raise KVDecodeError(
                "FP8StaticCache needs [B, H_kv, n, D] key and value states of one head dim, got key "
                f"{tuple(key_states.shape)} and value {tuple(value_states.shape)}; models whose values "
                "have another head dim (MLA) need transformers' StaticCache"
            )
        super().lazy_initialization(  # allocates in the dtype of what it is given: fp8
            key_states[:, :, :0].to(self.fp8_dtype), value_states[:, :, :0].to(self.fp8_dtype)
        )
        self.k_scale, self.v_scale = cache_scales(
            self.fp8_dtype, *self._scales_given, key_states.shape[1], key_states.device
        )
        if not torch.compiler.is_compiling():  # as transformers marks the caches: the scales are inputs of
            # every compiled step, which CUDA-graph trees would otherwise copy into place at each replay
            torch._dynamo.mark_static_address(self.k_scale)
            torch._dynamo.mark_static_address(self.v_scale)
        _register(self.keys, (self.k_scale, self.v_scale))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantize and write ``[B, H_kv, n, D]`` new K/V at the layer's length; returns the fp8 caches.

        One kernel writes K and V (``torch.ops.kvdecode.append_kv``: divide by the scale, saturate,
        store fp8) at positions ``length .. length + n - 1``, after the length (a device tensor) has
        moved on; no host sync, so steps capture in CUDA graphs and compile to one op. An eager update
        past ``max_cache_len`` raises :class:`~kvdecode.KVDecodeError` (the layer counts its tokens on
        the host); in a compiled or captured step the kernel drops the tokens past it instead."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        want = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            got = (t.shape[0], t.shape[1], t.shape[3]) if t.dim() == 4 else None
            if got != want or t.dtype not in FP8_Q_DTYPES or t.device != self.keys.device:
                raise KVDecodeError(
                    f"{name} must be [B, H_kv, n, D] = [{want[0]}, {want[1]}, n, {want[2]}] float16 or "
                    f"bfloat16 on {self.keys.device}, like the first states this layer stored; got "
                    f"{tuple(t.shape)} {t.dtype} on {t.device}"
                )
        if value_states.shape != key_states.shape:  # the append kernel reads both with the keys' n
            raise KVDecodeError(
                f"value_states must have key_states' shape {tuple(key_states.shape)} (one n for both), got "
                f"{tuple(value_states.shape)}"
            )
        n = key_states.shape[-2]
        if torch.compiler.is_compiling() or capturing(key_states.device):
            self._host_length_stale = True  # (compiled: a side effect dynamo replays after every call)
        else:
            length = self._synced_host_length()
            if length + n > self.max_cache_len:
                raise KVDecodeError(
                    f"FP8StaticCache holds max_cache_len={self.max_cache_len} tokens per layer; {n} more at "
                    f"length {length} would pass it; make the cache larger or the generation shorter"
                )
            self._host_length = length + n
        self.cumulative_length.add_(n)
        torch.ops.kvdecode.append_kv(
            self.keys,
            self.values,
            key_states,
            value_states,
            self.cumulative_length,
            self.k_scale,
            self.v_scale,
        )
        return self.keys, self.values


class FP8StaticCache(StaticCache):
    """A transformers ``StaticCache`` whose full-attention layers store K/V in fp8 (see module doc).

    Parameters
    ----------
    config : PreTrainedConfig
        The model's config.
    max_cache_len : int
        Capacity (tokens) of every layer.
    dtype : torch.dtype
        ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
    k_scale, v_scale : float or Tensor
        Dequantization scales, one value or one per KV head, for every layer (default 1.0: values are
        stored as they are, saturated at the fp8 range).
    **kwargs
        Passed on to ``StaticCache``.

    Examples
    --------
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
    ...                   num_hidden_layers=2, intermediate_size=128, vocab_size=96)
    >>> cache = FP8StaticCache(cfg, max_cache_len=32)
    >>> [type(layer).__name__ for layer in cache.layers]
    ['FP8StaticLayer', 'FP8StaticLayer']
    """

    def __init__(
        self, config, max_cache_len: int, *, dtype: torch.dtype = torch.float8_e4m3fn, k_scale=1.0,
        v_scale=1.0, **kwargs,
    ) -> None:  # fmt: skip
        if dtype not in FP8_DTYPES:
            raise KVDecodeError(f"dtype must be one of {list(FP8_DTYPES)}, got {dtype}")
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.layers = [
            FP8StaticLayer(max_cache_len, dtype=dtype, k_scale=k_scale, v_scale=v_scale)
            if type(layer) is StaticLayer
            else layer
            for layer in self.layers
        ]
