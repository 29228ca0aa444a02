"""Which Chitu model class serves which checkpoint architecture."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from chitu.errors import UserError
from chitu.models.dense import DecoderOptions, DenseForCausalLM


class UnsupportedModelError(UserError):
    pass


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the `type` of chitu/config/models/*.yaml
    build: Callable[[PretrainedConfig, int, torch.dtype], nn.Module]


def _dense(options: Callable[[PretrainedConfig], DecoderOptions]) -> Callable[[PretrainedConfig, int, torch.dtype], nn.Module]:
    return lambda config, max_positions, dtype: DenseForCausalLM(config, options(config), max_positions, dtype)


def _llama_options(config: PretrainedConfig) -> DecoderOptions:
    bias = getattr(config, "attention_bias", False)
    return DecoderOptions(qkv_bias=bias, o_bias=bias, mlp_bias=getattr(config, "mlp_bias", False))


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("hf-llama", _dense(_llama_options)),
    "MistralForCausalLM": Architecture("hf-llama", _dense(_llama_options)),
    "Qwen2ForCausalLM": Architecture("hf-llama", _dense(lambda c: DecoderOptions(qkv_bias=True))),
    "Qwen3ForCausalLM": Architecture("hf-llama", _dense(lambda c: DecoderOptions(
        qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm=True))),
    "Glm4ForCausalLM": Architecture("hf-glm-z1", _dense(lambda c: DecoderOptions(
        qkv_bias=c.attention_bias, sandwich_norm=True, rope_interleaved=True, gate_up_sources=("gate_up_proj",)))),
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


def build_model(config: PretrainedConfig, expected_type: str, max_positions: int, dtype: torch.dtype) -> nn.Module:
    """An uninitialised model for `config`; `expected_type` is the yaml's `type`, checked against it."""
    name, arch = architecture_of(config)
    if expected_type != arch.model_type:
        raise UnsupportedModelError(
            f"models.type={expected_type} but the checkpoint is {name} (type {arch.model_type})"
        )
    return arch.build(config, max_positions, dtype)
