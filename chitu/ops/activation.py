"""Gated activations of the MLP."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.cpu import decode as cpu_kernels
from chitu.ops.torch_ref import activation as ref

if triton_ops.AVAILABLE:
    from chitu.ops.triton import activation as kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] for x of width 2n."""
    if triton_ops.enabled(x):
        return kernels.silu_and_mul(x)
    if cpu_kernels.enabled(x):
        return cpu_kernels.silu_and_mul(x)
    return ref.silu_and_mul(x)
