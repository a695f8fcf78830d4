"""Attention shapes of common models, for ``kvdecode tune --preset`` and ``kvdecode plan --preset``.

Each preset is one layer's attention: query heads, KV heads and head dim, from the model's published
config (``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` or ``hidden_size / heads``).
Presets of the same shape (llama3-8b, mistral-7b, mixtral-8x7b) tune the same family once.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import KVDecodeError

__all__ = ["PRESETS", "Preset", "get_preset", "parse_presets"]


@dataclass(frozen=True)
class Preset:
    """One model's attention layer shape."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads(self) -> str:
        return f"{self.num_q_heads}:{self.num_kv_heads}"


_SHAPES = {
    "llama3-8b": (32, 8, 128),
    "llama3-70b": (64, 8, 128),
    "llama3.2-1b": (32, 8, 64),
    "llama2-7b": (32, 32, 128),
    "llama2-13b": (40, 40, 128),
    "mistral-7b": (32, 8, 128),
    "mixtral-8x7b": (32, 8, 128),
    "qwen2-7b": (28, 4, 128),
    "gemma2-2b": (8, 4, 256),
    "gemma2-9b": (16, 8, 256),
}
PRESETS: dict[str, Preset] = {name: Preset(name, *shape) for name, shape in _SHAPES.items()}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; raises :class:`KVDecodeError` listing the known ones."""
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        raise KVDecodeError(
            f"--preset must be one of {', '.join(PRESETS)}, got {name!r}; "
            "or give the shape with --heads H_q:H_kv --head-dim D"
        ) from None


def parse_presets(text: str) -> list[Preset]:
    """``"llama3-8b,qwen2-7b"`` -> presets, in order, duplicates kept out."""
    names = [n for n in (part.strip() for part in text.split(",")) if n]
    if not names:
        raise KVDecodeError(f"--preset must name at least one preset, got {text!r}")
    out: list[Preset] = []
    for name in names:
        preset = get_preset(name)
        if preset not in out:
            out.append(preset)
    return out
