"""Multi-head attention with grouped KV heads (GQA) over the paged cache, split over tensor ranks by heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chitu.distributed.parallel_state import parallel_state
from chitu.distributed.sharding import Span, head_shard
from chitu.layers.attention import PagedAttention
from chitu.layers.linear import ColumnParallelLinear, RowParallelLinear
from chitu.layers.norm import PendingNorm, RMSNorm
from chitu.layers.rotary import RotaryEmbedding
from chitu.layers.context import ModelContext
from chitu.ops.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3, GLM-4.5: RMSNorm over each head of q and k before RoPE


def _scaled(span: Span, factor: int) -> Span:
    return Span(span.start * factor, span.length * factor)


class SelfAttention(nn.Module):
    """Q/K/V column-parallel over this tensor rank's heads, the output projection row-parallel."""

    def __init__(self, ctx: ModelContext, prefix: str, options: AttentionOptions, rotary: RotaryEmbedding):
        super().__init__()
        config, state, dtype = ctx.config, parallel_state(), ctx.dtype
        self.head_dim = ctx.head_dim
        heads = head_shard(config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                           state.tp_size, state.tp_rank)
        self.num_heads, self.num_kv_heads = heads.q_heads.length, heads.kv_heads.length
        q_span, kv_span = _scaled(heads.q_heads, self.head_dim), _scaled(heads.kv_heads, self.head_dim)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [("q_proj", q_span), ("k_proj", kv_span), ("v_proj", kv_span)], options.qkv_bias,
            dtype, ctx.quant.linear_method(f"{prefix}.qkv_proj"))
        self.o_proj = RowParallelLinear(q_span, config.hidden_size, options.o_bias, dtype,
                                        ctx.quant.linear_method(f"{prefix}.o_proj"))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if options.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, dtype)

    takes_pending_norm = True  # qkv_proj folds the norm before it (layers/norm.py)

    def forward(self, hidden: torch.Tensor | PendingNorm, meta: AttentionMetadata,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv_proj(hidden).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        norm = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.num_heads, self.q_norm.eps)
        q = self.rotary.rotate_and_store_kv(rope, qkv, self.num_heads, norm, self.attn.k_cache, self.attn.v_cache,
                                            meta.slot_mapping)
        return self.o_proj(self.attn.attend_stored(q, meta).flatten(1))
