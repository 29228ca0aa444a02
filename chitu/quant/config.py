"""Which linear method each layer of a checkpoint gets, from its `quantization_config`.

Unquantized weights, and FP8 block-quantized ones dequantized at load (`infer.raise_lower_bit_float_to=
bfloat16`; quant/fp8_block.py); GGUF tensors are dequantized as they are read, or with quant=gguf kept
in their blocks (quant/gguf_blocks.py). A checkpoint declaring any
other quantization is refused with its name: loading its packed or fp8 tensors as plain weights, without
their scales, would serve garbage. `quant=w8a16 quant_on_load=True` quantizes an unquantized checkpoint's
linear layers to int8 as they load, and `quant=simple_w8a8` also its activations as they come (quant/int8.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from chitu.errors import UserError
from chitu.quant.fp8_block import Fp8BlockDequantizedMethod
from chitu.quant.gguf_blocks import GGUF_BLOCKS
from chitu.quant.int8 import Int8DynamicActivationMethod, Int8WeightOnlyMethod
from chitu.quant.linear_method import UNQUANTIZED, LinearMethod


class UnsupportedQuantizationError(UserError):
    pass


# quant=<name> quant_on_load=True: the method each name quantizes an unquantized checkpoint's linear layers to
QUANTIZE_ON_LOAD = {"w8a16": Int8WeightOnlyMethod, "simple_w8a8": Int8DynamicActivationMethod}


@dataclass(frozen=True)
class QuantConfig:
    """Per-layer linear methods; methods for quantized formats add their settings here."""

    method: LinearMethod = field(default=UNQUANTIZED)
    experts: LinearMethod | None = None  # the routed experts' method, when not `method`
    int8_lm_head: bool = False  # the int8 methods quantize the LM head too, as W8A16 (layers/embedding.py)
    lm_head: LinearMethod | None = None  # the LM head's method, when it keeps the checkpoint's format (GGUF)

    @classmethod
    def gguf_blocks(cls) -> QuantConfig:
        """quant=gguf: dense layers and the LM head multiply the file's blocks; experts stay dequantized for now."""
        return cls(GGUF_BLOCKS, experts=UNQUANTIZED, lm_head=GGUF_BLOCKS)

    @classmethod
    def from_checkpoint(cls, config: PretrainedConfig, raise_lower_bit_float_to: str = "float8_e4m3fn",
                        quantize_on_load: str | None = None) -> QuantConfig:
        """raise_lower_bit_float_to: `bfloat16` dequantizes fp8 weights at load; the default keeps them fp8.
        quantize_on_load: the method (QUANTIZE_ON_LOAD) that quantizes an unquantized checkpoint as it loads."""
        declared = getattr(config, "quantization_config", None)
        if quantize_on_load:
            return cls._on_load(config, quantize_on_load, declared)
        if not declared:
            return cls()
        declared = declared if isinstance(declared, dict) else declared.to_dict()
        method = declared.get("quant_method") or declared.get("format") or "unnamed"
        details = ", ".join(f"{k}={declared[k]}" for k in ("fmt", "bits", "weight_block_size") if k in declared)
        if method == "fp8" and declared.get("weight_block_size"):
            if raise_lower_bit_float_to == "bfloat16":
                return cls(Fp8BlockDequantizedMethod(tuple(declared["weight_block_size"])))
            raise UnsupportedQuantizationError(
                f"the checkpoint is FP8 block-quantized ({details}); running fp8 weights (W8A8) is not built "
                f"yet: set infer.raise_lower_bit_float_to=bfloat16 to dequantize them at load")
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with quant_method={method!r}{f' ({details})' if details else ''}; "
            f"Chitu has no linear method for {method!r} yet: use the unquantized (bf16) checkpoint, or a GGUF file")

    @classmethod
    def _on_load(cls, config: PretrainedConfig, method: str, declared) -> QuantConfig:
        if declared:
            raise UnsupportedQuantizationError(
                f"quant={method} quant_on_load=True quantizes an unquantized checkpoint, but this one is already "
                f"quantized ({declared.get('quant_method') if isinstance(declared, dict) else declared})")
        if getattr(config, "kv_lora_rank", None):
            raise UnsupportedQuantizationError(f"quant={method} is not built for multi-head latent attention "
                                               "(DeepSeek-V2/V3) yet: its projections are folded as dense weights")
        return cls(QUANTIZE_ON_LOAD[method](), int8_lm_head=True)

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the linear layer whose checkpoint name is `prefix` ("...mlp.experts.gate_up_proj"
        for stacked experts)."""
        if self.experts is not None and prefix.rpartition(".")[0].endswith("experts"):
            return self.experts
        return self.method
