"""Linear layers whose weight may stack several checkpoint matrices (merged Q/K/V, gate/up)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader
from chitu.layers.loadable import copy_into, sibling


class Linear(nn.Module):
    """y = x W^T (+ b), where W stacks the checkpoint matrices `sources` along the output dimension.

    `sources` are names of sibling modules in the checkpoint (["q_proj", "k_proj", "v_proj"]);
    None means the layer's own name.
    """

    def __init__(self, in_features: int, out_features: list[int] | int, bias: bool = False,
                 sources: list[str] | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.out_splits = [out_features] if isinstance(out_features, int) else list(out_features)
        self.sources = sources
        self.weight = nn.Parameter(torch.empty(sum(self.out_splits), in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.out_splits), dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        names = [sibling(prefix, s) for s in self.sources] if self.sources else [prefix]
        copy_into(self.weight, self._read_stacked(reader, names, "weight"), f"{prefix}.weight")
        if self.bias is not None:
            copy_into(self.bias, self._read_stacked(reader, names, "bias"), f"{prefix}.bias")

    def _read_stacked(self, reader: CheckpointReader, names: list[str], kind: str) -> torch.Tensor:
        dtype = self.weight.dtype
        parts = [reader.read(f"{name}.{kind}", dtype, self.weight.device) for name in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
