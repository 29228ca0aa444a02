"""The dense decoder-only transformer: Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3, GLM-4-0414, Mistral —
one implementation with a few switches (`DecoderOptions`), module names as in HF checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from chitu.distributed.parallel_state import parallel_state
from chitu.distributed.sharding import Span, balanced_span, head_shard, stage_layers
from chitu.layers.attention import PagedAttention
from chitu.layers.embedding import Embedding, LMHead
from chitu.layers.linear import ColumnParallelLinear, RowParallelLinear
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


def _scaled(span: Span, factor: int) -> Span:
    return Span(span.start * factor, span.length * factor)


class SelfAttention(nn.Module):
    """Attention over this tensor rank's heads: Q/K/V column-parallel, the output projection row-parallel."""

    def __init__(self, config: PretrainedConfig, options: DecoderOptions, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        state = parallel_state()
        self.head_dim = head_dim_of(config)
        heads = head_shard(config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                           state.tp_size, state.tp_rank)
        self.num_heads, self.num_kv_heads = heads.q_heads.length, heads.kv_heads.length
        q_span, kv_span = _scaled(heads.q_heads, self.head_dim), _scaled(heads.kv_heads, self.head_dim)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [("q_proj", q_span), ("k_proj", kv_span),
                                                                  ("v_proj", kv_span)], options.qkv_bias, dtype)
        self.o_proj = RowParallelLinear(q_span, config.hidden_size, options.o_bias, dtype=dtype)
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
        state = parallel_state()
        inter = config.intermediate_size
        columns = balanced_span(inter, state.tp_size, state.tp_rank)
        if len(options.gate_up_sources) == 1:  # one checkpoint matrix stacks gate over up
            source = options.gate_up_sources[0]
            parts = [(source, columns), (source, Span(inter + columns.start, columns.length))]
        else:
            parts = [(source, columns) for source in options.gate_up_sources]
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, parts, options.mlp_bias, dtype)
        self.down_proj = RowParallelLinear(columns, config.hidden_size, options.mlp_bias, dtype=dtype)

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


Intermediate = tuple[torch.Tensor, torch.Tensor]  # (branch output, residual stream) between pipeline stages


class DecoderModel(nn.Module):
    """This pipeline stage's decoder layers (keyed by their global index, as checkpoints name them);
    the first stage also embeds tokens, the last one applies the final norm."""

    def __init__(self, config: PretrainedConfig, options: DecoderOptions, max_positions: int, dtype: torch.dtype):
        super().__init__()
        state = parallel_state()
        layers = stage_layers(config.num_hidden_layers, state.pp_size, state.pp_rank, state.pp_layer_partition)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype) if state.is_first_stage else None
        self.rotary = RotaryEmbedding(config, head_dim_of(config), max_positions, options.rope_interleaved)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, options, self.rotary, dtype) for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) if state.is_last_stage else None

    def forward(self, token_ids: torch.Tensor | None, meta: AttentionMetadata,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        """Final hidden states on the last stage; elsewhere what the next stage takes as `intermediate`."""
        hidden, residual = (self.embed_tokens(token_ids), None) if intermediate is None else intermediate
        rope = self.rotary.lookup(meta.positions)
        for layer in self.layers.values():
            hidden, residual = layer(hidden, residual, meta, rope)
        if self.norm is None:
            return hidden, residual
        return self.norm(hidden, residual)[0]


class DenseForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig, options: DecoderOptions, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, options, max_positions, dtype)
        self.lm_head = None
        if parallel_state().is_last_stage:
            tied = getattr(config, "tie_word_embeddings", False)
            self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype,
                                  tied_to=self.model.embed_tokens if tied else None,
                                  source="model.embed_tokens" if tied else None)

    def forward(self, token_ids: torch.Tensor | None, meta: AttentionMetadata,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        """Hidden states [T, hidden] of the flat tokens of one step (see DecoderModel.forward)."""
        return self.model(token_ids, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers.values()]
