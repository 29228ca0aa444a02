"""The dense decoder-only transformer: Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3, GLM-4-0414, Mistral —
one implementation with a few switches (`DecoderOptions`), module names as in HF checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from chitu.layers.attention import PagedAttention
from chitu.layers.embedding import Embedding, LMHead
from chitu.layers.linear import Linear
from chitu.layers.norm import RMSNorm
from chitu.layers.rotary import RotaryEmbedding
from chitu.ops.activation import silu_and_mul
from chitu.ops.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class DecoderOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm over each head of q and k before RoPE
    sandwich_norm: bool = False     # GLM-4: extra norms after attention and after the MLP
    rope_interleaved: bool = False  # GLM-4: rotate (even, odd) pairs instead of halves
    gate_up_sources: tuple[str, ...] = ("gate_proj", "up_proj")


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class SelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], options.qkv_bias,
                               sources=["q_proj", "k_proj", "v_proj"], dtype=dtype)
        self.o_proj = Linear(q_size, config.hidden_size, options.o_bias, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if options.qk_norm else None
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.out_splits, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(rope, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, dtype: torch.dtype):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], options.mlp_bias,
                                   sources=list(options.gate_up_sources), dtype=dtype)
        self.down_proj = Linear(inter, config.hidden_size, options.mlp_bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = SelfAttention(config, options, rotary, dtype)
        self.mlp = MLP(config, options, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, eps, dtype) if options.sandwich_norm else None
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps, dtype) if options.sandwich_norm else None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns (branch output, residual stream) so each add fuses into the next norm."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, meta, rope)
        if self.post_self_attn_layernorm is not None:
            hidden = self.post_self_attn_layernorm(hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        if self.post_mlp_layernorm is not None:
            hidden = self.post_mlp_layernorm(hidden)
        return hidden, residual


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions, options.rope_interleaved)
        self.layers = nn.ModuleList(DecoderLayer(config, options, self.rotary, dtype)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, token_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(token_ids), None
        rope = self.rotary.lookup(meta.positions)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, meta, rope)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DenseForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, options, max_positions, dtype)
        tied = self.model.embed_tokens if getattr(config, "tie_word_embeddings", False) else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied, dtype)

    def forward(self, token_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of the flat tokens of one step."""
        return self.model(token_ids, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
