"""Multimodal token cache: content-derived keys, in-worker LRU by bytes, and
the Redis metadata that lets any prefill worker find who holds an embedding."""

from .keys import block_hashes, image_key, item_key
from .lru import ByteLRU
from .metadata import CacheRecord, MetadataStore

__all__ = ["ByteLRU", "CacheRecord", "MetadataStore", "block_hashes", "image_key", "item_key"]
