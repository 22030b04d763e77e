"""Stage engines: synchronous, single-threaded compute that the servers drive."""

from .decode import DecodeEngine
from .prefill import PrefillEngine, plan_prefill_batches

__all__ = ["DecodeEngine", "PrefillEngine", "plan_prefill_batches"]
