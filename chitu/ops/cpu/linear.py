"""Rows times a weight as it is stored, on the CPU (linear_kernels.cpp, float32 sums): GGUF blocks
(ops/cpu/gguf.py), or plain float32 / bfloat16 rows, which torch's CPU matmul multiplies slowly at a few
rows, and bfloat16 at any number on CPUs without bfloat16 instructions (capability.py)."""
from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from chitu.ops.cpu.build import KernelBuildError, build
from chitu.ops.cpu.capability import NATIVE_BF16

logger = logging.getLogger(__name__)

PLAIN_FORMATS = {torch.float32: 0, torch.bfloat16: 30}  # weight_formats.h (ggml's type numbers)
# Past this many rows torch's matmul takes float32 weights (bench_cpu_kernels.py: the kernel is 2-4x faster from 2
# to 32 rows on weights larger than the caches, as fast on smaller ones up to 16, slower past that), and bfloat16
# ones on a CPU with bfloat16 instructions.
FLOAT32_MAX_ROWS = 16
NATIVE_BF16_MAX_ROWS = 8


@functools.cache
def kernels() -> ModuleType:
    """The compiled kernels: linear(rows [m, k] float32, weight rows [n, bytes] uint8 as stored, format) → [m, n]
    float32, and dequantize(GGUF rows, format, k) → [n, k] float32. KernelBuildError where they cannot be built."""
    return build("chitu_linear_cpu", "linear_kernels.cpp")


@functools.cache
def _plain_kernels() -> ModuleType | None:
    try:
        return kernels()
    except KernelBuildError as e:
        logger.warning("%s; float32 and bfloat16 projections run on torch's matmul instead (slower at small batches)", e)
        return None


def max_rows(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return FLOAT32_MAX_ROWS
    return NATIVE_BF16_MAX_ROWS if NATIVE_BF16 else float("inf")


def takes_plain(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a float32 or bfloat16 weight multiplies x here: CPU rows, not too many for the weight's dtype
    (capability.py), the kernels built."""
    return (x.device.type == "cpu" and weight.dtype in PLAIN_FORMATS and weight.dim() == 2 and weight.is_contiguous()
            and x.numel() // x.shape[-1] <= max_rows(weight.dtype) and _plain_kernels() is not None)


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for a float32 or bfloat16 weight, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    rows = rows if rows.dtype == torch.bfloat16 and bias is None else rows.float()  # a bias is added in float32
    out = _plain_kernels().linear(rows, weight.view(torch.uint8), PLAIN_FORMATS[weight.dtype], False)
    if bias is not None:
        out += bias
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
