"""GGUF blocks multiplied as they are stored, on the CPU: gguf_kernels.cpp, compiled for this machine
(-march=native) the first time a process needs it and cached by torch (TORCH_EXTENSIONS_DIR)."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from chitu.errors import UserError

logger = logging.getLogger(__name__)

FORMATS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}  # the types the kernels take, ggml's numbers
VALUES_PER_BLOCK = {"Q4_K": 256, "Q6_K": 256}  # the others: 32
# Up to this many rows the kernel (eight rows per decoded block) beats dequantizing; more (a prefill) multiply the
# dequantized matrix in one float32 GEMM.
KERNEL_MAX_ROWS = 24


class KernelBuildError(UserError):
    pass


@functools.cache
def _kernels():
    logger.info("compiling the GGUF CPU kernels for this machine (once; cached by torch)")
    try:
        return load(name="chitu_gguf_cpu", sources=[str(Path(__file__).with_name("gguf_kernels.cpp"))],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError) as e:  # no compiler, no ninja, a failed build
        raise KernelBuildError(f"quant=gguf needs its CPU kernels built, which failed (a C++ compiler and ninja "
                               f"are needed; or drop quant=gguf to dequantize the file at load): {e}") from e


def takes(qtype: str, in_features: int) -> bool:
    return qtype in FORMATS and in_features % VALUES_PER_BLOCK.get(qtype, 32) == 0


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """x [..., k] times the GGUF rows blocks [n, bytes], transposed → [..., n] in x's dtype (float32 inside)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if rows.shape[0] <= KERNEL_MAX_ROWS:
        out = _kernels().gguf_linear(rows, blocks, FORMATS[qtype])
    else:
        out = rows @ dequantize(blocks, qtype, x.shape[-1]).T
    return out.to(x.dtype).view(*x.shape[:-1], blocks.shape[0])


def dequantize(blocks: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    return _kernels().gguf_dequantize(blocks, FORMATS[qtype], in_features)
