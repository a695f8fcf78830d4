"""The mask function registered with ``transformers.masking_utils.AttentionMaskInterface``.

It returns what ``sdpa`` would (torch SDPA's bool mask ``[B, 1, q_len, kv_len]``, True = attend, or
``None`` where ``is_causal`` does), except on a **static-cache decode step**: a static cache layer
(transformers passes its filled length as a 0-d device tensor ``q_offset``; other caches pass an int),
``1 <= q_len <= 16``, the model's plain causal mask pattern (the first forward into a static cache not
allocated yet, which passes ``q_offset`` 0 as an int but more slots than tokens, counts too). There it
always materializes the mask (padding included) and appends one **marker column**::

    mask  bool [B, 1, q_len, capacity + 1]
    mask[..., :capacity]  the sdpa mask          mask[..., capacity]  True (the marker)

The attention function takes the extra column as the sign that the step may run kvdecode (a host-side
shape check, static under ``torch.compile``) and reads the lengths from the mask on the device: no host
sync. Anything that strips the column (a model slicing the mask to the key length) just sends the step
to torch SDPA. Masks of other patterns (sliding window, chunked, packed sequences, bidirectional blocks)
are never marked: kvdecode's bottom-right causal range cannot express them, so SDPA serves them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

from .warn import warn_once

__all__ = ["MARKER_COLUMNS", "MAX_DECODE_Q_LEN", "is_marked", "kvdecode_mask", "strip_marker"]

MAX_DECODE_Q_LEN = 16  # decode steps (T_q 1, or up to 16 when speculating); longer calls are prefill
MARKER_COLUMNS = 1


def _is_static_decode(q_length: int, q_offset: object, kv_offset: object, kv_length: int) -> bool:
    if not (
        isinstance(kv_offset, int) and kv_offset == 0 and 1 <= q_length <= min(MAX_DECODE_Q_LEN, kv_length)
    ):
        return False
    if isinstance(q_offset, torch.Tensor):  # a static cache layer's filled length, on the device
        return True
    # The first forward into a static cache that is not allocated yet: offset 0 as an int, but more
    # slots than tokens (a dynamic cache always has exactly q_offset + q_length).
    return isinstance(q_offset, int) and q_offset == 0 and kv_length > q_length


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
        The model's mask pattern; only ``causal_mask_function`` itself is marked.
    attention_mask : bool Tensor ``[B, seen + q_len]``, optional
        The 2-D padding mask (left padding: zeros first).
    local_size : int, optional
        A sliding window's size (never marked).
    allow_is_causal_skip : bool
        Passed to ``sdpa_mask`` where the step is not marked.
    **kwargs
        Passed to ``sdpa_mask`` (``device``, ``use_vmap``, ...).

    Returns
    -------
    Tensor or None
        bool ``[B, 1, q_len, kv_len + 1]`` with the marker on a static-cache decode step, else exactly
        what ``sdpa_mask`` returns.
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
    if not _is_static_decode(q_length, q_offset, kv_offset, kv_length):
        return sdpa_mask(allow_is_causal_skip=allow_is_causal_skip, **common)
    if mask_function is not causal_mask_function or local_size is not None:
        # sliding-window layers and bidirectional (encoder, cross) attention are warned about by the
        # attention function (a cross-attention mask of one decode query looks like a decode step here)
        if local_size is None and mask_function is not bidirectional_mask_function:
            warn_once(
                "mask-pattern",
                "the model's attention mask is not plain causal (chunked attention, packed sequences or "
                "bidirectional blocks); kvdecode cannot express it, so those decode steps run torch SDPA "
                "with the model's mask",
            )
        return sdpa_mask(allow_is_causal_skip=allow_is_causal_skip, **common)
    mask = sdpa_mask(allow_is_causal_skip=False, **common)
    marker = torch.ones((*mask.shape[:-1], MARKER_COLUMNS), dtype=torch.bool, device=mask.device)
    return torch.cat([mask.to(torch.bool), marker], dim=-1)


def is_marked(attention_mask: object, key: torch.Tensor) -> bool:
    """True when ``attention_mask`` is kvdecode's marked static-cache decode mask for ``key``."""
    return (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_mask.dim() == 4
        and attention_mask.shape[-1] == key.shape[-2] + MARKER_COLUMNS
    )


def strip_marker(attention_mask: object, key: torch.Tensor) -> object:
    """The sdpa mask without the marker column (other masks unchanged)."""
    if is_marked(attention_mask, key):
        return attention_mask[..., : key.shape[-2]]
    return attention_mask
