"""The routed experts of an MoE layer, stacked: gate/up [E, 2I, H] and down [E, H, I] for the experts
and columns this rank holds (ExpertPlacement). Checkpoints store them one by one
(`experts.{e}.gate_proj` ...; GGUF stacks them, its reader presents them the same way)."""
from __future__ import annotations

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader, Shard
from chitu.distributed.expert_placement import ExpertPlacement
from chitu.layers.context import ModelContext
from chitu.ops import moe as moe_ops


class _StackedWeight(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.method = ctx.quant.linear_method(prefix)
        self.method.create_weights(self, out_features, in_features, ctx.dtype, num_experts=num_experts)


class StackedExperts(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str, placement: ExpertPlacement):
        super().__init__()
        self.placement = placement
        local, columns, hidden = placement.experts.length, placement.columns.length, ctx.config.hidden_size
        self.gate_up = _StackedWeight(ctx, f"{prefix}.gate_up_proj", local, 2 * columns, hidden)
        self.down = _StackedWeight(ctx, f"{prefix}.down_proj", local, hidden, columns)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of sum_k weights[t, k] * expert_{ids[t, k]}(x[t]); the MoE block sums the shares."""
        return moe_ops.fused_experts(x, self.gate_up.method.stacked(self.gate_up), self.down.method.stacked(self.down),
                                     weights, ids, self.placement.experts.start)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        columns = self.placement.columns
        rows, cols = Shard(0, columns.start, columns.length), Shard(1, columns.start, columns.length)
        for local, expert in enumerate(range(self.placement.experts.start, self.placement.experts.end)):
            name = f"{prefix}.{expert}"
            self.gate_up.method.load(self.gate_up, reader, [(f"{name}.gate_proj", rows), (f"{name}.up_proj", rows)], local)
            self.down.method.load(self.down, reader, [(f"{name}.down_proj", cols)], local)
