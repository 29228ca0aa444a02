"""The gated MLP, down(silu(gate(x)) * up(x)), split over tensor ranks by intermediate columns."""
from __future__ import annotations

import torch
from torch import nn

from chitu.distributed.parallel_state import parallel_state
from chitu.distributed.sharding import Span, balanced_span
from chitu.layers.linear import ColumnParallelLinear, RowParallelLinear
from chitu.layers.context import ModelContext
from chitu.layers.norm import PendingNorm


class GatedMLP(nn.Module):
    """`gate_up_sources` names the checkpoint matrices: gate and up, or one that stacks gate over up (GLM-4).
    With reduce_results=False the ranks' partial outputs are left for the caller to sum (an MoE block
    sums its shared experts with its routed ones in one all-reduce)."""

    def __init__(self, ctx: ModelContext, prefix: str, intermediate_size: int, bias: bool = False,
                 gate_up_sources: tuple[str, ...] = ("gate_proj", "up_proj"), reduce_results: bool = True):
        super().__init__()
        state, hidden = parallel_state(), ctx.config.hidden_size
        columns = balanced_span(intermediate_size, state.tp_size, state.tp_rank)
        if len(gate_up_sources) == 1:
            source = gate_up_sources[0]
            parts = [(source, columns), (source, Span(intermediate_size + columns.start, columns.length))]
        else:
            parts = [(source, columns) for source in gate_up_sources]
        self.gate_up_proj = ColumnParallelLinear(hidden, parts, bias, ctx.dtype,
                                                 ctx.quant.linear_method(f"{prefix}.gate_up_proj"))
        self.down_proj = RowParallelLinear(columns, hidden, bias, ctx.dtype, ctx.quant.linear_method(f"{prefix}.down_proj"),
                                           reduce_results=reduce_results)

    takes_pending_norm = True  # gate_up_proj folds the norm before it (layers/norm.py)

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        return self.down_proj.forward_gated(self.gate_up_proj(x))
