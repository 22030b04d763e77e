"""Stage engines: synchronous, single-threaded compute that the servers drive."""

from .decode import DecodeEngine
from .prefill import PrefillEngine

__all__ = ["DecodeEngine", "PrefillEngine"]
