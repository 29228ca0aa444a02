"""Which linear method each layer of a checkpoint gets, from its `quantization_config`.

Unquantized weights; FP8 block-quantized ones kept in fp8 (W8A8 on GPUs of compute capability 8.9+) or
dequantized at load (`infer.raise_lower_bit_float_to=bfloat16`; quant/fp8_block.py); GGUF tensors are
dequantized as they are read, or with quant=gguf kept in their blocks (quant/gguf_blocks.py); 4-bit AWQ
(GEMM) and GPTQ checkpoints keep their int4 groups (quant/int4_groups.py). A checkpoint declaring any other quantization, or settings of these that Chitu
has no kernel for, is refused with its name: loading its packed or fp8 tensors as plain weights, without
their scales, would serve garbage. `quant=w8a16 quant_on_load=True` quantizes an unquantized checkpoint's
linear layers to int8 as they load, and `quant=simple_w8a8` also its activations as they come (quant/int8.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from chitu.quant.awq_gptq import Int4Format
from chitu.quant.errors import UnsupportedQuantizationError
from chitu.quant.fp8_block import Fp8BlockDequantizedMethod, Fp8BlockMethod
from chitu.quant.gguf_blocks import GGUF_BLOCKS
from chitu.quant.int4_groups import Int4GroupsMethod
from chitu.quant.int8 import Int8DynamicActivationMethod, Int8WeightOnlyMethod
from chitu.quant.linear_method import UNQUANTIZED, LinearMethod

__all__ = ["QUANTIZE_ON_LOAD", "QuantConfig", "UnsupportedQuantizationError"]
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what to add to each stored zero


# quant=<name> quant_on_load=True: the method each name quantizes an unquantized checkpoint's linear layers to
QUANTIZE_ON_LOAD = {"w8a16": Int8WeightOnlyMethod, "simple_w8a8": Int8DynamicActivationMethod}


@dataclass(frozen=True)
class QuantConfig:
    """Per-layer linear methods; methods for quantized formats add their settings here."""

    method: LinearMethod = field(default=UNQUANTIZED)
    experts: LinearMethod | None = None  # the routed experts' method, when not `method`
    int8_lm_head: bool = False  # the int8 methods quantize the LM head too, as W8A16 (layers/embedding.py)
    lm_head: LinearMethod | None = None  # the LM head's method, when it keeps the checkpoint's format (GGUF)
    unquantized: tuple[str, ...] = ()  # modules a checkpoint keeps unquantized (AWQ/GPTQ modules_to_not_convert)

    @classmethod
    def gguf_blocks(cls) -> QuantConfig:
        """quant=gguf: dense layers, experts and the LM head multiply the file's blocks."""
        return cls(GGUF_BLOCKS, lm_head=GGUF_BLOCKS)

    @classmethod
    def from_checkpoint(cls, config: PretrainedConfig, raise_lower_bit_float_to: str = "float8_e4m3fn",
                        quantize_on_load: str | None = None, device: torch.device | None = None) -> QuantConfig:
        """raise_lower_bit_float_to: `bfloat16` dequantizes fp8 weights at load; the default keeps them fp8
        (on `device`, the default device unless given: GPUs with e4m3 tensor cores only).
        quantize_on_load: the method (QUANTIZE_ON_LOAD) that quantizes an unquantized checkpoint as it loads."""
        declared = getattr(config, "quantization_config", None)
        if quantize_on_load:
            return cls._on_load(config, quantize_on_load, declared)
        if not declared:
            return cls()
        declared = declared if isinstance(declared, dict) else declared.to_dict()
        method = declared.get("quant_method") or declared.get("format") or "unnamed"
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        if method in ("awq", "gptq"):
            return cls._int4_groups(config, method, declared)
        details = ", ".join(f"{k}={declared[k]}" for k in ("fmt", "bits", "weight_block_size") if k in declared)
        if method == "fp8" and declared.get("weight_block_size"):
            block = tuple(declared["weight_block_size"])
            if raise_lower_bit_float_to == "bfloat16":
                return cls(Fp8BlockDequantizedMethod(block))
            _check_fp8_device(details, device or torch.get_default_device())
            return cls(Fp8BlockMethod(block))
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with quant_method={method!r}{f' ({details})' if details else ''}; "
            f"Chitu has no linear method for {method!r} yet: use the unquantized (bf16) checkpoint, or a GGUF file")

    @classmethod
    def _int4_groups(cls, config: PretrainedConfig, method: str, declared: dict) -> QuantConfig:
        bits = declared.get("bits", declared.get("w_bit"))
        group_size = declared.get("group_size", declared.get("q_group_size", 128))
        if bits != 4:
            raise UnsupportedQuantizationError(f"the checkpoint is {method.upper()}-quantized with bits={bits}; "
                                               f"Chitu runs 4-bit AWQ and GPTQ checkpoints only")
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise UnsupportedQuantizationError(f"{method.upper()} group_size={group_size!r}: a positive number of "
                                               f"input rows, or -1 for one group of all of them, is expected")
        if getattr(config, "kv_lora_rank", None):
            raise UnsupportedQuantizationError(f"{method.upper()} checkpoints are not built for multi-head latent "
                                               "attention (DeepSeek-V2/V3) yet: its projections are folded as dense weights")
        unquantized = tuple(declared.get("modules_to_not_convert") or ())
        if method == "awq":
            return cls(Int4GroupsMethod(cls._awq_format(declared, group_size), act_order=False), unquantized=unquantized)
        return cls(Int4GroupsMethod(cls._gptq_format(declared, group_size), bool(declared.get("desc_act"))),
                   unquantized=unquantized)

    @staticmethod
    def _awq_format(declared: dict, group_size: int) -> Int4Format:
        version = str(declared.get("version") or declared.get("format") or "gemm").lower()
        if version != "gemm":
            raise UnsupportedQuantizationError(f"the checkpoint is AWQ version={version!r}; Chitu reads AWQ's GEMM "
                                               f"packing only (AutoAWQ version='gemm')")
        if not declared.get("zero_point", True):
            raise UnsupportedQuantizationError("the checkpoint is AWQ with zero_point=false; Chitu reads AWQ "
                                               "checkpoints with zero points only")
        return Int4Format("awq", group_size)

    @staticmethod
    def _gptq_format(declared: dict, group_size: int) -> Int4Format:
        checkpoint_format = str(declared.get("checkpoint_format") or declared.get("format") or "gptq").lower()
        if checkpoint_format not in GPTQ_FORMATS:
            raise UnsupportedQuantizationError(f"the checkpoint is GPTQ with checkpoint_format={checkpoint_format!r}; "
                                               f"Chitu reads {' and '.join(map(repr, GPTQ_FORMATS))}")
        for key in ("lm_head", "dynamic"):
            if declared.get(key):
                raise UnsupportedQuantizationError(f"the checkpoint is GPTQ with {key}={declared[key]!r}; Chitu reads "
                                                   f"GPTQ checkpoints with one setting for all decoder layers and an "
                                                   f"unquantized LM head")
        return Int4Format("gptq", group_size, sym=bool(declared.get("sym", True)),
                          zero_offset=GPTQ_FORMATS[checkpoint_format])

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
        if any(f".{module}." in f".{prefix}." for module in self.unquantized):
            return UNQUANTIZED
        if self.experts is not None and prefix.rpartition(".")[0].endswith("experts"):
            return self.experts
        return self.method


FP8_CAPABILITY = (8, 9)  # e4m3 tensor cores: Ada and Hopper on


def _check_fp8_device(details: str, device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY:
        return
    where = ("the CPU" if device.type == "cpu" else
             f"this GPU (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
             if device.type == "cuda" else f"device={device.type}")
    raise UnsupportedQuantizationError(
        f"the checkpoint is FP8 block-quantized ({details}); its fp8 weights run as W8A8 on GPUs of compute "
        f"capability {'.'.join(map(str, FP8_CAPABILITY))} or later, not on {where}: set "
        f"infer.raise_lower_bit_float_to=bfloat16 to dequantize them at load")
