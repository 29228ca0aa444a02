"""RMSNorm layer, and a norm left for its first reader to fold into its projection."""
from __future__ import annotations

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader
from chitu.layers.loadable import copy_into
from chitu.ops import linear as linear_ops
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


class PendingNorm:
    """rms_norm(x + residual) (or of x alone), computed by whoever reads it first. A projection reading
    it first may fold the norm into its single-row GEMV (ops.linear.norm_linear: one launch in a
    batch-1 decode step instead of two); every other reader takes `normed`. A layer that accepts one
    says so with `takes_pending_norm = True` and reads its input only through `project` and `normed`."""

    def __init__(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        self.norm, self.x, self.residual = norm, x, residual
        self._normed: torch.Tensor | None = None
        self._summed: torch.Tensor | None = None

    def project(self, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """normed @ weight^T with the norm folded in, when this is the first read and the fused GEMV
        applies; None otherwise (the caller multiplies `normed`)."""
        if self._normed is not None:
            return None
        fused = linear_ops.norm_linear(self.x, self.residual, self.norm.weight, self.norm.eps, weight, out_dtype)
        if fused is None:
            return None
        out, self._normed, self._summed = fused
        return out

    @property
    def normed(self) -> torch.Tensor:
        if self._normed is None:
            if self.residual is None:
                self._normed, self._summed = self.norm(self.x), self.x
            else:
                self._normed, self._summed = self.norm(self.x, self.residual)
        return self._normed

    @property
    def summed(self) -> torch.Tensor:
        """x + residual, the residual stream after this norm (x itself without a residual)."""
        self.normed  # noqa: B018 (computes both when nobody has read the norm)
        return self._summed
