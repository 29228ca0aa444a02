"""Which linear method each layer of a checkpoint gets, from its `quantization_config`.

Only unquantized weights have a method yet (GGUF tensors are dequantized as they are read). A
checkpoint that declares a quantization method is refused with its name: loading its packed or fp8
tensors as plain weights, without their scales, would serve garbage.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from chitu.errors import UserError
from chitu.quant.linear_method import UNQUANTIZED, LinearMethod


class UnsupportedQuantizationError(UserError):
    pass


@dataclass(frozen=True)
class QuantConfig:
    """Per-layer linear methods; methods for quantized formats add their settings here."""

    @classmethod
    def from_checkpoint(cls, config: PretrainedConfig) -> QuantConfig:
        declared = getattr(config, "quantization_config", None)
        if not declared:
            return cls()
        declared = declared if isinstance(declared, dict) else declared.to_dict()
        method = declared.get("quant_method") or declared.get("format") or "unnamed"
        details = ", ".join(f"{k}={declared[k]}" for k in ("fmt", "bits", "weight_block_size") if k in declared)
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with quant_method={method!r}{f' ({details})' if details else ''}; "
            f"Chitu has no linear method for {method!r} yet: use the unquantized (bf16) checkpoint, or a GGUF file")

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the linear layer whose checkpoint name is `prefix`."""
        return UNQUANTIZED
