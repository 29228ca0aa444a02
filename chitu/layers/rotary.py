"""Rotary position embedding with a precomputed cos/sin table; frequencies from transformers' RoPE
initialisers, so every scaling type HF supports (llama3, yarn, linear, dynamic…) is covered."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from chitu.ops import rotary as rotary_ops


def rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:  # transformers < 5 spells it rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return params


def inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """On the CPU, whatever device the model is being built on."""
    with torch.device("cpu"):
        return _inverse_frequencies(config, head_dim)


def _inverse_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (params["rope_theta"] ** exponents), 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int, interleaved: bool):
        super().__init__()
        self.interleaved = interleaved
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq.float())
        device = torch.get_default_device()  # the model is built under `with torch.device(...)`
        self.register_buffer("cos", (freqs.cos() * scaling).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scaling).to(device), persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows of the step's positions: gathered once per step, shared by every layer."""
        return self.cos[positions], self.sin[positions]

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], qk: torch.Tensor,
                norm: rotary_ops.HeadNorm | None = None) -> torch.Tensor:
        """Rotate q and k heads side by side (qk [T, q_heads + k_heads, head_dim]) in one launch, each head
        RMS-normalised first when given a norm."""
        cos, sin = rope
        return rotary_ops.apply_rotary(qk, cos, sin, self.interleaved, norm)

    def rotate_and_store_kv(self, rope: tuple[torch.Tensor, torch.Tensor], qkv: torch.Tensor, q_heads: int,
                            norm: rotary_ops.HeadNorm | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> torch.Tensor:
        """qkv [T, q_heads + 2 kv_heads, head_dim]: rotates q and k, stores k and v at their slots, returns q."""
        cos, sin = rope
        return rotary_ops.rotate_and_store_kv(qkv, q_heads, cos, sin, self.interleaved, norm, k_cache, v_cache,
                                              slot_mapping)
