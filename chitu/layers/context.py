"""What every layer builder is given: the checkpoint's config, the compute dtype and the quantization."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from chitu.quant.config import QuantConfig


@dataclass(frozen=True)
class ModelContext:
    config: PretrainedConfig
    dtype: torch.dtype          # activations, dense weights and the KV cache
    max_positions: int          # the longest sequence the RoPE table covers
    quant: QuantConfig = QuantConfig()
    mla_absorb: str = "none"    # infer.mla_absorb: where MLA expands its latents (layers/mla_attention.py)
    # cpu_layer_num: the layers whose routed experts live in host memory and run on the CPU, and, as a layer's
    # MoE block is built, whether it is one of them (models/decoder.py MoEOrDense)
    host_expert_layers: frozenset[int] = frozenset()
    experts_on_host: bool = False

    @property
    def head_dim(self) -> int:
        config = self.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def rope_head_dim(self) -> int:
        """The width of a head RoPE rotates (before partial_rotary_factor): MLA's rope part, else the whole head."""
        return getattr(self.config, "qk_rope_head_dim", None) or self.head_dim
