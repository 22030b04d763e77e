"""Stage engines: synchronous, single-threaded compute that the servers drive."""

from .decode import DecodeEngine
from .prefill import PrefillEngine
from .prefix_cache import PrefixKVCache

__all__ = ["DecodeEngine", "PrefillEngine", "PrefixKVCache"]
