"""Stage engines: synchronous, single-threaded compute that the servers drive,
over a paged KV pool with our own packed decoder forward."""

from .attention import BACKENDS as ATTENTION_BACKENDS
from .decode import DecodeEngine, SequenceTooLong
from .prefill import PrefillEngine, PrefillResult, PromptTooLong
from .runtime import EngineRuntime, KVCacheConfig, build_runtime

__all__ = ["ATTENTION_BACKENDS", "DecodeEngine", "EngineRuntime", "KVCacheConfig", "PrefillEngine", "PrefillResult", "PromptTooLong",
           "SequenceTooLong", "build_runtime"]
