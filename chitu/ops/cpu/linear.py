"""Rows times a weight as it is stored, on the CPU (linear_kernels.cpp, float32 sums): GGUF blocks
(ops/cpu/gguf.py), or plain bfloat16 rows, which torch's CPU matmul multiplies slowly on CPUs without
bfloat16 instructions (capability.py)."""
from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from chitu.ops.cpu.build import KernelBuildError, build
from chitu.ops.cpu.capability import NATIVE_BF16

logger = logging.getLogger(__name__)

BF16 = 30  # weight_formats.h (ggml's type numbers)
# On a CPU with bfloat16 instructions torch's matmul takes plain bfloat16 weights past this many rows.
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
        logger.warning("%s; bfloat16 projections run on torch's matmul instead (slower at small batches)", e)
        return None


def takes_plain(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a bfloat16 weight multiplies x here (capability.py): CPU rows, a few of them where the CPU has
    bfloat16 instructions, the kernels built."""
    few = not NATIVE_BF16 or x.numel() // x.shape[-1] <= NATIVE_BF16_MAX_ROWS
    return (x.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.is_contiguous()
            and few and _plain_kernels() is not None)


def plain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for a bfloat16 weight, in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out = _plain_kernels().linear(rows, weight.view(torch.uint8), BF16)
    if bias is not None:
        out += bias
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
