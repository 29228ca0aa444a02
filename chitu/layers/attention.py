"""Attention over the paged KV cache: stores this step's K/V, then attends."""
from __future__ import annotations

import torch
from torch import nn

from chitu.layers.kv_cache_spec import FullAttentionSpec, KVCacheSpec
from chitu.ops import attention as attention_ops
from chitu.ops.attention_metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Caches per-head K and V ([num_blocks, block_size, kv_heads, head_dim] each) in `cache_dtype`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, cache_dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.cache_dtype = cache_dtype
        self.backend = "ref"
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def kv_cache_spec(self) -> KVCacheSpec:
        return FullAttentionSpec(self.cache_dtype, self.num_kv_heads, self.head_dim, self.head_dim)

    def bind_kv_cache(self, pages: dict[str, torch.Tensor] | None) -> None:
        self.k_cache, self.v_cache = (None, None) if pages is None else (pages["k"], pages["v"])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] → [T, heads, head_dim]."""
        attention_ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return attention_ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.backend)
