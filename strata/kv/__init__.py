"""KV-cache reuse: prefix chunks, paged gather/scatter, and the vLLM connector (strata.kv.vllm)."""

from strata.kv.chunks import Chunk, ChunkHasher, kv_scope
from strata.kv.paged import PagedKV

__all__ = ["Chunk", "ChunkHasher", "PagedKV", "kv_scope"]
