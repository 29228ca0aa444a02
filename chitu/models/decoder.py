"""The decoder-only transformer, composed per layer from an attention and an MLP builder.

A family (models/dense.py, qwen3_moe.py, ...) says which attention and which MLP each layer gets
(a `LayerBuilders`); this module stacks them with the norms, the embedding, the RoPE table and the
LM head, and cuts the stack into pipeline stages. Module paths are the checkpoint's tensor names
(`model.layers.3.mlp.experts.7.up_proj`); families whose checkpoints spell them otherwise rename
them in the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from chitu.distributed.parallel_state import parallel_state
from chitu.distributed.sharding import stage_layers
from chitu.layers.context import ModelContext
from chitu.layers.embedding import Embedding, LMHead
from chitu.layers.mlp import GatedMLP
from chitu.layers.norm import PendingNorm, RMSNorm
from chitu.layers.rotary import RotaryEmbedding
from chitu.ops.attention_metadata import AttentionMetadata

# (context, layer index, module prefix, the model's RoPE table) -> the attention module of that layer
AttentionBuilder = Callable[[ModelContext, int, str, RotaryEmbedding], nn.Module]
# (context, layer index, module prefix) -> the MLP (dense or MoE) of that layer
MLPBuilder = Callable[[ModelContext, int, str], nn.Module]


@dataclass(frozen=True)
class MoEOrDense:
    """An MLP builder choosing per layer between a sparse MoE block and a dense gated MLP. The MoE blocks of the
    layers in ctx.host_expert_layers (cpu_layer_num) get a context saying their routed experts live on the host."""

    is_moe: Callable[[int], bool]
    moe: Callable[[ModelContext, str], nn.Module]

    def __call__(self, ctx: ModelContext, index: int, prefix: str) -> nn.Module:
        if not self.is_moe(index):
            return GatedMLP(ctx, prefix, ctx.config.intermediate_size)
        return self.moe(replace(ctx, experts_on_host=index in ctx.host_expert_layers), prefix)


@dataclass(frozen=True)
class LayerBuilders:
    attention: AttentionBuilder
    mlp: MLPBuilder
    sandwich_norm: bool = False     # GLM-4: extra norms after attention and after the MLP
    rope_interleaved: bool = False  # GLM-4: rotate (even, odd) pairs instead of halves

    def moe_layers(self, num_layers: int) -> list[int]:
        """The indices of the layers whose MLP is a sparse MoE block."""
        return [i for i in range(num_layers) if isinstance(self.mlp, MoEOrDense) and self.mlp.is_moe(i)]


class DecoderLayer(nn.Module):
    def __init__(self, ctx: ModelContext, index: int, prefix: str, builders: LayerBuilders, rotary: RotaryEmbedding):
        super().__init__()
        hidden, eps, dtype = ctx.config.hidden_size, ctx.config.rms_norm_eps, ctx.dtype
        self.self_attn = builders.attention(ctx, index, f"{prefix}.self_attn", rotary)
        self.mlp = builders.mlp(ctx, index, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hidden, eps, dtype)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype)
        self.post_self_attn_layernorm = RMSNorm(hidden, eps, dtype) if builders.sandwich_norm else None
        self.post_mlp_layernorm = RMSNorm(hidden, eps, dtype) if builders.sandwich_norm else None

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns (branch output, residual stream) so each add fuses into the next norm, and
        that norm into the projection after it where the branch takes a pending norm."""
        hidden, residual = self._branch(self.self_attn, self.input_layernorm, hidden, residual, meta, rope)
        if self.post_self_attn_layernorm is not None:
            hidden = self.post_self_attn_layernorm(hidden)
        hidden, residual = self._branch(self.mlp, self.post_attention_layernorm, hidden, residual)
        if self.post_mlp_layernorm is not None:
            hidden = self.post_mlp_layernorm(hidden)
        return hidden, residual

    @staticmethod
    def _branch(branch: nn.Module, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None,
                *args) -> tuple[torch.Tensor, torch.Tensor]:
        """(branch(norm(hidden + residual)), hidden + residual); the residual is hidden itself at the first layer."""
        if getattr(branch, "takes_pending_norm", False):
            pending = PendingNorm(norm, hidden, residual)
            return branch(pending, *args), pending.summed
        if residual is None:
            return branch(norm(hidden), *args), hidden
        hidden, residual = norm(hidden, residual)
        return branch(hidden, *args), residual


Intermediate = tuple[torch.Tensor, torch.Tensor]  # (branch output, residual stream) between pipeline stages


class DecoderModel(nn.Module):
    """This pipeline stage's decoder layers (keyed by their global index, as checkpoints name them);
    the first stage also embeds tokens, the last one applies the final norm."""

    def __init__(self, ctx: ModelContext, builders: LayerBuilders):
        super().__init__()
        config, state = ctx.config, parallel_state()
        layers = stage_layers(config.num_hidden_layers, state.pp_size, state.pp_rank, state.pp_layer_partition)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, ctx.dtype) if state.is_first_stage else None
        self.rotary = RotaryEmbedding(config, ctx.rope_head_dim, ctx.max_positions, builders.rope_interleaved)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(ctx, i, f"model.layers.{i}", builders, self.rotary)
                                     for i in layers})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx.dtype) if state.is_last_stage else None

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


class CausalLM(nn.Module):
    def __init__(self, ctx: ModelContext, builders: LayerBuilders):
        super().__init__()
        config = ctx.config
        self.config = config
        self.dtype = ctx.dtype
        self.model = DecoderModel(ctx, builders)
        self.lm_head = None
        if parallel_state().is_last_stage:
            tied = getattr(config, "tie_word_embeddings", False)
            self.lm_head = LMHead(config.vocab_size, config.hidden_size, ctx.dtype,
                                  tied_to=self.model.embed_tokens if tied else None,
                                  source="model.embed_tokens" if tied else None, int8=ctx.quant.int8_lm_head,
                                  method=ctx.quant.lm_head)

    def forward(self, token_ids: torch.Tensor | None, meta: AttentionMetadata,
                intermediate: Intermediate | None = None) -> torch.Tensor | Intermediate:
        """Hidden states [T, hidden] of the flat tokens of one step (see DecoderModel.forward)."""
        return self.model(token_ids, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def intermediate_spec(self, num_tokens: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of what one stage passes the next for `num_tokens` tokens."""
        return [((num_tokens, self.config.hidden_size), self.dtype)] * 2
