"""The mask function registered with ``transformers.masking_utils.AttentionMaskInterface``.

It returns what ``sdpa`` would (torch SDPA's bool mask ``[B, 1, q_len, kv_len]``, True = attend, or
``None`` where ``is_causal`` does), except on a **static-cache decode step**: a static cache layer
(transformers passes its filled length as a 0-d device tensor ``q_offset``; other caches pass an int),
``1 <= q_len <= 16``, the model's causal or sliding-window mask pattern. A layer that passes its
length as an int counts when it has free slots past the step (``q_offset + q_len < kv_len``: a sliding
layer's static buffer that has not wrapped, or the first forward into a static cache not allocated
yet); a dynamic cache never has. A sliding layer past its window counts when it hands over its last
``window - 1`` tokens and the step's (``kv_offset > 0``, ``kv_len = window - 1 + q_len``: static and
dynamic caches alike keep them in position order). There it always materializes the mask (padding,
window included) and appends **marker columns** (one; two for a sliding window's mask, so that only a
mask with the window in it runs a sliding layer)::

    mask  bool [B, 1, q_len, capacity + 1]      (capacity + 2 for a sliding window's mask)
    mask[..., :capacity]  the sdpa mask          mask[..., capacity:]  True (the marker)

The attention function takes the extra columns as the sign that the step may run kvdecode (a host-side
shape check, static under ``torch.compile``) and reads the lengths from the mask on the device: no host
sync. Anything that strips the columns (a model slicing the mask to the key length) just sends the step
to torch SDPA. Masks of other patterns (packed sequences, bidirectional blocks) are never marked, nor
are the steps of a sliding layer whose keys have another length (a dynamic cache still growing, the step
that fills a static buffer from part-way): each would need a plan per length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from .warn import warn_once

__all__ = [
    "MARKER_COLUMNS",
    "MAX_DECODE_Q_LEN",
    "WINDOW_MARKER_COLUMNS",
    "carries_window",
    "is_marked",
    "kvdecode_mask",
    "strip_marker",
]

MAX_DECODE_Q_LEN = 16  # decode steps (T_q 1, or up to 16 when speculating); longer calls are prefill
MARKER_COLUMNS = 1
WINDOW_MARKER_COLUMNS = 2  # a sliding-window mask: the attention function of a sliding layer needs this one


def _is_static_decode(
    q_length: int, q_offset: object, kv_offset: object, kv_length: int, local_size: int | None
) -> bool:
    if not (isinstance(kv_offset, int) and 1 <= q_length <= min(MAX_DECODE_Q_LEN, kv_length)):
        return False
    if isinstance(local_size, int) and kv_length == local_size - 1 + q_length:
        # A sliding (or chunked) layer at or past its window: transformers hands over its last
        # window - 1 tokens and the step's (for one query, the rolled buffer), in position order, the
        # step last; one length per q_len, so one plan.
        return True
    if kv_offset > 0:  # past the window with keys of another length (a buffer filled from part-way)
        return False
    if isinstance(q_offset, torch.Tensor):  # a static cache layer's filled length, on the device
        return True
    # Free slots past the step: a static layer whose length transformers passes as an int (a sliding
    # layer's buffer that has not wrapped yet, so slot j holds position j; the first forward into a
    # static cache not allocated yet). A dynamic cache always has exactly q_offset + q_length keys.
    return isinstance(q_offset, int) and q_offset + q_length < kv_length


def kvdecode_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """``sdpa_mask``'s contract, plus the marker column on static-cache decode steps.

    Parameters
    ----------
    batch_size, q_length, kv_length : int
        ``B``, the new tokens ``q_len`` and the keys ``kv_len`` (the capacity of a static cache).
    q_offset : int or 0-d Tensor
        Position of the first new token; a tensor for a static cache layer.
    kv_offset : int
        Position of the first key.
    mask_function : callable
        The model's mask pattern: ``causal_mask_function`` itself, or any with a ``local_size``, is marked.
    attention_mask : bool Tensor ``[B, seen + q_len]``, optional
        The 2-D padding mask (left padding: zeros first).
    local_size : int, optional
        A sliding window's size.
    allow_is_causal_skip : bool
        Passed to ``sdpa_mask`` where the step is not marked.
    **kwargs
        Passed to ``sdpa_mask`` (``device``, ``use_vmap``, ...).

    Returns
    -------
    Tensor or None
        bool ``[B, 1, q_len, kv_len + 1]`` (``+ 2`` with a window) with the marker on a static-cache
        decode step, else exactly what ``sdpa_mask`` returns.
    """
    common = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )
    if not _is_static_decode(q_length, q_offset, kv_offset, kv_length, local_size):
        return sdpa_mask(allow_is_causal_skip=allow_is_causal_skip, **common)
    if mask_function is not causal_mask_function and local_size is None:
        # A sliding window (local_size) is marked: its keys sit in position order (slot j is position
        # kv_offset + j) and the mask, read for the lengths and applied in the kernel, decides exactly.
        # Bidirectional (encoder, cross) attention is warned about by the attention function (a
        # cross-attention mask of one decode query looks like a decode step here).
        if mask_function is not bidirectional_mask_function:
            warn_once(
                "mask-pattern",
                "the model's attention mask is not plain causal (chunked attention, packed sequences or "
                "bidirectional blocks); kvdecode cannot express it, so those decode steps run torch SDPA "
                "with the model's mask",
            )
        return sdpa_mask(allow_is_causal_skip=allow_is_causal_skip, **common)
    mask = sdpa_mask(allow_is_causal_skip=False, **common)
    columns = MARKER_COLUMNS if local_size is None else WINDOW_MARKER_COLUMNS
    marker = torch.ones((*mask.shape[:-1], columns), dtype=torch.bool, device=mask.device)
    return torch.cat([mask.to(torch.bool), marker], dim=-1)


def is_marked(attention_mask: object, key: torch.Tensor) -> bool:
    """True when ``attention_mask`` is kvdecode's marked static-cache decode mask for ``key`` (with or
    without a sliding window in it)."""
    return (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[-1] - key.shape[-2] in (MARKER_COLUMNS, WINDOW_MARKER_COLUMNS)
    )


def carries_window(attention_mask: object, key: torch.Tensor) -> bool:
    """True when ``attention_mask`` is marked and was made for a sliding window (the window is in the
    mask): the only marked mask a sliding layer may run on. A plain causal mask reaching a layer that
    slides would lose the window."""
    return (
        is_marked(attention_mask, key) and attention_mask.shape[-1] - key.shape[-2] == WINDOW_MARKER_COLUMNS
    )


def strip_marker(attention_mask: object, key: torch.Tensor) -> object:
    """The sdpa mask without the marker columns (other masks unchanged)."""
    if is_marked(attention_mask, key):
        return attention_mask[..., : key.shape[-2]]
    return attention_mask
