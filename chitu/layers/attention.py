"""Attention over the paged KV cache: stores this step's K/V (or MLA latents), then attends."""
from __future__ import annotations

import torch
from torch import nn

from chitu.layers.kv_cache_spec import FullAttentionSpec, KVCacheSpec, MLALatentSpec
from chitu.ops import attention as attention_ops
from chitu.ops.attention_metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """Caches per-head K and V ([num_blocks, block_size, kv_heads, head_dim or head_dim_v]) in `cache_dtype`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, cache_dtype: torch.dtype,
                 head_dim_v: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.head_dim_v = head_dim_v or head_dim
        self.cache_dtype = cache_dtype
        self.backend = "ref"
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def kv_cache_spec(self) -> KVCacheSpec:
        return FullAttentionSpec(self.cache_dtype, self.num_kv_heads, self.head_dim, self.head_dim_v)

    def bind_kv_cache(self, pages: dict[str, torch.Tensor] | None) -> None:
        self.k_cache, self.v_cache = (None, None) if pages is None else (pages["k"], pages["v"])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, head_dim], k [T, kv_heads, head_dim], v [T, kv_heads, head_dim_v] → [T, heads, head_dim_v]."""
        attention_ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend_stored(q, meta)

    def attend_stored(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q over the cache, this step's K/V already stored in it."""
        return attention_ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.backend)


class LatentPagedAttention(nn.Module):
    """MLA with absorbed weights, as multi-query attention over the cached latents: the query of each head
    is [its nope query taken into the latent space, its RoPE query], the one key of a token its cached
    [latent, RoPE key] entry and its value the latent alone. Returns each head's output in the latent space."""

    def __init__(self, num_heads: int, kv_lora_rank: int, rope_dim: int, scale: float, cache_dtype: torch.dtype):
        super().__init__()
        self.num_heads, self.kv_lora_rank, self.rope_dim, self.scale = num_heads, kv_lora_rank, rope_dim, scale
        self.cache_dtype = cache_dtype
        self.backend = "ref"
        self.cache: torch.Tensor | None = None

    def kv_cache_spec(self) -> KVCacheSpec:
        return MLALatentSpec(self.cache_dtype, self.kv_lora_rank, self.rope_dim)

    def bind_kv_cache(self, pages: dict[str, torch.Tensor] | None) -> None:
        self.cache = None if pages is None else pages["kv_lora_k_pe"]

    def forward(self, q: torch.Tensor, latent: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, kv_lora_rank + rope_dim], latent [T, kv_lora_rank + rope_dim] → [T, heads, kv_lora_rank]."""
        attention_ops.store_rows(latent, self.cache, meta.slot_mapping)
        return attention_ops.latent_attention(q, self.cache, meta, self.kv_lora_rank, self.scale, self.backend)
