"""RMSNorm, alone or fused with the residual add that precedes it."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.cpu import decode as cpu_kernels
from chitu.ops.torch_ref import norm as ref

if triton_ops.AVAILABLE:
    from chitu.ops.triton import norm as kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if triton_ops.enabled(x):
        return kernels.rms_norm(x, weight, eps)
    if cpu_kernels.enabled(x) and weight.dtype == x.dtype:
        return cpu_kernels.rms_norm(x, weight, eps)
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    if triton_ops.enabled(x):
        return kernels.add_rms_norm(x, residual, weight, eps)
    if cpu_kernels.enabled(x) and residual.is_contiguous() and weight.dtype == x.dtype == residual.dtype:
        return cpu_kernels.add_rms_norm(x, residual, weight, eps)
    return ref.add_rms_norm(x, residual, weight, eps)
