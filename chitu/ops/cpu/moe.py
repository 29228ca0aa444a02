"""The routed experts of an MoE layer over a decode step's few tokens on the CPU, in one call
(moe_kernels.cpp), their weights read as stored: float32, bfloat16, int8 with per-row scales (W8A16), GGUF blocks
(quant=gguf; bf16 activations meet them quantized to Q8_0, as in ops/cpu/gguf.py). Where the kernels cannot be built
(no compiler), the torch reference runs instead, after one warning."""
from __future__ import annotations

import functools
import logging

import torch

from chitu.ops.cpu import gguf as gguf_ops
from chitu.ops.cpu.build import KernelBuildError, build
from chitu.ops.cpu.capability import NATIVE_BF16

logger = logging.getLogger(__name__)

F32, BF16, INT8 = 0, 30, 24  # weight_formats.h (ggml's type numbers)
PLAIN_FORMATS = {torch.float32: F32, torch.bfloat16: BF16}
# Up to this many tokens the kernel beats the reference's grouped float32 matmuls (benchmarks/bench_cpu_kernels.py:
# 37 against 57 ms at 128 tokens, even at 256); bfloat16 and int8 experts it takes at any number where the CPU has no
# bfloat16 instructions (3x faster than torch at 64 to 256 tokens), up to 32 where it has.
FLOAT32_MAX_TOKENS = 128
NATIVE_BF16_MAX_TOKENS = 32
# GGUF blocks: no expert meets more rows than there are tokens, so up to the dense layers' bound every expert is in the
# kernel's range; past it the reference multiplies each expert's dequantized blocks where it has many rows.
BLOCKS_MAX_TOKENS = gguf_ops.KERNEL_MAX_ROWS
BLOCK_FORMATS = frozenset(gguf_ops.FORMATS.values())


@functools.cache
def _kernels():
    try:
        return build("chitu_moe_cpu", "moe_kernels.cpp")
    except KernelBuildError as e:
        logger.warning("%s; MoE experts run on the torch reference instead (slower at small batches)", e)
        return None


def operands(stack) -> tuple[torch.Tensor, torch.Tensor | None, int] | None:
    """(weights, int8 scales or None, format) of stacked experts the kernel reads, or None: a dense
    [E, out, in] tensor, or quantized experts offering `cpu_kernel_operands` (quant/int8.py, quant/gguf_blocks.py)."""
    if isinstance(stack, torch.Tensor):
        format = PLAIN_FORMATS.get(stack.dtype)
        return None if format is None or not stack.is_contiguous() else (stack, None, format)
    return getattr(stack, "cpu_kernel_operands", None)


def max_tokens(dtype: torch.dtype, formats: tuple[int, ...] = ()) -> float:
    """The most tokens the kernel takes in x's dtype over weights of these formats."""
    if any(f in BLOCK_FORMATS for f in formats):
        return BLOCKS_MAX_TOKENS
    if dtype == torch.float32:
        return FLOAT32_MAX_TOKENS
    return NATIVE_BF16_MAX_TOKENS if NATIVE_BF16 else float("inf")


def takes(x: torch.Tensor, gate_up, down) -> bool:
    """Whether the kernel runs these experts on x: few CPU tokens, weights in a format it reads, the kernels built."""
    if x.device.type != "cpu" or x.dim() != 2:
        return False
    stacks = operands(gate_up), operands(down)
    if None in stacks or x.shape[0] > max_tokens(x.dtype, tuple(stack[2] for stack in stacks)):
        return False
    return _kernels() is not None

def fused_experts(x: torch.Tensor, gate_up, down, weights: torch.Tensor, ids: torch.Tensor,
                  first_expert: int) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the experts held here (see torch_ref.moe), in x's dtype."""
    out = _kernels().fused_experts(x.float().contiguous(), *operands(gate_up), *operands(down),
                                   weights.float().contiguous(), ids.long().contiguous(), first_expert,
                                   x.dtype != torch.float32)
    return out.to(x.dtype)
