"""Tensor-parallel linear layers, reading only their rank's slice of each checkpoint matrix.

ColumnParallelLinear splits the output features: merged Q/K/V and gate/up stack a slice of several
checkpoint matrices. RowParallelLinear splits the input features and sums the ranks' partial
products. With tp_size=1 both are plain linears over whole matrices. How the weight is stored and
multiplied is the layer's LinearMethod (chitu/quant/linear_method.py); biases stay dense.
"""
from __future__ import annotations

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.distributed.comm import tp_all_reduce
from chitu.distributed.sharding import Span
from chitu.layers.loadable import copy_into, sibling
from chitu.layers.norm import PendingNorm
from chitu.quant.linear_method import UNQUANTIZED, LinearMethod


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), where W stacks, for each (source, span) of `parts`, rows `span` of checkpoint
    matrix `source`: the name of a sibling module ("q_proj" next to "qkv_proj"), None for the layer's own.
    """

    def __init__(self, in_features: int, parts: list[tuple[str | None, Span]], bias: bool = False,
                 dtype: torch.dtype | None = None, method: LinearMethod = UNQUANTIZED):
        super().__init__()
        self.parts = parts
        self.out_splits = [span.length for _, span in parts]
        self.method = method
        method.create_weights(self, sum(self.out_splits), in_features, dtype)
        self.bias = nn.Parameter(torch.empty(sum(self.out_splits), dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        if isinstance(x, PendingNorm):
            return self.method.apply_normed(self, x, self.bias)
        return self.method.apply(self, x, self.bias)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        sources = [(sibling(prefix, source) if source else prefix, Shard(0, span.start, span.length))
                   for source, span in self.parts]
        self.method.load(self, reader, sources)
        if self.bias is not None:
            rows = [reader.read(f"{name}.bias", self.bias.dtype, self.bias.device, shard) for name, shard in sources]
            copy_into(self.bias, torch.cat(rows), f"{prefix}.bias")


class RowParallelLinear(nn.Module):
    """y = all-reduce(x_r W_r^T) + b: this rank holds the input columns `in_span` of W. With
    reduce_results=False the partial product x_r W_r^T is returned (no bias), for the caller to sum."""

    def __init__(self, in_span: Span, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 method: LinearMethod = UNQUANTIZED, reduce_results: bool = True):
        super().__init__()
        if bias and not reduce_results:
            raise ValueError("a row-parallel linear with a bias must reduce its results")
        self.in_span = in_span
        self.reduce_results = reduce_results
        self.method = method
        method.create_weights(self, out_features, in_span.length, dtype)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduced(self.method.apply(self, x))

    def forward_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """forward(silu(gate) * up) for gate_up = [gate | up] [T, 2 in], the activation folded into the
        product where the method can."""
        return self._reduced(self.method.apply_gated(self, gate_up))

    def _reduced(self, y: torch.Tensor) -> torch.Tensor:
        if not self.reduce_results:
            return y
        y = tp_all_reduce(y)
        return y if self.bias is None else y + self.bias

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        self.method.load(self, reader, [(prefix, Shard(1, self.in_span.start, self.in_span.length))])
        if self.bias is not None:
            copy_into(self.bias, reader.read(f"{prefix}.bias", self.bias.dtype, self.bias.device), f"{prefix}.bias")
