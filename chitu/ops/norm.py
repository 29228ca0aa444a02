"""RMSNorm, alone or fused with the residual add that precedes it."""
import torch

from chitu.ops.torch_ref import norm as ref


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return ref.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    return ref.add_rms_norm(x, residual, weight, eps)
