"""Int8 weights with one scale per output channel (symmetric): W8A16 keeps activations in the compute
dtype; W8A8 (`simple_w8a8`) quantizes them too, per token as they come, for an int8 GEMM.

`quant=w8a16 quant_on_load=True` (or quant=simple_w8a8) quantizes every linear layer's weight (dense projections and MoE
experts; not the embedding or the routers) as the checkpoint is read, and the LM head once it is loaded. Each scale is rounded
to the compute dtype before the weight is divided by it, so q * scale is exactly the weight the
kernel multiplies: the dequantized reference is exact. On the CPU, bf16/fp16 activations take torch's
int8 weight-only kernel (`_weight_int8pack_mm`: ~3x the rows per second of a bf16 matmul at one row on
AVX2); float32 activations multiply the dequantized weight (exact, not faster). W8A8 multiplies int8
by int8 into int32 exactly (torch._int_mm), then applies both scales; the LM head stays W8A16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.layers.loadable import copy_into
from chitu.ops import linear as linear_ops
from chitu.ops import triton as triton_ops
from chitu.ops.cpu import moe as cpu_moe
from chitu.quant.grouped_codes import GroupedCodes
from chitu.quant.linear_method import LinearMethod


CPU_KERNEL_MAX_ROWS = 16
CUDA_INT_MM_MIN_ROWS = 16  # torch._int_mm on CUDA needs more rows than this


def quantize_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, scale [rows] in scale_dtype) with weight ≈ q * scale[:, None] to about scale / 2."""
    weight = weight.float()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = (weight / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[..., None]


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (q * scale)^T in x's dtype. On CUDA the Triton kernels read the int8 rows (ops/triton/grouped_codes.py)."""
    if _cpu_kernel_takes(x, q):
        x = x.contiguous()
        if x.data_ptr() % 64:
            x = x.clone()  # a fresh allocation is aligned
        return torch.ops.aten._weight_int8pack_mm(x, q, scale.to(x.dtype))
    if triton_ops.enabled(x) and q.shape[1] % 32 == 0:
        return linear_ops.grouped_codes_linear(x, GroupedCodes.from_int8(q, scale))
    return F.linear(x, dequantize(q, scale).to(x.dtype))


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (q * scale)^T in x's dtype, x quantized per row (its absmax / 127) as it comes; the int32 sums
    are exact, so the result is the product of the two dequantized operands up to float32 rounding."""
    x_q, x_scale = quantize_per_channel(x.reshape(-1, x.shape[-1]), torch.float32)
    rows = x_q.shape[0]
    if x_q.is_cuda and rows <= CUDA_INT_MM_MIN_ROWS:  # cuBLAS's int8 GEMM takes more rows: pad with zeros
        x_q = F.pad(x_q, (0, 0, 0, CUDA_INT_MM_MIN_ROWS + 1 - rows))
    product = torch._int_mm(x_q, q.t())[:rows].float() * x_scale[:, None] * scale.float()
    return product.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def _cpu_kernel_takes(x: torch.Tensor, q: torch.Tensor) -> bool:
    """torch's CPU kernel steps through a row 16 values at a time with aligned vector loads (8 on AVX2):
    rows of other widths give garbage or crash it (seen on AVX2 with widths not a multiple of 8). It
    multiplies one row at a time: past CPU_KERNEL_MAX_ROWS rows (a prefill) dequantizing the weight and
    one bf16 matmul are faster (1536x576: 172 against 143 us at 16 rows, 700 against ~170 at 64)."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and x.shape[0] <= CPU_KERNEL_MAX_ROWS and q.shape[1] % 16 == 0 and q.is_contiguous())


@dataclass(frozen=True)
class Int8ExpertStack:
    """Stacked int8 experts [E, out, in] with scales [E, out], and each expert's views of them (made once:
    a decode step multiplies hundreds of experts one by one, and indexing the stacks each time shows)."""
    q: torch.Tensor
    scale: torch.Tensor
    experts: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    weight_only: bool

    @classmethod
    def of(cls, q: torch.Tensor, scale: torch.Tensor, linear, weight_only: bool) -> Int8ExpertStack:
        return cls(q, scale, tuple(zip(q.unbind(0), scale.unbind(0))), linear, weight_only)

    @property
    def cpu_kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """What the CPU MoE kernel reads (ops/cpu/moe.py): it multiplies activations as they are, so W8A16 only."""
        return (self.q, self.scale, cpu_moe.INT8) if self.weight_only and self.q.is_contiguous() else None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def expert_linear(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, *self.experts[expert])


class Int8WeightOnlyMethod(LinearMethod):
    linear = staticmethod(int8_linear)
    weight_only = True

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype,
                       num_experts: int | None = None) -> None:
        rows = (out_features,) if num_experts is None else (num_experts, out_features)
        layer.weight = nn.Parameter(torch.empty(*rows, in_features, dtype=torch.int8), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(rows, dtype=dtype), requires_grad=False)

    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        weight = layer.weight if expert is None else layer.weight[expert]
        scale = layer.weight_scale if expert is None else layer.weight_scale[expert]
        rows = [reader.read(f"{prefix}.weight", torch.float32, weight.device, shard) for prefix, shard in parts]
        q, s = quantize_per_channel(torch.cat(rows), scale.dtype)
        copy_into(weight, q, f"{parts[0][0]}.weight")
        copy_into(scale, s, f"{parts[0][0]}.weight_scale")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear(x, layer.weight, layer.weight_scale)
        return y if bias is None else y + bias

    def stacked(self, layer: nn.Module) -> Int8ExpertStack:
        stack = getattr(layer, "_int8_stack", None)
        if stack is None or stack.q is not layer.weight:
            stack = layer._int8_stack = Int8ExpertStack.of(layer.weight, layer.weight_scale, self.linear,
                                                             self.weight_only)
        return stack


class Int8DynamicActivationMethod(Int8WeightOnlyMethod):
    """W8A8 (simple_w8a8): the weights of W8A16, activations quantized per token for an int8 GEMM."""
    linear = staticmethod(w8a8_linear)
    weight_only = False
