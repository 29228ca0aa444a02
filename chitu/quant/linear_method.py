"""How a linear layer's weight is stored, loaded from the checkpoint and applied to activations.

A linear layer decides which slices of which checkpoint matrices it holds (its sharding); its
LinearMethod decides the rest. Methods for quantized formats (FP8 with block scales, GGUF blocks,
int8, AWQ/GPTQ) keep their raw tensors and scales (CheckpointReader.read_raw) and apply them with
their own kernels; the unquantized method holds a dense matrix in the compute dtype.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.layers.loadable import copy_into
from chitu.ops import linear as linear_ops
from chitu.ops.activation import silu_and_mul

if TYPE_CHECKING:
    from chitu.layers.norm import PendingNorm


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype,
                       num_experts: int | None = None) -> None:
        """Register the layer's weight parameters: one [out, in] matrix, or one per expert when stacked."""

    @abstractmethod
    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        """Fill the weight (or expert slot `expert` of a stacked one) from the checkpoint: the output rows
        stack `parts`, each the weight of the module named by its prefix, cut to its shard."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias)."""

    def apply_normed(self, layer: nn.Module, x: PendingNorm, bias: torch.Tensor | None = None) -> torch.Tensor:
        """apply() to an input whose RMSNorm is still pending (layers/norm.py)."""
        return self.apply(layer, x.normed, bias)

    def apply_gated(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """apply() to silu(gate) * up of gate_up = [gate | up] (the gated MLP's down projection)."""
        return self.apply(layer, silu_and_mul(gate_up))

    def dense(self) -> LinearMethod:
        """The method holding this format's weights as dense matrices in the compute dtype, for a layer that
        reads its weight as a matrix (MLA's folded projections). The unquantized method dequantizes GGUF
        tensors as it reads them."""
        return UNQUANTIZED

    def stacked(self, layer: nn.Module):
        """A stacked experts' weight as the MoE operations take it: the dense [E, out, in] tensor, or an
        object with `shape` and `expert_linear(e, x)` (quantized experts, on the torch reference)."""
        return layer.weight


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight in the compute dtype; quantized checkpoint tensors (GGUF) are dequantized as read."""

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype,
                       num_experts: int | None = None) -> None:
        shape = (out_features, in_features) if num_experts is None else (num_experts, out_features, in_features)
        layer.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)

    def load(self, layer: nn.Module, reader: CheckpointReader, parts: list[tuple[str, Shard | None]],
             expert: int | None = None) -> None:
        target = layer.weight if expert is None else layer.weight[expert]
        rows = [self.read_part(reader, prefix, shard, target) for prefix, shard in parts]
        copy_into(target, rows[0] if len(rows) == 1 else torch.cat(rows, dim=0), f"{parts[0][0]}.weight")

    def dense(self) -> LinearMethod:
        return self

    def read_part(self, reader: CheckpointReader, prefix: str, shard: Shard | None, target: torch.Tensor) -> torch.Tensor:
        """The weight of module `prefix` cut to `shard`, in the target's dtype and on its device."""
        return reader.read(f"{prefix}.weight", target.dtype, target.device, shard)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_ops.linear(x, layer.weight, bias)

    def apply_normed(self, layer: nn.Module, x: PendingNorm, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight lets the norm fold into a single-row GEMV."""
        folded = x.project(layer.weight) if bias is None else None
        return folded if folded is not None else self.apply(layer, x.normed, bias)

    def apply_gated(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """The dense weight lets SiLU-and-mul fold into a single-row GEMV."""
        folded = linear_ops.gated_linear(gate_up, layer.weight)
        return folded if folded is not None else super().apply_gated(layer, gate_up)


UNQUANTIZED = UnquantizedLinearMethod()
