"""Rotary position embedding, neox (halves) or interleaved (pairs) style, optionally partial, optionally
after a per-head RMSNorm (see torch_ref.rotary)."""
import torch

from chitu.ops import triton as triton_ops
from chitu.ops.torch_ref import rotary as ref

if triton_ops.AVAILABLE:
    from chitu.ops.triton import rotary as kernels

HeadNorm = tuple[torch.Tensor, torch.Tensor, int, float]  # (weight of heads < split, of the others, split, eps)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                 norm: HeadNorm | None = None) -> torch.Tensor:
    if triton_ops.enabled(x):
        return kernels.apply_rotary(x, cos, sin, interleaved, norm=norm)
    return ref.apply_rotary(x, cos, sin, interleaved, norm)
