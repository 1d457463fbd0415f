"""Inference: the KV cache and greedy generation through it."""

from longctx.infer.kv_cache import CacheView, KVCache

__all__ = ["CacheView", "KVCache"]
