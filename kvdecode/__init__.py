"""kvdecode: decode attention against fixed-capacity KV caches at the memory roofline."""

from . import _interpret  # noqa: F401  (first: sets TRITON_INTERPRET=1 where there is no CUDA)
from .api import decode_attention
from .errors import KVDecodeError, UnsupportedError
from .plan import DecodePlan, plan
from .planner import Choice, explain
from .problem import DecodeProblem
from .reference import reference_decode_attention
from .sdpa import sdpa
from .static_cache import StaticKVCache
from .warm import warmup

__all__ = [
    "Choice",
    "DecodePlan",
    "DecodeProblem",
    "KVDecodeError",
    "StaticKVCache",
    "UnsupportedError",
    "decode_attention",
    "explain",
    "plan",
    "reference_decode_attention",
    "sdpa",
    "warmup",
]

__version__ = "0.1.0"
