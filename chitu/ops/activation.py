"""Gated activations of the MLP."""
import torch

from chitu.ops.torch_ref import activation as ref


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :n]) * x[..., n:] for x of width 2n."""
    return ref.silu_and_mul(x)
