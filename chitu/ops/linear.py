"""Matrix products the layers do not leave to F.linear."""
import torch
import torch.nn.functional as F

from chitu.ops import triton as triton_ops
from chitu.ops.cpu import linear as cpu_kernels
from chitu.ops.torch_ref import fp8 as ref_fp8
from chitu.quant.grouped_codes import GroupedCodes

if triton_ops.AVAILABLE:
    from chitu.ops.triton import fp8_gemm
    from chitu.ops.triton import gemv as kernels
    from chitu.ops.triton import grouped_codes as codes_kernels


def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T in float32 for a float32 weight (the MoE router), whatever x's dtype. A single row on CUDA
    takes one Triton GEMV launch, where x.float() and cuBLAS's split GEMV take three."""
    if x.shape[0] == 1 and triton_ops.enabled(x):
        return kernels.gemv(x, weight, out=torch.empty(1, weight.shape[0], dtype=torch.float32, device=x.device))
    return F.linear(x.float(), weight)


def _single_row_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] == 1 and weight.stride(-1) == 1 and triton_ops.enabled(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b). A single row on CUDA (a batch-1 decode step) takes the Triton GEMV, which streams
    the weight nearer the copy rate than cuBLAS does (benchmarks/bench_kernels.py, "gemv" rows); a few
    rows of a bfloat16 weight on the CPU the C++ kernel (ops/cpu/linear.py)."""
    if bias is None and _single_row_gemv(x, weight):
        return kernels.gemv(x, weight)
    if cpu_kernels.takes_plain(x, weight):
        return cpu_kernels.plain_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, out_dtype: torch.dtype | None = None) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(normed W^T, normed, x + residual) with normed = rms_norm(x + residual), in one launch for a
    single row on CUDA (the Triton GEMV normalises the row itself); None elsewhere."""
    if not (_single_row_gemv(x, weight) and norm_weight.dtype == x.dtype):
        return None
    out = torch.empty(1, weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    return kernels.norm_gemv(x, residual, norm_weight, eps, weight, out=out)


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """(silu(gate) * up) W^T for gate_up = [gate | up], in one launch for a single row on CUDA (the Triton
    GEMV applies the activation as it reads the row); None elsewhere."""
    if not _single_row_gemv(gate_up, weight):
        return None
    return kernels.gated_gemv(gate_up, weight)


def grouped_codes_linear(x: torch.Tensor, weight: GroupedCodes) -> torch.Tensor:
    """x W^T for quantized rows in quant/grouped_codes.py's layout: the Triton kernels read them as stored on
    CUDA; elsewhere the dequantized rows are multiplied."""
    if triton_ops.enabled(x):
        return codes_kernels.grouped_codes_linear(x, weight)
    return F.linear(x, weight.dequantize().to(x.dtype))


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int]) -> torch.Tensor:
    """x W^T in x's dtype for an e4m3 weight with block multipliers (quant/fp8_block.py), as W8A8: the Triton
    GEMM on CUDA, the reference (both operands dequantized) elsewhere."""
    if triton_ops.enabled(x) and x.dtype in (torch.bfloat16, torch.float16) and block[1] == 128:
        return fp8_gemm.block_fp8_linear(x, weight, scale_inv, block)
    return ref_fp8.block_fp8_linear(x, weight, scale_inv, block)
