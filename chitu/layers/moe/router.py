"""The MoE router (the checkpoint's `gate`): scores every expert for each token and picks its top-k."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from chitu.checkpoint import CheckpointReader
from chitu.layers.loadable import copy_into
from chitu.layers.norm import PendingNorm
from chitu.ops import linear as linear_ops
from chitu.ops import moe as moe_ops


@dataclass(frozen=True)
class RouterOptions:
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = False        # rescale the chosen weights to sum to 1 (Qwen3-MoE norm_topk_prob, Mixtral)
    correction_bias: bool = False    # e_score_correction_bias steers the choice (DeepSeek-V3, GLM-4.5)
    num_groups: int = 1              # n_group: experts ranked by group first ...
    top_groups: int = 1              # topk_group: ... of which these many groups are eligible, ...
    group_by_max: bool = False       # ... ranked by their best score (DeepSeek-V2), not their two best
    scaling_factor: float = 1.0      # routed_scaling_factor, applied to the chosen weights


class Router(nn.Module):
    """Replicated on every rank, and run in float32 whatever the compute dtype: routing is a discrete choice."""

    def __init__(self, num_experts: int, hidden_size: int, options: RouterOptions):
        super().__init__()
        self.options = options
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = (nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
                                        if options.correction_bias else None)

    def forward(self, x: torch.Tensor | PendingNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, top_k] float32, expert ids [T, top_k])."""
        o = self.options
        logits = x.project(self.weight, torch.float32) if isinstance(x, PendingNorm) else None
        if logits is None:
            logits = linear_ops.float_linear(x.normed if isinstance(x, PendingNorm) else x, self.weight)
        return moe_ops.select_experts(logits, o.top_k, o.scoring, o.renormalize, self.e_score_correction_bias,
                                      o.num_groups, o.top_groups, o.scaling_factor, o.group_by_max)

    def load_weights(self, reader: CheckpointReader, prefix: str) -> None:
        for name, param in self.named_parameters():
            copy_into(param, reader.read(f"{prefix}.{name}", param.dtype, param.device), f"{prefix}.{name}")
