"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2), split over tensor ranks by heads.

Each token's keys and values are compressed into one latent (`kv_a_proj_with_mqa` → kv_lora_rank, plus
a RoPE key shared by all heads); `kv_b_proj` expands the latent into every head's K_nope and V.
`infer.mla_absorb` says where that expansion happens:
- `none`: every step, before attention; the cache holds per-head K (nope + rope) and V.
- `absorb-without-precomp`: never for the cache. The cache holds the latent and the RoPE key (one entry
  per token); kv_b_proj's per-head K part takes q_nope into the latent space and its V part takes the
  attention output out of it, so attention is multi-query over the latents.
- `absorb`: the same cache and attention, with kv_b_proj's K part folded into the q projection and its V
  part into o_proj once the checkpoint is loaded: no extra GEMMs per step, larger q and o projections.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from chitu.config.schema import ConfigError
from chitu.distributed.parallel_state import parallel_state
from chitu.distributed.sharding import Span, head_shard
from chitu.layers.attention import LatentPagedAttention, PagedAttention
from chitu.layers.context import ModelContext
from chitu.layers.linear import ColumnParallelLinear, RowParallelLinear
from chitu.layers.norm import RMSNorm
from chitu.layers.rotary import RotaryEmbedding, rope_parameters
from chitu.ops import attention as attention_ops
from chitu.ops.attention_metadata import AttentionMetadata

