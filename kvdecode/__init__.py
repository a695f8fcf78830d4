"""kvdecode: decode attention against fixed-capacity KV caches at the memory roofline."""

from .api import decode_attention
from .errors import KVDecodeError, UnsupportedError
from .plan import DecodePlan, plan
from .problem import DecodeProblem
from .reference import reference_decode_attention

__all__ = [
    "DecodePlan",
    "DecodeProblem",
    "KVDecodeError",
    "UnsupportedError",
    "decode_attention",
    "plan",
    "reference_decode_attention",
]

__version__ = "0.1.0"
