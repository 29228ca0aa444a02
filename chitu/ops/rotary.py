"""Rotary position embedding, neox (halves) or interleaved (pairs) style, optionally partial, optionally
after a per-head RMSNorm (see torch_ref.rotary)."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.cpu import decode as cpu_kernels
from chitu.ops.torch_ref import rotary as ref
from chitu.ops.torch_ref.rotary import HeadNorm

if triton_ops.AVAILABLE:
    from chitu.ops.triton import rotary as kernels


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 norm: HeadNorm | None = None) -> torch.Tensor:
    if triton_ops.enabled(x):
        return kernels.apply_rotary(x, cos, sin, interleaved, norm=norm)
    if norm is None and x.stride(-1) == 1 and cos.dtype == torch.float32 and cpu_kernels.enabled(cos):
        return cpu_kernels.apply_rotary(x, cos, sin, interleaved)
    return ref.apply_rotary(x, cos, sin, interleaved, norm)