MLA_ABSORB_MODES = ("none", "absorb-without-precomp", "absorb")
LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: the checkpoints' configs do not set it


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def softmax_scale(config) -> float:
    """1/sqrt(qk head dim), times mscale(mscale_all_dim)² under DeepSeek's YaRN (its attention-scale correction)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


class MLAAttention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str, rotary: RotaryEmbedding):
        super().__init__()
        config, state, dtype = ctx.config, parallel_state(), ctx.dtype
        if ctx.mla_absorb not in MLA_ABSORB_MODES:
            raise ConfigError(f"infer.mla_absorb={ctx.mla_absorb} is not one of {MLA_ABSORB_MODES}")
        self.mla_absorb = ctx.mla_absorb
        self.folded = False  # set once after_loading has folded kv_b_proj away
        heads = head_shard(config.num_attention_heads, config.num_attention_heads, state.tp_size, state.tp_rank).q_heads
        self.num_heads = heads.length
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        hidden, bias = config.hidden_size, config.attention_bias

        def method(name: str, read_as_matrix: bool = False):
            """The projection's linear method; one whose weight this layer reads as a matrix (to fold it, or
            to split kv_b_proj per head) holds it dense."""
            chosen = ctx.quant.linear_method(name)
            return chosen.dense() if read_as_matrix else chosen

        folds = self.mla_absorb == "absorb"

        def per_head(width: int) -> list[tuple[None, Span]]:
            return [(None, Span(heads.start * width, heads.length * width))]

        def replicated(width: int) -> list[tuple[None, Span]]:
            return [(None, Span(0, width))]

        q_width = self.nope + self.rope
        self.q_lora = bool(config.q_lora_rank)
        if self.q_lora:
            self.q_a_proj = ColumnParallelLinear(hidden, replicated(config.q_lora_rank), bias, dtype,
                                                 method(f"{prefix}.q_a_proj"))
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, per_head(q_width), False, dtype,
                                                 method(f"{prefix}.q_b_proj", folds))
        else:
            self.q_proj = ColumnParallelLinear(hidden, per_head(q_width), False, dtype,
                                               method(f"{prefix}.q_proj", folds))
        self.kv_a_proj_with_mqa = ColumnParallelLinear(hidden, replicated(self.kv_lora_rank + self.rope), bias, dtype,
                                                       method(f"{prefix}.kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, per_head(self.nope + self.v_dim), False, dtype,
                                              method(f"{prefix}.kv_b_proj", self.mla_absorb != "none"))
        self.o_proj = RowParallelLinear(Span(heads.start * self.v_dim, heads.length * self.v_dim), hidden, bias,
                                        dtype, method(f"{prefix}.o_proj", folds))
        self.rotary = rotary
        scale = softmax_scale(config)
        self.attn = (PagedAttention(self.num_heads, self.num_heads, q_width, scale, dtype, self.v_dim)
                     if self.mla_absorb == "none" else
                     LatentPagedAttention(self.num_heads, self.kv_lora_rank, self.rope, scale, dtype))

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can capture this layer (runner/cuda_graph.py): the Triton kernels can; the
        torch reference reads the longest context on the host."""
        return attention_ops.kernels_run(self.attn.backend, self.kv_a_proj_with_mqa.weight)

    def _query(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, heads, nope + rope], or once folded [T, heads, kv_lora_rank + rope]."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden))) if self.q_lora else self.q_proj(hidden)
        return q.view(-1, self.num_heads, (self.kv_lora_rank if self.folded else self.nope) + self.rope)

    def _expansion(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's per-head halves: K [heads, nope, kv_lora_rank] and V [heads, v_dim, kv_lora_rank]."""
        weight = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return weight[:, : self.nope], weight[:, self.nope:]

    def after_loading(self) -> None:
        """mla_absorb=absorb: fold kv_b_proj's K half into the q projection (per head, q_nope's rows become
        W_UK^T W_q_nope) and its V half into o_proj (W_o W_UV), in float32, then drop kv_b_proj."""
        if self.mla_absorb != "absorb" or self.folded:
            return
        w_k, w_v = (w.float() for w in self._expansion())
        q_layer = self.q_b_proj if self.q_lora else self.q_proj
        w_q = q_layer.weight.float().view(self.num_heads, self.nope + self.rope, -1)
        q_latent = torch.einsum("hnl,hni->hli", w_k, w_q[:, : self.nope])
        q_layer.weight = nn.Parameter(torch.cat((q_latent, w_q[:, self.nope:]), dim=1).flatten(0, 1)
                                      .to(q_layer.weight.dtype), requires_grad=False)
        w_o = self.o_proj.weight.float().view(-1, self.num_heads, self.v_dim)
        self.o_proj.weight = nn.Parameter(torch.einsum("ohv,hvl->ohl", w_o, w_v).flatten(1)
                                          .to(self.o_proj.weight.dtype), requires_grad=False)
        del self.kv_b_proj
        self.folded = True

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self._query(hidden)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        # the heads' RoPE queries and the shared RoPE key rotate in one launch
        pe = self.rotary(rope, torch.cat((q[..., -self.rope:], k_pe[:, None]), dim=1))
        q_pe, k_pe = pe[:, : self.num_heads], pe[:, self.num_heads]
        q_nope = q[..., : -self.rope]
        if self.mla_absorb == "none":
            out = self._expanded(q_nope, q_pe, latent, k_pe, meta)
        else:
            out = self._absorbed(q_nope, q_pe, torch.cat((latent, k_pe), dim=-1), meta)
        return self.o_proj(out.flatten(1))

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        k_nope, v = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope + self.v_dim).split(
            [self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(-1, self.num_heads, -1)), dim=-1)
        return self.attn(torch.cat((q_nope, q_pe), dim=-1), k, v, meta)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entry: torch.Tensor,
                  meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the latents; once folded, q_nope is already in the latent space and o_proj takes
        the output straight from it."""
        if self.folded:
            return self.attn(torch.cat((q_nope, q_pe), dim=-1), entry, meta)
        w_k, w_v = self._expansion()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_k).transpose(0, 1)  # [T, heads, kv_lora_rank]
        out_latent = self.attn(torch.cat((q_latent, q_pe), dim=-1), entry, meta)
        return torch.bmm(out_latent.transpose(0, 1), w_v.transpose(1, 2)).transpose(0, 1)  # [T, heads, v_dim]
