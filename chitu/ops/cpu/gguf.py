"""GGUF blocks multiplied as they are stored, on the CPU (linear_kernels.cpp)."""
from __future__ import annotations

import functools

import torch

from chitu.ops.cpu import linear as cpu_linear
from chitu.ops.cpu.build import KernelBuildError

FORMATS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}  # the types the kernels take, ggml's numbers
VALUES_PER_BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256}  # the others: 32
# Up to this many rows the kernel (eight rows per decoded block) beats dequantizing; more (a prefill) multiply the
# dequantized matrix in one float32 GEMM.
KERNEL_MAX_ROWS = 24
# bfloat16 rows meet the blocks decoded into bfloat16 tiles (linear_bf16_tiles, on CPUs with AVX-512 BF16) from this
# many rows on, and from TILES_MIN_ROWS_SMALL on where the weight holds at most SMALL_WEIGHT values: decoding a tile
# costs as much as a few rows' integer dots, which stream a large weight (an LM head) faster (bench_cpu_kernels.py).
TILES_MIN_ROWS = 9
TILES_MIN_ROWS_SMALL = 4
SMALL_WEIGHT = 1 << 22


@functools.cache
def kernels():
    """The compiled kernels (ops/cpu/linear.py); where they cannot be built, an error that says what to do."""
    try:
        return cpu_linear.kernels()
    except KernelBuildError as e:
        raise KernelBuildError(f"quant=gguf needs its CPU kernels (or drop quant=gguf to dequantize the file at "
                               f"load): {e}") from e


def takes(qtype: str, in_features: int) -> bool:
    return qtype in FORMATS and in_features % VALUES_PER_BLOCK.get(qtype, 32) == 0


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """x [..., k] times the GGUF rows blocks [n, bytes], transposed → [..., n] in x's dtype (float32 sums). A few
    rows in float32 meet the blocks decoded to floats; in a narrower dtype (bf16: 8 bits of precision already)
    they are quantized to Q8_0 and meet the blocks' codes in integer dots, as llama.cpp's do, which is faster; many
    bf16 rows meet the blocks decoded to bf16, as the file dequantized at load would multiply them."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    kernel, code = kernels(), FORMATS[qtype]
    if x.dtype == torch.bfloat16 and takes_tiles(rows.shape[0], blocks.shape[0] * x.shape[-1]):
        out = kernel.linear_bf16_tiles(rows, blocks, code)
    elif rows.shape[0] <= KERNEL_MAX_ROWS:
        out = kernel.linear(rows if x.dtype == torch.bfloat16 else rows.float(), blocks, code, x.dtype != torch.float32)
    else:
        out = rows.float() @ dequantize(blocks, qtype, x.shape[-1]).T
    out = out if out.dtype == x.dtype else out.to(x.dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], blocks.shape[0])


def takes_tiles(rows: int, weight_values: int) -> bool:
    return rows >= (TILES_MIN_ROWS_SMALL if weight_values <= SMALL_WEIGHT else TILES_MIN_ROWS) and bf16_tiles()


@functools.cache
def bf16_tiles() -> bool:
    return kernels().bf16_tiles()


def dequantize(blocks: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    return kernels().dequantize(blocks, FORMATS[qtype], in_features)
