"""Rotary position embedding, neox (halves) or interleaved (pairs) style, optionally partial."""
import torch

from chitu.ops.torch_ref import rotary as ref


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return ref.apply_rotary(x, cos, sin, interleaved)
