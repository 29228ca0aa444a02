"""Which Chitu model serves which checkpoint architecture, and how its checkpoints name the tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from chitu.config.schema import ConfigError
from chitu.errors import UserError
from chitu.layers.context import ModelContext
from chitu.models import dense, moe
from chitu.models.decoder import CausalLM, LayerBuilders
from chitu.quant.config import QuantConfig


class UnsupportedModelError(UserError):
    pass


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the `type` of chitu/config/models/*.yaml
    layers: Callable[[PretrainedConfig], LayerBuilders]
    # (pattern, replacement) regexes from Chitu's tensor names (its module paths) to the names in HF
    # safetensors checkpoints, where they differ; GGUF names are mapped in checkpoint/gguf_names.py.
    hf_renames: tuple[tuple[str, str], ...] = field(default=())


_MIXTRAL_RENAMES = ((r"\.mlp\.", ".block_sparse_moe."), (r"(experts\.\d+)\.gate_proj\.", r"\1.w1."),
                    (r"(experts\.\d+)\.down_proj\.", r"\1.w2."), (r"(experts\.\d+)\.up_proj\.", r"\1.w3."))

ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("hf-llama", dense.llama),
    "MistralForCausalLM": Architecture("hf-llama", dense.llama),
    "Qwen2ForCausalLM": Architecture("hf-llama", dense.qwen2),
    "Qwen3ForCausalLM": Architecture("hf-llama", dense.qwen3),
    "Glm4ForCausalLM": Architecture("hf-glm-z1", dense.glm4),
    "Qwen3MoeForCausalLM": Architecture("hf-qwen-3-moe", moe.qwen3_moe),
    "MixtralForCausalLM": Architecture("hf-mixtral", moe.mixtral, _MIXTRAL_RENAMES),
    "Glm4MoeForCausalLM": Architecture("hf-glm-4-moe", moe.glm4_moe),
    "DeepseekV2ForCausalLM": Architecture("deepseek-v3", moe.deepseek_v2),
    "DeepseekV3ForCausalLM": Architecture("deepseek-v3", moe.deepseek_v3),
}
MODEL_TYPES = sorted({a.model_type for a in ARCHITECTURES.values()})


def architecture_of(config: PretrainedConfig) -> tuple[str, Architecture]:
    # GGUF-derived configs carry only model_type; transformers knows its causal-LM class name.
    names = getattr(config, "architectures", None) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)]
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise UnsupportedModelError(
        f"unsupported model architecture {names or config.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
    )


def build_model(config: PretrainedConfig, expected_type: str, max_positions: int, dtype: torch.dtype,
                mla_absorb: str = "none", raise_lower_bit_float_to: str = "float8_e4m3fn",
                quantize_on_load: str | None = None, gguf_blocks: bool = False, cpu_layer_num: int = 0) -> nn.Module:
    """An uninitialised model for `config`; `expected_type` is the yaml's `type`, checked against it.
    A checkpoint declaring a quantization Chitu has no method for is refused here; `quantize_on_load`
    names the method that quantizes the weights as they load (quant/config.py); `gguf_blocks` keeps a GGUF
    file's blocks (quant=gguf); the routed experts of the last `cpu_layer_num` MoE layers live in host memory."""
    name, arch = architecture_of(config)
    if expected_type != arch.model_type:
        raise UnsupportedModelError(
            f"models.type={expected_type} but the checkpoint is {name} (type {arch.model_type})"
        )
    quant = QuantConfig.gguf_blocks() if gguf_blocks else \
        QuantConfig.from_checkpoint(config, raise_lower_bit_float_to, quantize_on_load)
    builders = arch.layers(config)
    host_layers = host_expert_layers(builders.moe_layers(config.num_hidden_layers), cpu_layer_num, name)
    ctx = ModelContext(config, dtype, max_positions, quant, mla_absorb, host_layers)
    return CausalLM(ctx, builders)


def host_expert_layers(moe_layers: list[int], cpu_layer_num: int, name: str) -> frozenset[int]:
    """The layers whose routed experts cpu_layer_num puts in host memory: the last cpu_layer_num MoE layers
    (Chitu's DeepSeek-R1 example, 58, is every MoE layer: 3 to 60)."""
    if cpu_layer_num > len(moe_layers):
        raise ConfigError(f"cpu_layer_num={cpu_layer_num}, but {name} has {len(moe_layers)} MoE layers"
                          + ("" if moe_layers else ": it is a dense model, with no experts to place on the CPU"))
    return frozenset(moe_layers[len(moe_layers) - cpu_layer_num:]) if cpu_layer_num else frozenset()
