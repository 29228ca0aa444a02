"""RMSNorm layer."""
from __future__ import annotations

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader
from chitu.layers.loadable import copy_into
from chitu.ops import norm as norm_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rms_norm(x), or with a residual: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return norm_ops.rms_norm(x, self.weight, self.eps)
        return norm_ops.add_rms_norm(x, residual, self.weight, self.eps)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        name = f"{prefix}.weight"
        copy_into(self.weight, reader.read(name, self.weight.dtype, self.weight.device), name)
