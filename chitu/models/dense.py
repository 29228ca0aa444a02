"""Dense decoders — Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3, GLM-4-0414: GQA attention and a
gated MLP in every layer, differing only in biases, q/k norms and GLM-4's norms and RoPE."""
from __future__ import annotations

from transformers import PretrainedConfig

from chitu.layers.context import ModelContext
from chitu.layers.mlp import GatedMLP
from chitu.layers.rotary import RotaryEmbedding
from chitu.layers.self_attention import AttentionOptions, SelfAttention
from chitu.models.decoder import AttentionBuilder, LayerBuilders, MLPBuilder


def gqa_attention(options: AttentionOptions) -> AttentionBuilder:
    def build(ctx: ModelContext, index: int, prefix: str, rotary: RotaryEmbedding) -> SelfAttention:
        return SelfAttention(ctx, prefix, options, rotary)
    return build


def dense_mlp(bias: bool = False, gate_up_sources: tuple[str, ...] = ("gate_proj", "up_proj")) -> MLPBuilder:
    def build(ctx: ModelContext, index: int, prefix: str) -> GatedMLP:
        return GatedMLP(ctx, prefix, ctx.config.intermediate_size, bias, gate_up_sources)
    return build


def llama(config: PretrainedConfig) -> LayerBuilders:
    bias = getattr(config, "attention_bias", False)
    return LayerBuilders(gqa_attention(AttentionOptions(qkv_bias=bias, o_bias=bias)),
                         dense_mlp(getattr(config, "mlp_bias", False)))


def qwen2(config: PretrainedConfig) -> LayerBuilders:
    return LayerBuilders(gqa_attention(AttentionOptions(qkv_bias=True)), dense_mlp())


def qwen3(config: PretrainedConfig) -> LayerBuilders:
    bias = config.attention_bias
    return LayerBuilders(gqa_attention(AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)), dense_mlp())


def glm4(config: PretrainedConfig) -> LayerBuilders:
    return LayerBuilders(gqa_attention(AttentionOptions(qkv_bias=config.attention_bias)),
                         dense_mlp(gate_up_sources=("gate_up_proj",)), sandwich_norm=True, rope_interleaved=True)
