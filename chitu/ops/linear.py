"""Matrix products the layers do not leave to F.linear."""
import torch
import torch.nn.functional as F

from chitu.ops import triton as triton_ops

if triton_ops.AVAILABLE:
    from chitu.ops.triton import gemv as kernels


def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T in float32 for a float32 weight (the MoE router), whatever x's dtype. A single row on CUDA
    takes one Triton GEMV launch, where x.float() and cuBLAS's split GEMV take three."""
    if x.shape[0] == 1 and triton_ops.enabled(x):
        return kernels.gemv(x, weight, out=torch.empty(1, weight.shape[0], dtype=torch.float32, device=x.device))
    return F.linear(x.float(), weight)


def wide_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for a matrix as wide as a vocabulary; a single row on CUDA goes through the Triton GEMV
    (benchmarks/bench_kernels.py on an H100: 354 µs against cuBLAS's 382 µs for a 128256 x 4096 LM
    head; no faster for the decoder's own, smaller projections, which therefore stay on F.linear)."""
    if x.shape[0] == 1 and triton_ops.enabled(x):
        return kernels.gemv(x, weight)
    return F.linear(x, weight)
