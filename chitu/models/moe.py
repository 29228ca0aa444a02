"""Mixture-of-experts decoders — Qwen3-MoE, Mixtral, GLM-4.5/4.5-Air (GQA attention), DeepSeek-V2/V3
(multi-head latent attention): in each layer either a dense gated MLP or a sparse MoE block, as the
checkpoint's config says."""
from __future__ import annotations

from transformers import PretrainedConfig

from chitu.layers.context import ModelContext
from chitu.layers.mla_attention import MLAAttention
from chitu.layers.moe.router import RouterOptions
from chitu.layers.moe.sparse_moe import SparseMoE
from chitu.layers.rotary import RotaryEmbedding
from chitu.layers.self_attention import AttentionOptions
from chitu.models.decoder import LayerBuilders, MLPBuilder, MoEOrDense
from chitu.models.dense import gqa_attention


def qwen3_moe(config: PretrainedConfig) -> LayerBuilders:
    def is_moe(index: int) -> bool:
        return (index not in (config.mlp_only_layers or []) and config.num_experts > 0
                and (index + 1) % config.decoder_sparse_step == 0)

    router = RouterOptions(config.num_experts_per_tok, renormalize=config.norm_topk_prob)
    bias = config.attention_bias
    return LayerBuilders(
        gqa_attention(AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)),
        MoEOrDense(is_moe, lambda ctx, prefix: SparseMoE(ctx, prefix, config.num_experts,
                                                           config.moe_intermediate_size, router)))


def mixtral(config: PretrainedConfig) -> LayerBuilders:
    router = RouterOptions(config.num_experts_per_tok, renormalize=True)
    return LayerBuilders(
        gqa_attention(AttentionOptions()),
        MoEOrDense(lambda index: True, lambda ctx, prefix: SparseMoE(ctx, prefix, config.num_local_experts,
                                                                       config.intermediate_size, router)))


def shared_expert_moe(config: PretrainedConfig, router: RouterOptions) -> MLPBuilder:
    """GLM-4.5's and DeepSeek's layout: dense below first_k_dense_replace, then routed experts beside
    always-on shared experts."""
    shared = config.moe_intermediate_size * config.n_shared_experts
    return MoEOrDense(lambda index: index >= config.first_k_dense_replace,
                        lambda ctx, prefix: SparseMoE(ctx, prefix, config.n_routed_experts,
                                                      config.moe_intermediate_size, router, shared))


def grouped_sigmoid_router(config: PretrainedConfig) -> RouterOptions:
    """GLM-4.5's and DeepSeek-V3's: sigmoid scores steered by a correction bias, top-k within the groups
    holding the best pairs, scaled."""
    return RouterOptions(config.num_experts_per_tok, scoring="sigmoid", renormalize=config.norm_topk_prob,
                         correction_bias=True, num_groups=config.n_group, top_groups=config.topk_group,
                         scaling_factor=config.routed_scaling_factor)


def glm4_moe(config: PretrainedConfig) -> LayerBuilders:
    return LayerBuilders(
        gqa_attention(AttentionOptions(qkv_bias=config.attention_bias, qk_norm=config.use_qk_norm)),
        shared_expert_moe(config, grouped_sigmoid_router(config)))


def mla_attention(ctx: ModelContext, index: int, prefix: str, rotary: RotaryEmbedding) -> MLAAttention:
    return MLAAttention(ctx, prefix, rotary)


def deepseek_v2(config: PretrainedConfig) -> LayerBuilders:
    """Softmax scores, never renormalized; group_limited_greedy ranks the groups by their best score."""
    grouped = config.topk_method == "group_limited_greedy"
    router = RouterOptions(config.num_experts_per_tok, num_groups=config.n_group if grouped else 1,
                           top_groups=config.topk_group if grouped else 1, group_by_max=True,
                           scaling_factor=config.routed_scaling_factor)
    return LayerBuilders(mla_attention, shared_expert_moe(config, router), rope_interleaved=True)


def deepseek_v3(config: PretrainedConfig) -> LayerBuilders:
    return LayerBuilders(mla_attention, shared_expert_moe(config, grouped_sigmoid_router(config)),
                         rope_interleaved=getattr(config, "rope_interleave", True))
