"""A sparse MoE block: the router, the routed experts and optional always-on shared experts.

Every tensor rank of the stage holds the same tokens; each computes its experts' share (and its
columns of the shared experts), and one all-reduce over the stage sums them (expert_placement.py).
With ctx.experts_on_host (cpu_layer_num) the routed experts live in host memory and run on the CPU
(host_experts.py) while the device computes the shared experts.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from chitu.distributed.comm import tp_all_reduce
from chitu.distributed.expert_placement import ExpertPlacement
from chitu.distributed.parallel_state import parallel_state
from chitu.layers.context import ModelContext
from chitu.layers.mlp import GatedMLP
from chitu.layers.norm import PendingNorm
from chitu.layers.moe.experts import StackedExperts
from chitu.layers.moe.host_experts import run_on_host
from chitu.layers.moe.router import Router, RouterOptions
from chitu.ops import moe as moe_ops


class SparseMoE(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str, num_experts: int, intermediate_size: int,
                 router: RouterOptions, shared_intermediate_size: int = 0):
        super().__init__()
        self.gate = Router(num_experts, ctx.config.hidden_size, router)
        placement = ExpertPlacement.for_rank(parallel_state(), num_experts, intermediate_size)
        self.on_host = ctx.experts_on_host
        with torch.device("cpu") if self.on_host else contextlib.nullcontext():
            self.experts = StackedExperts(ctx, f"{prefix}.experts", placement)
        self.shared_experts = (GatedMLP(ctx, f"{prefix}.shared_experts", shared_intermediate_size, reduce_results=False)
                               if shared_intermediate_size else None)

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can capture this block (runner/cuda_graph.py): not on the torch reference; its
        experts on the host run as a host-function node (layers/moe/host_experts.py)."""
        return self.on_host or moe_ops.capturable(self.experts.gate_up.method.stacked(self.experts.gate_up))

    takes_pending_norm = True  # the router folds the norm before it (layers/norm.py)

    def forward(self, x: torch.Tensor | PendingNorm) -> torch.Tensor:
        weights, ids = self.gate(x)
        if isinstance(x, PendingNorm):
            x = x.normed
        # The shared experts first: the device computes them while the host runs experts it holds.
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        out = run_on_host(self.experts, x, weights, ids) if self.on_host else self.experts(x, weights, ids)
        return tp_all_reduce(out if shared is None else out + shared)
