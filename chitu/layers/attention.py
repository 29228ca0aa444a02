"""Attention over the paged KV cache: stores this step's K/V, then attends."""
from __future__ import annotations

import torch
from torch import nn

from chitu.ops import attention as attention_ops
from chitu.ops.attention_metadata import AttentionMetadata


class PagedAttention(nn.Module):
    """The runner hands each layer its cache views ([num_blocks, block_size, kv_heads, head_dim])."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.backend = "ref"  # set by the engine: "ref" (torch) or "triton"
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] → [T, heads, head_dim]."""
        attention_ops.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return attention_ops.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale, self.backend)
