"""Tensor-parallel linear layers, reading only their rank's slice of each checkpoint matrix.

ColumnParallelLinear splits the output features: merged Q/K/V and gate/up stack a slice of several
checkpoint matrices. RowParallelLinear splits the input features and sums the ranks' partial
products. With tp_size=1 both are plain linears over whole matrices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.distributed.comm import tp_all_reduce
from chitu.distributed.sharding import Span
from chitu.layers.loadable import copy_into, sibling


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), where W stacks, for each (source, span) of `parts`, rows `span` of checkpoint
    matrix `source`: the name of a sibling module ("q_proj" next to "qkv_proj"), None for the layer's own.
    """

    def __init__(self, in_features: int, parts: list[tuple[str | None, Span]], bias: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.parts = parts
        self.out_splits = [span.length for _, span in parts]
        self.weight = nn.Parameter(torch.empty(sum(self.out_splits), in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.out_splits), dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        copy_into(self.weight, self._read_stacked(reader, prefix, "weight"), f"{prefix}.weight")
        if self.bias is not None:
            copy_into(self.bias, self._read_stacked(reader, prefix, "bias"), f"{prefix}.bias")

    def _read_stacked(self, reader: CheckpointReader, prefix: str, kind: str) -> torch.Tensor:
        dtype, device = self.weight.dtype, self.weight.device
        rows = [reader.read(f"{sibling(prefix, source) if source else prefix}.{kind}", dtype, device,
                            Shard(0, span.start, span.length)) for source, span in self.parts]
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


class RowParallelLinear(nn.Module):
    """y = all-reduce(x_r W_r^T) + b: this rank holds the input columns `in_span` of W."""

    def __init__(self, in_span: Span, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_span = in_span
        self.weight = nn.Parameter(torch.empty(out_features, in_span.length, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tp_all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        span, dtype, device = self.in_span, self.weight.dtype, self.weight.device
        weight = reader.read(f"{prefix}.weight", dtype, device, Shard(1, span.start, span.length))
        copy_into(self.weight, weight, f"{prefix}.weight")
        if self.bias is not None:
            copy_into(self.bias, reader.read(f"{prefix}.bias", dtype, device), f"{prefix}.bias")
