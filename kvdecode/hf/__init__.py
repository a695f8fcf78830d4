"""Hugging Face transformers integration: ``attn_implementation="kvdecode"``.

Three lines for your own model::

    import kvdecode.hf  # registers "kvdecode" (attention and mask functions)
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kvdecode")
    out = model.generate(**inputs, cache_implementation="static", max_new_tokens=256)

Decode steps (1..16 new tokens) against a static cache run ``torch.ops.kvdecode.decode_attention``
with the filled length and each row's first token (left padding) read on the device from the mask;
prefill, dynamic caches and model features kvdecode does not implement go to torch SDPA (or the
model's eager attention for softcapping and sinks), each reason warned once
(:class:`KVDecodeFallbackWarning`). See :mod:`kvdecode.hf.attention` and :mod:`kvdecode.hf.mask`.

Importing this module imports transformers (``pip install 'kvdecode[hf]'``); ``import kvdecode``
never does.
"""

from __future__ import annotations

from ..errors import KVDecodeError

try:
    import transformers
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "kvdecode.hf needs Hugging Face transformers 5.x; install it with pip install 'kvdecode[hf]'"
    ) from exc

from .attention import Fallback, fallback_reason, kvdecode_attention_forward, lengths_from_mask
from .cache import FP8StaticCache, FP8StaticLayer
from .mask import kvdecode_mask
from .warn import KVDecodeFallbackWarning, reset_warnings, warned

__all__ = [
    "DEFAULT_NAME",
    "FP8StaticCache",
    "FP8StaticLayer",
    "Fallback",
    "KVDecodeFallbackWarning",
    "fallback_reason",
    "kvdecode_attention_forward",
    "kvdecode_mask",
    "lengths_from_mask",
    "register",
    "reset_warnings",
    "warned",
]

DEFAULT_NAME = "kvdecode"
SUPPORTED_TRANSFORMERS = ("5.0", "6.0")  # tested: 5.17 (GPU machine), 5.24 (CI)

_BUILTIN = frozenset(
    {"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}
)


def _check_transformers_version() -> None:
    major = int(transformers.__version__.split(".")[0])
    if major != 5:
        raise ImportError(
            f"kvdecode.hf supports transformers >= {SUPPORTED_TRANSFORMERS[0]}, "
            f"< {SUPPORTED_TRANSFORMERS[1]}, found {transformers.__version__}; "
            "install a supported one with pip install 'kvdecode[hf]'"
        )


def register(name: str = DEFAULT_NAME) -> str:
    """Register kvdecode's attention and mask functions under ``name``; returns ``name``.

    Both are needed: without the mask function transformers would build no causal mask at all.

    Parameters
    ----------
    name : str
        The ``attn_implementation`` to pass to ``from_pretrained`` / ``from_config``; not one of
        transformers' own implementations.

    Raises
    ------
    KVDecodeError
        ``name`` is not a non-empty string, or names a built-in implementation.

    Examples
    --------
    >>> import kvdecode.hf
    >>> kvdecode.hf.register("kvdecode_llama")
    'kvdecode_llama'
    """
    if not isinstance(name, str) or not name.strip() or name.startswith("paged|"):
        raise KVDecodeError(
            f"name must be a non-empty attention-implementation name, got {name!r}; e.g. 'kvdecode'"
        )
    if name in _BUILTIN:
        raise KVDecodeError(
            f"name must not be one of transformers' own implementations ({', '.join(sorted(_BUILTIN))}), "
            f"got {name!r}; pick another, e.g. 'kvdecode'"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, kvdecode_attention_forward)
    AttentionMaskInterface.register(name, kvdecode_mask)
    return name


_check_transformers_version()
register()
